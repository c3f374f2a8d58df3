"""Elastic weight consolidation: a run started from an earlier one keeps what the earlier task needed.

`continual.strategy: ewc` with `init_from: RUN_DIR` (each stage of a continual sequence after the
first: `finegrain.continual`) adds to every step's loss

    ewc_lambda / 2 * sum_i F_i * (theta_i - theta*_i)^2

over the trained parameters (Kirkpatrick et al., 2017), where theta* are the earlier run's weights
and F is the diagonal of the (empirical) Fisher information of the earlier task at theta*: the mean,
over the earlier run's training examples, of the squared gradient of each example's own loss (the
task's loss with its gold label). A weight the earlier task's loss is sharp in is held near its
value; one it is flat in moves freely.

`fisher_diagonal` computes F once, before training, on the earlier run's trained model (built by
`finegrain.run`), one example at a time (a batch's gradient squared is not the mean of the squared
per-example gradients), from the frozen-prefix cache: only the adapted layers run. A resumed run
computes it again from the same run and data, to the same numbers, so it goes on exactly as an
uninterrupted one.

Parameters are matched by name. A head that is one row per label is matched row by row by label
(a class-incremental stage's head has the earlier classes' rows and new ones): a row of a label
the earlier run lacked has F = 0, free to learn, as has every tensor the earlier run did not train.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from finegrain.errors import FinegrainError
from finegrain.train.objectives import Forward, Objective, WrappedObjective


def fisher_diagonal(
    model: nn.Module, task: Any, items: list, names: set[str], pad_id: int,
    hidden: list[torch.Tensor] | None = None, start_layer: int = 0, progress: bool = False,
) -> dict[str, torch.Tensor]:
    """The mean over `items` of each example's squared loss gradient, for `model`'s parameters in `names`.

    Args:
        model: the earlier run's trained task model, in float32 (its parameters' `requires_grad`
            are set here for `names` and left so).
        task: encodes the earlier task: `collate(items, pad_id, hidden)` and `loss(outputs, batch)`.
        items: the earlier run's encoded training items.
        names: the parameter names (as `model.named_parameters()` gives them) to compute F for.
        hidden: each item's cached states at `start_layer` (`train.prefix_cache.compute_prefix`), or None.

    Returns:
        {name: (F, float32, the parameter's shape)}.
    """
    if not items:
        raise FinegrainError("continual.strategy: ewc needs the earlier run's training examples and found none; "
                             "use another strategy")
    params = {n: p for n, p in model.named_parameters() if n in names}
    for p in params.values():
        p.requires_grad_(True)
    sums = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    was_training = model.training
    model.eval()  # no dropout: the same F every time it is computed (a resumed run's too)
    for i in tqdm(range(len(items)), desc="ewc: Fisher", unit="example", disable=not progress, leave=False):
        batch = task.collate([items[i]], pad_id, [hidden[i]] if hidden is not None else None)
        loss = task.loss(model(batch, start_layer=start_layer if hidden is not None else 0), batch)
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for name, grad in zip(params, grads):
            if grad is not None:
                sums[name] += grad.float() ** 2
    model.train(was_training)
    return {n: s / len(items) for n, s in sums.items()}


def anchors(
    earlier: dict[str, torch.Tensor], fisher: dict[str, torch.Tensor], current: dict[str, torch.Tensor],
    head_modules: list[str], earlier_labels: list, labels: list,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """theta* and F on the current run's parameters (see the module docstring: by name, head rows by label).

    Args:
        earlier: the earlier model's weights by name; `fisher` its F by name.
        current: the current run's trained parameters by name (only their shapes are read).
        head_modules: the task's head modules, whose per-label tensors are matched by label.

    Returns:
        (theta*, F), each {name: float32 tensor of the current parameter's shape}, for the names
        with any F above 0 to hold.
    """
    where = {label: i for i, label in enumerate(earlier_labels)}
    theta, weights = {}, {}
    for name, param in current.items():
        if name not in fisher:
            continue
        old, f = earlier[name].detach().float(), fisher[name]
        if old.shape != param.shape:
            per_label = any(name.startswith(f"{head}.") for head in head_modules) and old.dim() >= 1 and \
                old.shape[0] == len(earlier_labels) and param.shape[0] == len(labels) and old.shape[1:] == param.shape[1:]
            if not per_label:
                continue  # another shape that labels do not explain: nothing of the earlier run to hold
            rows = [(i, where[label]) for i, label in enumerate(labels) if label in where]
            old_rows, f_rows = torch.zeros(param.shape), torch.zeros(param.shape)
            for i, j in rows:
                old_rows[i], f_rows[i] = old[j], f[j]
            old, f = old_rows, f_rows
        if float(f.sum()) > 0:
            theta[name], weights[name] = old.to(param.device), f.to(param.device)
    return theta, weights


class EwcObjective(WrappedObjective):
    """An objective's loss plus the EWC penalty on the trained weights (see the module docstring).

    The penalty is added to each micro-batch's mean loss; the trainer weighs those by their share
    of the step's loss terms, which sum to 1, so a step's gradient holds the penalty's once.

    Args:
        inner: the objective wrapped; its items, batches and cached states are this objective's.
        parameters: the trained parameters by name (the live ones the optimizer steps).
        theta: theta* by name; `fisher` F by name (`anchors`).
        strength: lambda (`continual.ewc_lambda`).
    """

    def __init__(self, inner: Objective, parameters: dict[str, nn.Parameter], theta: dict[str, torch.Tensor],
                 fisher: dict[str, torch.Tensor], strength: float):
        super().__init__(inner)
        self.strength = strength
        self.held = [(parameters[n], theta[n], fisher[n]) for n in fisher]

    def penalty(self) -> torch.Tensor:
        """lambda / 2 * sum F (theta - theta*)^2, in float32."""
        if not self.held:
            return torch.zeros(())
        return self.strength / 2 * sum((f * (p.float() - theta) ** 2).sum() for p, theta, f in self.held)

    def loss(self, forward: Forward, batch: dict[str, Any]) -> torch.Tensor:
        return self.inner.loss(forward, batch) + self.penalty()
