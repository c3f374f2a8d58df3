"""peft.method: bitfit: RMSNorm weights and added biases on the tiny model: norms alone against PEFT's
LN_TUNING in both directions, biases in finegrain's own format, other methods beside it on one
model, training through the CLI (classification and NER) and exact resume after a kill."""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
import transformers
from test_adapter_method import TEXTS, assert_same_adapter, killed_then_resumed, method_config_file, train_method_run
from torch.testing import assert_close

import finegrain
from finegrain.errors import FinegrainError
from finegrain.model.llama import RMSNorm
from finegrain.peft import LoraConfig, adapter_layers, adapter_state_dict, inject, load_adapter, save_adapter, unload_adapters
from finegrain.peft.base import read_adapter
from finegrain.peft.bitfit import BitfitConfig, BitfitLinear, BitfitNorm
from peft_fixtures import hf_model, input_ids, ours_of  # noqa: F401 (fixtures)

pytestmark = [
    pytest.mark.filterwarnings("ignore:Unsupported layer type:UserWarning"),  # PEFT on LlamaRMSNorm
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
]

NORMS = ["input_layernorm", "post_attention_layernorm", "norm"]


def perturb(model: torch.nn.Module, seed: int = 3) -> None:
    """Move every trainable tensor away from its start, as training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in (p for p in model.parameters() if p.requires_grad):
            param.add_(torch.randn(param.shape, generator=generator) * 0.3)


@pytest.mark.parametrize("layers", [None, [1]], ids=["all-layers", "layer-1"])
def test_norms_alone_save_as_ln_tuning_that_peft_loads(hf_model, input_ids, tmp_path, layers):
    ours = ours_of(hf_model)
    config = BitfitConfig(targets=NORMS, layers=layers)
    inject(ours, config)
    with torch.no_grad():
        assert_close(ours(input_ids), hf_model(input_ids).logits)  # a copy of each weight: unchanged at the start
    perturb(ours)
    save_adapter(ours, config, tmp_path, base_model_name_or_path="tiny", task_type="CAUSAL_LM")
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["peft_type"] == "LN_TUNING" and "layers_to_transform" not in written
    expected_targets = sorted(NORMS) if layers is None else [f"model.layers.1.{n}" for n in NORMS[:2]]
    assert written["target_modules"] == expected_targets
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(hf_model), tmp_path).eval()
    with torch.no_grad():
        expected = ours(input_ids)
        assert not torch.allclose(expected, hf_model(input_ids).logits, atol=1e-3)
        assert_close(theirs(input_ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_an_ln_tuning_adapter_of_peft_loads(hf_model, input_ids, tmp_path):
    torch.manual_seed(4)
    theirs = peft.get_peft_model(copy.deepcopy(hf_model), peft.LNTuningConfig(task_type="CAUSAL_LM", target_modules=NORMS))
    perturb(theirs)
    theirs.save_pretrained(tmp_path)
    ours = ours_of(hf_model)
    config = load_adapter(ours, tmp_path)
    assert isinstance(config, BitfitConfig) and len(adapter_layers(ours)) == 5
    with torch.no_grad():
        assert_close(ours(input_ids), theirs.eval()(input_ids).logits, atol=1e-5, rtol=1e-5)


def test_biases_start_at_zero_and_save_in_the_own_format(tiny_model, tiny_config, tmp_path):
    from conftest import random_llama

    ids = torch.tensor([[4, 5, 6, 7, 8]])
    with torch.no_grad():
        bare = tiny_model(ids)
    config = BitfitConfig(layers=[1])  # every norm and linear layer of layer 1 (the final norm is outside it)
    inject(tiny_model, config)
    assert {type(m) for m in adapter_layers(tiny_model).values()} == {BitfitNorm, BitfitLinear}
    assert len(adapter_layers(tiny_model)) == 9 and "model.norm" not in adapter_layers(tiny_model)
    with torch.no_grad():
        assert_close(tiny_model(ids), bare, atol=0, rtol=0)
    trainable = {n for n, p in tiny_model.named_parameters() if p.requires_grad}
    assert trainable == set(adapter_state_dict(tiny_model))
    assert "model.layers.1.self_attn.q_proj.bitfit_bias" in trainable
    perturb(tiny_model)
    q_proj = tiny_model.model.layers[1].self_attn.q_proj
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert_close(q_proj(x), x @ q_proj.weight.t() + q_proj.bitfit_bias)
    save_adapter(tiny_model, config, tmp_path, base_model_name_or_path="tiny")
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["peft_type"] == "FINEGRAIN_BITFIT"
    assert "model.layers.1.mlp.down_proj" in written["target_modules"] and len(written["target_modules"]) == 9
    fresh = random_llama(tiny_config)
    load_adapter(fresh, tmp_path)
    with torch.no_grad():
        expected = tiny_model(ids)
        assert_close(fresh(ids), expected, atol=0, rtol=0)
        unload_adapters(fresh)  # merged: plain layers that carry the trained weights and biases
        assert not adapter_layers(fresh) and isinstance(fresh.model.layers[1].input_layernorm, RMSNorm)
        assert fresh.model.layers[1].self_attn.q_proj.bias is not None
        assert_close(fresh(ids), expected, atol=1e-5, rtol=1e-5)


def test_lora_leaves_wrapped_norms_alone_and_bad_targets_list_the_names(tiny_model):
    inject(tiny_model, BitfitConfig(targets=NORMS), adapter_name="norms")
    # LoRA's all-linear takes the linear layers and leaves the wrapped norms alone.
    inject(tiny_model, LoraConfig(targets="all-linear", layers=[1]), adapter_name="lora")
    assert isinstance(tiny_model.model.layers[1].input_layernorm, BitfitNorm)
    with pytest.raises(FinegrainError, match=r"bitfit.targets: unknown target 'layernorm'; valid module names are .*input_layernorm"):
        inject(tiny_model, BitfitConfig(targets=["layernorm"]), adapter_name="x")


def test_a_file_with_a_matrix_where_a_vector_belongs_is_refused(tiny_model, tmp_path):
    from safetensors.torch import save_file

    inject(tiny_model, BitfitConfig(targets=NORMS))
    save_adapter(tiny_model, BitfitConfig(targets=NORMS), tmp_path, base_model_name_or_path="tiny")
    save_file({"base_model.model.model.norm.ln_tuning_layers.weight": torch.ones(2, 64)}, tmp_path / "adapter_model.safetensors")
    with pytest.raises(FinegrainError, match=r"'model.norm.ln_tuning_layers.weight' has shape \(2, 64\), a vector is expected"):
        read_adapter(tmp_path)


@pytest.mark.parametrize("task", ["classification", "ner"])
def test_train_and_predict_through_the_cli(tiny_model_dir, tmp_path, task):
    run_dir = train_method_run(tmp_path, tiny_model_dir, {"method": "bitfit", "layers": [-1]}, task)
    results = json.loads((run_dir / "metrics.json").read_text())
    assert results["train"]["frozen_prefix_layers"] == 1
    assert json.loads((run_dir / "adapter" / "adapter_config.json").read_text())["peft_type"] == "FINEGRAIN_BITFIT"
    predictor = finegrain.load(run_dir)
    inputs = TEXTS if task == "classification" else [["John", "was", "in", "Paris"]]
    predictions = predictor.predict(inputs)
    assert len(predictions) == len(inputs)
    assert ("label" if task == "classification" else "tags") in predictions[0]


def test_a_killed_run_resumes_to_the_same_adapter_which_peft_loads(tiny_model_dir, tmp_path):
    peft_keys = {"method": "bitfit", "targets": NORMS}  # norms alone: an LN_TUNING run
    (tmp_path / "straight").mkdir()
    reference = train_method_run(tmp_path / "straight", tiny_model_dir, peft_keys)
    assert json.loads((reference / "adapter" / "adapter_config.json").read_text())["peft_type"] == "LN_TUNING"
    config = method_config_file(tmp_path, tiny_model_dir, peft_keys)
    assert_same_adapter(killed_then_resumed(tmp_path, config), reference)

    # The run's adapter is a PEFT SEQ_CLS adapter: transformers + peft give the run's probabilities.
    _, tensors = read_adapter(reference / "adapter")
    assert max(float((t - 1).abs().max()) for k, t in tensors.items() if "ln_tuning" in k) > 0.01  # the norms moved
    ours = finegrain.load(reference)
    expected = [[p["probabilities"][label] for label in ours.task.labels] for p in ours.predict(TEXTS)]
    base = transformers.AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    base.config.pad_token_id = ours.tokenizer.pad_token_id
    theirs = peft.PeftModel.from_pretrained(base, reference / "adapter").eval()
    with torch.no_grad():
        for text, probabilities in zip(TEXTS, expected):
            ids = ours.tokenizer.encode(text)[: ours.config.data.max_length]
            assert_close(theirs(torch.tensor([ids])).logits.softmax(-1)[0], torch.tensor(probabilities), atol=1e-4, rtol=0)


def test_served_beside_a_lora_run_on_one_base_like_their_predictors(tiny_model_dir, tmp_path):
    """The final norm of each bitfit run lives in its own task model's view of the base; the norms and
    biases inside the layers are switched per batch with the LoRA run's adapters."""
    from finegrain.serve.batching import Job
    from finegrain.serve.engine import Engine
    from finegrain.serve.metrics import Metrics
    from finegrain.serve.models import ModelRegistry

    (tmp_path / "lora").mkdir()
    (tmp_path / "bitfit").mkdir()
    bitfit_targets = ["input_layernorm", "post_attention_layernorm", "model.norm", "o_proj", "gate_proj"]
    runs = {
        "lora": train_method_run(tmp_path / "lora", tiny_model_dir, {"method": "lora", "r": 4, "layers": [-1]}),
        "bitfit": train_method_run(tmp_path / "bitfit", tiny_model_dir, {"method": "bitfit", "targets": bitfit_targets}),
    }
    registry = ModelRegistry(list(runs.items()))
    registry.load()
    assert isinstance(registry.runs["bitfit"].model.model.norm, BitfitNorm)
    engine = Engine(registry, Metrics())
    for name, run_dir in [*runs.items(), *runs.items()]:
        expected = finegrain.load(run_dir).predict(TEXTS)
        served = registry.runs[name]
        items = served.task.encode(served.tokenizer, served.task.examples_from_inputs(TEXTS, served.config.data),
                                   served.config.data.max_length)
        (answers,) = engine.run(("task", name), [Job(("task", name), items, size=len(items))])
        for a, e in zip(answers, expected):
            assert a["label"] == e["label"]
            assert all(abs(a["probabilities"][k] - e["probabilities"][k]) < 1e-5 for k in e["probabilities"])
