"""Length-bucketed training batches: little padding, a shuffled order that a seed and epoch fully determine."""

from __future__ import annotations

import math
import random

# `train.micro_batch_tokens: auto`: a piece may hold as many activations as a whole batch of the
# main job's shape, 16 texts of 64 tokens, through 20 trained layers of the default model (hidden
# 576, FFN 1536). So the example configs that train at most 20 layers run their batches whole,
# and with all 30 layers trained the default model's pieces of 682 tokens run as fast as whole
# batches and peak under half of transformers+PEFT's memory (docs/PERFORMANCE.md). A token's
# activations in a layer grow with the layer's widths, and only the layers from the lowest trained
# one up keep theirs for the backward pass: a 1.1B LLaMA (hidden 2048, FFN 5632) gets 256 tokens
# through its 22 layers, so benchmarks/memory.py's batches of 128-token rows run in pieces of two
# rows, as before.
AUTO_PIECE_BUDGET = 1024 * 20 * (576 + 1536)


def bucketed_batches(lengths: list[int], batch_size: int, seed: int, epoch: int, bucket_batches: int = 32) -> list[list[int]]:
    """Index batches for one epoch.

    Examples are shuffled, grouped into windows of `bucket_batches` batches, sorted by length
    inside each window and cut into batches; then the batch order is shuffled. Batches hold
    texts of similar length (so almost no padding) while every epoch sees a new order. The
    same (seed, epoch) always gives the same batches, which is what makes resuming exact.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * bucket_batches
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: lengths[i])
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


def piece_tokens(setting: int | str | None, hidden: int, intermediate: int,
                 trained_layers: int) -> int | None:
    """`train.micro_batch_tokens` in padded tokens (None: whole batches). `auto` fits
    `AUTO_PIECE_BUDGET` to the model: 682 tokens for the default model with all 30 layers
    trained, 256 for the 1.1B, 89 for a 7B; whole batches when only a head trains."""
    if setting != "auto":
        return setting  # type: ignore[return-value]  # validated: a number or None
    per_token = trained_layers * (hidden + intermediate)
    return max(1, AUTO_PIECE_BUDGET // per_token) if per_token else None


def micro_batches(batch: list[int], lengths: list[int], max_tokens: int | None) -> list[list[int]]:
    """A batch (indices sorted by length) cut into the fewest consecutive pieces of equal row
    counts whose padded size (rows times the longest row) stays within `max_tokens`; a piece
    holds at least one row. Equal pieces: a small leftover piece would cost nearly as much as
    a full one."""
    if not max_tokens or len(batch) <= 1:
        return [batch]
    for count in range(1, len(batch) + 1):
        size = math.ceil(len(batch) / count)
        pieces = [batch[i : i + size] for i in range(0, len(batch), size)]
        if all(len(piece) * max(lengths[i] for i in piece) <= max_tokens for piece in pieces):
            break
    return pieces

