"""The frozen base that every weight-side adapter layer (lora, ia3, adalora, adapter) wraps.

Each such layer keeps the targeted linear layer's `weight` and `bias` as frozen parameters of
its own (so state dicts keep the base's names), shares them with the layer it replaced, and
gives them back as a plain `Linear` when the adapters are unloaded. These are those three steps,
written once.
"""

from __future__ import annotations

import torch
from torch import nn

from finegrain.model.linear import Linear


def init_frozen(layer: nn.Module, in_features: int, out_features: int, bias: bool,
                dtype: torch.dtype | None, device: torch.device | str | None) -> None:
    """Give `layer` its sizes and an empty frozen `weight` (out, in) and zero `bias` (or None)."""
    layer.in_features, layer.out_features = in_features, out_features
    layer.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype, device=device), requires_grad=False)
    layer.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None


def share_frozen(layer: nn.Module, linear: nn.Linear) -> None:
    """Make `layer` hold `linear`'s weight and bias tensors (no copy), frozen."""
    layer.weight = linear.weight
    layer.weight.requires_grad_(False)
    if linear.bias is not None:
        layer.bias = linear.bias
        layer.bias.requires_grad_(False)


def plain_linear(layer: nn.Module) -> nn.Linear:
    """A plain `Linear` holding `layer`'s `weight` and `bias` (with whatever is merged into them),
    or the `QuantLinear` a layer keeps whole under model.quantize."""
    quantized = getattr(layer, "quantized", None)
    if quantized is not None:
        return quantized
    plain = Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
    plain.weight = layer.weight
    plain.bias = layer.bias
    return plain
