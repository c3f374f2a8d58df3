"""Embedding mixup (finegrain.train.mixup) on the tiny model: the loss is the texts' own plus that of
mixed pairs of their pooled states, the layers below learn from both, a run trains and resumes
exactly with it, and its options are checked in one line."""

import json

import pytest
import torch
import torch.nn.functional as F
import yaml

from finegrain.config import load_config
from finegrain.errors import FinegrainError
from finegrain.train.mixup import MixupObjective
from finegrain.train.objectives import TaskObjective

from test_train import assert_same_adapter, classifier, kill_and_resume, train_cli, write_config, write_data


def test_the_loss_adds_mixed_pairs_of_pooled_states(tiny_model):
    task, model, items = classifier(tiny_model)
    inner = TaskObjective(task, items)
    mixup = MixupObjective(inner, model.score, fraction=0.5, alpha=0.4)
    (batch, _), = inner.pieces(list(range(8)), 0, None)
    pooled = []
    handle = model.score.register_forward_hook(lambda _m, args, _out: pooled.append(args[0]))

    torch.manual_seed(3)
    loss = mixup.loss(model, batch)
    handle.remove()
    assert pooled[0].shape[0] == 8 + 4  # the texts and k = 0.5 * 8 mixed rows, in one forward
    torch.manual_seed(3)  # the same draws, by hand
    first = torch.randperm(8)[:4]
    second = (first + torch.randint(1, 8, (4,))) % 8
    lam = torch.distributions.Beta(0.4, 0.4).sample((4,))
    assert bool((first != second).all())
    h = pooled[0][:8]
    mixed = lam[:, None] * h[first] + (1 - lam[:, None]) * h[second]
    torch.testing.assert_close(pooled[0][8:], mixed)
    logits = model.score(mixed)
    y = batch["targets"]
    pairs = lam * F.cross_entropy(logits, y[first], reduction="none") + (1 - lam) * F.cross_entropy(logits, y[second], reduction="none")
    expected = F.cross_entropy(model.score(h), y) + 0.5 * pairs.mean()
    torch.testing.assert_close(loss, expected)
    own = inner.loss(model, batch)
    assert float(loss.detach()) > float(own.detach())

    def lora_b_gradients(value):  # LoRA's B starts at zero: only its gradient is non-zero at the start
        model.zero_grad()
        value.backward()
        return torch.cat([p.grad.flatten() for n, p in model.named_parameters() if "lora_B" in n])

    with_pairs, alone = lora_b_gradients(loss), lora_b_gradients(own)
    assert alone.abs().sum() > 0 and not torch.allclose(with_pairs, alone)  # the pairs' loss reaches the layers below


def test_a_piece_of_one_text_is_left_as_it_is(tiny_model):
    task, model, items = classifier(tiny_model)
    inner = TaskObjective(task, items)
    (batch, _), = inner.pieces([0], 0, None)
    torch.testing.assert_close(MixupObjective(inner, model.score, 1.0, 0.4).loss(model, batch), inner.loss(model, batch))


def test_cli_trains_with_mixup_and_resumes_exactly(tiny_model_dir, tmp_path):
    data = write_data(tmp_path / "data.jsonl", 60)
    config = write_config(tmp_path / "run.yaml", tiny_model_dir, data, epochs=2, eval_every=0, checkpoint_every=2)
    plain = train_cli(str(config), "--output", str(tmp_path / "plain"))
    assert plain.returncode == 0, plain.stderr[-2000:]
    spec = yaml.safe_load(config.read_text())
    spec["augment"] = {"mixup": 0.5, "mixup_alpha": 0.3}
    config.write_text(yaml.safe_dump(spec))
    straight = train_cli(str(config), "--output", str(tmp_path / "straight"))
    assert straight.returncode == 0, straight.stderr[-2000:]

    def first_loss(run):
        records = map(json.loads, (tmp_path / run / "metrics.jsonl").read_text().splitlines())
        return next(r["train_loss"] for r in records if "train_loss" in r)

    assert first_loss("straight") > 1.2 * first_loss("plain")  # the texts' loss and half as many mixed ones
    kill_and_resume(config, tmp_path / "killed", "train_step:9")  # mid-epoch 2
    assert_same_adapter(tmp_path / "straight", tmp_path / "killed")


@pytest.mark.parametrize("override, message", [
    ("augment.mixup=1.5", "'augment.mixup' must be a fraction of each batch in"),
    ("augment.mixup_alpha=0", "'augment.mixup_alpha' must be above 0"),
])
def test_bad_mixup_options_are_one_line(tiny_model_dir, tmp_path, override, message):
    config = write_config(tmp_path / "run.yaml", tiny_model_dir, write_data(tmp_path / "data.jsonl", 10))
    with pytest.raises(FinegrainError, match=message):
        load_config(str(config), [override])


def test_mixup_is_refused_outside_classification(tiny_model_dir, tmp_path):
    config = write_config(tmp_path / "run.yaml", tiny_model_dir, write_data(tmp_path / "data.jsonl", 10))
    with pytest.raises(FinegrainError, match="'augment.mixup' must be 0 unless the task is classification"):
        load_config(str(config), ["task=regression", "augment.mixup=0.2"])
