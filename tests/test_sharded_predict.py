"""Prediction and evaluation in two processes (torchrun, gloo) on the tiny model: the output of
`torchrun --nproc-per-node 2 -m finegrain predict` (and `finegrain predict --nproc 2`) is the
one-process output, in the input's order; `evaluate` gives the one-process metrics."""

import json
from pathlib import Path

import pytest

from finegrain.cli import main
from finegrain.sharded import merge_long_texts, shard, unshard
from launch_helpers import finegrain
from serve_helpers import train_run

LABELS = {"pos": ["great", "good", "fine", "lovely"], "neg": ["bad", "awful", "poor", "dull"]}
WORDS = [*LABELS["pos"], *LABELS["neg"], "film", "plot", "and", "very", "the", "acting"]


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, tmp_path_factory):
    return train_run(tiny_model_dir, tmp_path_factory.mktemp("sharded") / "run", LABELS)


def write_input(path: Path, count: int) -> Path:
    """`count` texts of 1 to 9 words (odd count: the shards differ in size), labelled by their first word."""
    rows = []
    for i in range(count):
        words = [WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(1 + i % 9)]
        rows.append({"text": " ".join(words), "label": "pos" if words[0] in LABELS["pos"] else "neg"})
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def assert_same_predictions(found: Path, expected: Path) -> None:
    """The same texts in the same order, the same labels, the probabilities to float rounding."""
    found_rows = [json.loads(line) for line in found.read_text().splitlines()]
    expected_rows = [json.loads(line) for line in expected.read_text().splitlines()]
    assert [r["text"] for r in found_rows] == [r["text"] for r in expected_rows]
    assert [r["label"] for r in found_rows] == [r["label"] for r in expected_rows]
    for a, b in zip(found_rows, expected_rows):
        assert a["probabilities"] == pytest.approx(b["probabilities"], abs=1e-5)


def test_shards_interleave_and_come_back_in_order():
    examples = list(range(11))
    shards = [shard(examples, 3, rank) for rank in range(3)]
    assert shards == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8]]
    assert unshard(shards, 11) == examples
    merged = merge_long_texts([
        {"max_length": 16, "long_texts": "truncate", "texts": {"input": 6}, "longer": {"input": 1}, "truncated": {"input": 3}},
        {"max_length": 16, "long_texts": "truncate", "texts": {"input": 5}, "longer": {"input": 2}, "truncated": {"input": 4}},
    ])
    assert merged["texts"] == {"input": 11} and merged["longer"] == {"input": 3} and merged["truncated"] == {"input": 7}
    words = merge_long_texts([
        {"max_length": 16, "unit": "words", "texts": {"input": 6}, "longer": {"input": 1}, "truncated": {"input": 3},
         "longest": {"input": 40}},
        {"max_length": 16, "unit": "words", "texts": {"input": 5}, "longer": {"input": 2}, "truncated": {"input": 4},
         "longest": {"input": 25}},
    ])
    assert words["truncated"] == {"input": 7} and words["longest"] == {"input": 40}  # a tagger's longest cut sentence
    assert merge_long_texts([None, None]) is None


