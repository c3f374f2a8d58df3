"""A run that mixes a TF-IDF model into its classifier (head.tfidf_mix): what it chooses, writes,
and how `finegrain.load` predicts with it, on the tiny random model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import finegrain
from finegrain.cli import main
from finegrain.tasks.lexical import STRENGTHS, LexicalModel

from test_baselines import _write_run


def _train(tmp_path: Path, model_dir: Path, mix) -> Path:
    config = _write_run(tmp_path, model_dir)  # words that TF-IDF separates, a model too slow to learn them
    run = tmp_path / f"run-{mix}"
    assert main(["train", str(config), "--output", str(run), "--set", f"head.tfidf_mix={mix}"]) == 0
    return run


def test_auto_mixes_in_tfidf_when_it_helps_and_predicts_as_trained(tiny_model_dir, tmp_path, capsys):
    run = _train(tmp_path, tiny_model_dir, "auto")
    assert "), chosen by validation log-loss " in capsys.readouterr().out
    metrics = json.loads((run / "metrics.json").read_text())
    mix = metrics["tfidf_mix"]
    weights = [round(0.1 * k, 1) for k in range(10)]
    assert [(row["strength"], row["weight"]) for row in mix["validation"]] == [(c, w) for c in STRENGTHS for w in weights]
    lowest = min(row["log_loss"] for row in mix["validation"])
    chosen = next(r for r in mix["validation"] if (r["strength"], r["weight"]) == (mix["strength"], mix["weight"]))
    assert mix["weight"] > 0 and chosen["log_loss"] == lowest
    assert metrics["test"]["accuracy"] == 1.0 > mix["test_model_alone"]["accuracy"]  # the words carry it
    assert metrics["baselines"]["model_alone"]["accuracy"] == mix["test_model_alone"]["accuracy"]
    assert "warning" not in metrics["baselines"]
    assert "finegrain, model alone" in (run / "report.md").read_text()

    saved = LexicalModel.load(run / "tfidf")
    assert (saved.weight, saved.strength) == (mix["weight"], mix["strength"])
    texts = ["great fun film", "dull slow film"]
    predicted = finegrain.load(run).predict(texts)
    assert [p["label"] for p in predicted] == ["fresh", "rotten"]
    # The served probabilities are the model's mixed with the saved TF-IDF model's at the weight.
    bare = finegrain.load(run)
    bare.task.lexical = None
    alone = torch.tensor([[p["probabilities"][label] for label in ("fresh", "rotten")] for p in bare.predict(texts)])
    expected = (1 - saved.weight) * alone + saved.weight * saved.probabilities(texts)
    got = torch.tensor([[p["probabilities"][label] for label in ("fresh", "rotten")] for p in predicted])
    torch.testing.assert_close(got, expected, atol=2e-6, rtol=0)


@pytest.mark.parametrize("mix", [0, 0.5])
def test_a_fixed_weight_or_none(tiny_model_dir, tmp_path, mix):
    run = _train(tmp_path, tiny_model_dir, mix)
    metrics = json.loads((run / "metrics.json").read_text())
    if mix == 0:
        assert "tfidf_mix" not in metrics and not (run / "tfidf").exists()
        assert "model_alone" not in metrics["baselines"]
    else:
        assert metrics["tfidf_mix"]["weight"] == 0.5 and metrics["tfidf_mix"]["validation"] == []
        assert LexicalModel.load(run / "tfidf").weight == 0.5


def test_a_bad_weight_names_the_key(tiny_model_dir, tmp_path, capsys):
    config = _write_run(tmp_path, tiny_model_dir)
    assert main(["train", str(config), "--output", str(tmp_path / "run"), "--set", "head.tfidf_mix=1.5"]) != 0
    assert "head.tfidf_mix" in capsys.readouterr().err
