"""Continual learning: class- and task-incremental sequences, replay buffers, the accuracy matrix."""

from __future__ import annotations

import json
import random
import shutil
from collections import Counter

import pytest
import yaml

from finegrain.cli import main
from finegrain.config import load_config
from finegrain.continual import replay_buffer, stage_training, class_stages, transfer, train_sequence
from finegrain.data.readers import Example
from finegrain.errors import FinegrainError

WORDS = {"sport": "goal match team", "tech": "chip code server", "food": "bread soup salt", "art": "paint stage song",
         "spam": "win prize now", "ham": "see you soon"}


def write_labelled(path, labels, n, seed=0):
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            label = labels[i % len(labels)]
            words = WORDS[label].split()
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(4)), "label": label}) + "\n")
    return path


def write_sequence_config(tmp_path, tiny_model_dir, continual, data):
    config = {
        "model": {"name": str(tiny_model_dir)},
        "data": {"max_length": 16, **data},
        "lora": {"r": 4, "alpha": 8, "targets": "all-linear"},
        "train": {"epochs": 2, "lr": 1e-2, "batch_size": 8, "threads": 1, "recipe": "off", "checkpoint_every": 5},
        "continual": continual,
    }
    path = tmp_path / "continual.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_replay_buffers_keep_earlier_classes():
    earlier = [Example(text=str(i), label="a" if i < 90 else "b", source=f"d:{i}") for i in range(100)]
    balanced = replay_buffer(earlier, 20, "balanced", seed=0)
    assert Counter(e.label for e in balanced) == {"a": 10, "b": 10}
    reservoir = replay_buffer(earlier, 20, "reservoir", seed=0)
    assert len(reservoir) == 20 and len(set(map(id, reservoir))) == 20
    assert replay_buffer(earlier[:5], 20, "balanced", seed=0) == earlier[:5]


def test_transfer_scores():
    summary = transfer([[0.9], [0.6, 0.8], [0.5, 0.7, 0.9]])
    assert summary["average_accuracy"] == pytest.approx(0.7)
    assert summary["bwt"] == pytest.approx(((0.5 - 0.9) + (0.7 - 0.8)) / 2)
    assert summary["forgetting"] == pytest.approx([0.4, 0.1])


def test_class_incremental_sequence_with_replay_and_its_resume(tiny_model_dir, tmp_path, capsys):
    data = write_labelled(tmp_path / "d.jsonl", ["sport", "tech", "food", "art"], 96)
    continual = {"strategy": "replay", "classes": [["sport", "tech"], ["food", "art"]], "buffer_size": 8}
    path = write_sequence_config(tmp_path, tiny_model_dir, continual, {"train": str(data)})
    config = load_config(path)
    stages = class_stages(config)
    assert [s.labels for s in stages] == [["sport", "tech"], ["sport", "tech", "food", "art"]]
    replayed = stage_training(config, stages, 1)
    assert Counter(e.label for e in replayed[len(stages[1].train):]) == {"sport": 4, "tech": 4}

    output = tmp_path / "seq"
    assert main(["train", str(path), "--output", str(output)]) == 0
    results = json.loads((output / "metrics.json").read_text())["continual"]
    assert [len(row) for row in results["accuracy_matrix"]] == [1, 2]
    assert results["bwt"] == pytest.approx(results["accuracy_matrix"][1][0] - results["accuracy_matrix"][0][0])
    assert (output / "accuracy_matrix.png").stat().st_size > 1000
    assert json.loads((output / "stage-1" / "labels.json").read_text()) == ["sport", "tech", "food", "art"]
    assert load_config(output / "stage-1" / "config.yaml").init_from == str(output / "stage-0")
    assert "backward transfer" in capsys.readouterr().out

    # Killed during the last stage: a rerun reads stage 0 back and trains stage 1 again.
    first = (output / "stage-0" / "metrics.json").read_text()
    shutil.rmtree(output / "stage-1")
    again = train_sequence(load_config(path, [f"output={output}"]), progress=False)["continual"]
    assert (output / "stage-0" / "metrics.json").read_text() == first
    assert again["accuracy_matrix"][0] == results["accuracy_matrix"][0]


def test_task_incremental_adapters_forget_nothing(tiny_model_dir, tmp_path):
    topics = write_labelled(tmp_path / "topics.jsonl", ["sport", "tech"], 48)
    spam = write_labelled(tmp_path / "spam.jsonl", ["spam", "ham"], 48, seed=1)
    continual = {"strategy": "adapters", "tasks": [{"train": str(topics)}, {"train": str(spam)}]}
    path = write_sequence_config(tmp_path, tiny_model_dir, continual, {})
    results = train_sequence(load_config(path, [f"output={tmp_path / 'seq'}"]), progress=False)["continual"]
    matrix = results["accuracy_matrix"]
    assert results["stages"] == ["stage-0-topics", "stage-1-spam"] and matrix[1][0] == matrix[0][0]
    assert results["bwt"] == 0 and results["kind"] == "task-incremental"


def test_bad_sequences_are_refused_in_one_line(tiny_model_dir, tmp_path, capsys):
    data = write_labelled(tmp_path / "d.jsonl", ["sport", "tech", "food", "art"], 16)
    bad = {"strategy": "replay", "classes": [["sport", "tech"], ["food", "opera"]]}
    path = write_sequence_config(tmp_path, tiny_model_dir, bad, {"train": str(data)})
    assert main(["train", str(path), "--output", str(tmp_path / "seq")]) != 0
    assert "continual.classes: 'opera' is not a label of the data" in capsys.readouterr().err
    adapters = {"strategy": "adapters", "classes": [["sport", "tech"], ["food", "art"]]}
    path = write_sequence_config(tmp_path, tiny_model_dir, adapters, {"train": str(data)})
    with pytest.raises(FinegrainError, match="adapters needs task-incremental stages"):
        train_sequence(load_config(path, [f"output={tmp_path / 'seq2'}"]), progress=False)
    with pytest.raises(FinegrainError, match="'continual.strategy' must be sequential, replay, joint or adapters"):
        load_config(path, ["continual.strategy=ewc"])
