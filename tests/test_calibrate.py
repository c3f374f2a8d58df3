"""Calibration: ECE and the reliability diagram in classification reports, `finegrain calibrate` on a tiny run."""

import json
import math
import random

import pytest
import torch
import torch.nn.functional as F
import yaml

import finegrain
from finegrain.calibrate import calibrate_run, fit_temperature
from finegrain.cli import main
from finegrain.errors import FinegrainError
from finegrain.evaluate.metrics import calibration_metrics
from finegrain.evaluate.report import write_classification_report
from finegrain.evaluate.metrics import classification_metrics
from finegrain.inference import predict_outputs
from finegrain.tasks.classification import scale_temperature
from finegrain.serve.models import ModelRegistry

from serve_helpers import train_run

SENTIMENT = {"fresh": ["great fun film", "a gripping story", "good cast"], "rotten": ["dull and slow", "badly acted", "a bad story"]}
TEXTS = ["great fun film and good cast", "dull and slow", "a gripping story", "badly acted and a bad story"]


def reference_ece(y_true, probabilities, labels, num_bins=15):
    """ECE written out as in Guo et al. (2017): bins ((m-1)/M, m/M], sum |B|/n |acc(B) - conf(B)|."""
    n, total = len(y_true), 0.0
    for m in range(1, num_bins + 1):
        members = [i for i, p in enumerate(probabilities)
                   if (m - 1) / num_bins < max(p) <= m / num_bins or (m == 1 and max(p) == 0)]
        if members:
            accuracy = sum(labels[max(range(len(labels)), key=probabilities[i].__getitem__)] == y_true[i] for i in members) / len(members)
            confidence = sum(max(probabilities[i]) for i in members) / len(members)
            total += len(members) / n * abs(accuracy - confidence)
    return total


def test_ece_matches_the_definition_on_random_predictions():
    rng = random.Random(0)
    labels = ["a", "b", "c"]
    for _ in range(5):
        probabilities = []
        for _ in range(200):
            row = [rng.random() ** 3 for _ in labels]
            probabilities.append([x / sum(row) for x in row])
        y_true = [rng.choice(labels) for _ in probabilities]
        result = calibration_metrics(y_true, probabilities, labels)
        assert result["ece"] == pytest.approx(reference_ece(y_true, probabilities, labels), abs=1e-12)
        assert sum(b["count"] for b in result["bins"]) == 200 and len(result["bins"]) == 15


def test_ece_of_a_perfectly_calibrated_and_an_overconfident_model():
    # Confidence 0.75 right on 3 of 4: calibrated; confidence 1.0 right on 1 of 2: ECE 0.5.
    calibrated = calibration_metrics(["a", "a", "a", "b"], [[0.75, 0.25]] * 4, ["a", "b"])
    assert calibrated["ece"] == pytest.approx(0.0)
    overconfident = calibration_metrics(["a", "b"], [[1.0, 0.0], [1.0, 0.0]], ["a", "b"])
    assert overconfident["ece"] == pytest.approx(0.5)
    assert overconfident["bins"][-1]["count"] == 2 and overconfident["bins"][0]["accuracy"] is None


def test_temperature_scales_logits_through_probabilities():
    logits = torch.randn(5, 3, dtype=torch.float64)
    torch.testing.assert_close(scale_temperature(logits.softmax(-1), 1.7), (logits / 1.7).softmax(-1))


def test_temperature_is_the_nll_minimum():
    generator = torch.Generator().manual_seed(0)
    targets = torch.randint(0, 4, (300,), generator=generator)
    logits = torch.randn(300, 4, generator=generator) + 1.5 * F.one_hot(targets, 4)
    for scale in (0.3, 1.0, 5.0):  # under-, about right, over-confident
        fitted = fit_temperature(logits * scale, targets)
        grid = [math.exp(x / 200) for x in range(-800, 801)]
        best = min(grid, key=lambda t: F.cross_entropy(logits * scale / t, targets).item())
        assert fitted == pytest.approx(best, rel=0.01)
    assert fit_temperature(logits * 5, targets) > 1 > fit_temperature(logits * 0.3, targets)


