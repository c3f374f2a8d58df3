"""peft.method: ia3: the layer against PEFT's IA3 (files both ways, named adapters, merge), training
through the CLI (classification and NER), exact resume, and a server holding an IA3 run, a LoRA run
and a DoRA run on one base."""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import subprocess
import sys
import warnings

import peft
import pytest
import torch
import transformers
import yaml
from safetensors.torch import load_file
from torch.testing import assert_close

import finegrain
from finegrain.cli import main
from finegrain.config import load_config
from finegrain.errors import FinegrainError
from finegrain.peft import (
    adapter_layers,
    inject,
    load_adapter,
    merge_adapters,
    method_config,
    save_adapter,
    set_adapter,
    unmerge_adapters,
)
from finegrain.peft.base import MethodLayers
from finegrain.peft.ia3 import Ia3Config, Ia3Linear
from peft_fixtures import hf_model, input_ids, ours_of  # noqa: F401 (fixtures)

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

POSITIVE = ["great fun film", "a gripping story", "good cast and a fine script", "the actors were great"]
NEGATIVE = ["dull and slow", "badly acted", "a bad story told slowly", "two hours I will never get back"]


@pytest.fixture(scope="module")
def peft_dirs(hf_model, tmp_path_factory):
    """Two PEFT-saved IA3 adapters with random vectors (so each changes the output): PEFT's LLaMA
    defaults, and value/FFN-up vectors with up_proj scaled on its input."""
    root = tmp_path_factory.mktemp("ia3")
    options = {
        "a": dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
        "b": dict(target_modules=["v_proj", "up_proj"], feedforward_modules=["up_proj"]),
    }
    for seed, (name, kwargs) in enumerate(options.items()):
        torch.manual_seed(20 + seed)
        config = peft.IA3Config(task_type="CAUSAL_LM", init_ia3_weights=False, **kwargs)
        peft.get_peft_model(copy.deepcopy(hf_model), config).save_pretrained(root / name)
    return {name: root / name for name in options}


def test_peft_ia3_adapters_load_and_switch_like_peft(hf_model, peft_dirs, input_ids):
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(hf_model), peft_dirs["a"], adapter_name="a").eval()
    peft_model.load_adapter(peft_dirs["b"], adapter_name="b")
    ours = ours_of(hf_model)
    assert isinstance(load_adapter(ours, peft_dirs["a"], adapter_name="a"), Ia3Config)
    load_adapter(ours, peft_dirs["b"], adapter_name="b")
    assert ours.model.layers[0].mlp.down_proj.feedforward and not ours.model.layers[0].self_attn.k_proj.feedforward
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


@pytest.mark.parametrize("layers", [None, [1]], ids=["all-layers", "last-layer"])
def test_our_ia3_adapter_loads_into_peft(hf_model, input_ids, tmp_path, layers):
    ours = ours_of(hf_model)
    config = Ia3Config(init="random", layers=layers)
    torch.manual_seed(5)
    inject(ours, config)
    save_adapter(ours, config, tmp_path, base_model_name_or_path="tiny", task_type="CAUSAL_LM")
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    adapted = [i for i in range(2) if layers is None or i in layers]
    assert set(tensors) == {
        f"base_model.model.model.layers.{i}.{path}.ia3_l"
        for i in adapted for path in ("self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj")
    }
    assert tensors[f"base_model.model.model.layers.{adapted[0]}.mlp.down_proj.ia3_l"].shape == (1, 128)  # input side
    assert tensors[f"base_model.model.model.layers.{adapted[0]}.self_attn.v_proj.ia3_l"].shape == (32, 1)
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    assert raw["peft_type"] == "IA3" and "layers_to_transform" not in raw  # PEFT's IA3Config has none
    if layers is None:
        assert (raw["target_modules"], raw["feedforward_modules"]) == (["down_proj", "k_proj", "v_proj"], ["down_proj"])
    else:  # the adapted modules by path, the feed-forward ones among them
        assert raw["target_modules"] == sorted(adapter_layers(ours))
        assert raw["feedforward_modules"] == ["model.layers.1.mlp.down_proj"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no key PEFT's IA3Config would ignore
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(hf_model), tmp_path).eval()
    wrapped = sorted(n.removeprefix("base_model.model.") for n, m in theirs.named_modules() if hasattr(m, "ia3_l"))
    assert wrapped == sorted(adapter_layers(ours))  # PEFT adapts exactly the layers we did
    with torch.no_grad():
        assert_close(ours(input_ids), theirs(input_ids).logits, atol=1e-5, rtol=1e-5)
    back = ours_of(hf_model)
    load_adapter(back, tmp_path)
    with torch.no_grad():
        assert_close(back(input_ids), ours(input_ids), atol=1e-6, rtol=1e-6)


