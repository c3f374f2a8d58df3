"""Frozen-prefix activation cache.

When only the upper decoder layers are adapted, the layers below the lowest adapted one
compute the same thing every epoch. Their output is computed once per example and kept;
training then runs only the upper layers. Results are unchanged with float32 storage (the
default); bfloat16 storage halves the memory at the cost of rounding the cached states (an
opt-in approximation). All states sit in one (tokens, hidden) tensor, in RAM or, when larger
than a limit, in a memory-mapped file whose pages the OS moves to and from disk as needed.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from finegrain.device import model_device, to_device
from finegrain.inference import item_rows, sorted_batches
from finegrain.model.backbone import hidden_states

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def lowest_trainable_layer(model: nn.Module, num_layers: int) -> int:
    """Index of the lowest decoder layer with a trainable parameter.

    0 when something that feeds the layers trains (any parameter named like an embedding, such
    as a task's marker embeddings), `num_layers` when only the head trains.
    """
    lowest = num_layers
    # An input-side adapter (prompt or prefix tuning) names the lowest layer it changes: 0 for
    # virtual tokens, the lowest adapted layer for a prefix of keys and values.
    entered = set()
    for name, module in model.named_modules():
        entry = getattr(module, "entry_layer", None)
        if entry is None:
            continue
        trains = [n for n, p in module.named_parameters(prefix=name) if p.requires_grad]
        if trains:
            lowest = min(lowest, entry)
            entered.update(trains)
    for name, param in model.named_parameters():
        if not param.requires_grad or name in entered:
            continue
        match = _LAYER.search(name)
        if match:
            lowest = min(lowest, int(match.group(1)))
        elif "embed" in name:
            return 0
    return lowest


@torch.no_grad()
def cache_storage(rows: int, width: int, dtype: torch.dtype, spill_dir: Path | None = None,
                  ram_limit_bytes: int | None = None) -> torch.Tensor:
    """An uninitialised (rows, width) tensor: in RAM, or, when it is larger than `ram_limit_bytes`,
    mapped from a file in `spill_dir`. The file is unlinked at once (its pages stay mapped until
    the tensor is freed), so nothing is left on disk whatever happens to the process."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    if spill_dir is None or ram_limit_bytes is None or rows * width * itemsize <= ram_limit_bytes:
        return torch.empty(rows, width, dtype=dtype)
    with tempfile.NamedTemporaryFile(dir=spill_dir, prefix=".prefix-cache-") as file:
        file.truncate(rows * width * itemsize)
        # numpy has no bfloat16: map 2-byte elements as int16 and reinterpret them.
        mapped = np.memmap(file.name, dtype=np.float32 if itemsize == 4 else np.int16, mode="r+", shape=(rows, width))
    return torch.from_numpy(mapped).view(dtype)


@torch.no_grad()
def compute_prefix(
    backbone: nn.Module, task, items: list, end_layer: int, pad_id: int, batch_size: int = 64, progress: bool = True,
    dtype: torch.dtype = torch.float32, spill_dir: Path | None = None, ram_limit_bytes: int | None = None,
) -> list[torch.Tensor]:
    """Hidden states (T_i, H) of every item after decoder layers [0, end_layer), stored as `dtype`.

    Batches come from `task.collate`; an `attention_mask` or `position_ids` it returns (packed
    rows) reach the layers as they will in training. An item that runs as several rows (the
    windows of a long text, `documents` in the batch) gets its rows' states one after another,
    as `pad_inputs` splits them again. The states are views of one tensor
    (`cache_storage`: in RAM up to `ram_limit_bytes`, else memory-mapped in `spill_dir`), with
    no autograd history: they are constants of the training that follows. The storage stays on
    the CPU wherever the backbone runs (each training batch takes its rows to the device).
    """
    lengths = [len(item.input_ids) for item in items]
    starts = np.cumsum([0, *lengths]).tolist()
    storage = cache_storage(starts[-1], backbone.config.hidden_size, dtype, spill_dir, ram_limit_bytes)
    out = [storage[starts[i] : starts[i + 1]] for i in range(len(items))]
    was_training = backbone.training
    backbone.eval()
    batches = sorted_batches(lengths, batch_size, [len(item_rows(item)) for item in items])
    device = model_device(backbone)
    for batch in tqdm(batches, desc=f"caching layers 0-{end_layer - 1}", unit="batch", disable=not progress, leave=False):
        inputs = to_device(task.collate([items[i] for i in batch], pad_id), device)
        hidden = hidden_states(backbone, inputs, end_layer=end_layer)  # (B, T, H) after the layers below end_layer
        hidden = hidden.to(storage.device)  # one copy per batch off the CPU; on it, `hidden` itself
        documents = inputs.get("documents", torch.arange(len(batch))).tolist()
        filled = dict.fromkeys(batch, 0)  # tokens of each item written so far
        for row, (d, n) in enumerate(zip(documents, inputs["lengths"].tolist())):
            i = batch[d]
            out[i][filled[i] : filled[i] + n].copy_(hidden[row, :n])
            filled[i] += n
    backbone.train(was_training)
    return out
