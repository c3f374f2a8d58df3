"""benchmarks/fewshot_draws.py: the recipe of each model on several draws of a few rows, their
ensemble, the earlier TF-IDF mix rule replayed, and the table of means and spreads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from test_bert import random_reference, tiny_hf_config, write_tokenizer

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "fewshot_draws.py"
WORDS = ["plot", "cast", "score", "ending", "pace", "script", "camera"]


@pytest.fixture
def encoder_dir(tmp_path):
    directory = tmp_path / "tiny-bert"
    random_reference(tiny_hf_config()).save_pretrained(directory)
    write_tokenizer(directory)
    return directory


def _rows(path: Path, n: int, offset: int = 0) -> Path:
    rows = [{"text": f"the {WORDS[(i + offset) % 7]} was {'good great' if i % 2 else 'bad dull'} {i + offset}",
             "label": "fresh" if i % 2 else "rotten"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "out"), *args], capture_output=True, text=True,
                          timeout=600)


def test_each_draw_runs_every_model_and_their_ensemble_and_a_rerun_keeps_them(tiny_model_dir, encoder_dir, tmp_path):
    train, test = _rows(tmp_path / "train.jsonl", 60), _rows(tmp_path / "test.jsonl", 16, offset=100)
    args = [f"mine={train},{test}", "--rows", "20", "--draws", "2", "--models", f"{tiny_model_dir},{encoder_dir}",
            "--set", "train.threads=1", "--set", "train.epochs=1"]
    done = _run(tmp_path, *args)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "out"
    draws = [[json.loads(line) for line in (out / "mine" / f"d{d}" / "train.jsonl").read_text().splitlines()] for d in (0, 1)]
    assert all(len(rows) == 20 for rows in draws) and draws[0] != draws[1]  # two draws of the 60 rows
    results = json.loads((out / "table.json").read_text())["mine"]
    assert [list(r) for r in results] == [["finegrain", "model alone", "earlier mix rule", "tiny-bert", "ensemble", "TF-IDF"]] * 2
    for d, scores in enumerate(results):
        folder = out / "mine" / f"d{d}"
        decoder = json.loads((folder / "tiny-llama-recipe" / "metrics.json").read_text())
        encoder = json.loads((folder / "tiny-bert-recipe" / "metrics.json").read_text())
        ensemble = json.loads((folder / "ensemble" / "ensemble.json").read_text())
        assert scores["finegrain"] == decoder["test"]["macro"]["f1"] and scores["tiny-bert"] == encoder["test"]["macro"]["f1"]
        assert scores["TF-IDF"] == decoder["baselines"]["tfidf"]["macro_f1"]
        assert [Path(m).name for m in ensemble["members"]] == ["tiny-llama-recipe", "tiny-bert-recipe"]
        assert json.loads((folder / "replay.json").read_text())["test_macro_f1"] == scores["earlier mix rule"]
        assert all(0 <= v <= 1 for v in scores.values())
    table = (out / "table.md").read_text()
    assert "| set | finegrain (tiny-llama) | model alone | earlier mix rule | tiny-bert | ensemble | TF-IDF |" in table
    assert "| mine | " in table and "| against finegrain, 2 draws | " in table and " ± " in table
    runs = sorted((out / "mine").glob("d*/*-recipe/metrics.json"))
    stamps = [p.stat().st_mtime_ns for p in runs]
    again = _run(tmp_path, *args)  # everything finished is kept, and the same table comes out
    assert again.returncode == 0, again.stderr[-3000:]
    assert [p.stat().st_mtime_ns for p in runs] == stamps and (out / "table.md").read_text() == table


def test_a_set_without_its_test_file_or_two_models_of_one_name_are_refused(tmp_path):
    done = _run(tmp_path, f"mine={tmp_path / 'train.jsonl'}")
    assert done.returncode != 0 and "give NAME=TRAIN.jsonl,TEST.jsonl" in done.stderr
    done = _run(tmp_path, f"mine={tmp_path / 'train.jsonl'},{tmp_path / 'test.jsonl'}", "--models", "a/model,b/model")
    assert done.returncode != 0 and "give models of different names" in done.stderr
