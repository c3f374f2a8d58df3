"""Which items form each training batch: the trainer asks its sampler for an epoch's batches.

A sampler gives the same batches for the same epoch, so a run resumed from a checkpoint (which
stores the epoch and how many of its batches were done) continues with exactly the batches an
uninterrupted run would have seen. Each batch names the objective it feeds (`Draw.objective`,
an index into the trainer's objectives) and that objective's items: a single-task run has one
objective and `LengthBuckets`; a mixture of tasks or a replay buffer is another sampler whose
draws name several objectives, with no change to the trainer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from finegrain.train.batching import bucketed_batches


class Draw(NamedTuple):
    """One batch: `indices` into the items of the trainer's objective number `objective`."""

    objective: int
    indices: list[int]


class Sampler(Protocol):
    """What the trainer needs of a sampler."""

    def __len__(self) -> int:
        """Batches per epoch (the schedule's length is counted from it)."""
        ...

    def epoch(self, epoch: int) -> list[Draw]:
        """The batches of `epoch`, in order; the same for the same epoch (exact resume)."""
        ...


@dataclass(frozen=True)
class LengthBuckets:
    """One objective's items in length-bucketed batches (`batching.bucketed_batches`): little
    padding, a new order each epoch, fully determined by `seed` and the epoch.

    Args:
        lengths: the token count of each item.
        batch_size: items per batch (the last batch of a window may hold fewer).
        seed: the run's seed (`train.seed`).
        objective: the objective these items belong to.
    """

    lengths: list[int]
    batch_size: int
    seed: int
    objective: int = 0

    def __len__(self) -> int:
        return math.ceil(len(self.lengths) / self.batch_size)

    def epoch(self, epoch: int) -> list[Draw]:
        batches = bucketed_batches(self.lengths, self.batch_size, self.seed, epoch)
        return [Draw(self.objective, indices) for indices in batches]
