"""The method-neutral adapter layer: the METHODS table the run config reads, and named adapters
with an active one, checked against PEFT's `load_adapter` / `set_adapter` on the same files."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
import transformers
from torch.testing import assert_close

from finegrain.config import PEFT_METHODS, RunConfig
from finegrain.errors import FinegrainError
from finegrain.model.config import LlamaConfig
from finegrain.model.llama import Llama
from finegrain.peft import (
    METHODS,
    LoraConfig,
    adapter_layers,
    adapter_state_dict,
    inject,
    load_adapter,
    method_config,
    save_adapter,
    set_adapter,
)

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


@pytest.fixture(scope="module")
def hf_model() -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def ours_of(hf_model: transformers.LlamaForCausalLM) -> Llama:
    model = Llama(LlamaConfig.from_hf(hf_model.config.to_dict()))
    model.load_state_dict(hf_model.state_dict())
    return model.eval()


@pytest.fixture(scope="module")
def input_ids() -> torch.Tensor:
    return torch.randint(1, 128, (2, 7), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def peft_dirs(hf_model, tmp_path_factory) -> dict[str, object]:
    """Two PEFT-saved adapters of different targets, ranks and layers, with random B (so each
    changes the output)."""
    root = tmp_path_factory.mktemp("adapters")
    options = {
        "a": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        "b": dict(r=2, lora_alpha=4, target_modules=["v_proj", "down_proj"], layers_to_transform=[1], use_rslora=True),
    }
    for seed, (name, kwargs) in enumerate(options.items()):
        torch.manual_seed(10 + seed)
        config = peft.LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, **kwargs)
        peft.get_peft_model(copy.deepcopy(hf_model), config).save_pretrained(root / name)
    return {name: root / name for name in options}


def test_the_method_table_is_what_the_run_config_offers():
    assert set(METHODS) == set(PEFT_METHODS)
    for name, method in METHODS.items():
        assert method.name == name and hasattr(RunConfig(), name)  # its options: the section named after it
    assert len({method.peft_type for method in METHODS.values()}) == len(METHODS)


def test_method_config_reads_the_run_config_section_and_names_an_unknown_method():
    section = RunConfig().lora
    section.r, section.rslora, section.targets = 4, True, "all-linear"
    config = method_config("lora", section, layers=[1], modules_to_save=["score"])
    assert config == LoraConfig(r=4, alpha=16.0, dropout=0.05, targets="all-linear", use_rslora=True, layers=[1], modules_to_save=["score"])
    with pytest.raises(FinegrainError, match="peft.method: 'dora' is unknown; use one of lora"):
        method_config("dora", section, layers=None, modules_to_save=[])


def test_named_adapters_switch_like_peft_set_adapter(hf_model, peft_dirs, input_ids):
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(hf_model), peft_dirs["a"], adapter_name="a").eval()
    peft_model.load_adapter(peft_dirs["b"], adapter_name="b")
    ours = ours_of(hf_model)
    load_adapter(ours, peft_dirs["a"], adapter_name="a")
    load_adapter(ours, peft_dirs["b"], adapter_name="b")
    layers = adapter_layers(ours).values()
    with torch.no_grad():
        bare = hf_model(input_ids).logits
        for name in ("a", "b", "a"):
            peft_model.set_adapter(name)
            set_adapter(layers, name)
            expected = peft_model(input_ids).logits
            assert not torch.allclose(expected, bare, atol=1e-3)
            assert_close(ours(input_ids), expected, atol=1e-5, rtol=1e-5)
        set_adapter(layers, None)
        assert_close(ours(input_ids), bare, atol=1e-5, rtol=1e-5)
    # A layer only "b" adapts runs bare while "a" is active, as in PEFT.
    set_adapter(layers, "a")
    assert ours.model.layers[1].mlp.down_proj.active_adapter is None


def test_the_active_adapter_is_what_state_dict_and_save_see(hf_model, peft_dirs, input_ids, tmp_path):
    """Adapter "b" loaded beside "a" saves to the same bytes as "b" loaded alone, under PEFT's names."""
    alone, shared = ours_of(hf_model), ours_of(hf_model)
    config = load_adapter(alone, peft_dirs["b"])
    load_adapter(shared, peft_dirs["a"], adapter_name="a")
    load_adapter(shared, peft_dirs["b"], adapter_name="b")
    assert set(adapter_state_dict(shared)) == set(adapter_state_dict(alone))
    assert all(".lora_A.b." not in key for key in shared.state_dict())  # no adapter name in the keys
    save_adapter(alone, config, tmp_path / "alone", base_model_name_or_path="tiny")
    save_adapter(shared, config, tmp_path / "shared", base_model_name_or_path="tiny")
    for file in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "alone" / file).read_bytes() == (tmp_path / "shared" / file).read_bytes()


def test_inject_trains_only_the_new_adapter(hf_model):
    ours = ours_of(hf_model)
    inject(ours, LoraConfig(targets=["q_proj"]), adapter_name="first")
    first = ours.model.layers[0].self_attn.q_proj.adapters["first"]
    inject(ours, LoraConfig(targets=["q_proj", "v_proj"], r=2), adapter_name="second")
    trainable = {name for name, p in ours.named_parameters() if p.requires_grad}
    assert trainable == {
        f"model.layers.{i}.self_attn.{proj}.lora_{ab}.weight" for i in range(2) for proj in ("q_proj", "v_proj") for ab in "AB"
    }
    assert ours.model.layers[0].self_attn.q_proj.lora_A.weight.shape[0] == 2  # "second" is active
    assert ours.model.layers[0].self_attn.q_proj.adapters["first"] is first
    with pytest.raises(FinegrainError, match="already has an adapter named 'first'"):
        inject(ours, LoraConfig(), adapter_name="first")
