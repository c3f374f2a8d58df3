"""Linear layers whose float32 CPU matmuls run in oneDNN.

PyTorch runs a float32 `F.linear` on the CPU through MKL's sgemm. For the shapes of LoRA
training and batched inference (tens to a thousand rows against 192- to 1536-wide weights),
the oneDNN matmul that PyTorch also ships (`torch.ops.mkldnn._linear_pointwise`, the kernel
inductor calls) ran 1.1-1.8x faster on the Zen 4 host of docs/PERFORMANCE.md, in float32, to
the same rounding (a different summation order). It reads the weight as it is, transposed views
included, so the backward pass of a frozen layer, grad @ W, is the same op on W's transpose
and needs no second copy of W.

The op has no gradient formula: `FrozenLinearFunction` gives frozen weights the input's
gradient through it, and `TrainedLinearFunction` gives trained weights (full fine-tuning,
bitfit's biases) the forward and the input's gradient through it, the weight's gradient
grad^T x as autograd computes it (on 2 cores, oneDNN took 10-15% less CPU time than MKL for
the forward and the input's gradient of the default model's shapes at 220-490 rows, and the
same for the weight's). Other dtypes, autocast, few rows (decoding) and builds without oneDNN
keep `F.linear`.
`FINEGRAIN_ONEDNN=0` turns it off. Importing this module caps oneDNN's caches (below) unless
the user set them.

The input's gradient of a weight wider than it is tall and at least `MKL_GRAD_MIN_OUT` tall
(the FFN's down projection) is the exception on CPUs without AVX-512 (`matmul_grad`): there
oneDNN reads the transposed view slowly, and MKL's grad @ W ran 1.1-1.5x as fast on the Zen 2
host of docs/PERFORMANCE.md (down_proj's shape at 64-1,024 rows, and 960 x 2560 and 2048 x 5632):
5-9% more tokens/s in LoRA training. The narrow key and value projections (192 x 576 here,
256 x 2048 in a 1.1B LLaMA) are the other way round: oneDNN ran their gradients 1.2-1.5x as fast.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch import nn

MIN_ROWS = 32  # below this (decoding), MKL is as fast or faster
MKL_GRAD_MIN_OUT = 512  # `matmul_grad`: a wide weight's input gradient runs in MKL from this many output rows

# oneDNN, and PyTorch's layer over it, each cache a compiled matmul per shape, with its
# buffers. Bucketed batches make hundreds of row counts: in the Rotten Tomatoes benchmark
# (1,000 examples) the two caches grew peak RSS by ~220 MB. 32 entries each (four row
# counts of the default model's eight matmul shapes) gave that back at the same speed; a
# compiled matmul serves all 30 layers of a micro-batch. The user's own settings win.
for _cache in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
    os.environ.setdefault(_cache, "32")


@functools.cache
def onednn_available() -> bool:
    """oneDNN's linear op is present and agrees with `F.linear` on a small product."""
    if os.environ.get("FINEGRAIN_ONEDNN", "1") == "0" or not torch.backends.mkldnn.is_available():
        return False
    try:
        x = torch.linspace(-1, 1, MIN_ROWS * 8).view(MIN_ROWS, 8)  # no random draw: seeded runs stay as they were
        w = torch.linspace(-1, 1, 32).view(4, 8)
        return torch.allclose(_onednn(x, w, None), F.linear(x, w), atol=1e-5)
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


def _onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _fits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    return (
        x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and (bias is None or bias.dtype == torch.float32)
        and not torch.is_autocast_enabled("cpu")
        and onednn_available()
    )


def matmul_t(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight^T (+ bias) with no autograd: (..., in) x (out, in) -> (..., out).

    For frozen weights inside autograd functions; `weight` may be a transposed view.
    """
    if x.numel() >= MIN_ROWS * x.shape[-1] and _fits(x, weight, bias):
        return _onednn(x, weight, bias)
    return F.linear(x, weight, bias)


@functools.cache
def _wide_grads_in_mkl() -> bool:
    from finegrain.cpu import cpu_flags

    return "avx512f" not in cpu_flags()


def matmul_grad(grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """grad @ weight with no autograd: (..., out) x (out, in) -> (..., in), the input's gradient of
    a linear layer; in MKL where weight is wider than tall and at least `MKL_GRAD_MIN_OUT` tall on
    a CPU without AVX-512 (see the module docstring), else as `matmul_t` on weight's transpose."""
    out, width = weight.shape
    if width > out >= MKL_GRAD_MIN_OUT and grad.dtype == weight.dtype == torch.float32 and _wide_grads_in_mkl():
        return (grad.reshape(-1, out) @ weight).view(*grad.shape[:-1], width)
    return matmul_t(grad, weight.t())


class FrozenLinearFunction(torch.autograd.Function):
    """x W^T + b for a frozen W and b: the backward pass returns the input's gradient only."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(weight)
        return matmul_t(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        return matmul_grad(grad, weight), None, None


class TrainedLinearFunction(torch.autograd.Function):
    """x W^T + b where W or b trains: each gradient that is needed, the input's in oneDNN."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, weight)
        return matmul_t(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        needs_x, needs_weight, needs_bias = ctx.needs_input_grad
        rows = grad.reshape(-1, grad.shape[-1])  # (B*T, out)
        grad_x = matmul_grad(grad, weight) if needs_x else None
        grad_weight = rows.t() @ x.reshape(-1, x.shape[-1]) if needs_weight else None  # (out, in)
        grad_bias = rows.sum(0) if needs_bias else None
        return grad_x, grad_weight, grad_bias


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear`, with oneDNN's matmul in both passes (see the module docstring)."""
    frozen = not (weight.requires_grad or (bias is not None and bias.requires_grad))
    if not torch.is_grad_enabled() or (frozen and not x.requires_grad):
        return matmul_t(x, weight, bias)
    if _fits(x, weight, bias):
        return (FrozenLinearFunction if frozen else TrainedLinearFunction).apply(x, weight, bias)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """`nn.Linear` whose frozen float32 matmuls run in oneDNN (see the module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
