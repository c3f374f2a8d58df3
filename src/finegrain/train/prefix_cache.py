"""Frozen-prefix activation cache.

When only the upper decoder layers are adapted, the layers below the lowest adapted one
compute the same thing every epoch. Their output is computed once per example and kept;
training then runs only the upper layers. Results are unchanged (float32 storage).
"""

from __future__ import annotations

import re

import torch
from torch import nn
from tqdm import tqdm

from finegrain.train.batching import sorted_batches

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def lowest_trainable_layer(model: nn.Module, num_layers: int) -> int:
    """Index of the lowest decoder layer with a trainable parameter.

    0 when something that feeds the layers trains (any parameter named like an embedding, such
    as a task's marker embeddings), `num_layers` when only the head trains.
    """
    lowest = num_layers
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        match = _LAYER.search(name)
        if match:
            lowest = min(lowest, int(match.group(1)))
        elif "embed" in name:
            return 0
    return lowest


@torch.no_grad()
def compute_prefix(
    backbone: nn.Module, task, items: list, end_layer: int, pad_id: int, batch_size: int = 64, progress: bool = True
) -> list[torch.Tensor]:
    """Hidden states (T_i, H) of every item after decoder layers [0, end_layer).

    Batches come from `task.collate`; an `attention_mask` or `position_ids` it returns (packed
    rows) reach the layers as they will in training.
    """
    out: list[torch.Tensor | None] = [None] * len(items)
    lengths = [len(item.input_ids) for item in items]
    was_training = backbone.training
    backbone.eval()
    batches = sorted_batches(lengths, batch_size)
    for batch in tqdm(batches, desc=f"caching layers 0-{end_layer - 1}", unit="batch", disable=not progress, leave=False):
        inputs = task.collate([items[i] for i in batch], pad_id)
        mask = inputs.get("attention_mask")
        if mask is None and not backbone.config.causal:
            T = inputs["input_ids"].shape[1]
            mask = torch.arange(T)[None, :] < inputs["lengths"][:, None]  # (B, T)
        hidden = backbone.run_layers(
            backbone.embed_tokens(inputs["input_ids"]), attention_mask=mask,
            position_ids=inputs.get("position_ids"), end=end_layer,
        )
        for row, i in enumerate(batch):
            out[i] = hidden[row, : lengths[i]].clone()
    backbone.train(was_training)
    return out  # type: ignore[return-value]
