"""Checkpoint averaging (train.average_last) on the tiny model: the run's saved weights are the mean of
the trainable weights at its last K evaluations, validated and reported; the copies resume; bad values."""

import json

import pytest
import torch

import finegrain.train.trainer
from finegrain.config import load_config
from finegrain.errors import FinegrainError
from finegrain.run import build_trained, train
from finegrain.rundir import read_config
from finegrain.train.averaging import WeightAverage
from finegrain.train.trainer import flat_metrics

from test_train import write_config, write_data


def test_weight_average_keeps_the_last_k_and_their_mean():
    average = WeightAverage(3)
    weight = torch.zeros(2, 2)
    for step in range(1, 6):
        weight.fill_(step)
        average.snapshot({"w": weight}, step)
        average.snapshot({"w": weight}, step)  # a second call at the same evaluation adds nothing
    assert average.steps == [3, 4, 5]
    torch.testing.assert_close(average.mean()["w"], torch.full((2, 2), 4.0))
    twin = WeightAverage(3)
    twin.load_state_dict(average.state_dict())
    assert twin.steps == [3, 4, 5]
    target = torch.nn.Parameter(torch.zeros(2, 2, dtype=torch.bfloat16))
    twin.load_mean({"w": target})
    assert target.dtype == torch.bfloat16 and float(target[0, 0]) == 4.0


def test_the_run_saves_and_reports_the_mean_of_its_last_evaluations(tiny_model_dir, tmp_path, monkeypatch):
    data = write_data(tmp_path / "data.jsonl", 96)
    config = write_config(tmp_path / "run.yaml", tiny_model_dir, data, epochs=2, eval_every=3, checkpoint_every=1000)
    seen = {}  # the trainable weights at every validation, recorded beside the trainer
    real = finegrain.train.trainer.Trainer._validate

    def recording(self):
        real(self)
        seen[self.state.step] = {n: p.detach().clone() for n, p in self.trainable.items()}

    monkeypatch.setattr(finegrain.train.trainer.Trainer, "_validate", recording)
    results = train(load_config(str(config), [f"output={tmp_path / 'run'}", "train.average_last=3"]), progress=False)

    averaged = results["train"]["average_last"]
    steps = sorted(seen)[-3:]
    assert averaged["evaluations"] == 3 and averaged["steps"] == steps
    name = averaged["metric"]  # the recipe's choice (accuracy or macro_f1)
    assert 0 <= averaged["validation"] <= 1 and averaged["best_single_step"] in seen
    assert flat_metrics(results["validation"])[name] == averaged["validation"]  # the run's weights are the mean's
    log = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r[name] for r in log if r.get("averaged") == 3] == [averaged["validation"]]

    model, _, _ = build_trained(read_config(tmp_path / "run"), tmp_path / "run")
    loaded = dict(model.named_parameters())
    compared = 0
    for name in seen[steps[0]]:
        if name in loaded:
            mean = torch.stack([seen[step][name] for step in steps]).mean(0)
            torch.testing.assert_close(loaded[name].detach(), mean, atol=1e-6, rtol=1e-5)
            assert not torch.allclose(loaded[name].detach(), seen[steps[-1]][name])  # not the last weights
            compared += 1
    assert compared == len(seen[steps[0]])  # the LoRA tensors and the head


def test_average_last_must_be_at_least_two(tiny_model_dir, tmp_path):
    data = write_data(tmp_path / "data.jsonl", 20)
    config = write_config(tmp_path / "run.yaml", tiny_model_dir, data)
    with pytest.raises(FinegrainError, match=r"'train.average_last' must be at least 2") as error:
        load_config(str(config), ["train.average_last=1"])
    assert "\n" not in str(error.value) and "--set train.average_last=1" in str(error.value)


def test_fewer_evaluations_than_average_last_is_one_line(tiny_model_dir, tmp_path):
    data = write_data(tmp_path / "data.jsonl", 40)
    config = write_config(tmp_path / "run.yaml", tiny_model_dir, data, epochs=1, eval_every=0)
    output = tmp_path / "run"
    with pytest.raises(FinegrainError, match=r"train.average_last: 3 evaluations to average, but this run evaluates 1 "
                                             r"time\(s\) \(once per epoch, \d+ steps\); set train.eval_every to at most \d+") as error:
        train(load_config(str(config), [f"output={output}", "train.average_last=3"]), progress=False)
    assert "\n" not in str(error.value) and not output.exists()