def test_report_shows_the_ece_and_the_reliability_diagram(tmp_path):
    y_true = ["a", "b", "a", "a"]
    probabilities = [[0.9, 0.1], [0.4, 0.6], [0.3, 0.7], [0.8, 0.2]]
    metrics = classification_metrics(y_true, ["a", "b", "b", "a"], ["a", "b"])
    metrics["calibration"] = calibration_metrics(y_true, probabilities, ["a", "b"])
    written = write_classification_report(tmp_path, metrics)
    assert written["reliability_diagram"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (tmp_path / "report.md").read_text()
    assert f"ECE {metrics['calibration']['ece']:.4f} (15 bins)" in markdown
    assert "![Reliability diagram](reliability_diagram.png)" in markdown
    assert "Reliability diagram" in (tmp_path / "report.html").read_text()


@pytest.fixture(scope="module")
def run(tiny_model_dir, tmp_path_factory):
    return train_run(tiny_model_dir, tmp_path_factory.mktemp("calibrate") / "sentiment", SENTIMENT)


def test_a_trained_run_reports_its_calibration(run):
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0 <= metrics["test"]["calibration"]["ece"] <= 1
    assert (run / "reliability_diagram.png").is_file()
    assert "ECE" in (run / "report.md").read_text()


def test_calibrate_stores_a_temperature_that_load_and_serve_apply(run, capsys):
    before = finegrain.load(run).predict(TEXTS)
    assert main(["calibrate", str(run)]) == 0
    assert "validation ECE" in capsys.readouterr().out
    stored = json.loads((run / "temperature.json").read_text())
    temperature = stored["temperature"]
    assert temperature != 1.0 and stored["validation"]["after"]["nll"] <= stored["validation"]["before"]["nll"] + 1e-9
    assert stored["validation"]["after"]["accuracy"] == stored["validation"]["before"]["accuracy"]

    after = finegrain.load(run).predict(TEXTS)
    assert [p["label"] for p in after] == [p["label"] for p in before]  # the argmax is unchanged
    predictor = finegrain.load(run)  # softmax(log p / T) of the probabilities the run gave before
    items = predictor.task.encode(predictor.tokenizer, predictor.task.examples_from_inputs(TEXTS, predictor.config.data), 16)
    logits = predict_outputs(predictor.model, predictor.task, items, predictor.tokenizer.pad_token_id)
    predictor.task.temperature = 1.0
    uncalibrated = predictor.task.final_probabilities(predictor.task.probabilities(logits), items)
    expected = (uncalibrated.double().log() / temperature).softmax(-1)
    for a, row in zip(after, expected.tolist()):
        assert a["probabilities"]["fresh"] == pytest.approx(row[predictor.task.index["fresh"]], abs=2e-6)

    registry = ModelRegistry([("sentiment", run)])
    registry.load()
    assert registry.runs["sentiment"].task.temperature == temperature

    again = calibrate_run(run)  # a second fit starts from T = 1, not from the stored T
    assert again["temperature"] == pytest.approx(temperature, rel=1e-4)
    assert again["validation"]["before"] == stored["validation"]["before"]


def test_calibrate_refusals(run, tmp_path, capsys):
    assert main(["calibrate", str(tmp_path)]) == 1
    assert "not a finegrain run directory" in capsys.readouterr().err
    other = tmp_path / "multi"
    other.mkdir()
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["data"]["multi_label"] = True
    (other / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(FinegrainError, match="multi-label"):
        calibrate_run(other)
    (run / "temperature.json").write_text('{"temperature": -1}')
    try:
        with pytest.raises(FinegrainError, match="temperature.json: temperature -1.0 is not a positive number"):
            finegrain.load(run)
    finally:
        (run / "temperature.json").unlink()
