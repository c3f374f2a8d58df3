"""Warm starts: `init_from` begins from an earlier run's adapter and its head, row by row per label."""

from __future__ import annotations

import json

import pytest
import torch

from finegrain.cli import main
from finegrain.config import load_config
from finegrain.errors import FinegrainError
from finegrain.peft import read_adapter
from finegrain.rundir import adapter_dir
from finegrain.run import build
from finegrain.warm_start import check_init_from
from test_train import write_config, write_data


@pytest.fixture(scope="module")
def earlier(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("earlier")
    config = write_config(root / "c.yaml", tiny_model_dir, write_data(root / "d.jsonl", 32), epochs=1, recipe="off")
    assert main(["train", str(config), "--output", str(root / "run")]) == 0
    return root / "run"


def test_the_adapter_and_the_rows_of_shared_labels_carry_over(earlier, tiny_model_dir, tmp_path):
    config = load_config(write_config(tmp_path / "c.yaml", tiny_model_dir, tmp_path / "unused.jsonl"),
                         [f"init_from={earlier}", "init_labels={rotten: negative}"])
    model, _, _, adapter = build(config, ["fresh", "mixed", "negative"], progress=False)
    _, tensors = read_adapter(adapter_dir(earlier))
    own = model.state_dict()
    old_labels = json.loads((earlier / "labels.json").read_text())
    for key, tensor in tensors.items():
        if key.startswith("score."):
            assert torch.equal(own[key][0], tensor[old_labels.index("fresh")])
            assert torch.equal(own[key][2], tensor[old_labels.index("rotten")])  # renamed to negative
            assert not torch.equal(own[key][1], tensor[0]) and not torch.equal(own[key][1], tensor[1])  # a fresh row
        else:
            assert torch.equal(own[key], tensor), key
    assert adapter.modules_to_save == ["score"] and model.get_submodule("score").weight.requires_grad


def test_a_warm_started_run_trains_through_the_cli(earlier, tiny_model_dir, tmp_path):
    config = write_config(tmp_path / "c.yaml", tiny_model_dir, write_data(tmp_path / "d.jsonl", 24, seed=3),
                          epochs=1, recipe="off")
    assert main(["train", str(config), "--set", f"init_from={earlier}", "--output", str(tmp_path / "run")]) == 0
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["test"]["accuracy"] >= 0


@pytest.mark.parametrize("overrides, message", [
    (["task=regression"], "is a classification run and this config trains regression"),
    (["model.num_layers=1"], "kept model.num_layers=None, this config 1"),
    (["init_labels={sour: negative}"], "init_labels: .* has no label 'sour'"),
])
def test_a_run_that_does_not_fit_is_refused_in_one_line(earlier, tiny_model_dir, tmp_path, capsys, overrides, message):
    config = write_config(tmp_path / "c.yaml", tiny_model_dir, write_data(tmp_path / "d.jsonl", 24))
    sets = [a for o in [f"init_from={earlier}", *overrides] for a in ("--set", o)]
    assert main(["train", str(config), *sets, "--output", str(tmp_path / "run")]) != 0
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    with pytest.raises(FinegrainError, match=message):
        check_init_from(load_config(config, [f"init_from={earlier}", *overrides]))


def test_an_unfinished_run_is_refused(tiny_model_dir, tmp_path):
    (tmp_path / "half").mkdir()
    config = write_config(tmp_path / "c.yaml", tiny_model_dir, write_data(tmp_path / "d.jsonl", 8))
    (tmp_path / "half" / "config.yaml").write_text((tmp_path / "c.yaml").read_text())
    with pytest.raises(FinegrainError, match="no trained adapter yet"):
        build(load_config(config, [f"init_from={tmp_path / 'half'}"]), ["fresh", "rotten"], progress=False)
