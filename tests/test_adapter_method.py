"""peft.method: adapter: bottleneck adapters (Houlsby, Pfeiffer) on the tiny model: the layer against
its formula, placements, named adapters, finegrain's own file format, training through the CLI
(classification and NER), exact resume after a kill, and serving beside a LoRA run on one base.

`train_method_run`, `killed_then_resumed` and `assert_same_adapter` here are shared with
tests/test_bitfit.py and tests/test_head_method.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch.testing import assert_close

import finegrain
from finegrain.cli import main
from finegrain.errors import FinegrainError
from finegrain.peft import adapter_layers, adapter_state_dict, inject, load_adapter, merge_adapters, save_adapter, set_adapter
from finegrain.peft.adapter import BottleneckConfig, BottleneckLinear
from finegrain.peft.base import WEIGHTS_NAME, read_adapter

TEXTS = ["good film 3", "bad film 5", "a good story", "bad"]
ENTITIES = {"LOC": ["Paris", "London", "New York"], "PER": ["Anna Smith", "John"]}
FILLER = ["the", "film", "was", "good", "in", "and", "story", "."]


# ---------------------------------------------------------------------------------------------- shared helpers


def write_classification(path: Path) -> Path:
    rows = [{"text": f"{'good' if i % 2 else 'bad'} film {i % 7}", "label": "fresh" if i % 2 else "rotten"} for i in range(64)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_ner(path: Path) -> Path:
    lines = []
    for i in range(48):
        kind = sorted(ENTITIES)[i % 2]
        words = ENTITIES[kind][i % len(ENTITIES[kind])].split()
        filler = FILLER[i % len(FILLER)]
        lines += [f"{filler}\tO\n", *(f"{w}\t{'B' if j == 0 else 'I'}-{kind}\n" for j, w in enumerate(words)), "in\tO\n", "\n"]
    path.write_text("".join(lines))
    return path


def method_config_file(root: Path, model_dir: Path, peft: dict, task: str = "classification", **train) -> Path:
    """A tiny run of `task` with `peft:` keys `peft`: 2 epochs of 7 steps, a checkpoint every 2 steps,
    the recipe off (its probe is slow) unless `train` turns it on."""
    data = write_classification(root / "data.jsonl") if task == "classification" else write_ner(root / "data.conll")
    config = {
        "task": task,
        "model": {"name": str(model_dir), "num_layers": 2},
        "data": {"train": str(data), "max_length": 16},
        "peft": peft,
        "train": {"epochs": 2, "batch_size": 8, "lr": 0.01, "threads": 1, "eval_every": 3, "checkpoint_every": 2,
                  "recipe": False, **train},
    }
    path = root / f"{task}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def train_method_run(root: Path, model_dir: Path, peft: dict, task: str = "classification", **train) -> Path:
    """Train the run of `method_config_file` into root/run through the CLI; returns the run directory."""
    config = method_config_file(root, model_dir, peft, task, **train)
    run_dir = root / "run"
    assert main(["train", str(config), "--output", str(run_dir)]) == 0
    return run_dir


def killed_then_resumed(root: Path, config: Path, fault: str = "checkpoint_write:2") -> Path:
    """`finegrain train CONFIG` SIGKILLed inside its second checkpoint write, then `--resume`d."""
    run_dir = root / "killed"
    env = {**os.environ, "FINEGRAIN_FAULT": fault, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    killed = subprocess.run([sys.executable, "-m", "finegrain.cli", "train", str(config), "--output", str(run_dir)],
                            capture_output=True, text=True, timeout=300, env=env)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert (run_dir / "checkpoint" / "state.json").exists() and not (run_dir / "metrics.json").exists()
    assert main(["train", "--resume", str(run_dir)]) == 0
    return run_dir


def assert_same_adapter(run: Path, reference: Path) -> None:
    """The resumed run ended where the uninterrupted one did: the same adapter files, byte for byte."""
    for name in ("adapter_config.json", WEIGHTS_NAME):
        assert (run / "adapter" / name).read_bytes() == (reference / "adapter" / name).read_bytes(), name
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (reference, run))
    assert a["train"]["steps"] == b["train"]["steps"] and a["train"]["best_step"] == b["train"]["best_step"]


# ---------------------------------------------------------------------------------------------- the layer


def test_the_adapter_starts_as_a_no_op_and_computes_its_formula(tiny_model):
    ids = torch.randint(1, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        bare = tiny_model(ids)
    inject(tiny_model, BottleneckConfig(reduction_factor=8, non_linearity="gelu"))
    layers = adapter_layers(tiny_model)
    assert sorted(layers) == [f"model.layers.{i}.{p}" for i in range(2) for p in ("mlp.down_proj", "self_attn.o_proj")]
    with torch.no_grad():
        assert_close(tiny_model(ids), bare, atol=0, rtol=0)  # up = 0: exactly the base model
    layer = tiny_model.model.layers[1].self_attn.o_proj
    assert isinstance(layer, BottleneckLinear)
    assert layer.adapter_down.weight.shape == (64 // 8, 64) and layer.adapter_up.weight.shape == (64, 64 // 8)
    with torch.no_grad():
        layer.adapter_up.weight.normal_(0, 0.3)
        layer.adapter_up.bias.normal_(0, 0.3)
        x = torch.randn(3, 64)
        y = x @ layer.weight.t()
        expected = y + F.linear(F.gelu(F.linear(y, layer.adapter_down.weight, layer.adapter_down.bias)),
                                layer.adapter_up.weight, layer.adapter_up.bias)
        assert_close(layer(x), expected)
        assert not torch.allclose(tiny_model(ids), bare, atol=1e-4)
    trainable = {n for n, p in tiny_model.named_parameters() if p.requires_grad}
    assert trainable == set(adapter_state_dict(tiny_model)) and len(trainable) == 16  # 4 layers x (down, up) x (W, b)


def test_pfeiffer_wraps_the_ffn_output_only_in_the_chosen_layers(tiny_model):
    inject(tiny_model, BottleneckConfig(placement="pfeiffer", layers=[1], non_linearity="tanh"))
    assert list(adapter_layers(tiny_model)) == ["model.layers.1.mlp.down_proj"]
    loss = tiny_model(torch.tensor([[5, 6, 7]])).sum()
    loss.backward()
    grads = {n for n, p in tiny_model.named_parameters() if p.grad is not None}
    assert grads == {f"model.layers.1.mlp.down_proj.adapter_{s}.{t}" for s in ("down", "up") for t in ("weight", "bias")}


def test_named_adapters_switch_and_merging_is_refused(tiny_model):
    ids = torch.tensor([[3, 4, 5, 6]])
    inject(tiny_model, BottleneckConfig(), adapter_name="a")
    inject(tiny_model, BottleneckConfig(placement="pfeiffer", reduction_factor=4), adapter_name="b")
    layers = adapter_layers(tiny_model).values()
    with torch.no_grad():
        bare = tiny_model(ids)
        for layer in layers:
            for adapter in layer.adapters.values():
                adapter.adapter_up.weight.normal_(0, 0.5)
        outputs = {}
        for name in ("a", "b", None):
            set_adapter(layers, name)
            outputs[name] = tiny_model(ids)
    assert_close(outputs[None], bare)
    assert not torch.allclose(outputs["a"], outputs["b"], atol=1e-4)
    set_adapter(layers, "b")  # o_proj holds only "a": it runs bare
    assert tiny_model.model.layers[0].self_attn.o_proj.active_adapter is None
    with pytest.raises(FinegrainError, match="cannot be merged into the base weights"):
        merge_adapters(tiny_model)


def test_bad_options_name_the_key_and_the_choices():
    with pytest.raises(FinegrainError, match=r"peft.placement: 'after' is unknown; use one of houlsby, pfeiffer"):
        BottleneckConfig(placement="after")
    with pytest.raises(FinegrainError, match=r"peft.non_linearity: 'swish' is unknown; use one of relu, gelu, silu, tanh"):
        BottleneckConfig(non_linearity="swish")
    with pytest.raises(FinegrainError, match=r"peft.reduction_factor: must be a positive integer, got 0"):
        BottleneckConfig(reduction_factor=0)


# ---------------------------------------------------------------------------------------------- the file


def test_own_format_round_trip_and_damage_is_refused(tiny_model, tiny_config, tmp_path):
    from conftest import random_llama

    inject(tiny_model, BottleneckConfig(reduction_factor=4, layers=[1], modules_to_save=None))
    with torch.no_grad():
        for param in adapter_state_dict(tiny_model).values():
            param.normal_(0, 0.2)
    config = BottleneckConfig(reduction_factor=4, layers=[1])
    save_adapter(tiny_model, config, tmp_path / "a", base_model_name_or_path="tiny", task_type="CAUSAL_LM")
    written = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert written["peft_type"] == "FINEGRAIN_ADAPTER" and written["reduction_factor"] == 4
    assert written["target_modules"] == ["down_proj", "o_proj"] and written["layers_to_transform"] == [1]
    _, tensors = read_adapter(tmp_path / "a")
    assert set(tensors) == set(adapter_state_dict(tiny_model))
    fresh = random_llama(tiny_config)
    assert load_adapter(fresh, tmp_path / "a") == config
    ids = torch.tensor([[9, 8, 7, 6, 5]])
    with torch.no_grad():
        assert_close(fresh(ids), tiny_model(ids), atol=0, rtol=0)
    # A file whose matrices do not fit its reduction factor, and a damaged one, are refused in one line.
    written["reduction_factor"] = 8
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(written))
    with pytest.raises(FinegrainError, match=r"does not fit reduction_factor=8 of adapter_config.json"):
        read_adapter(tmp_path / "a")
    written["reduction_factor"] = 4
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(written))
    data = bytearray((tmp_path / "a" / WEIGHTS_NAME).read_bytes())
    data[-8:] = bytes(8)
    (tmp_path / "a" / WEIGHTS_NAME).write_bytes(bytes(data))
    with pytest.raises(FinegrainError, match="do not match the checksum"):
        read_adapter(tmp_path / "a")


# ---------------------------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("task", ["classification", "ner"])
def test_train_and_predict_through_the_cli(tiny_model_dir, tmp_path, task):
    run_dir = train_method_run(tmp_path, tiny_model_dir, {"method": "adapter", "layers": [-1], "reduction_factor": 8}, task)
    results = json.loads((run_dir / "metrics.json").read_text())
    assert results["train"]["frozen_prefix_layers"] == 1  # layer 0 runs once: only layer 1 holds adapters
    written = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert written["peft_type"] == "FINEGRAIN_ADAPTER" and written["modules_to_save"] == ["score"]
    predictor = finegrain.load(run_dir)
    assert sorted(adapter_layers(predictor.model)) == ["model.layers.1.mlp.down_proj", "model.layers.1.self_attn.o_proj"]
    inputs = TEXTS if task == "classification" else [["John", "was", "in", "Paris"]]
    predictions = predictor.predict(inputs)
    assert len(predictions) == len(inputs)
    if task == "classification":
        assert {p["label"] for p in predictions} <= {"fresh", "rotten"}
        assert results["validation"]["accuracy"] >= 0.0
    else:
        assert predictions[0]["words"] == inputs[0] and len(predictions[0]["tags"]) == 4


def test_a_killed_run_resumes_to_the_same_adapter(tiny_model_dir, tmp_path):
    peft = {"method": "adapter", "layers": [-1], "placement": "pfeiffer", "non_linearity": "silu"}
    (tmp_path / "straight").mkdir()
    reference = train_method_run(tmp_path / "straight", tiny_model_dir, peft)
    config = method_config_file(tmp_path, tiny_model_dir, peft)
    assert_same_adapter(killed_then_resumed(tmp_path, config), reference)


def test_served_beside_a_lora_run_on_one_base_like_their_predictors(tiny_model_dir, tmp_path):
    from finegrain.serve.batching import Job
    from finegrain.serve.engine import Engine
    from finegrain.serve.metrics import Metrics
    from finegrain.serve.models import ModelRegistry

    (tmp_path / "lora").mkdir()
    (tmp_path / "adapter").mkdir()
    runs = {
        "lora": train_method_run(tmp_path / "lora", tiny_model_dir, {"method": "lora", "r": 4, "layers": [-1]}),
        "adapter": train_method_run(tmp_path / "adapter", tiny_model_dir, {"method": "adapter", "layers": [-1]}),
    }
    registry = ModelRegistry(list(runs.items()))
    registry.load()
    assert len(registry.bases) == 1
    base = next(iter(registry.bases.values()))
    assert registry.runs["lora"].model.model.layers[1] is registry.runs["adapter"].model.model.layers[1] is base.llama.model.layers[1]
    engine = Engine(registry, Metrics())
    for _ in range(2):  # switching back and forth between the two runs' adapters
        for name, run_dir in runs.items():
            expected = finegrain.load(run_dir).predict(TEXTS)
            served = registry.runs[name]
            items = served.task.encode(served.tokenizer, served.task.examples_from_inputs(TEXTS, served.config.data),
                                       served.config.data.max_length)
            (answers,) = engine.run(("task", name), [Job(("task", name), items, size=len(items))])
            assert [a["label"] for a in answers] == [e["label"] for e in expected]
            for a, e in zip(answers, expected):
                for label in e["probabilities"]:
                    assert abs(a["probabilities"][label] - e["probabilities"][label]) < 1e-5


def test_a_bad_option_is_one_line_before_anything_is_written(tiny_model_dir, tmp_path, capsys):
    config = method_config_file(tmp_path, tiny_model_dir, {"method": "adapter", "placement": "after"})
    assert main(["train", str(config), "--output", str(tmp_path / "run")]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "peft.placement: 'after' is unknown; use one of houlsby, pfeiffer" in err[0]
    assert not (tmp_path / "run").exists()
