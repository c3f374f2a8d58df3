"""CPU feature detection: bf16 autocast only where the flags say the CPU computes bf16 natively."""

import pytest
import torch

from finegrain.cpu import FrozenWeightsInBF16, cpu_flags, native_bf16, training_autocast
from finegrain.model.llama import Llama
from finegrain.peft import LoraConfig, apply_lora

ZEN1 = "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr sse sse2 ht syscall nx mmxext fxsr_opt pdpe1gb avx avx2 fma bmi1 bmi2 sha_ni"
SAPPHIRE_RAPIDS = "fpu sse sse2 avx avx2 fma avx512f avx512bw avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8"
COOPER_LAKE = "fpu sse sse2 avx avx2 fma avx512f avx512bw avx512_bf16"


def cpuinfo(tmp_path, flags: str):
    path = tmp_path / "cpuinfo"
    processor = f"processor\t: {{}}\nvendor_id\t: X\nmodel name\t: A CPU\nflags\t\t: {flags}\n\n"
    path.write_text(processor.format(0) + processor.format(1))
    return path


@pytest.mark.parametrize(("flags", "native"), [(ZEN1, False), (SAPPHIRE_RAPIDS, True), (COOPER_LAKE, True)],
                         ids=["zen1", "amx", "avx512-bf16"])
def test_native_bf16_follows_the_flags(tmp_path, flags, native):
    assert native_bf16(cpuinfo(tmp_path, flags)) is native


def test_flags_are_whole_words(tmp_path):
    """`avx512_bf16_extra` or `no_amx_bf16` are other flags, not the ones we look for."""
    path = cpuinfo(tmp_path, "avx2 avx512_bf16_extra no_amx_bf16")
    assert "avx2" in cpu_flags(path)
    assert not native_bf16(path)


def test_no_cpuinfo_means_no_bf16(tmp_path):
    assert cpu_flags(tmp_path / "missing") == frozenset()
    assert not native_bf16(tmp_path / "missing")


def test_training_autocast_runs_matmuls_in_bf16_only_when_native(tmp_path):
    a, b = torch.randn(4, 8), torch.randn(8, 2)
    with training_autocast(True, cpuinfo(tmp_path, SAPPHIRE_RAPIDS)):
        assert (a @ b).dtype == torch.bfloat16
    with training_autocast(False, cpuinfo(tmp_path, SAPPHIRE_RAPIDS)):
        assert (a @ b).dtype == torch.float32
    with training_autocast(True, cpuinfo(tmp_path, ZEN1)):
        assert (a @ b).dtype == torch.float32


def test_frozen_weights_in_bf16_hold_only_the_frozen_matrices_and_release_them_bit_for_bit(tiny_config):
    model = Llama(tiny_config)
    apply_lora(model, LoraConfig(r=2, targets=["q_proj", "v_proj"]))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    weights = FrozenWeightsInBF16(model)
    weights.hold()
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    assert dtypes["model.layers.0.self_attn.q_proj.weight"] == dtypes["model.layers.1.mlp.down_proj.weight"] == torch.bfloat16
    assert dtypes["model.embed_tokens.weight"] == torch.float32  # a lookup table, shared with the tied head
    assert dtypes["model.layers.0.self_attn.q_proj.lora_A.weight"] == torch.float32  # trained
    assert dtypes["model.layers.0.input_layernorm.weight"] == torch.float32
    weights.release()
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32 and torch.equal(p, before[name]), name


def test_frozen_weights_in_bf16_leave_skipped_modules_float32(tiny_config):
    model = Llama(tiny_config)  # all frozen: nothing trains
    model.requires_grad_(False)
    weights = FrozenWeightsInBF16(model, skip=model.model.layers[:1])  # below a trainer's start_layer
    weights.hold()
    assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.float32
    assert model.model.layers[1].mlp.up_proj.weight.dtype == torch.bfloat16
    weights.release()
    assert not FrozenWeightsInBF16(model, enabled=False).params
