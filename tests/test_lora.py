"""LoRA: injection, freezing, merging, and parity with `peft` in both directions of the adapter file format."""

from __future__ import annotations

import copy
import json
import math

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file
from torch import nn
from torch.testing import assert_close

from finegrain.errors import FinegrainError
from finegrain.model.config import LlamaConfig
from finegrain.model.llama import Llama
from finegrain.model.linear import Linear
from finegrain.peft import (
    METHODS,
    LoraConfig,
    LoraLinear,
    adapter_state_dict,
    apply_lora,
    load_adapter,
    lora_layers,
    merge_adapters,
    read_adapter,
    save_adapter,
    trainable_parameters,
    unload_adapters,
    unmerge_adapters,
)
from finegrain.peft.lora import LoraMatmul, keep_mask

# peft calls a transformers API that transformers 5 deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

DECODER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def hf_config() -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        num_labels=3,
    )


@pytest.fixture(scope="module")
def hf_model(hf_config) -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(hf_config).eval()


@pytest.fixture
def ours(hf_config, hf_model) -> Llama:
    model = Llama(LlamaConfig.from_hf(hf_config.to_dict()))
    model.load_state_dict(hf_model.state_dict())
    return model.eval()


@pytest.fixture(scope="module")
def input_ids() -> torch.Tensor:
    return torch.randint(1, 128, (2, 7), generator=torch.Generator().manual_seed(1))


