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
import random
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


SAMPLINGS = ("proportional", "temperature", "round_robin")


@dataclass(frozen=True)
class TaskMixture:
    """The items of several objectives (the tasks of a multi-task run, `finegrain.multitask`) in
    batches of one task each.

    Each task's items are length-bucketed as `LengthBuckets` does, with seed `seed + k` for task k.
    An epoch has as many batches as the tasks have together (the sum of ceil(n_k / batch_size)),
    whatever the sampling, so that samplings compare at equal compute. Task k's share of them:

    - proportional: all its batches, once: an epoch is one pass over every task;
    - temperature: proportional to n_k ** (1 / temperature) (1: to its size; larger: towards equal
      shares): a small task goes through its batches more than once, a large one continues in the
      next epoch where this one stopped;
    - round_robin: equal shares, the tasks taking turns batch by batch.

    A task's batches are one stream (its epoch 0 order, then its epoch 1 order, ...) that the
    epochs cut in consecutive pieces; the tasks' batches are shuffled together (seeded by `seed`
    and the epoch), except in round_robin's fixed turns. The same epoch always gives the same
    batches (exact resume).

    Args:
        lengths: per objective, the token count of each of its items.
        batch_size: items per batch.
        seed: the run's seed (`train.seed`).
        sampling: one of `SAMPLINGS`.
        temperature: for `temperature` sampling, above 0.
    """

    lengths: tuple[tuple[int, ...], ...]
    batch_size: int
    seed: int
    sampling: str = "proportional"
    temperature: float = 2.0

    def __len__(self) -> int:
        return sum(self.batches_per_task())

    def batches_per_task(self) -> list[int]:
        """Batches that one pass over each task's items takes."""
        return [math.ceil(len(lengths) / self.batch_size) for lengths in self.lengths]

    def shares(self) -> list[int]:
        """Batches of each task in one epoch (each at least 1; together `len(self)`)."""
        passes = self.batches_per_task()
        if self.sampling == "proportional":
            return passes
        total = sum(passes)
        if self.sampling == "temperature":
            weights = [len(lengths) ** (1.0 / self.temperature) for lengths in self.lengths]
        else:
            weights = [1.0] * len(self.lengths)
        exact = [total * w / sum(weights) for w in weights]
        shares = [max(1, math.floor(x)) for x in exact]
        by_remainder = sorted(range(len(shares)), key=lambda k: (shares[k] - exact[k], k))
        for k in by_remainder[: max(0, total - sum(shares))]:  # largest remainders first
            shares[k] += 1
        while sum(shares) > total:  # only when a floor of 0 became 1: take from the largest
            shares[max(range(len(shares)), key=lambda k: shares[k])] -= 1
        return shares

    def task_batches(self, k: int, start: int, count: int) -> list[list[int]]:
        """Batches [start, start + count) of task k's stream."""
        per_pass = self.batches_per_task()[k]
        batches: list[list[int]] = []
        for round_ in range(start // per_pass, (start + count - 1) // per_pass + 1):
            batches += bucketed_batches(list(self.lengths[k]), self.batch_size, self.seed + k, round_)
        offset = start - (start // per_pass) * per_pass
        return batches[offset : offset + count]

    def epoch(self, epoch: int) -> list[Draw]:
        shares = self.shares()
        queues = [[Draw(k, indices) for indices in self.task_batches(k, epoch * share, share)]
                  for k, share in enumerate(shares)]
        if self.sampling == "round_robin":
            return [queue[turn] for turn in range(max(shares)) for queue in queues if turn < len(queue)]
        draws = [draw for queue in queues for draw in queue]
        random.Random(self.seed * 1_000_003 + epoch).shuffle(draws)
        return draws
