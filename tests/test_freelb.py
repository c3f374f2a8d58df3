"""FreeLB (adversarial.method: freelb) on the tiny model: the loss is the mean over K ascent steps of the
loss at each step's perturbation, its gradient the mean of the K gradients, every perturbation in the
epsilon ball; on the embeddings and on the cached states; a run with the prefix cache; the one-line error."""

import json

import pytest
import torch

from finegrain.config import load_config
from finegrain.errors import FinegrainError
from finegrain.run import train
from finegrain.train.adversarial import AdversarialObjective, per_token_unit, project
from finegrain.train.objectives import TaskObjective

from test_train import classifier, write_config, write_data


def by_hand(loss_at, shape, epsilon, steps):
    """FreeLB's K losses and deltas, written out: delta_0 = 0, delta_k+1 = project(delta_k + 2 eps / K * unit(grad))."""
    step_size = 2 * epsilon / steps
    delta = torch.zeros(shape, requires_grad=True)
    losses, deltas = [], []
    for k in range(steps):
        loss = loss_at(delta)
        losses.append(loss.detach())
        deltas.append(delta.detach().clone())
        (g,) = torch.autograd.grad(loss, delta)
        delta = project(delta.detach() + step_size * per_token_unit(g), epsilon).requires_grad_(True)
    return losses, deltas


def test_freelb_on_the_embeddings_averages_the_losses_and_gradients_of_its_steps(tiny_model):
    task, model, items = classifier(tiny_model)
    model.eval()  # no dropout: the same forward by hand and in the objective
    epsilon, steps = 0.4, 3
    objective = AdversarialObjective(TaskObjective(task, items), "freelb", epsilon, steps, model.model.embed_tokens)
    [(batch, _)] = objective.pieces(list(range(8)), pad_id=0, max_tokens=None)
    embedding = model.model.embed_tokens

    def loss_at(delta):
        handle = embedding.register_forward_hook(lambda m, a, out: out + delta)
        try:
            return task.loss(model(batch), batch)
        finally:
            handle.remove()

    losses, deltas = by_hand(loss_at, (*batch["input_ids"].shape, 64), epsilon, steps)
    loss = objective.loss(model, batch)
    torch.testing.assert_close(loss, torch.stack(losses).mean())
    assert losses[0] < losses[1] < losses[2]  # each ascent step raises the loss
    real = torch.arange(batch["input_ids"].shape[1])[None, :] < batch["lengths"][:, None]
    for delta in deltas[1:]:
        norms = delta.norm(dim=-1)
        assert norms[real].max() <= epsilon + 1e-5 and norms[~real].abs().max() == 0  # in the ball; padding untouched
    # The weights' gradient: the mean of the K gradients, each at its delta held fixed.
    params = [p for p in model.parameters() if p.requires_grad]
    got = torch.autograd.grad(objective.loss(model, batch), params)
    want = [torch.zeros_like(p) for p in params]
    for delta in deltas:
        for total, g in zip(want, torch.autograd.grad(loss_at(delta), params)):
            total += g / steps
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_freelb_on_cached_states_and_one_step_is_plain_training(tiny_model):
    task, model, items = classifier(tiny_model)
    model.eval()
    torch.manual_seed(1)
    inner = TaskObjective(task, items)
    inner.hidden = [torch.randn(len(item.input_ids), 64) for item in items]  # states at layer 1 (the prefix cache)
    objective = AdversarialObjective(inner, "freelb", 0.3, 2, model.model.embed_tokens)
    [(batch, _)] = objective.pieces(list(range(8)), pad_id=0, max_tokens=None)

    def forward(b):
        return model(b, start_layer=1)

    def loss_at(delta):
        return task.loss(forward({**batch, "hidden": batch["hidden"] + delta}), batch)

    losses, _ = by_hand(loss_at, batch["hidden"].shape, 0.3, 2)
    torch.testing.assert_close(objective.loss(forward, batch), torch.stack(losses).mean())
    one = AdversarialObjective(inner, "freelb", 0.3, 1, model.model.embed_tokens)
    torch.testing.assert_close(one.loss(forward, batch), task.loss(forward(batch), batch))


def test_a_freelb_run_with_the_prefix_cache(tiny_model_dir, tmp_path):
    data = write_data(tmp_path / "data.jsonl", 60)
    config = write_config(tmp_path / "run.yaml", tiny_model_dir, data, epochs=1, eval_every=0)
    runs = {}
    for name, method in (("plain", None), ("freelb", "freelb")):
        overrides = [f"output={tmp_path / name}"] + ([f"adversarial.method={method}", "adversarial.steps=2"] if method else [])
        results = train(load_config(str(config), overrides), progress=False)
        assert results["train"]["frozen_prefix_layers"] == 1  # lora.layers [-1]: the cache holds layer 0's output
        runs[name] = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    first = [next(r["train_loss"] for r in runs[name] if "train_loss" in r) for name in ("plain", "freelb")]
    assert first[1] > first[0]  # the mean includes losses at perturbed states, above the clean one


def test_a_bad_method_names_freelb_among_the_choices(tiny_model_dir, tmp_path):
    data = write_data(tmp_path / "data.jsonl", 20)
    config = write_config(tmp_path / "run.yaml", tiny_model_dir, data)
    with pytest.raises(FinegrainError, match="'adversarial.method' must be null, fgm, pgd or freelb") as error:
        load_config(str(config), ["adversarial.method=freeLB"])
    assert "\n" not in str(error.value)