def test_merge_and_unmerge(hf_model, peft_dirs, input_ids):
    ours = ours_of(hf_model)
    load_adapter(ours, peft_dirs["b"])  # v_proj on its output, up_proj on its input
    weights = {k: v.clone() for k, v in ours.state_dict().items() if k.endswith(".weight")}
    with torch.no_grad():
        adapted = ours(input_ids)
        merge_adapters(ours)
        assert_close(ours(input_ids), adapted, atol=1e-5, rtol=1e-5)
        assert not torch.equal(ours.model.layers[0].mlp.up_proj.weight, weights["model.layers.0.mlp.up_proj.weight"])
        with pytest.raises(FinegrainError, match="merged into the base weight; unmerge it"):
            set_adapter(adapter_layers(ours).values(), None)
        unmerge_adapters(ours)
    for key, weight in weights.items():
        assert_close(ours.state_dict()[key], weight, atol=1e-6, rtol=1e-5)


def test_ia3_trains_only_its_vectors_and_gets_gradients(hf_model, input_ids):
    ours = ours_of(hf_model)
    inject(ours, Ia3Config(targets=["v_proj", "down_proj"]))
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable == {f"model.layers.{i}.{m}.ia3_l" for i in range(2) for m in ("self_attn.v_proj", "mlp.down_proj")}
    ours.train()
    ours(input_ids).logsumexp(-1).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in ours.parameters() if p.requires_grad)


