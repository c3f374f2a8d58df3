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
`embed` (relation's marker embeddings) or as a module of the decoder with an active adapter:
`prompt_encoder` (prompt tuning, `finegrain.peft.prompt`) gives P virtual token embeddings that go
before every row, `prefix_encoder` (prefix tuning, `finegrain.peft.prefix`) gives P keys and values
per adapted layer. Either way the row's own tokens sit at positions P.. (as in PEFT, where they
follow the virtual tokens or the cached prefix), the mask, positions and `rows` are shifted here,
and the virtual tokens' states are dropped before the head: a head sees its T input positions.
In a causal decoder the virtual tokens see only each other, so they run through the layers once
per batch (batch 1) and the rows see their keys and values as a prefix (`virtual_tokens_once`):
the same numbers, to float32 rounding, without P more tokens in every row.
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
    # Children by name: a dict lookup, where getattr of a missing module raises and catches an error.
    prompt_encoder, prefix_encoder = decoder._modules.get("prompt_encoder"), decoder._modules.get("prefix_encoder")
    prompts = None if prompt_encoder is None else prompt_encoder()  # (P, H), None when no adapter is active
    prefix = None if prefix_encoder is None else prefix_encoder()  # {layer: (k, v)}, None when inactive
    if prompts is not None and (start_layer or end_layer is not None):
        raise ValueError("prompt tuning's virtual tokens enter below layer 0: run the whole decoder (no cached layers)")
    if start_layer:
        x = batch["hidden"]  # (B, T, H)
    else:
        x = (embed or decoder.embed_tokens)(batch["input_ids"])  # (B, T, H)
    mask = batch.get("attention_mask")
    positions = batch.get("position_ids")
    # Right padding cannot reach real tokens under a causal mask; without one it must be masked.
    if mask is None and not decoder.config.causal:
        mask = padding_mask(batch["lengths"].to(x.device), x.shape[1])  # (B, T)
    virtual = 0
    if prompts is not None and virtual_tokens_once(decoder, mask, prefix):
        prefix, prompts = decoder.prefix_keys_values(prompts.to(x.dtype)[None]), None  # {layer: (k, v)}, once
    if prompts is not None:
        virtual = prompts.shape[0]
        x = torch.cat((prompts.to(x.dtype).expand(x.shape[0], -1, -1), x), dim=1)  # (B, P+T, H)
        mask = with_virtual_tokens(mask, virtual, decoder.config.causal)
        if positions is not None:
            positions = torch.cat((torch.arange(virtual, device=x.device).expand(len(x), -1), positions + virtual), 1)
        rows = None if rows is None else rows + virtual
    elif prefix is not None:
        shift = next(iter(prefix.values()))[0].shape[2]  # P (prefix tuning's, or the virtual tokens')
        if positions is None:
            positions = torch.arange(shift, shift + x.shape[1], device=x.device).expand(x.shape[0], -1)  # (B, T)
        else:
            positions = positions + shift
    x = decoder.run_layers(
        x, attention_mask=mask, position_ids=positions, start=start_layer, end=end_layer, rows=rows, prefix=prefix,
    )
    if virtual and rows is None:
        x = x[:, virtual:]  # (B, T, H): the head reads the row's own positions
    return decoder.norm(x) if end_layer is None else x


def virtual_tokens_once(decoder: nn.Module, mask: torch.Tensor | None, prefix: dict | None) -> bool:
    """Whether prompt tuning's virtual tokens can run once for the whole batch and reach its rows as
    a prefix of keys and values (`LlamaModel.prefix_keys_values`), rather than before every row.

    In a causal decoder they see only each other, and every token sees all of them (no mask, or
    packed rows' mask, which the prefix extends); a bidirectional decoder's see the row's tokens,
    and an active prefix-tuning adapter would come before them: those run them in every row.
    """
    return (
        decoder.config.causal and prefix is None and (mask is None or mask.dim() == 4)
        and hasattr(decoder, "prefix_keys_values")
    )


def with_virtual_tokens(mask: torch.Tensor | None, P: int, causal: bool) -> torch.Tensor | None:
    """The attention mask of rows that start with P virtual tokens: each token also sees them, and
    they see each other (causally in a causal decoder). A key mask (B, T) becomes (B, P+T), a
    ready mask (B, 1, T, S) (packed rows) (B, 1, P+T, P+S); None stays None (SDPA's causal mask)."""
    if mask is None:
        return None
    if mask.dim() == 2:
        return torch.cat((mask.new_ones(len(mask), P), mask), dim=1)
    B, _, T, S = mask.shape
    among = torch.ones(P, P, dtype=torch.bool, device=mask.device)
    top = torch.cat((among.tril() if causal else among, among.new_zeros(P, S)), dim=1).expand(B, 1, P, P + S)
    bottom = torch.cat((mask.new_ones(B, 1, T, P), mask.bool()), dim=3)  # (B, 1, T, P+S)
    return torch.cat((top, bottom), dim=2)
