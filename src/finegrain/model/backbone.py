"""The backbone: the one place a batch becomes hidden states.

A task model is a backbone (its `model`, the decoder) and a head. The head reads what
`hidden_states` returns and nothing else of the decoder: the embedding lookup (or the cached
lower-layer states that replace it), the attention mask, the positions, the layer range and the
rows shortcut are decided here, once, for every task and for the frozen-prefix cache.

A batch (as `finegrain.tasks.base.pad_inputs` makes it) holds `lengths` (B,) and either
right-padded `input_ids` (B, T) or `hidden` (B, T, H), the cached output of the layers below
`start_layer`; packed rows add `attention_mask` (B, 1, T, T) and `position_ids` (B, T).

What plugs in here: another backbone with the decoder's interface (`embed_tokens`, `run_layers`,
`norm`, `config.causal`; a bidirectional decoder already is one), and input-side methods through
`embed` (relation's marker embeddings today; prompt tuning's virtual tokens).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def padding_mask(lengths: torch.Tensor, T: int) -> torch.Tensor:
    """(B, T): True at each row's real tokens, False at its right padding."""
    return torch.arange(T, device=lengths.device)[None, :] < lengths[:, None]


def hidden_states(
    decoder: nn.Module, batch: dict[str, torch.Tensor], start_layer: int = 0, end_layer: int | None = None,
    rows: torch.Tensor | None = None, embed: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """The states (B, T, H) after decoder layers [start_layer, end_layer) for a batch.

    Args:
        decoder: the backbone (`LlamaModel`).
        batch: see the module docstring; `hidden` is read when `start_layer` > 0, else `input_ids`.
        start_layer: the first layer to run (the ones below are cached in `batch["hidden"]`).
        end_layer: the layer to stop before; None runs to the top and applies the final norm,
            as a head needs (the frozen-prefix cache stops below and keeps states un-normed).
        rows: (B,) the one position per row the caller reads (a classifier's last token): the
            last layer computes only that position and the result is (B, 1, H).
        embed: the embedding of token ids, when an input-side module replaces the decoder's.
    """
    if start_layer:
        x = batch["hidden"]  # (B, T, H)
    else:
        x = (embed or decoder.embed_tokens)(batch["input_ids"])  # (B, T, H)
    mask = batch.get("attention_mask")
    # Right padding cannot reach real tokens under a causal mask; without one it must be masked.
    if mask is None and not decoder.config.causal:
        mask = padding_mask(batch["lengths"].to(x.device), x.shape[1])  # (B, T)
    x = decoder.run_layers(
        x, attention_mask=mask, position_ids=batch.get("position_ids"), start=start_layer, end=end_layer, rows=rows,
    )
    return decoder.norm(x) if end_layer is None else x