def test_options_and_their_errors(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  dataset: sms_spam\npeft:\n  method: ia3\n  targets: [k_proj, v_proj]\n  layers: [-1]\n")
    # unset, feedforward is down_proj where it is targeted (switching from a LoRA config on q_proj, v_proj works)
    assert method_config(load_config(path), num_layers=2, modules_to_save=["score"]) == Ia3Config(
        targets=("k_proj", "v_proj"), feedforward=(), layers=[1], modules_to_save=["score"]
    )
    with pytest.raises(FinegrainError, match=r"peft.feedforward: 'down_proj' is not one of peft.targets \['k_proj', 'v_proj'\]"):
        method_config(load_config(path, ["peft.feedforward=[down_proj]"]), num_layers=2, modules_to_save=[])
    assert Ia3Config().feedforward == ("down_proj",) and Ia3Config(targets="all-linear").feedforward == ("down_proj",)
    with pytest.raises(FinegrainError, match="peft.init: 'zeros' is unknown; use one of ones, random"):
        Ia3Config(init="zeros")
    # every option's error names the key under `peft:`, where an IA3 run's options are written
    for override, message in (("peft.targets=[]", "peft.targets: empty"), ("peft.init=zeros", "peft.init: 'zeros'"),
                              ("peft.feedforward=(", "peft.feedforward: '(' is not a valid regular expression")):
        with pytest.raises(FinegrainError, match=re.escape(message)):
            method_config(load_config(path, [override]), num_layers=2, modules_to_save=[])
    path.write_text("data:\n  dataset: sms_spam\npeft:\n  method: ia3\n  rank: 4\n")
    with pytest.raises(FinegrainError, match=r"c.yaml:5: unknown key 'peft.rank'"):
        method_config(load_config(path), num_layers=2, modules_to_save=[])
    layer = Ia3Linear.from_linear(torch.nn.Linear(4, 3), feedforward=True)
    with pytest.raises(FinegrainError, match="scales this layer's output, its other adapters the input"):
        layer.add_adapter("other", feedforward=False)


# ---------------------------------------------------------------------------------------------- end to end


def write_data(path, n: int, seed: int = 0):
    import random

    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            positive = rng.random() < 0.5
            text = " and ".join(rng.sample(POSITIVE if positive else NEGATIVE, 2))
            f.write(json.dumps({"text": text, "label": "fresh" if positive else "rotten"}) + "\n")
    return path


def write_config(path, model_dir, data, method: str, **train):
    config = {
        "model": {"name": str(model_dir), "num_layers": 2},
        "data": {"train": str(data), "max_length": 16},
        "peft": {"method": method, "layers": [-1]},
        "head": {"tfidf_mix": 0, "pooling": "last", "init": "random"},  # the adapter alone, read as PEFT's SEQ_CLS model reads it
        "train": {"epochs": 2, "lr": 2e-2, "batch_size": 8, "threads": 1, "eval_every": 3, "checkpoint_every": 2, **train},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def test_cli_trains_classification_that_peft_reproduces(tiny_model_dir, tmp_path):
    data = write_data(tmp_path / "data.jsonl", 80)
    run_dir = tmp_path / "run"
    assert main(["train", str(write_config(tmp_path / "c.yaml", tiny_model_dir, data, "ia3")), "--output", str(run_dir)]) == 0
    tensors = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert {k.rsplit(".", 1)[-1] for k in tensors} == {"ia3_l", "weight"}  # the vectors and the head
    assert any(not torch.allclose(v, torch.ones_like(v)) for k, v in tensors.items() if k.endswith("ia3_l"))  # it trained
    ours = finegrain.load(run_dir)
    texts = [POSITIVE[0], NEGATIVE[2] + " " + NEGATIVE[3]]
    predictions = ours.predict(texts)
    expected = torch.tensor([[p["probabilities"][label] for label in ours.task.labels] for p in predictions])
    base = transformers.AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    base.config.pad_token_id = ours.tokenizer.pad_token_id
    theirs = peft.PeftModel.from_pretrained(base, run_dir / "adapter").eval()
    with torch.no_grad():
        for text, probs in zip(texts, expected):
            ids = ours.tokenizer.encode(text)[: ours.config.data.max_length]
            torch.testing.assert_close(theirs(torch.tensor([ids])).logits.softmax(-1)[0], probs, atol=1e-4, rtol=0)


def test_cli_trains_ner_and_predicts(tiny_model_dir, tmp_path):
    from serve_helpers import train_ner_run

    entities = {"LOC": ["Paris", "London"], "PER": ["Anna Smith", "John"]}
    run_dir = train_ner_run_with(tiny_model_dir, tmp_path / "ner", entities, "ia3", train_ner_run)
    assert load_file(run_dir / "adapter" / "adapter_model.safetensors")  # vectors and the tag head
    predictions = finegrain.load(run_dir).predict(["Anna Smith was in Paris .", "John"])
    assert [len(p["tags"]) for p in predictions] == [6, 1]
    assert json.loads((run_dir / "metrics.json").read_text())["train"]["steps"] > 0


def train_ner_run_with(model_dir, directory, entities, method, train_ner_run):
    """serve_helpers.train_ner_run with `peft.method` set: its `lora:` keys (layers, targets) carry over."""
    import serve_helpers

    original = serve_helpers.train_task_run

    def with_method(*args, sections=None, **kwargs):
        return original(*args, sections={**(sections or {}), "peft": {"method": method}}, **kwargs)

    serve_helpers.train_task_run = with_method
    try:
        return train_ner_run(model_dir, directory, entities, ["the", "film", "was", "in", "and", "."])
    finally:
        serve_helpers.train_task_run = original


def test_a_killed_run_resumes_to_the_uninterrupted_result(tiny_model_dir, tmp_path):
    data = write_data(tmp_path / "data.jsonl", 64)
    config = write_config(tmp_path / "c.yaml", tiny_model_dir, data, "ia3")
    assert main(["train", str(config), "--output", str(tmp_path / "straight")]) == 0
    env = {**os.environ, "FINEGRAIN_FAULT": "checkpoint_write:3", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    killed = subprocess.run([sys.executable, "-m", "finegrain.cli", "train", str(config), "--output", str(tmp_path / "run")],
                            capture_output=True, text=True, timeout=300, env=env)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (tmp_path / "run" / "metrics.json").exists()
    assert main(["train", "--resume", str(tmp_path / "run")]) == 0
    adapter = "adapter/adapter_model.safetensors"
    assert (tmp_path / "run" / adapter).read_bytes() == (tmp_path / "straight" / adapter).read_bytes()
    a, b = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("straight", "run"))
    assert a["test"]["accuracy"] == b["test"]["accuracy"] and a["train"]["best_step"] == b["train"]["best_step"]


# ---------------------------------------------------------------------------------------------- serving


def test_a_server_answers_for_lora_ia3_and_dora_runs_on_one_base(tiny_model_dir, tmp_path):
    """Three runs of three methods adapt the same layers of one base: each answers as its Predictor."""
    from serve_helpers import Server, train_run

    from finegrain.serve.models import ModelRegistry

    sentiment = {"fresh": ["great fun film", "a gripping story", "good cast"], "rotten": ["dull and slow", "badly acted", "a bad story"]}
    runs = {
        method: train_run(tiny_model_dir, tmp_path / method, sentiment, seed=i, sections={"peft": {"method": method}})
        for i, method in enumerate(("lora", "ia3", "dora"))
    }
    registry = ModelRegistry(list(runs.items()))
    registry.load()
    shared = registry.bases["tiny-llama"].llama.model.layers[-1].self_attn.v_proj
    assert isinstance(shared, MethodLayers) and set(shared.adapters) == set(runs)  # one layer per method, one weight
    assert len({id(m.base_layer().weight) for m in shared.members}) == 1

    texts = ["great fun film and good cast", "dull and slow", "a bad story", "a gripping story"]
    server = Server([f"{name}={run}" for name, run in runs.items()])
    try:
        server.wait_ready()
        import httpx

        for name, run in runs.items():
            expected = finegrain.load(run).predict(texts)
            response = httpx.post(f"{server.url}/v1/classify", json={"texts": texts, "model": name}, timeout=30)
            assert response.status_code == 200, response.text
            for a, b in zip(response.json()["predictions"], expected):
                assert a["label"] == b["label"]
                assert all(abs(a["probabilities"][k] - b["probabilities"][k]) < 1e-4 for k in b["probabilities"])
    finally:
        assert server.stop() == 0, server.read_rest()[-3000:]


def test_ia3_over_a_quantized_base_is_ia3_over_its_dequantized_weight(tiny_model_dir, tmp_path):
    from finegrain.model.qlinear import QuantLinear, quantize_weight

    torch.manual_seed(0)
    base = QuantLinear(quantize_weight(torch.randn(48, 256), "int8"), torch.randn(48))
    float_base = torch.nn.Linear(256, 48)
    with torch.no_grad():
        float_base.weight.copy_(base.dequantize())
        float_base.bias.copy_(base.bias)
    x = torch.randn(3, 5, 256)
    for feedforward in (False, True):
        results = []
        for linear in (base, float_base):
            torch.manual_seed(1)
            layer = Ia3Linear.from_linear(linear, feedforward=feedforward, init="random")
            x_ = x.clone().requires_grad_(True)
            y = layer(x_)
            y.square().sum().backward()
            results.append((y, x_.grad, layer.ia3_l.grad))
        assert results[0][0].shape == (3, 5, 48)
        for ours, reference in zip(*results):
            assert_close(ours, reference, atol=1e-4 * float(reference.abs().max()), rtol=0)
    with pytest.raises(FinegrainError, match="model.quantize"):
        layer = Ia3Linear.from_linear(base)
        layer.merge()
    # and through the CLI, on the tiny model quantised to int8
    config = write_config(tmp_path / "c.yaml", tiny_model_dir, write_data(tmp_path / "data.jsonl", 64), "ia3")
    values = yaml.safe_load(config.read_text())
    values["model"]["quantize"] = "int8"
    config.write_text(yaml.safe_dump(values))
    assert main(["train", str(config), "--output", str(tmp_path / "run")]) == 0
    ours = finegrain.load(tmp_path / "run")
    assert any(isinstance(m, QuantLinear) for m in ours.model.modules())
    assert len(ours.predict([POSITIVE[0], NEGATIVE[1]])) == 2
