"""A run that mixes a TF-IDF model into its classifier (head.tfidf_mix): what it chooses, writes,
and how `finegrain.load` predicts with it, on the tiny random model."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

import finegrain
from finegrain.cli import main
from finegrain.tasks.lexical import STRENGTHS, LexicalModel
from finegrain.train.tfidf_mix import out_of_fold

from test_baselines import _write_run


WEIGHTS = [round(0.1 * k, 1) for k in range(10)]


def _train(tmp_path: Path, model_dir: Path, mix, rows: int = 60) -> Path:
    config = _write_run(tmp_path, model_dir, rows)  # words that TF-IDF separates, a model too slow to learn them
    run = tmp_path / f"run-{mix}"
    assert main(["train", str(config), "--output", str(run), "--set", f"head.tfidf_mix={mix}"]) == 0
    return run


def test_auto_mixes_in_tfidf_when_it_helps_and_predicts_as_trained(tiny_model_dir, tmp_path, capsys):
    run = _train(tmp_path, tiny_model_dir, "auto", rows=500)  # 100 validation texts: chosen on them
    assert "), chosen by validation log-loss " in capsys.readouterr().out
    metrics = json.loads((run / "metrics.json").read_text())
    mix = metrics["tfidf_mix"]
    assert "cross_validated" not in mix
    assert [(row["strength"], row["weight"]) for row in mix["validation"]] == [(c, w) for c in STRENGTHS for w in WEIGHTS]
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


def test_a_small_validation_split_chooses_the_mix_on_the_training_texts_too(tiny_model_dir, tmp_path, capsys):
    run = _train(tmp_path, tiny_model_dir, "auto")  # 36 training and 12 validation texts
    assert "chosen by log-loss " in capsys.readouterr().out
    mix = json.loads((run / "metrics.json").read_text())["tfidf_mix"]
    crossed = mix["cross_validated"]
    assert (crossed["folds"], crossed["training_examples"]) == (5, 36)
    pairs = [(c, w) for c in STRENGTHS for w in WEIGHTS]
    assert [(r["strength"], r["weight"]) for r in crossed["table"]] == pairs == [(r["strength"], r["weight"])
                                                                                  for r in mix["validation"]]
    chosen = min(crossed["table"], key=lambda r: (r["log_loss"], r["weight"]))
    assert (mix["strength"], mix["weight"]) == (chosen["strength"], chosen["weight"]) and mix["weight"] > 0
    assert LexicalModel.load(run / "tfidf").weight == mix["weight"]
    # The 48 texts' log-loss: the 12 validation texts' (the validation table's) counts a quarter.
    alone_validation, alone_both = mix["validation"][0]["log_loss"], crossed["table"][0]["log_loss"]
    assert alone_both != pytest.approx(alone_validation)


@pytest.mark.parametrize("informative", ["states", "texts"])
def test_out_of_fold_predicts_each_example_by_models_fitted_without_it(informative):
    # 40 examples: either the states carry the class and the texts are unique nonsense words, or the
    # reverse. Fitted on all 40, both would fit every label; out of fold, only the informative one does.
    generator, rng = torch.Generator().manual_seed(0), random.Random(0)
    targets = torch.arange(40) % 2
    states = torch.randn(40, 64, generator=generator)
    if informative == "states":
        states[:, 0] += 4 * (2 * targets - 1)
        texts = [f"w{rng.randrange(10**6)} v{rng.randrange(10**6)}" for _ in range(40)]
    else:
        texts = [("great fun" if t else "dull slow") + f" film{i}" for i, t in enumerate(targets.tolist())]
    regression, lexical = out_of_fold(states, targets, texts, 2, False, seed=0)
    accuracy = {name: float((probs.argmax(-1) == targets).float().mean())
                for name, probs in {"states": regression, "texts": lexical[STRENGTHS[-1]]}.items()}
    other = "texts" if informative == "states" else "states"
    assert accuracy[informative] >= 0.95 and accuracy[other] <= 0.75
    assert set(lexical) == set(STRENGTHS) and torch.allclose(regression.sum(-1), torch.ones(40))


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
