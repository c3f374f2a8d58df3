"""Model outputs for encoded items: what the trainer's validation, `finegrain.load(...).predict`
and the server all run.

It lives outside `finegrain.train` so that tasks and the server predict without importing the
training loop; the task is used only through its `collate`, so this module imports no task either.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from tqdm import tqdm


def item_rows(item: Any) -> list[int]:
    """The lengths of the rows an item runs as: one (its `input_ids`), or its windows'
    (`row_lengths`, when `input_ids` holds several windows of a long text one after another)."""
    return getattr(item, "row_lengths", None) or [len(item.input_ids)]


def sorted_batches(lengths: list[int], batch_size: int, rows: list[int] | None = None) -> list[list[int]]:
    """Batches for inference: longest first, so memory peaks early and padding stays minimal.

    With `rows` (how many rows each item runs as: the windows of a long text), a batch holds
    at most `batch_size` rows (and at least one item), so windows do not multiply its memory.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    if rows is None:
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    batches: list[list[int]] = []
    taken = 0
    for i in order:
        if not batches or taken + rows[i] > batch_size:
            batches.append([])
            taken = 0
        batches[-1].append(i)
        taken += rows[i]
    return batches


@torch.no_grad()
def predict_outputs(
    model: nn.Module, task: Any, items: list, pad_id: int, batch_size: int = 64,
    hidden: list[torch.Tensor] | None = None, start_layer: int = 0, progress: str | None = None,
) -> torch.Tensor:
    """Model outputs for every item, in the items' order, computed in length-sorted batches.

    With `hidden` (the cached output of the layers below `start_layer`), only the layers from
    `start_layer` up run. `progress` names a progress bar to show once the work has run for a second
    (a quick pass shows none). The outputs are on the CPU,
    wherever the model runs (`finegrain.device.place`): tasks decode them there.
    """
    was_training = model.training
    model.eval()
    lengths = [len(item.input_ids) for item in items]
    results: list[torch.Tensor | None] = [None] * len(items)
    batches = sorted_batches(lengths, batch_size, [len(item_rows(item)) for item in items])  # windows count as rows
    for indices in tqdm(batches, desc=progress, unit="batch", disable=progress is None, leave=False, delay=1.0):
        cached = [hidden[i] for i in indices] if hidden is not None else None
        batch = task.collate([items[i] for i in indices], pad_id, cached)
        for i, row in zip(indices, model(batch, start_layer=start_layer if cached else 0).cpu()):  # on the CPU: itself
            results[i] = row
    model.train(was_training)
    return torch.stack(results)  # type: ignore[arg-type]
