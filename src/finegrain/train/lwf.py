"""Learning without forgetting: a run started from an earlier one keeps the earlier model's outputs.

`continual.strategy: lwf` with `init_from: RUN_DIR` (each stage of a continual sequence after the
first: `finegrain.continual`) trains a classification run on

    alpha * T^2 * KL(earlier model's old outputs / T || this model's old outputs / T) + (1 - alpha) * the task's loss

(Li & Hoiem, 2016; `continual.lwf_alpha`, `continual.lwf_temperature`). The old outputs are the
earlier heads' logits on this run's own training texts: no earlier example is kept. The earlier
model (the previous stage's adapter and heads) runs once over the training items before training
(`teacher_outputs`), as distillation's teacher does (`finegrain.train.distill`, whose objective and
soft loss this reuses), and its outputs are kept beside the items; a resumed run computes them again,
to the same numbers.

An earlier head is read in one of two ways (`OldHead`):
- its labels are all among this run's (class-incremental: one head over every class so far): its
  old outputs are the rows of those labels in this run's own head, trained with it;
- else (task-incremental: another task's head): the earlier head, kept frozen, reads this run's
  pooled states; the KL keeps the adapter giving that head what it read before. A
  task-incremental sequence keeps every earlier stage's head this way (`continual.lwf_heads`).
Each head's distribution is its own softmax; the soft term is the mean over the heads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from finegrain.inference import predict_outputs
from finegrain.train.distill import DistillObjective, soft_loss
from finegrain.train.linear_probe import HeadInputs
from finegrain.train.objectives import Forward


@dataclass
class OldHead:
    """An earlier run's head as LwF reads it in this run: `rows` of this run's head (its labels are
    among this run's), or a frozen `weight` (C_j, H) of its own."""

    labels: list
    rows: list[int] | None = None
    weight: torch.Tensor | None = None

    @property
    def width(self) -> int:
        return len(self.labels)


def old_head(earlier_labels: list, weight: torch.Tensor, labels: list) -> OldHead:
    """How this run (`labels`) reads an earlier run's head (`earlier_labels`, its (C_j, H) `weight`)."""
    if all(label in labels for label in earlier_labels):
        return OldHead(list(earlier_labels), rows=[labels.index(label) for label in earlier_labels])
    return OldHead(list(earlier_labels), weight=weight.detach().float().clone())


def teacher_outputs(
    model: nn.Module, task: Any, items: list, pad_id: int, head: str, weights: list[torch.Tensor],
    batch_size: int = 64, progress: bool = False,
) -> torch.Tensor:
    """(N, sum C_j) float32: the earlier model's logits under each earlier head (`weights`, (C_j, H)
    each, side by side), for each of this run's training `items` (the earlier model shares its base and
    tokenizer, so this run's items are its inputs too)."""
    with torch.no_grad(), HeadInputs(model, head):
        pooled = predict_outputs(model, task, items, pad_id, batch_size,
                                 progress="lwf: earlier model" if progress else None).float()  # (N, H)
    return torch.cat([pooled @ w.float().T for w in weights], dim=1)


@dataclass
class LwfObjective(DistillObjective):
    """The task's loss mixed with the earlier model's outputs under the earlier heads (see the module docstring).

    Args (beyond `DistillObjective`'s: `teacher` (N, sum C_j) from `teacher_outputs`, `temperature`, `alpha`):
        model: the task model trained (its head module `head` is read to get the pooled states).
        heads: the earlier heads, in `teacher`'s column order.
    """

    model: nn.Module | None = None
    head: str = "score"
    heads: list[OldHead] = field(default_factory=list)

    def loss(self, forward: Forward, batch: dict[str, Any]) -> torch.Tensor:
        with HeadInputs(self.model, self.head):
            pooled = forward(batch)  # (B, H): what the head reads
        outputs = self.model.get_submodule(self.head)(pooled)  # (B, C): the model's own logits
        multi_label = getattr(self.task, "multi_label", False)
        soft, start = 0.0, 0
        for old in self.heads:
            if old.rows is not None:
                student = outputs[:, old.rows]  # (B, C_j)
            else:
                student = pooled @ old.weight.to(pooled.device, pooled.dtype).T
            teacher = batch["teacher_logits"][:, start : start + old.width]
            soft = soft + soft_loss(student, teacher, self.temperature, multi_label)
            start += old.width
        soft = soft / max(1, len(self.heads))
        if self.alpha == 1:
            return soft
        return self.alpha * soft + (1 - self.alpha) * self.task.loss(outputs, batch)
