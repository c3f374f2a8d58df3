"""Adversarial training (finegrain.train.adversarial) on the tiny model: the loss is clean + the loss at a
perturbation found from the gradient, on the embedding output or on the cached states, and a CLI run."""

import json

import pytest
import torch

from finegrain.config import load_config
from finegrain.errors import FinegrainError
from finegrain.run import train
from finegrain.train.adversarial import AdversarialObjective, per_token_unit, project
from finegrain.train.objectives import TaskObjective

from test_train import classifier, run_cli, write_config, write_data


class Recording(TaskObjective):
    """The task's loss, keeping each batch it is asked about (to see what the wrapper fed it)."""

    def __post_init__(self):
        super().__post_init__()
        self.seen = []

    def loss(self, forward, batch):
        self.seen.append(batch)
        return super().loss(forward, batch)


def test_fgm_on_the_embeddings_is_one_normalised_gradient_step(tiny_model):
    task, model, items = classifier(tiny_model)
    model.eval()  # no dropout: the same forward by hand and in the objective
    objective = AdversarialObjective(TaskObjective(task, items), "fgm", 0.5, 3, model.model.embed_tokens)
    [(batch, _)] = objective.pieces(list(range(6)), pad_id=0, max_tokens=None)

    def forward(b):
        return model(b)

    loss = objective.loss(forward, batch)

    # By hand: the clean loss's gradient with respect to the embedding output, one step of 0.5 per token.
    embedding = model.model.embed_tokens
    delta = torch.zeros(*batch["input_ids"].shape, 64, requires_grad=True)
    handle = embedding.register_forward_hook(lambda m, a, out: out + delta)
    clean = task.loss(model(batch), batch)
    (g,) = torch.autograd.grad(clean, delta)
    handle.remove()
    step = 0.5 * per_token_unit(g)
    handle = embedding.register_forward_hook(lambda m, a, out: out + step)
    adversarial = task.loss(model(batch), batch)
    handle.remove()
    torch.testing.assert_close(loss, clean + adversarial)
    assert adversarial > clean  # uphill: the gradient's direction raises the loss
    norms = step.norm(dim=-1)  # (B, T): epsilon at each real token, nothing at the padding
    real = torch.arange(norms.shape[1])[None, :] < batch["lengths"][:, None]
    torch.testing.assert_close(norms[real], torch.full_like(norms[real], 0.5))
    assert norms[~real].abs().max() == 0
    # The gradient of the wrapped loss reaches the trained weights through both forwards.
    params = [p for p in model.parameters() if p.requires_grad]
    got = torch.autograd.grad(objective.loss(forward, batch), params)
    handle = embedding.register_forward_hook(lambda m, a, out: out + step)
    want = torch.autograd.grad(task.loss(model(batch), batch), params)
    handle.remove()
    clean_grads = torch.autograd.grad(task.loss(model(batch), batch), params)
    for a, b, c in zip(got, want, clean_grads):
        torch.testing.assert_close(a, b + c, atol=1e-6, rtol=1e-5)


def test_pgd_on_cached_states_steps_within_the_ball(tiny_model):
    task, model, items = classifier(tiny_model)
    model.eval()
    torch.manual_seed(1)
    inner = Recording(task, items)
    inner.hidden = [torch.randn(len(item.input_ids), 64) for item in items]  # states at layer 1 (the prefix cache)
    objective = AdversarialObjective(inner, "pgd", 0.3, 4, model.model.embed_tokens)
    assert objective.hidden is inner.hidden
    [(batch, _)] = objective.pieces(list(range(8)), pad_id=0, max_tokens=None)

    def forward(b):
        return model(b, start_layer=1)

    loss = objective.loss(forward, batch)
    deltas = [seen["hidden"] - batch["hidden"] for seen in inner.seen]
    assert len(deltas) == 5  # the clean forward, 3 more ascent steps, the adversarial forward
    assert deltas[0].abs().max() == 0
    for delta in deltas[1:]:
        assert delta.norm(dim=-1).max() <= 0.3 + 1e-5  # projected onto each token's epsilon ball
    assert deltas[-1].norm(dim=-1).max() > 0.25  # pushed out towards its edge
    clean = task.loss(forward(batch), batch)
    adversarial = task.loss(forward({**batch, "hidden": batch["hidden"] + deltas[-1]}), batch)
    torch.testing.assert_close(loss, clean + adversarial)
    assert adversarial > clean
    # pgd with one step of 2 * epsilon, projected, is fgm
    fgm = AdversarialObjective(TaskObjective(task, items), "fgm", 0.3, 1, model.model.embed_tokens)
    pgd1 = AdversarialObjective(TaskObjective(task, items), "pgd", 0.3, 1, model.model.embed_tokens)
    fgm.hidden = pgd1.hidden = inner.hidden
    [(batch, _)] = fgm.pieces(list(range(8)), pad_id=0, max_tokens=None)
    torch.testing.assert_close(fgm.loss(forward, batch), pgd1.loss(forward, batch))


def test_delta_projection():
    delta = torch.tensor([[[3.0, 4.0], [0.3, 0.4], [0.0, 0.0]]])
    torch.testing.assert_close(project(delta, 1.0), torch.tensor([[[0.6, 0.8], [0.3, 0.4], [0.0, 0.0]]]))


def test_cli_trains_with_pgd_on_the_cached_states_and_fgm_on_the_embeddings(tiny_model_dir, tmp_path):
    data = write_data(tmp_path / "data.jsonl", 80)
    config = write_config(tmp_path / "run.yaml", tiny_model_dir, data, epochs=1, eval_every=0)
    result = run_cli("train", str(config), "--output", str(tmp_path / "pgd"), "--set", "adversarial.method=pgd",
                     "--set", "adversarial.epsilon=0.5", "--set", "adversarial.steps=2")
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((tmp_path / "pgd" / "metrics.json").read_text())
    assert metrics["train"]["frozen_prefix_layers"] == 1 and "accuracy" in metrics["test"]
    plain = train(load_config(str(config), [f"output={tmp_path / 'plain'}", "train.prefix_cache=false"]),
                  progress=False)
    fgm = train(load_config(str(config), [f"output={tmp_path / 'fgm'}", "train.prefix_cache=false",
                                          "adversarial.method=fgm"]), progress=False)
    assert fgm["train"]["frozen_prefix_layers"] == 0

    def first_loss(run):
        records = map(json.loads, (tmp_path / run / "metrics.jsonl").read_text().splitlines())
        return next(r["train_loss"] for r in records if "train_loss" in r)  # after any step-0 validation (LP-FT)

    assert first_loss("fgm") > 1.5 * first_loss("plain")  # clean + an adversarial loss at least as high
    assert plain["train"]["steps"] == fgm["train"]["steps"]


def test_bad_adversarial_options_are_one_line(tiny_model_dir, tmp_path):
    data = write_data(tmp_path / "data.jsonl", 20)
    config = write_config(tmp_path / "run.yaml", tiny_model_dir, data)
    for override, key in (("adversarial.method=vat", "adversarial.method"),
                          ("adversarial.epsilon=0", "adversarial.epsilon"), ("adversarial.steps=0", "adversarial.steps")):
        with pytest.raises(FinegrainError, match=f"'{key}' must be"):
            load_config(str(config), [override])
