"""task: regression on the tiny model: numbers in, numbers out, standardised targets, the VADER demo set."""

import json
import random

import pytest
import torch
import yaml

import finegrain
from finegrain import datasets
from finegrain.cli import main
from finegrain.config import HeadConfig
from finegrain.errors import FinegrainError
from finegrain.tasks.regression import RegressionTask

WORDS = {2.0: ["superb", "wonderful", "great"], 0.0: ["fine", "okay", "average"], -2.0: ["awful", "dreadful", "terrible"]}


def write_scores(path, n: int, seed: int = 0):
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            value = rng.choice(sorted(WORDS))
            f.write(json.dumps({"text": " ".join(rng.sample(WORDS[value], 2)), "score": value}) + "\n")
    return path


def test_targets_are_standardised_and_predictions_return_to_units():
    task = RegressionTask(["score", 1.0, 2.0])
    assert task.target(5.0) == 2.0
    values = task.probabilities(torch.tensor([[0.0], [1.5]]))
    assert task.decode(values) == [{"value": 1.0}, {"value": 4.0}]
    loss = task.loss(torch.tensor([[0.5], [1.0]]), {"targets": torch.tensor([0.0, 1.0])})
    torch.testing.assert_close(loss, torch.tensor(0.125))
    metrics = task.metrics([{"value": 1.0}, {"value": 3.0}], [1.0, 2.0])
    assert metrics["mse"] == 0.5 and metrics["neg_mse"] == -0.5 and metrics["mae"] == 0.5


def test_class_weights_are_refused():
    with pytest.raises(FinegrainError, match="head.class_weights"):
        RegressionTask(["score", 0.0, 1.0], HeadConfig(class_weights="balanced")).set_class_weights([])


def test_cli_trains_a_regression_run_that_beats_the_mean(tiny_model_dir, tmp_path, capsys):
    data = write_scores(tmp_path / "scores.jsonl", 240)
    config = {
        "task": "regression",
        "model": {"name": str(tiny_model_dir)},
        "data": {"train": str(data), "label_field": "score", "max_length": 8},
        "lora": {"r": 4, "alpha": 8, "targets": "all-linear", "layers": [-1]},
        "train": {"epochs": 6, "lr": 1e-2, "batch_size": 16, "threads": 1, "checkpoint_every": 1000},
    }
    path = tmp_path / "regression.yaml"
    path.write_text(yaml.safe_dump(config))
    run_dir = tmp_path / "run"
    assert main(["train", str(path), "--output", str(run_dir)]) == 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    labels = json.loads((run_dir / "labels.json").read_text())
    assert labels[0] == "score" and abs(labels[1]) < 0.5 and 1.0 < labels[2] < 2.0
    # Predicting the training mean scores r2 = 0; the words tell the three values apart.
    assert metrics["test"]["r2"] > 0.5, metrics["test"]
    assert "pearson" in capsys.readouterr().out
    assert (run_dir / "by_range.png").is_file() and "By range of the true value" in (run_dir / "report.md").read_text()

    predictor = finegrain.load(run_dir)
    superb, awful = predictor.predict(["superb wonderful", "awful dreadful"])
    assert superb["value"] > awful["value"]
    assert main(["evaluate", str(run_dir), "--data", str(data)]) == 0


def test_non_numeric_scores_name_the_line(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "a", "score": 1.5}\n{"text": "b", "score": "high"}\n')
    args = ["train", "--model", str(tiny_model_dir), "--data", str(data), "--set", "task=regression",
            "--set", "data.label_field=score", "--output", str(tmp_path / "r")]
    assert main(args) == 1
    assert "bad.jsonl:2" in capsys.readouterr().err


def test_vader_domains():
    tweets = datasets.load("vader")
    assert len(tweets) == 4200 and all(-4 <= ex.label <= 4 for ex in tweets)
    assert tweets[0].source.endswith("tweets_GroundTruth.txt:2")
    assert len(datasets.load("vader", domain="all")) == sum(
        len(datasets.load("vader", domain=d)) for d in ("tweets", "movies", "amazon", "nyt")
    )
    with pytest.raises(FinegrainError, match="domain"):
        datasets.load("vader", domain="books")
