"""Tasks: each gives a head, a collate function, a loss, decoding and metrics to the one training loop."""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch

from finegrain.errors import FinegrainError


def class_weights(spec: Any, names: list[str], counts: Counter) -> torch.Tensor | None:
    """Loss weights per class from `head.class_weights`.

    Args:
        spec: None, "balanced" (inverse frequency, as scikit-learn's) or {name: weight}.
        names: the classes (or tags) in head order.
        counts: training occurrences by class index (used by "balanced").
    """
    if spec is None:
        return None
    if spec == "balanced":
        total = sum(counts.values())
        return torch.tensor([total / (len(names) * max(counts.get(i, 0), 1)) for i in range(len(names))])
    if isinstance(spec, dict):
        unknown = [k for k in spec if k not in names]
        if unknown:
            raise FinegrainError(f"head.class_weights: unknown label '{unknown[0]}'; labels are {', '.join(names)}")
        return torch.tensor([float(spec.get(name, 1.0)) for name in names])
    raise FinegrainError("head.class_weights: use 'balanced' or a mapping {label: weight}")


def pad_inputs(items: list, pad_id: int, hidden: list[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The input part of a batch: `lengths` (B,) and right-padded `input_ids` (B, T), or, with
    `hidden` (cached lower-layer states, one (T_i, H) per item), those padded to (B, T, H)."""
    lengths = torch.tensor([len(item.input_ids) for item in items])
    if hidden is not None:
        return {"lengths": lengths, "hidden": torch.nn.utils.rnn.pad_sequence([h.float() for h in hidden], batch_first=True)}
    input_ids = torch.full((len(items), int(lengths.max())), pad_id, dtype=torch.long)
    for row, item in enumerate(items):
        input_ids[row, : len(item.input_ids)] = torch.tensor(item.input_ids)
    return {"lengths": lengths, "input_ids": input_ids}
