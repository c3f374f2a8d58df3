"""Int8 weight quantization for fast CPU decoding (an opt-in approximation).

At batch 1 decoding reads every weight once per token, so its speed is set by memory
bandwidth; int8 weights are a quarter of float32's bytes. The linear layers become
`torch.ao` dynamic-quantized ones (fbgemm kernels: int8 weights per output channel,
activations quantized per call). Outputs differ from float32 by quantization error, so this
is for generation and serving, never for the parity tests or training.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace every `nn.Linear` (the output head included) with an int8 dynamic-quantized one, in place."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's notice that eager quantization moves to torchao
        torch.ao.quantization.quantize_dynamic(
            model, {nn.Linear: torch.ao.quantization.per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True
        )
    return model
