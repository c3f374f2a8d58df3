"""`augment.judge: current`: paraphrases judged by the classifier as it trains.

Every usable rewrite (finegrain.paraphrase) joins the training set, and in each step a rewrite's
loss counts only where the model, in that step's own forward pass, gives it its original's label:
LAMBADA's filter with the current classifier as the judge, at no extra forward. A rewrite it
disagrees with adds nothing to that step (its loss term is 0; the batch's mean keeps its place), so
the epoch length, the schedule and exact resume are those of a run that keeps every rewrite. Early
in training the classifier is still weak, and so is its judgement: that is the trade of judging with
the model mid-training instead of a finished one (`augment.judge: RUN` or `self`).

`Agreement` counts the rewrites' rows seen and agreed with over the run (every forward counts, an
adversarial step's perturbed ones too, FSDP's weight-0 repeats of a piece not); it is a step hook,
so every checkpoint keeps the counts.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from finegrain.device import model_device
from finegrain.tasks.base import IGNORE_INDEX
from finegrain.train.batching import micro_batches
from finegrain.train.distributed import all_sum, world_size
from finegrain.train.objectives import Forward, TaskObjective, WrappedObjective


class Agreement:
    """The judged rows the classifier saw and agreed with: summed over the ranks after each step."""

    def __init__(self) -> None:
        self.seen = self.agreed = 0
        self._step = [0, 0]  # this rank's counts since the last step

    def add(self, seen: int, agreed: int) -> None:
        self._step[0] += seen
        self._step[1] += agreed

    def after_step(self, model: nn.Module, step: int, total_steps: int) -> None:
        counts = all_sum(self._step, model_device(model)) if world_size() > 1 else self._step
        self.seen += int(counts[0])
        self.agreed += int(counts[1])
        self._step = [0, 0]

    def state_dict(self) -> dict[str, Any]:
        return {"seen": self.seen, "agreed": self.agreed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seen, self.agreed = state["seen"], state["agreed"]


class AgreeingObjective(WrappedObjective):
    """A single-label classification task's loss in which the items of `judged` (their indices)
    count only where the current logits' top label is their target."""

    def __init__(self, inner: TaskObjective, judged: set[int], agreement: Agreement):
        super().__init__(inner)
        self.judged, self.agreement = judged, agreement

    def pieces(self, indices: list[int], pad_id: int, max_tokens: int | None) -> list[tuple[dict[str, Any], float]]:
        return [({**batch, "judged": torch.tensor([i in self.judged for i in piece])}, weight)
                for piece in micro_batches(indices, self.lengths, max_tokens)
                for batch, weight in self.inner.pieces(piece, pad_id, None)]

    def loss(self, forward: Forward, batch: dict[str, Any]) -> torch.Tensor:
        outputs = forward(batch)
        targets, judged = batch["targets"], batch["judged"].to(batch["targets"].device)
        disagree = judged & (outputs.detach().argmax(-1) != targets)
        if not batch.get("filler"):  # FSDP's weight-0 repeat of a piece (fsdp.even_pieces) is not seen again
            self.agreement.add(int(judged.sum()), int((judged & ~disagree).sum()))
        if not disagree.any():
            return self.task.loss(outputs, batch)
        kept = {**batch, "targets": targets.masked_fill(disagree, IGNORE_INDEX)}
        share = self.task.loss_weight(kept) / self.task.loss_weight(batch)  # the step weighs this piece by the whole
        return self.task.loss(outputs, kept) * share if share else outputs.sum() * 0.0
