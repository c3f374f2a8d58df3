"""peft.method: head: the task head alone on a frozen backbone (the linear-probe baseline): nothing
injected, the whole backbone cached once, the head saved in finegrain's own format; training through
the CLI (classification and NER, with the recipe too), exact resume, serving beside a LoRA run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_adapter_method import TEXTS, assert_same_adapter, killed_then_resumed, method_config_file, train_method_run

import finegrain
from finegrain.cli import main
from finegrain.config import load_config
from finegrain.errors import FinegrainError
from finegrain.peft import adapter_layers
from finegrain.peft.base import read_adapter
from finegrain.peft.head import HeadOnlyConfig
from finegrain.run import build
from finegrain.train.prefix_cache import lowest_trainable_layer


def test_only_the_head_trains_and_the_whole_backbone_is_the_frozen_prefix(tiny_model_dir):
    config = load_config(None, [f"model.name={tiny_model_dir}", "data.train=x.jsonl", "peft.method=head"])
    model, _, _, adapter = build(config, ["fresh", "rotten"], progress=False)
    assert adapter == HeadOnlyConfig(modules_to_save=["score"]) and not adapter_layers(model)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"score.weight"}
    assert lowest_trainable_layer(model, len(model.model.layers)) == len(model.model.layers)


def test_the_head_reads_each_texts_last_token_when_every_layer_is_cached(tiny_model_dir):
    """With the whole backbone cached no layer runs above it to pick each row's last real token:
    the classifier still reads that token's state (it read the first token's, and trained at chance)."""
    from finegrain.model.backbone import hidden_states

    config = load_config(None, [f"model.name={tiny_model_dir}", "data.train=x.jsonl", "peft.method=head"])
    model, _, _, _ = build(config, ["fresh", "rotten"], progress=False)
    model.eval()
    layers = len(model.model.layers)
    batch = {"input_ids": torch.tensor([[5, 9, 14, 3, 7], [6, 11, 2, 0, 0]]), "lengths": torch.tensor([5, 3])}
    with torch.no_grad():
        whole = model(batch)  # (2, C): every layer runs
        for start in (layers - 1, layers):  # one layer above the cache, and none
            cached = {**batch, "hidden": hidden_states(model.model, batch, end_layer=start)}
            torch.testing.assert_close(model(cached, start_layer=start), whole)


def test_a_task_without_a_head_is_refused_in_one_line(tiny_model_dir, tmp_path, capsys):
    config = method_config_file(tmp_path, tiny_model_dir, {"method": "head"})
    chat = Path(__file__).resolve().parent.parent / "examples" / "data" / "instruct" / "train.jsonl"
    assert main(["train", str(config), "--set", "task=instruct", "--set", f"data.train={chat}",
                 "--output", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "peft.method: head trains the task's head alone, and this task has none" in err[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("task", ["classification", "ner"])
def test_train_and_predict_through_the_cli(tiny_model_dir, tmp_path, task):
    run_dir = train_method_run(tmp_path, tiny_model_dir, {"method": "head"}, task)
    results = json.loads((run_dir / "metrics.json").read_text())
    assert results["train"]["frozen_prefix_layers"] == 2  # both layers ran once; each step runs the head
    written = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert written["peft_type"] == "FINEGRAIN_HEAD" and written["target_modules"] == []
    assert written["modules_to_save"] == ["score"]
    _, tensors = read_adapter(run_dir / "adapter")
    assert sorted(tensors) == (["score.weight"] if task == "classification" else ["score.bias", "score.weight"])
    predictor = finegrain.load(run_dir)
    inputs = TEXTS if task == "classification" else [["John", "was", "in", "Paris"]]
    predictions = predictor.predict(inputs)
    assert len(predictions) == len(inputs)
    assert ("label" if task == "classification" else "tags") in predictions[0]


def test_the_recipe_plans_a_head_run(tiny_model_dir, tmp_path):
    """The recipe chooses no adapted layers for the head method, which adapts none."""
    run_dir = train_method_run(tmp_path, tiny_model_dir, {"method": "head"}, recipe="auto", epochs=1)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["train"]["frozen_prefix_layers"] >= 1 and "peft.layers" not in metrics["recipe"]
    assert json.loads((run_dir / "adapter" / "adapter_config.json").read_text())["layers_to_transform"] is None


def test_a_killed_run_resumes_to_the_same_head(tiny_model_dir, tmp_path):
    (tmp_path / "straight").mkdir()
    reference = train_method_run(tmp_path / "straight", tiny_model_dir, {"method": "head"})
    config = method_config_file(tmp_path, tiny_model_dir, {"method": "head"})
    assert_same_adapter(killed_then_resumed(tmp_path, config), reference)


def test_a_head_file_with_another_tensor_is_refused(tiny_model_dir, tmp_path):
    from safetensors.torch import save_file

    run_dir = train_method_run(tmp_path, tiny_model_dir, {"method": "head"}, epochs=1)
    save_file({"base_model.model.score.weight": torch.zeros(2, 64), "base_model.model.model.norm.weight": torch.ones(64)},
              run_dir / "adapter" / "adapter_model.safetensors")
    with pytest.raises(FinegrainError, match=r"'model.norm.weight' is not in a head module \(score\)"):
        finegrain.load(run_dir)


def test_served_beside_a_lora_run_on_one_base_like_their_predictors(tiny_model_dir, tmp_path):
    from finegrain.serve.batching import Job
    from finegrain.serve.engine import Engine
    from finegrain.serve.metrics import Metrics
    from finegrain.serve.models import ModelRegistry

    (tmp_path / "lora").mkdir()
    (tmp_path / "head").mkdir()
    runs = {
        "lora": train_method_run(tmp_path / "lora", tiny_model_dir, {"method": "lora", "r": 4, "targets": "all-linear"}),
        "head": train_method_run(tmp_path / "head", tiny_model_dir, {"method": "head"}),
    }
    registry = ModelRegistry(list(runs.items()))
    registry.load()
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
