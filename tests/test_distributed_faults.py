"""A rank of a torchrun job killed mid-run (gloo, 2 processes, the tiny model): the whole job exits
non-zero, the surviving rank says why in one line, nothing half-written takes the place of a run
file, and `--resume` finishes the run as if nothing had happened."""

import json

import torch
from safetensors.torch import load_file

from finegrain.cli import main
from launch_helpers import finegrain
from test_train import write_config, write_data


def test_rank0_killed_while_writing_a_checkpoint_ends_the_job(tiny_model_dir, tmp_path):
    """Rank 0 (the writer of an adapter run) is killed inside its second checkpoint write: rank 1's
    next collective call fails, it ends with one line, torchrun exits non-zero; checkpoint/ is still
    the first checkpoint, whole, and the resumed run ends with the uninterrupted run's adapter."""
    data = write_data(tmp_path / "data.jsonl", 64)
    config = write_config(tmp_path / "run.yaml", tiny_model_dir, data, epochs=2)
    options = ["--set", "lora.dropout=0", "--set", "head.tfidf_mix=0"]
    assert main(["train", str(config), "--output", str(tmp_path / "whole"), *options]) == 0
    run_dir = tmp_path / "killed"
    killed = finegrain("train", str(config), "--output", str(run_dir), *options, processes=2, fault="checkpoint_write:2")
    assert killed.returncode != 0
    said = [line for line in killed.stderr.splitlines() if line.startswith("finegrain train:")]
    assert len(said) <= 1 and all("another process of this job ended" in line for line in said), said
    checkpoint = run_dir / "checkpoint"
    assert json.loads((checkpoint / "state.json").read_text())["step"] == 2  # the first (checkpoint_every 2)
    assert sorted(p.name for p in checkpoint.iterdir()) == ["optimizer.pt", "state.json", "trainable.safetensors"]
    assert not (run_dir / "metrics.json").exists() and not (run_dir / "adapter").exists()
    assert main(["train", "--resume", str(run_dir)]) == 0
    assert not [p.name for p in run_dir.iterdir() if ".tmp" in p.name or p.name.endswith(".old")]  # cleaned on resume
    whole = load_file(tmp_path / "whole" / "adapter" / "adapter_model.safetensors")
    resumed = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    for name in whole:
        torch.testing.assert_close(resumed[name], whole[name], atol=1e-5, rtol=1e-4, msg=name)
