"""Embedding mixup for classification: extra training examples made by mixing two texts' pooled states.

`augment: {mixup: F}` wraps a classification run's objective (`MixupObjective`). In each piece of a
batch of n texts, k = max(1, round(F * n)) pairs (i, j) of different texts are drawn, each with a
weight lam ~ Beta(alpha, alpha) (`augment.mixup_alpha`); the head also reads lam * h_i + (1 - lam) *
h_j, h being the pooled state it classifies (senMixup, Guo et al., 2019: mixup of Zhang et al., 2018,
on sentence embeddings), and the mixed example's loss is lam * loss(y_i) + (1 - lam) * loss(y_j).
The step's loss is the piece's own plus k / n times the mixed examples' mean: each mixed example
weighs as one more text of the piece. Multi-label targets mix as vectors.

The mixed rows join the head's input inside the model's own forward (a pre-hook on the head), so
the pooled states come from the same forward as the piece's loss and the layers below get the
gradient of both; nothing runs twice. The draws use torch's random stream, which checkpoints
keep, so a resumed run mixes the same pairs.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from finegrain.train.objectives import Forward, Objective, WrappedObjective


class MixupObjective(WrappedObjective):
    """An objective's loss plus that of mixed pairs of its texts (see the module docstring).

    Args:
        inner: the classification objective wrapped (the task's loss, or distillation's); its
            batches carry `targets`.
        head: the classification head (the task model's `score`): what it reads is mixed.
        fraction: mixed examples per text of a piece, in (0, 1].
        alpha: the Beta distribution's parameter for the mixing weights.
    """

    def __init__(self, inner: Objective, head: nn.Module, fraction: float, alpha: float):
        super().__init__(inner)
        self.head, self.fraction, self.alpha = head, fraction, alpha

    def loss(self, forward: Forward, batch: dict[str, Any]) -> torch.Tensor:
        targets = batch["targets"]
        n = targets.shape[0]
        if n < 2:  # nothing to mix with
            return self.inner.loss(forward, batch)
        k = max(1, round(self.fraction * n))
        first = torch.randperm(n)[:k]
        second = (first + torch.randint(1, n, (k,))) % n  # another text of the piece
        lam = torch.distributions.Beta(self.alpha, self.alpha).sample((k,))
        mixed: list[torch.Tensor] = []

        def add_mixed(_module: nn.Module, args: tuple) -> tuple:
            (pooled,) = args
            if mixed or pooled.shape[0] != n:  # once, in the forward of the texts themselves
                return args
            w = lam.to(pooled.device, pooled.dtype)[:, None]
            return (torch.cat([pooled, w * pooled[first] + (1 - w) * pooled[second]]),)

        def split(logits: torch.Tensor) -> torch.Tensor:
            if logits.shape[0] == n + k and not mixed:
                mixed.append(logits[n:])
                return logits[:n]
            return logits

        handle = self.head.register_forward_pre_hook(add_mixed)
        try:
            loss = self.inner.loss(lambda b: split(forward(b)), batch)
        finally:
            handle.remove()
        if not mixed:  # the head never read the piece's texts: a model without one pooled state per text
            return loss
        logits = mixed[0].float()
        lam = lam.to(logits.device)
        task = self.inner.task
        if task.multi_label:
            soft = lam[:, None] * targets[first] + (1 - lam[:, None]) * targets[second]
            mixed_loss = F.binary_cross_entropy_with_logits(logits, soft.to(logits.device), pos_weight=task.class_weights)
        else:
            options = {"weight": task.class_weights, "label_smoothing": task.head.label_smoothing, "reduction": "none"}
            per_pair = (lam * F.cross_entropy(logits, targets[first].to(logits.device), **options)
                        + (1 - lam) * F.cross_entropy(logits, targets[second].to(logits.device), **options))
            mixed_loss = per_pair.mean()
        return loss + (k / n) * mixed_loss
