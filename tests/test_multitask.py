"""Multi-task runs: the task mixture sampler, `tasks:` validation, a classification + NER run on
the tiny model with its per-task metrics, runs and predictions, per-task adapters, exact resume."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections import Counter

import pytest
import torch
import yaml
from safetensors.torch import load_file

import finegrain
import finegrain.run
from finegrain.cli import main
from finegrain.config import load_config
from finegrain.errors import FinegrainError
from finegrain.multitask import task_specs
from finegrain.serve.models import ModelRegistry, task_run_arguments
from finegrain.tasks import task_class
from finegrain.train.sampler import TaskMixture

WORDS = {"spam": "win prize now cash", "ham": "see you soon home"}
PEOPLE, PLACES, OTHER = ["anna", "bob", "carl"], ["paris", "rome", "oslo"], ["went", "to", "the", "met", "in", "we"]


def write_texts(path, n, seed=0):
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            label = ("spam", "ham")[i % 2]
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS[label].split()) for _ in range(4)), "label": label}) + "\n")
    return path


def write_tokens(path, n, seed=0):
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            tokens, tags = [], []
            for _ in range(rng.randint(3, 6)):
                kind = rng.choice(["PER", "LOC", None, None])
                word = rng.choice(PEOPLE if kind == "PER" else PLACES if kind == "LOC" else OTHER)
                tokens.append(word)
                tags.append(f"B-{kind}" if kind else "O")
            f.write(json.dumps({"tokens": tokens, "tags": tags}) + "\n")
    return path


def write_config(tmp_path, tiny_model_dir, tasks=None, multitask=None, peft=None, **train):
    texts, tokens = write_texts(tmp_path / "texts.jsonl", 64), write_tokens(tmp_path / "tokens.jsonl", 64)
    config = {
        "model": {"name": str(tiny_model_dir)},
        "data": {"max_length": 16, "baselines": False},
        "peft": {"method": "lora", "r": 4, "alpha": 8, "targets": "all-linear", "layers": [-1], **(peft or {})},
        "train": {"epochs": 2, "lr": 1e-2, "batch_size": 8, "threads": 1, "recipe": "off", "checkpoint_every": 3, **train},
        "tasks": tasks or {
            "spam": {"task": "classification", "data": {"train": str(texts)}, "metric": "macro_f1"},
            "names": {"task": "ner", "data": {"train": str(tokens)}, "loss_weight": 2.0},
        },
        **({"multitask": multitask} if multitask else {}),
    }
    path = tmp_path / "multitask.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


# ---------------------------------------------------------------------------------------------- sampler


def test_proportional_epochs_see_every_item_of_every_task_once():
    mixture = TaskMixture(((5,) * 30, (3,) * 10), batch_size=4, seed=0)
    assert len(mixture) == 8 + 3 and mixture.shares() == [8, 3]
    for epoch in range(2):
        draws = mixture.epoch(epoch)
        for k, n in ((0, 30), (1, 10)):
            assert sorted(i for d in draws if d.objective == k for i in d.indices) == list(range(n))
    assert mixture.epoch(1) == mixture.epoch(1) and mixture.epoch(0) != mixture.epoch(1)


def test_temperature_and_round_robin_shares():
    lengths = ((5,) * 90, (3,) * 10)
    hot = TaskMixture(lengths, 10, 0, "temperature", temperature=100.0)  # towards equal shares
    assert len(hot) == 10 and hot.shares() == [5, 5]
    assert TaskMixture(lengths, 10, 0, "temperature", temperature=1.0).shares() == [9, 1]
    robin = TaskMixture(lengths, 10, 0, "round_robin")
    assert [d.objective for d in robin.epoch(0)] == [0, 1] * 5
    # the small task goes round its batches again; the large one continues where epoch 0 stopped
    small = [i for e in range(2) for d in hot.epoch(e) if d.objective == 1 for i in d.indices]
    assert Counter(small) == {i: 10 for i in range(10)}
    large = [i for e in range(2) for d in hot.epoch(e) if d.objective == 0 for i in d.indices]
    assert len(large) == 100 and set(large) == set(range(90)) and max(Counter(large).values()) == 2  # a pass, then on


# ---------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize("change, message", [
    ({"tasks": {"spam": {"task": "clasification"}}}, "tasks.spam.task: 'clasification' is not a task; did you mean 'classification'"),
    ({"tasks": {"spam": {"task": "instruct"}}}, "'instruct' generates text"),
    ({"tasks": {"spam": {"metrc": "accuracy"}}}, "unknown key 'tasks.spam.metrc'; did you mean 'tasks.spam.metric'"),
    ({"tasks": {"spam": {"data": {"datset": "trec"}}}}, "unknown key 'tasks.spam.data.datset'; did you mean 'tasks.spam.data.dataset'"),
    ({"tasks": {"spam": {"data": {"train": None}}}}, "tasks.spam: no training data"),
    ({"tasks": {"spam": {"loss_weight": 0}}}, "'tasks.spam.loss_weight' must be a number above 0"),
    ({"multitask": {"select": "spma"}}, "multitask.select: 'spma' is not a task of this run; did you mean 'spam'"),
    ({"multitask": {"sampling": "random"}}, "'multitask.sampling' must be proportional, temperature or round_robin"),
    ({"train": {"metric": "accuracy"}}, "train.metric: not in a multi-task run"),
    ({"tasks": {"names": None}}, "'tasks.names' must be dict"),
    ({"tasks": {"spam": {"head": {"word_mix": 0.5}}}}, "head.word_mix fit one task's model alone; leave them unset"),
    ({"head": {"word_mix": "auto"}}, "head.word_mix fit one task's model alone; leave them unset"),
])
def test_config_errors_name_the_key(tiny_model_dir, tmp_path, change, message):
    path = write_config(tmp_path, tiny_model_dir)
    values = yaml.safe_load(path.read_text())
    for section, keys in change.items():
        for key, value in keys.items():
            if section == "tasks" and isinstance(value, dict) and isinstance(values["tasks"].get(key), dict):
                for k, v in value.items():
                    if isinstance(v, dict):
                        values["tasks"][key].setdefault(k, {}).update(v)
                    else:
                        values["tasks"][key][k] = v
            else:
                values.setdefault(section, {})[key] = value
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    with pytest.raises(FinegrainError, match=".*") as caught:
        task_specs(load_config(path))
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_a_misspelt_task_metric_is_refused_before_training(tiny_model_dir, tmp_path, capsys):
    path = write_config(tmp_path, tiny_model_dir)
    path.write_text(path.read_text().replace("metric: macro_f1", "metric: macro-f1"))
    assert main(["train", str(path), "--output", str(tmp_path / "run")]) == 1
    line = capsys.readouterr().err.strip()
    assert line.startswith("finegrain train: error: tasks.spam.metric: 'macro-f1' is not a validation metric; "
                           "choose one of accuracy, macro_precision,") and "\n" not in line
    assert not (tmp_path / "run").exists()


def test_one_task_is_refused_and_a_task_config_is_the_run_s_with_the_task_s_keys(tiny_model_dir, tmp_path):
    path = write_config(tmp_path, tiny_model_dir)
    with pytest.raises(FinegrainError, match="'tasks' must be at least two tasks"):
        load_config(path, ["tasks={a: {data: {dataset: trec}}}"])
    spam, names = task_specs(load_config(path))
    assert (spam.config.task, spam.metric, spam.loss_weight) == ("classification", "macro_f1", 1.0)
    assert (names.config.task, names.metric, names.loss_weight) == ("ner", None, 2.0)
    assert names.config.data.max_length == 16 and names.config.data.train.endswith("tokens.jsonl")
    assert names.config.lora.r == 4 and names.config.tasks is None
    with pytest.raises(FinegrainError, match="tasks: this config is a multi-task run"):
        finegrain.run.train(load_config(path))


# ---------------------------------------------------------------------------------------------- a run


def test_classification_and_ner_train_together(tiny_model_dir, tmp_path, capsys):
    path = write_config(tmp_path, tiny_model_dir, multitask={"sampling": "round_robin"})
    output = tmp_path / "run"
    assert main(["train", str(path), "--output", str(output)]) == 0
    assert "| spam | classification | macro_f1 |" in capsys.readouterr().out
    results = json.loads((output / "metrics.json").read_text())
    assert set(results["tasks"]) == {"spam", "names"}
    assert 0 <= results["tasks"]["spam"]["test"]["macro"]["f1"] <= 1 and "f1" in results["tasks"]["names"]["test"]
    shares = results["multitask"]["batches_per_epoch"]
    assert results["multitask"]["sampling"] == "round_robin" and shares["spam"] == shares["names"]
    assert results["train"]["frozen_prefix_layers"] == 1  # the layer below the adapted one ran once per example
    assert results["validation"]["mean"] == pytest.approx(
        (results["validation"]["spam.macro_f1"] + results["validation"]["names.f1"]) / 2)
    log = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    epoch = sum(shares.values())
    assert [r["step"] for r in log if r.get("split") == "validation"] == [epoch, 2 * epoch]
    assert "| names | ner | f1 |" in (output / "report.md").read_text()

    # Each task is a finished run of its own: config, labels, PEFT adapter with its head, metrics.
    for name, kind in (("spam", "classification"), ("names", "ner")):
        sub = output / "tasks" / name
        assert yaml.safe_load((sub / "config.yaml").read_text())["task"] == kind
        assert json.loads((sub / "metrics.json").read_text())["test"] == {
            k: v for k, v in results["tasks"][name]["test"].items()}
    spam_adapter = load_file(output / "tasks" / "spam" / "adapter" / "adapter_model.safetensors")
    names_adapter = load_file(output / "tasks" / "names" / "adapter" / "adapter_model.safetensors")
    shared = [k for k in spam_adapter if "lora_" in k]
    assert shared and all(torch.equal(spam_adapter[k], names_adapter[k]) for k in shared)  # peft.share: true

    # finegrain.load: the base once, every head; the same predictions as each task's own run.
    predictor = finegrain.load(output)
    texts = ["win cash now", "see you at home"]
    assert predictor.predict(texts, task="spam") == finegrain.load(output / "tasks" / "spam").predict(texts)
    assert predictor.predict([], task="spam") == [] and finegrain.load(output / "tasks" / "spam").predict([]) == []
    words = [["anna", "went", "to", "rome"]]
    assert predictor.predict(words, task="names") == finegrain.load(output / "tasks" / "names").predict(words)
    with pytest.raises(FinegrainError, match="predict: 'spma' is not a task of this run; did you mean 'spam'"):
        predictor.predict(texts, task="spma")
    with pytest.raises(FinegrainError, match="predict: no task given; pass task= one of spam, names"):
        predictor.predict(texts)
    assert task_run_arguments([("mt", output)]) == [("mt.spam", output / "tasks" / "spam"),
                                                    ("mt.names", output / "tasks" / "names")]
    with pytest.raises(FinegrainError, match="a multi-task run"):
        finegrain.run.Predictor(output)
    registry = ModelRegistry([("mt", output)])  # each task on its task's endpoint, one base
    assert {name: run.endpoint for name, run in registry.runs.items()} == {
        "mt.spam": task_class("classification").endpoint.path, "mt.names": task_class("ner").endpoint.path}
    assert len(registry.base_sources) == 1


def test_an_adapter_per_task_and_selection_by_one_task(tiny_model_dir, tmp_path):
    path = write_config(tmp_path, tiny_model_dir, peft={"share": False}, multitask={"select": "names", "sampling": "temperature"})
    assert load_config(path).peft.share is False and "share" not in load_config(path).peft.options
    output = tmp_path / "run"
    assert main(["train", str(path), "--output", str(output)]) == 0
    results = json.loads((output / "metrics.json").read_text())
    assert results["multitask"]["selected_by"] == "names.f1" and results["multitask"]["peft_share"] is False
    assert yaml.safe_load((output / "config.yaml").read_text())["peft"]["share"] is False
    spam = load_file(output / "tasks" / "spam" / "adapter" / "adapter_model.safetensors")
    names = load_file(output / "tasks" / "names" / "adapter" / "adapter_model.safetensors")
    lora = [k for k in spam if "lora_B" in k]
    assert lora and all(not torch.equal(spam[k], names[k]) for k in lora)  # each task trained its own
    predictor = finegrain.load(output)
    texts = ["win cash now", "see you at home"]
    assert predictor.predict(texts, task="spam") == finegrain.load(output / "tasks" / "spam").predict(texts)
    words = [["bob", "met", "carl", "in", "oslo"]]
    assert predictor.predict(words, task="names") == finegrain.load(output / "tasks" / "names").predict(words)


def test_a_killed_run_resumes_exactly(tiny_model_dir, tmp_path):
    path = write_config(tmp_path, tiny_model_dir, eval_every=5)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "finegrain.cli", "train", str(path), "--output"]
    straight = subprocess.run([*command, str(tmp_path / "straight")], capture_output=True, text=True, env=env, timeout=300)
    assert straight.returncode == 0, straight.stderr[-2000:]
    killed = subprocess.run([*command, str(tmp_path / "killed")], capture_output=True, text=True, timeout=300,
                            env={**env, "FINEGRAIN_FAULT": "train_step:8"})  # SIGKILL after step 8; checkpoint at 6
    assert killed.returncode != 0 and not (tmp_path / "killed" / "metrics.json").exists()
    assert json.loads((tmp_path / "killed" / "checkpoint" / "state.json").read_text())["step"] == 6
    resumed = subprocess.run([sys.executable, "-m", "finegrain.cli", "train", "--resume", str(tmp_path / "killed")],
                             capture_output=True, text=True, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = (json.loads((tmp_path / run / "metrics.json").read_text()) for run in ("straight", "killed"))
    for name in ("spam", "names"):
        assert a["tasks"][name]["test"] == {**b["tasks"][name]["test"]}
        wa, wb = (load_file(tmp_path / run / "tasks" / name / "adapter" / "adapter_model.safetensors")
                  for run in ("straight", "killed"))
        for key in wa:
            torch.testing.assert_close(wa[key], wb[key], atol=1e-6, rtol=0)
    assert a["validation"] == b["validation"] and a["train"]["best_step"] == b["train"]["best_step"]
    steps = [json.loads(line)["step"] for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [json.loads(line)["step"] for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]


def test_regression_relation_and_qa_train_together(tiny_model_dir, tmp_path):
    rng = random.Random(0)
    scores, relations, questions = tmp_path / "scores.jsonl", tmp_path / "relations.jsonl", tmp_path / "qa.jsonl"
    with open(scores, "w", encoding="utf-8") as f:
        for i in range(48):
            value = (-1.0, 1.0)[i % 2]
            f.write(json.dumps({"text": " ".join(rng.sample(WORDS["spam" if value > 0 else "ham"].split(), 2)), "score": value}) + "\n")
    with open(relations, "w", encoding="utf-8") as f:
        for i in range(48):
            cause = i % 2 == 0
            text = "fire made smoke" if cause else "fire near smoke"
            f.write(json.dumps({"text": text, "head": [0, 4], "tail": [10, 15] if cause else [10, 15],
                                "label": "Cause" if cause else "Other"}) + "\n")
    with open(questions, "w", encoding="utf-8") as f:
        for i in range(48):
            city = PLACES[i % 3]
            context = f"{PEOPLE[i % 3]} lives in {city} now"
            f.write(json.dumps({"id": str(i), "question": "where?", "context": context,
                                "answers": {"text": [city], "answer_start": [context.index(city)]}}) + "\n")
    tasks = {  # each metric named, so that each is checked before training (on four validation examples)
        "score": {"task": "regression", "data": {"train": str(scores), "label_field": "score"}, "metric": "neg_mse"},
        "cause": {"task": "relation", "data": {"train": str(relations)}, "metric": "f1"},
        "where": {"task": "qa", "data": {"train": str(questions), "validation": str(questions), "test": str(questions),
                                         "max_length": 64}, "qa": {"stride": 8}, "metric": "f1"},
    }
    path = write_config(tmp_path, tiny_model_dir, tasks=tasks, epochs=1)
    output = tmp_path / "run"
    assert main(["train", str(path), "--output", str(output)]) == 0
    results = json.loads((output / "metrics.json").read_text())
    assert {name: task["metric"] for name, task in results["tasks"].items()} == {"score": "neg_mse", "cause": "f1", "where": "f1"}
    assert all("test" in task for task in results["tasks"].values())
    predictor = finegrain.load(output)
    assert "value" in predictor.predict(["win prize"], task="score")[0]
    context = {"question": "where?", "context": "anna lives in rome now"}
    assert predictor.predict([context], task="where") == finegrain.load(output / "tasks" / "where").predict([context])
