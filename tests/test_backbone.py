"""The backbone (`finegrain.model.backbone.hidden_states`): the rows shortcut, the cached lower
layers and the padding mask give the states a whole pass gives."""

from __future__ import annotations

import pytest
import torch

from finegrain.model.backbone import hidden_states


def batch_of(lengths: list[int], vocab: int) -> dict[str, torch.Tensor]:
    """Right-padded random ids (B, T) with their `lengths`."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab, (len(lengths), max(lengths)), generator=generator)
    for row, n in enumerate(lengths):
        ids[row, n:] = 0
    return {"input_ids": ids, "lengths": torch.tensor(lengths)}


@pytest.mark.parametrize("causal", [True, False])
def test_rows_and_cached_layers_give_the_whole_pass_states(tiny_model, causal):
    decoder = tiny_model.model.eval()
    decoder.config.causal = causal
    batch = batch_of([7, 4, 5], decoder.config.vocab_size)
    with torch.no_grad():
        whole = hidden_states(decoder, batch)  # (B, T, H)
        last = batch["lengths"] - 1
        rows = hidden_states(decoder, batch, rows=last)[:, 0]  # (B, H)
        below = hidden_states(decoder, batch, end_layer=1)
        above = hidden_states(decoder, {**batch, "hidden": below}, start_layer=1)
    torch.testing.assert_close(rows, whole[torch.arange(3), last])
    real = torch.arange(whole.shape[1])[None, :] < batch["lengths"][:, None]
    torch.testing.assert_close(above[real], whole[real])


def test_bidirectional_padding_does_not_reach_real_tokens(tiny_model):
    decoder = tiny_model.model.eval()
    decoder.config.causal = False
    short = batch_of([4], decoder.config.vocab_size)
    padded = {"input_ids": torch.cat([short["input_ids"], torch.full((1, 3), 5)], 1), "lengths": short["lengths"]}
    with torch.no_grad():
        torch.testing.assert_close(hidden_states(decoder, padded)[:, :4], hidden_states(decoder, short))
