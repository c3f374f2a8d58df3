"""What a training step minimises: each objective turns a batch of its items into a mean loss.

A single-task run has one objective, the task's own loss (`TaskObjective`). The trainer weighs
each objective's mean loss over a step by its `weight` and sums them, so more tasks (each its
own objective, fed by a mixture sampler) or a distillation term (an objective wrapping a task's
and adding the teacher's) train in the same loop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

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
