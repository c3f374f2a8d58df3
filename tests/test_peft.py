"""The method-neutral adapter layer: the METHODS table the run config reads, and named adapters
with an active one, checked against PEFT's `load_adapter` / `set_adapter` on the same files."""

from __future__ import annotations

import copy
import dataclasses

import peft
import pytest
import torch
from torch.testing import assert_close

from finegrain.config import RunConfig, load_config
from finegrain.errors import FinegrainError
from finegrain.peft import (
    METHODS,
    LoraConfig,
    adapter_layers,
    adapter_state_dict,
    inject,
    load_adapter,
    method_config,
    method_options,
    save_adapter,
    set_adapter,
)
from peft_fixtures import hf_model, input_ids, ours_of  # noqa: F401 (fixtures)

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


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


def test_every_method_of_the_table_reads_its_options_from_defaults():
    for name, method in METHODS.items():
        assert method.name == name and dataclasses.is_dataclass(method.options)
        config = method.from_section(method.options(), layers=None, modules_to_save=["score"])
        assert isinstance(config, method) and config.modules_to_save == ["score"]
    # one method per file type, or per flag a file of a shared type sets (DoRA: LORA with use_dora)
    assert len({(method.peft_type, getattr(method, "peft_flag", None)) for method in METHODS.values()}) == len(METHODS)


def test_method_config_reads_the_lora_section_and_resolves_layers_from_the_top():
    config = RunConfig()
    config.lora.r, config.lora.rslora, config.lora.targets, config.lora.layers = 4, True, "all-linear", [-1]
    adapter = method_config(config, num_layers=2, modules_to_save=["score"])
    assert adapter == LoraConfig(r=4, alpha=16.0, dropout=0.05, targets="all-linear", use_rslora=True, layers=[1], modules_to_save=["score"])
    config.lora.layers = [-3]
    with pytest.raises(FinegrainError, match=r"lora.layers: \[-3\] is outside the model's 2 layers"):
        method_config(config, num_layers=2, modules_to_save=[])


@dataclasses.dataclass
class ScaleOptions:
    targets: list[str] = dataclasses.field(default_factory=lambda: ["v_proj"])
    layers: list[int] | None = None
    init: float = 1.0


@dataclasses.dataclass
class ScaleConfig:
    """A method that is one class and one table line, as a new method file declares it."""

    name = "scale"
    options = ScaleOptions
    targets: list[str]
    layers: list[int] | None
    init: float
    modules_to_save: list[str] | None

    @classmethod
    def from_section(cls, section, layers, modules_to_save):
        return cls(section.targets, layers, section.init, modules_to_save)


def test_a_new_method_takes_its_options_from_the_peft_section_with_their_lines(tmp_path, monkeypatch):
    monkeypatch.setitem(METHODS, "scale", ScaleConfig)
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  dataset: sms_spam\npeft:\n  method: scale\n  layers: [-1]\n  init: 0.5\n")
    config = load_config(path)
    assert method_config(config, num_layers=3, modules_to_save=["score"]) == ScaleConfig(["v_proj"], [2], 0.5, ["score"])
    path.write_text("data:\n  dataset: sms_spam\npeft:\n  method: scale\n  int: 0.5\n")
    with pytest.raises(FinegrainError, match=r"c.yaml:5: unknown key 'peft.int'; did you mean 'peft.init'\?"):
        method_options(load_config(path))
    path.write_text("data:\n  dataset: sms_spam\nlora:\n  r: 4\n  layers: [-2, -1]\n")
    with pytest.warns(UserWarning, match=r"peft.method: scale does not take lora.r; it is left out"):
        carried = method_config(load_config(path, ["peft.method=scale"]), num_layers=3, modules_to_save=[])
    assert carried.layers == [1, 2]  # switching the method on a LoRA config keeps the options both take
    path.write_text("data:\n  dataset: sms_spam\npeft:\n  method: scael\n")
    with pytest.raises(FinegrainError, match=r"c.yaml:4: peft.method: 'scael' is unknown; use one of lora, (.+, )?scale"):
        method_options(load_config(path))


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


def test_train_names_the_line_of_an_unknown_method_and_creates_nothing(tmp_path, capsys):
    from finegrain.cli import main

    config = tmp_path / "c.yaml"
    config.write_text("data:\n  dataset: rotten_tomatoes\npeft:\n  method: dorra\n")
    assert main(["train", str(config), "--output", str(tmp_path / "run")]) != 0
    assert f"{config}:4: peft.method: 'dorra' is unknown; use one of lora" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