def test_two_processes_predict_as_one_in_input_order(run_dir, tmp_path):
    source = write_input(tmp_path / "in.jsonl", 23)
    assert main(["predict", str(run_dir), "--input", str(source), "--output", str(tmp_path / "one.jsonl")]) == 0
    done = finegrain("predict", str(run_dir), "--input", str(source), "--output", str(tmp_path / "two.jsonl"), processes=2)
    assert done.returncode == 0, done.stderr[-2000:]
    assert_same_predictions(tmp_path / "two.jsonl", tmp_path / "one.jsonl")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "one.jsonl", "two.jsonl"]  # no temp file left

    # The shortcut launches the same job.
    done = finegrain("predict", str(run_dir), "--input", str(source), "--nproc", "2", "--output", str(tmp_path / "nproc.jsonl"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert_same_predictions(tmp_path / "nproc.jsonl", tmp_path / "one.jsonl")


def test_two_processes_evaluate_as_one(run_dir, tmp_path):
    source = write_input(tmp_path / "test.jsonl", 17)
    assert main(["evaluate", str(run_dir), "--data", str(source), "--output", str(tmp_path / "one.json")]) == 0
    done = finegrain("evaluate", str(run_dir), "--data", str(source), "--output", str(tmp_path / "two.json"), processes=2)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("weighted avg") == 1  # one report, from rank 0
    assert done.stderr.count("long texts:") == 1 and "9 of 17 input texts" in done.stderr  # once, for the whole file
    one, two = (json.loads((tmp_path / name).read_text()) for name in ("one.json", "two.json"))
    assert two.keys() == one.keys()
    for key in ("accuracy", "confusion_matrix", "data", "num_examples", "source"):
        assert two[key] == one[key], key
    for key in ("macro", "weighted"):
        assert two[key] == pytest.approx(one[key]), key
    assert two["calibration"]["ece"] == pytest.approx(one["calibration"]["ece"], abs=1e-5)


def test_more_processes_than_examples_is_one_line_before_launching(run_dir, tmp_path):
    source = write_input(tmp_path / "in.jsonl", 3)
    done = finegrain("predict", str(run_dir), "--input", str(source), "--nproc", "4", "--output", str(tmp_path / "out.jsonl"))
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"finegrain predict: error: torchrun: 4 processes, but {source} has 3 examples; "
        "run at most 3 (--nproc-per-node) or give a larger file"
    ]
    assert not (tmp_path / "out.jsonl").exists()
    done = finegrain("predict", str(run_dir), "--input", str(source), "--nproc", "0")
    assert done.returncode == 1 and done.stderr.strip() == "finegrain predict: error: --nproc: 0; give at least 1 process"


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the ranks fail for want of a CUDA device")
def test_a_failing_rank_ends_the_shortcut_with_a_line_naming_it(run_dir, tmp_path):
    source = write_input(tmp_path / "in.jsonl", 5)
    done = finegrain("predict", str(run_dir), "--input", str(source), "--nproc", "2", "--device", "cuda")
    assert done.returncode == 1
    assert "Traceback" not in done.stderr and "ChildFailedError" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert "finegrain predict: error: --device: cuda, but torch sees no CUDA device; use cpu or auto" in lines  # the rank's
    assert lines[-1].startswith("finegrain predict: error: --nproc 2: process ") and "exited with code 1" in lines[-1]


def test_train_shortcut_runs_torchrun_and_refuses_a_split_larger_than_the_batch(tiny_model_dir, tmp_path):
    from test_train import write_config, write_data

    config = write_config(tmp_path / "run.yaml", tiny_model_dir, write_data(tmp_path / "data.jsonl", 48), epochs=1)
    done = finegrain("train", str(config), "--output", str(tmp_path / "too-many"), "--nproc", "16")
    assert done.returncode == 1 and not (tmp_path / "too-many").exists()
    assert done.stderr.strip() == ("finegrain train: error: torchrun: 16 processes, but train.batch_size is 8: each global "
                                   "batch is split across the processes; run at most 8 (--nproc-per-node) or raise train.batch_size")
    done = finegrain("train", str(config), "--output", str(tmp_path / "two"), "--nproc", "2")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("weighted avg") == 1  # rank 0 reports
    assert json.loads((tmp_path / "two" / "metrics.json").read_text())["train"]["steps"] > 0


def test_a_torch_without_gloo_is_one_line(monkeypatch):
    import torch.distributed

    from finegrain.errors import FinegrainError
    from finegrain.launch import check_backend, without_flag

    monkeypatch.setattr(torch.distributed, "is_gloo_available", lambda: False)
    with pytest.raises(FinegrainError, match="^--nproc: this torch build has no torch.distributed gloo backend; drop --nproc"):
        check_backend()
    assert without_flag(["predict", "RUN", "--nproc", "2", "--input", "x"], "--nproc") == ["predict", "RUN", "--input", "x"]
    assert without_flag(["train", "--nproc=2", "c.yaml"], "--nproc") == ["train", "c.yaml"]
