"""benchmarks/mix_choice.py: a finished run's mix, replayed under each rule, gives the rows the run
recorded and the test score the run reported at the weight its own rule chose."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from finegrain.cli import main

from test_baselines import _write_run
from test_word_mix import ner_config

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "mix_choice.py"


def _replay(run: Path, tmp_path: Path) -> dict:
    out = tmp_path / "replay.json"
    done = subprocess.run([sys.executable, str(SCRIPT), str(run), "--output", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"| {run} |" in done.stdout
    return json.loads(out.read_text())[str(run)]


def _check(run: Path, key: str, rule: str, tmp_path: Path) -> None:
    metrics = json.loads((run / "metrics.json").read_text())
    mix, replay = metrics[key], _replay(run, tmp_path)
    assert replay["validation"] == mix["validation"]  # the same candidates, scored the same way
    assert replay["picks"][rule] == mix["weight"]
    chosen = next(r for r in replay["test"] if (r.get("strength"), r["weight"]) == (mix.get("strength"), mix["weight"]))
    assert abs(chosen["score"]) == pytest.approx(metrics["test"][mix["metric"]], abs=1e-6)  # rows keep 6 digits
    assert abs(replay["test"][0]["score"]) == pytest.approx(mix["test_model_alone"][mix["metric"]], abs=1e-6)


def test_a_classifiers_tfidf_mix_replays_as_it_ran(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    config = _write_run(tmp_path, tiny_model_dir)
    assert main(["train", str(config), "--output", str(run), "--set", "head.tfidf_mix=auto"]) == 0
    _check(run, "tfidf_mix", "log_loss", tmp_path)


def test_a_taggers_word_mix_replays_as_it_ran(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    assert main(["train", ner_config(tmp_path, tiny_model_dir), "--output", str(run)]) == 0
    _check(run, "word_mix", "metric", tmp_path)
