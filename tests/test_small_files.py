"""benchmarks/small_files.py: a training file cut to a few rows, stratified, as the 100-label runs use it."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "small_files.py"


def test_cuts_each_file_to_its_rows_in_the_labels_proportions(tmp_path):
    rows = [{"text": f"text {i}", "label": "a" if i % 3 else "b"} for i in range(60)]  # 40 a, 20 b
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = [sys.executable, str(SCRIPT), str(tmp_path / "out"), f"mine={tmp_path / 'train.jsonl'}", "--rows", "9"]
    done = subprocess.run(run, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "mine: 9 of 60 rows" in done.stdout
    cut = [json.loads(line) for line in (tmp_path / "out" / "mine" / "train.jsonl").read_text().splitlines()]
    assert Counter(r["label"] for r in cut) == {"a": 6, "b": 3}
    assert all(r in rows for r in cut) and len({r["text"] for r in cut}) == 9
    again = subprocess.run(run, capture_output=True, text=True, timeout=120)  # seed 0: the same rows again
    assert again.returncode == 0
    assert [json.loads(line) for line in (tmp_path / "out" / "mine" / "train.jsonl").read_text().splitlines()] == cut
    other = subprocess.run(run + ["--seed", "1"], capture_output=True, text=True, timeout=120)  # another draw
    assert other.returncode == 0, other.stderr[-2000:]
    drawn = [json.loads(line) for line in (tmp_path / "out" / "mine" / "train.jsonl").read_text().splitlines()]
    assert Counter(r["label"] for r in drawn) == {"a": 6, "b": 3} and drawn != cut


def test_a_file_without_a_name_is_refused(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), "train.jsonl"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode != 0 and "give NAME=TRAIN.jsonl" in done.stderr