def randomize_lora_B(model: nn.Module, seed: int = 2) -> None:
    """LoRA starts with B = 0, which would make every comparison trivially pass."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=generator) * 0.1)


def wrapped(model: nn.Module) -> set[str]:
    return set(lora_layers(model))


def peft_wrapped(peft_model: peft.PeftModel) -> set[str]:
    return {n for n, m in peft_model.base_model.model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}


# ---------------------------------------------------------------------------------------------- inject


def test_apply_lora_freezes_everything_but_the_adapters(ours):
    apply_lora(ours, LoraConfig())
    trainable = {name for name, p in ours.named_parameters() if p.requires_grad}
    expected = {
        f"model.layers.{i}.self_attn.{proj}.{ab}.weight"
        for i in range(2)
        for proj in ("q_proj", "v_proj")
        for ab in ("lora_A", "lora_B")
    }
    assert trainable == expected
    assert set(adapter_state_dict(ours)) == expected
    assert len(trainable_parameters(ours)) == len(expected)
    assert METHODS["lora"] is LoraConfig and LoraConfig.layer is LoraLinear


def test_modules_to_save_stay_trainable_and_get_no_adapter(ours):
    apply_lora(ours, LoraConfig(targets="all-linear", modules_to_save=["lm_head"]))
    assert isinstance(ours.lm_head, nn.Linear) and ours.lm_head.weight.requires_grad
    assert not ours.model.embed_tokens.weight.requires_grad
    assert not ours.model.layers[0].self_attn.q_proj.weight.requires_grad


def test_base_weight_keeps_its_key_and_output_starts_unchanged(ours, hf_model, input_ids):
    expected = hf_model(input_ids).logits
    apply_lora(ours, LoraConfig(targets="all-linear"))
    missing, unexpected = ours.load_state_dict(hf_model.state_dict(), strict=False)
    assert unexpected == [] and set(missing) == set(adapter_state_dict(ours))
    with torch.no_grad():
        assert_close(ours(input_ids), expected, atol=1e-5, rtol=1e-5)


def test_forward_matches_the_lora_formula_with_rslora():
    torch.manual_seed(0)
    linear = nn.Linear(16, 12, bias=True)
    layer = LoraLinear.from_linear(linear, r=4, alpha=8, use_rslora=True)
    nn.init.normal_(layer.lora_B.weight)
    assert layer.scaling == pytest.approx(8 / math.sqrt(4))
    assert LoraConfig(r=4, alpha=8, use_rslora=True).scaling == pytest.approx(4.0)
    assert LoraConfig(r=4, alpha=8).scaling == pytest.approx(2.0)
    x = torch.randn(3, 5, 16)
    A, B = layer.lora_A.weight, layer.lora_B.weight
    assert_close(layer(x), linear(x) + x @ A.T @ B.T * (8 / 2), atol=1e-5, rtol=1e-5)


def test_adapter_of_a_half_precision_layer_is_float32():
    layer = LoraLinear.from_linear(nn.Linear(16, 8, dtype=torch.bfloat16), r=2, alpha=4)
    assert layer.weight.dtype == torch.bfloat16 and layer.lora_A.weight.dtype == torch.float32
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    unmerged = layer(x)
    assert unmerged.dtype == torch.bfloat16
    layer.merge()
    assert_close(layer(x), unmerged, atol=0.1, rtol=0.05)


def test_dropout_touches_only_the_adapter_and_grads_reach_only_the_adapter(ours, input_ids):
    apply_lora(ours, LoraConfig(dropout=0.5))
    base = ours(input_ids)  # eval: dropout off
    ours.train()
    # B = 0, so dropout on the adapter input cannot change the output.
    assert_close(ours(input_ids), base)
    randomize_lora_B(ours)
    ours(input_ids).logsumexp(-1).mean().backward()
    q = ours.model.layers[0].self_attn.q_proj
    assert q.weight.grad is None and q.lora_A.weight.grad is not None and q.lora_B.weight.grad is not None


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_lora_autograd_function_equals_autograd_on_the_plain_expression(dropout):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 7, dtype=torch.double, requires_grad=True)
    weight, bias = torch.randn(4, 7, dtype=torch.double), torch.randn(4, dtype=torch.double)
    A = torch.randn(2, 7, dtype=torch.double, requires_grad=True)
    B = torch.randn(4, 2, dtype=torch.double, requires_grad=True)
    keep = keep_mask(x.shape, dropout, x.device) if dropout else None
    dropped = x if keep is None else x * keep / (1 - dropout)
    plain = x @ weight.T + bias + dropped @ A.T @ B.T * 1.5
    ours = LoraMatmul.apply(x, weight, bias, A, B, 1.5 / (1 - dropout), keep)
    assert_close(ours, plain)
    grad = torch.randn_like(plain)
    assert_close(torch.autograd.grad(ours, (x, A, B), grad), torch.autograd.grad(plain, (x, A, B), grad))
    assert torch.autograd.gradcheck(lambda x, A, B: LoraMatmul.apply(x, weight, bias, A, B, 1.5, keep), (x, A, B))


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16], ids=["float32-base", "bf16-base"])
def test_under_bf16_autocast_lora_computes_in_bf16_with_float32_adapter_grads(weight_dtype):
    """train.bf16: the lean path runs what autocast runs for the plain expression, in bf16,
    with a float32 or a bf16 frozen base (the copies of finegrain.train.precision)."""
    torch.manual_seed(0)
    layer = LoraLinear.from_linear(nn.Linear(64, 48, bias=True), r=4, alpha=8)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(3, 5, 64)
    A, B = layer.lora_A.weight, layer.lora_B.weight
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = nn.functional.linear(x, layer.weight, layer.bias) + nn.functional.linear(nn.functional.linear(x, A), B) * 2
    layer.weight.data = layer.weight.data.to(weight_dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = layer(x)
    assert ours.dtype == plain.dtype == torch.bfloat16
    assert_close(ours.float(), plain.float(), atol=0.05, rtol=0.02)
    grad = torch.randn_like(plain)
    ours_grads = torch.autograd.grad(ours, (A, B), grad)
    assert {g.dtype for g in ours_grads} == {torch.float32}
    for ours_grad, plain_grad in zip(ours_grads, torch.autograd.grad(plain, (A, B), grad)):
        assert_close(ours_grad, plain_grad, atol=0.05 * plain_grad.abs().max().item(), rtol=0.02)


def test_keep_mask_drops_each_element_with_probability_p():
    torch.manual_seed(0)
    for p in (0.05, 0.5):
        keep = keep_mask((400, 1001), p, torch.device("cpu"))
        assert keep.shape == (400, 1001) and keep.dtype == torch.bool
        assert abs((~keep).float().mean().item() - p) < 0.003  # 400,400 draws: standard error <= 0.0008
        # Every 16-bit lane of the 64-bit draws, the top one included, drops at rate p.
        lanes = (~keep).flatten()[: 400 * 1000].view(-1, 4).float().mean(0)
        assert (lanes - p).abs().max() < 0.006
    # p within 2**-17 of 1 rounds to 1 - 2**-16, not past the 16-bit range (which would keep everything).
    assert (~keep_mask((400, 1001), 1 - 1e-6, torch.device("cpu"))).float().mean().item() > 0.999


def test_all_linear_targets_every_decoder_linear_but_never_lm_head(ours):
    apply_lora(ours, LoraConfig(targets="all-linear"))
    attention = ("q_proj", "k_proj", "v_proj", "o_proj")
    paths = {n: f"self_attn.{n}" if n in attention else f"mlp.{n}" for n in DECODER_LINEARS}
    assert wrapped(ours) == {f"model.layers.{i}.{paths[n]}" for i in range(2) for n in DECODER_LINEARS}
    assert isinstance(ours.lm_head, nn.Linear)


def test_layers_restrict_the_adapted_layers(ours):
    apply_lora(ours, LoraConfig(targets=("q_proj", "down_proj"), layers=[1]))
    assert wrapped(ours) == {"model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj"}
    assert all(not p.requires_grad for p in ours.model.layers[0].parameters())


def test_a_single_name_and_a_regex_are_targets_too(ours, hf_config, hf_model):
    apply_lora(ours, LoraConfig(targets="o_proj"))
    assert wrapped(ours) == {"model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"}
    other = Llama(LlamaConfig.from_hf(hf_config.to_dict()))
    apply_lora(other, LoraConfig(targets=r".*\.0\.mlp\.(up|gate)_proj"))
    assert wrapped(other) == {"model.layers.0.mlp.up_proj", "model.layers.0.mlp.gate_proj"}


def test_bad_targets_and_layers_are_user_errors(ours):
    with pytest.raises(FinegrainError, match=r"unknown target 'qproj'.*q_proj.*v_proj"):
        apply_lora(ours, LoraConfig(targets=("qproj", "v_proj")))
    with pytest.raises(FinegrainError, match=r"lora.layers: \[5\] not in the model"):
        apply_lora(ours, LoraConfig(layers=[5]))
    with pytest.raises(FinegrainError, match="not a valid regular expression"):
        LoraConfig(targets="q_proj(")
    with pytest.raises(FinegrainError, match="lora.r"):
        LoraConfig(r=0)
    assert wrapped(ours) == set()  # a failed call leaves the model untouched
    apply_lora(ours, LoraConfig())
    with pytest.raises(FinegrainError, match="already has an adapter named .default."):
        apply_lora(ours, LoraConfig())


# ---------------------------------------------------------------------------------------------- merge


def test_merged_output_equals_unmerged_and_unmerge_restores_the_base(ours, input_ids):
    base_weights = {k: v.clone() for k, v in ours.state_dict().items()}
    apply_lora(ours, LoraConfig(targets="all-linear", r=4))
    randomize_lora_B(ours)
    with torch.no_grad():
        unmerged = ours(input_ids)
        merge_adapters(ours)
        assert all(layer.merged for layer in lora_layers(ours).values())
        q_weight = ours.model.layers[0].self_attn.q_proj.weight
        assert not torch.equal(q_weight, base_weights["model.layers.0.self_attn.q_proj.weight"])
        assert_close(ours(input_ids), unmerged, atol=1e-5, rtol=1e-5)
        merge_adapters(ours)  # merging twice must not add the update twice
        assert_close(ours(input_ids), unmerged, atol=1e-5, rtol=1e-5)
        unmerge_adapters(ours)
        assert_close(ours(input_ids), unmerged, atol=1e-5, rtol=1e-5)
    state = ours.state_dict()
    for key, value in base_weights.items():
        assert_close(state[key], value, atol=1e-6, rtol=0)


def test_unload_leaves_plain_linears_with_the_update_merged(ours, input_ids):
    apply_lora(ours, LoraConfig())
    randomize_lora_B(ours)
    with torch.no_grad():
        expected = ours(input_ids)
        unload_adapters(ours)
        assert type(ours.model.layers[0].self_attn.q_proj) is Linear and not lora_layers(ours)
        assert_close(ours(input_ids), expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- PEFT files


@pytest.mark.parametrize(
    "config",
    [
        LoraConfig(r=4, alpha=8),
        LoraConfig(r=4, alpha=16, targets="all-linear", use_rslora=True, layers=[1]),
        LoraConfig(r=2, alpha=4, targets=r".*\.0\.mlp\.(up|gate)_proj"),
    ],
    ids=["q_v", "all_linear_rslora_layer1", "regex"],
)
def test_peft_loads_what_we_save(ours, hf_model, input_ids, tmp_path, config):
    apply_lora(ours, config)
    randomize_lora_B(ours)
    save_adapter(ours, config, tmp_path, base_model_name_or_path="tiny-llama", task_type="CAUSAL_LM")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]

    written = json.loads((tmp_path / "adapter_config.json").read_text())
    peft_keys = set(peft.LoraConfig().to_dict())
    assert set(written) <= peft_keys, set(written) - peft_keys
    assert written["peft_type"] == "LORA" and written["base_model_name_or_path"] == "tiny-llama"
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert set(tensors) == {"base_model.model." + k for k in adapter_state_dict(ours)}

    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(hf_model), tmp_path).eval()
    assert peft_wrapped(peft_model) == wrapped(ours)
    with torch.no_grad():
        expected = peft_model(input_ids).logits
        assert not torch.allclose(expected, hf_model(input_ids).logits, atol=1e-3)
        assert_close(ours(input_ids), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "peft_kwargs",
    [
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        dict(r=4, lora_alpha=8, target_modules="all-linear", use_rslora=True),
        dict(r=2, lora_alpha=4, target_modules=["k_proj", "down_proj"], layers_to_transform=[0]),
    ],
    ids=["q_v", "all_linear_rslora", "layer0"],
)
def test_we_load_what_peft_saves(ours, hf_model, input_ids, tmp_path, peft_kwargs):
    torch.manual_seed(3)
    # init_lora_weights=False gives a random B, so the adapter changes the output.
    config = peft.LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, **peft_kwargs)
    peft_model = peft.get_peft_model(copy.deepcopy(hf_model), config).eval()
    peft_model.save_pretrained(tmp_path)

    loaded = load_adapter(ours, tmp_path)
    assert loaded.r == peft_kwargs["r"] and loaded.use_rslora == peft_kwargs.get("use_rslora", False)
    assert wrapped(ours) == peft_wrapped(peft_model)
    ours.eval()
    with torch.no_grad():
        expected = peft_model(input_ids).logits
        assert not torch.allclose(expected, hf_model(input_ids).logits, atol=1e-3)
        assert_close(ours(input_ids), expected, atol=1e-5, rtol=1e-5)


def last_real_token_logits(hidden: torch.Tensor, ids: torch.Tensor, pad: int, weight: torch.Tensor) -> torch.Tensor:
    last = (ids != pad).long().cumsum(-1).argmax(-1)  # (B,) index of the last non-pad token (right padding)
    return hidden[torch.arange(ids.shape[0]), last] @ weight.T  # (B, num_labels)


def test_peft_loads_our_sequence_classification_head(hf_config, tmp_path):
    torch.manual_seed(4)
    hf_cls = transformers.LlamaForSequenceClassification(hf_config).eval()
    ours = Llama(LlamaConfig.from_hf(hf_config.to_dict()))
    missing, unexpected = ours.load_state_dict(hf_cls.state_dict(), strict=False)
    assert missing == ["lm_head.weight"] and unexpected == ["score.weight"]
    config = LoraConfig(r=4, alpha=8, targets="all-linear")
    apply_lora(ours.eval(), config)
    randomize_lora_B(ours)
    head = torch.randn(3, 64)
    save_adapter(
        ours,
        config,
        tmp_path,
        base_model_name_or_path="tiny-llama",
        extra_tensors={"score.weight": head},
        modules_to_save=["score"],
        task_type="SEQ_CLS",
    )
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert_close(tensors["base_model.model.score.weight"], head)

    # A fresh classifier: same backbone, a different random head that the adapter must replace.
    base = transformers.AutoModelForSequenceClassification.from_config(hf_config)
    base.load_state_dict({**hf_cls.state_dict(), "score.weight": torch.zeros(3, 64)})
    peft_model = peft.PeftModel.from_pretrained(base, tmp_path).eval()
    assert_close(peft_model.base_model.model.score.weight, head)

    ids = torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, 0, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        expected = last_real_token_logits(ours.model(ids, mask), ids, 0, head)
        assert_close(peft_model(input_ids=ids, attention_mask=mask).logits, expected, atol=1e-5, rtol=1e-5)


class Classifier(nn.Module):
    """The layout of `LlamaForSequenceClassification`: a backbone `model` and a head `score`."""

    def __init__(self, backbone: nn.Module, num_labels: int):
        super().__init__()
        self.model = backbone
        self.score = nn.Linear(backbone.config.hidden_size, num_labels, bias=False)


def test_a_head_inside_the_model_is_trained_saved_and_loaded_by_both(hf_config, tmp_path):
    torch.manual_seed(6)
    hf_cls = transformers.LlamaForSequenceClassification(hf_config).eval()
    backbone_state = {k.removeprefix("model."): v for k, v in hf_cls.state_dict().items() if k.startswith("model.")}

    def classifier() -> Classifier:
        backbone = Llama(LlamaConfig.from_hf(hf_config.to_dict())).model
        backbone.load_state_dict(backbone_state)
        return Classifier(backbone, 3).eval()

    ours = classifier()
    config = LoraConfig(r=4, alpha=8, targets=("q_proj", "v_proj"), modules_to_save=["score"])
    apply_lora(ours, config)
    assert ours.score.weight.requires_grad and type(ours.score) is nn.Linear
    randomize_lora_B(ours)
    save_adapter(ours, config, tmp_path, base_model_name_or_path="tiny-llama", task_type="SEQ_CLS")
    assert json.loads((tmp_path / "adapter_config.json").read_text())["modules_to_save"] == ["score"]

    ids = torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, 0, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        expected = last_real_token_logits(ours.model(ids, mask), ids, 0, ours.score.weight)
        peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(hf_cls), tmp_path).eval()
        assert_close(peft_model(input_ids=ids, attention_mask=mask).logits, expected, atol=1e-5, rtol=1e-5)
        again = classifier()
        load_adapter(again, tmp_path)
        assert_close(again.score.weight, ours.score.weight, atol=0, rtol=0)
        assert_close(last_real_token_logits(again.model(ids, mask), ids, 0, again.score.weight), expected)


def test_we_read_the_head_of_a_peft_sequence_classification_adapter(hf_config, tmp_path):
    torch.manual_seed(5)
    hf_cls = transformers.LlamaForSequenceClassification(hf_config).eval()
    state = hf_cls.state_dict()
    config = peft.LoraConfig(
        task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    peft_model = peft.get_peft_model(hf_cls, config).eval()
    with torch.no_grad():
        peft_model.base_model.model.score.modules_to_save["default"].weight.normal_()
    peft_model.save_pretrained(tmp_path)

    lora_config, tensors = read_adapter(tmp_path)
    head = tensors["score.weight"]
    assert_close(head, peft_model.base_model.model.score.modules_to_save["default"].weight)
    assert "score" in lora_config.modules_to_save

    ours = Llama(LlamaConfig.from_hf(hf_config.to_dict()))
    ours.load_state_dict(state, strict=False)
    with pytest.raises(FinegrainError, match=r"adapter_model.safetensors: 1 tensors have no place.*score.weight"):
        load_adapter(ours, tmp_path)
    ours = Llama(LlamaConfig.from_hf(hf_config.to_dict()))
    ours.load_state_dict(state, strict=False)
    load_adapter(ours, tmp_path, strict=False)
    ids = torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, 0, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        expected = peft_model(input_ids=ids, attention_mask=mask).logits
        assert_close(last_real_token_logits(ours.eval().model(ids, mask), ids, 0, head), expected, atol=1e-5, rtol=1e-5)


def test_missing_or_corrupt_adapter_files_name_the_file(ours, tmp_path):
    with pytest.raises(FinegrainError, match=r"adapter_config.json: not found"):
        load_adapter(ours, tmp_path)
    config = LoraConfig()
    apply_lora(ours, config)
    save_adapter(ours, config, tmp_path, base_model_name_or_path="tiny-llama")
    fresh = lambda: Llama(ours.config)  # noqa: E731

    (tmp_path / "adapter_model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(FinegrainError, match=r"adapter_model.safetensors: cannot be read"):
        load_adapter(fresh(), tmp_path)
    (tmp_path / "adapter_model.safetensors").unlink()
    with pytest.raises(FinegrainError, match=r"adapter_model.safetensors: not found"):
        load_adapter(fresh(), tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(FinegrainError, match=r"adapter_config.json: not valid JSON"):
        load_adapter(fresh(), tmp_path)
    # (a LORA file with use_dora true is read as peft.method dora: tests/test_dora.py)
    transposed = {"peft_type": "LORA", "r": 8, "target_modules": ["q_proj"], "fan_in_fan_out": True}
    (tmp_path / "adapter_config.json").write_text(json.dumps(transposed))
    with pytest.raises(FinegrainError, match=r"adapter_config.json: fan_in_fan_out=True is not supported"):
        load_adapter(fresh(), tmp_path)


def test_save_refuses_merged_adapters(ours, tmp_path):
    config = LoraConfig()
    apply_lora(ours, config)
    merge_adapters(ours)
    with pytest.raises(FinegrainError, match="unmerge_adapters"):
        save_adapter(ours, config, tmp_path, base_model_name_or_path="tiny-llama")
