"""What a training step minimises: each objective turns a batch of its items into a mean loss.

A single-task run has one objective, the task's own loss (`TaskObjective`). The trainer weighs
each objective's mean loss over a step by its `weight` and sums them, so more tasks (each its
own objective, fed by a mixture sampler) or a distillation term (an objective wrapping a task's
and adding the teacher's) train in the same loop.

An adapter method may add to a step what is not a batch's loss (`method_training`): loss terms on
the trained weights themselves (`ModelTerm`: AdaLoRA's orthogonality regulariser) and hooks run
after each optimizer step (`StepHook`: AdaLoRA's rank allocation), whose state every checkpoint
keeps. The trainer calls them without knowing the method.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from finegrain.tasks.base import Task
from finegrain.train.batching import micro_batches

# The task model's outputs for a collated batch, as the trainer runs it in a step (from its
# start layer up, in its precision).
Forward = Callable[[dict[str, Any]], torch.Tensor]


class Objective(Protocol):
    """What the trainer needs of an objective.

    `items` are encoded items (each with `input_ids`) of `task`, which collates them; `hidden`,
    when the trainer caches the frozen lower layers, holds each item's states at `start_layer`
    and is set by the trainer.
    """

    task: Task
    items: list
    lengths: list[int]
    weight: float
    hidden: list[torch.Tensor] | None

    def pieces(self, indices: list[int], pad_id: int, max_tokens: int | None) -> list[tuple[dict[str, Any], float]]:
        """The batch of `indices`, collated in micro-batches of at most `max_tokens` padded tokens,
        each with the number of loss terms its mean loss averages over."""
        ...

    def loss(self, forward: Forward, batch: dict[str, Any]) -> torch.Tensor:
        """The mean loss over one collated micro-batch, given the trained model's `forward`."""
        ...


@dataclass
class TaskObjective:
    """A task's own loss (`task.loss`) over its encoded items.

    Args:
        task: gives `collate(items, pad_id, hidden)`, `loss(outputs, batch)` and `loss_weight(batch)`.
        items: the task's encoded training items.
        weight: this objective's share of a step's loss, beside other objectives.
    """

    task: Task
    items: list
    weight: float = 1.0
    hidden: list[torch.Tensor] | None = None
    lengths: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.lengths = [len(item.input_ids) for item in self.items]

    def pieces(self, indices: list[int], pad_id: int, max_tokens: int | None) -> list[tuple[dict[str, Any], float]]:
        """Micro-batches, so that a batch of long texts fits in memory with the gradient of the whole batch."""
        pieces = []
        for piece in micro_batches(indices, self.lengths, max_tokens):
            hidden = [self.hidden[i] for i in piece] if self.hidden is not None else None
            batch = self.task.collate([self.items[i] for i in piece], pad_id, hidden)
            pieces.append((batch, self.task.loss_weight(batch)))
        return pieces

    def loss(self, forward: Forward, batch: dict[str, Any]) -> torch.Tensor:
        return self.task.loss(forward(batch), batch)


class WrappedObjective:
    """An objective that adds to another's loss (adversarial training, EWC): its items, batches
    and cached states are the inner objective's, and the trainer sets `hidden` (the prefix cache)
    there."""

    def __init__(self, inner: Objective):
        self.inner = inner

    task = property(lambda self: self.inner.task)
    items = property(lambda self: self.inner.items)
    lengths = property(lambda self: self.inner.lengths)
    weight = property(lambda self: self.inner.weight)

    @property
    def hidden(self) -> list[torch.Tensor] | None:
        return self.inner.hidden

    @hidden.setter
    def hidden(self, value: list[torch.Tensor] | None) -> None:
        self.inner.hidden = value

    def pieces(self, indices: list[int], pad_id: int, max_tokens: int | None) -> list[tuple[dict[str, Any], float]]:
        return self.inner.pieces(indices, pad_id, max_tokens)

    def loss(self, forward: Forward, batch: dict[str, Any]) -> torch.Tensor:
        return self.inner.loss(forward, batch)


class ModelTerm(Protocol):
    """A loss term on the trained weights, not on a batch: the trainer adds `weight * loss(model)`
    to each optimizer step's loss, once (AdaLoRA's orthogonality regulariser)."""

    name: str
    weight: float

    def loss(self, model: nn.Module) -> torch.Tensor: ...


class StepHook(Protocol):
    """What a method does to the model after each optimizer step, while that step's gradients are
    still in `.grad` (AdaLoRA's rank allocation). `step` counts the steps done, 1 to `total_steps`.
    Its state is saved with every checkpoint and loaded on resume, so a resumed run goes on as an
    uninterrupted one."""

    def after_step(self, model: nn.Module, step: int, total_steps: int) -> None: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def method_training(method: Any, total_steps: int) -> tuple[list[ModelTerm], list[StepHook]]:
    """The loss terms and step hooks an adapter method's config declares (`loss_terms()`,
    `step_hooks(total_steps)`, both optional); none for a method that declares neither, or None."""
    terms = getattr(method, "loss_terms", None)
    hooks = getattr(method, "step_hooks", None)
    return (list(terms()) if terms else []), (list(hooks(total_steps)) if hooks else [])
