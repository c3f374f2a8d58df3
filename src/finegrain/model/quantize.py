"""Int8 weight quantization for fast CPU decoding (an opt-in approximation).

At batch 1 decoding reads every weight once per token, so its speed is set by memory
bandwidth; int8 weights are a quarter of float32's bytes. Each linear layer becomes an
`Int8Linear` (fbgemm kernels: int8 weights per output channel, activations quantized per
call). Outputs differ from float32 by quantization error, so this is for generation and
serving, never for the parity tests or training.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from finegrain.model.llama import Llama


class Int8Linear(nn.Module):
    """A frozen `nn.Linear` with symmetric int8 weights, one scale per output channel.

    Calls the fbgemm operator directly: `torch.ao`'s module wrapper around it costs about as
    much Python time per call as a small layer's matmul.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach().float()
        # torch.ao's symmetric per-channel observer: the same scales, so the same outputs as quantize_dynamic.
        scales = (weight.abs().amax(dim=1) / 127.5).clamp(min=torch.finfo(torch.float32).eps).double()
        zero_points = torch.zeros(self.out_features, dtype=torch.long)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notice that quantized tensors move to torchao
            qweight = torch.quantize_per_channel(weight, scales, zero_points, 0, torch.qint8)
        bias = None if linear.bias is None else linear.bias.detach().float()
        self.packed = torch.ops.quantized.linear_prepack(qweight, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # reduce_range: 7-bit activations, so fbgemm's 16-bit pairwise sums cannot saturate.
        return torch.ops.quantized.linear_dynamic(x, self.packed, reduce_range=True)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


def quantize_int8(model: Llama) -> Llama:
    """Fuse the projections, then replace every `nn.Linear` (the output head included) by an `Int8Linear`, in place."""
    model.fuse_projections()
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, name, Int8Linear(child))
    return model
