"""The decoder's fused operations: each one function that runs finegrain's C kernel where it
applies and the PyTorch reference otherwise, so that `llama.py` reads like the model.

The reference code here is the definition (Hugging Face's LLaMA, to float32 rounding); the
kernels (`fused.py` over `train_kernels.c`) are faster routes to the same numbers, and decline
(return None) for another dtype or device, autocast, shapes they do not take, no C compiler or
`FINEGRAIN_NATIVE=0`. tests/test_ops.py holds each op's C path to its reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from finegrain.model import fused
from finegrain.model.kv_cache import KVCache

# Below this many rows (float32 decoding runs 61 norms per token) one PyTorch op beats a ctypes call.
MIN_NATIVE_NORM_ROWS = 16


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) * weight over the last dimension, as Hugging Face's `LlamaRMSNorm` computes it.

    float32 under autograd goes through `RMSNormFunction` (a leaner backward), float32 without it
    through the C kernel; other dtypes normalise in float32 and scale in their own dtype, as
    Hugging Face does, so bf16 checkpoints give its numbers.
    """
    if x.dtype != torch.float32:
        return F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype) * weight
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return RMSNormFunction.apply(x, weight, eps)
    normed = fused.rms_norm(x, weight, eps) if x.numel() >= MIN_NATIVE_NORM_ROWS * x.shape[-1] else None
    return F.rms_norm(x, (x.shape[-1],), weight, eps) if normed is None else normed[0]


class RMSNormFunction(torch.autograd.Function):
    """RMSNorm whose backward keeps its output and 1/rms only.

    Autograd on `F.rms_norm` keeps the input and the normalised input, two (..., H) tensors
    per norm, and its backward takes about 1.7x as long as this one. The output is kept
    instead of the input because a LoRA layer reading it (q_proj, v_proj) keeps it anyway:
    one tensor serves both. The normalised input is recovered as output / weight (to a
    rounding), or, if the weight has a zero, the input is kept.
    """

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        y, rstd = fused.rms_norm(x, weight, eps) or torch.ops.aten._fused_rms_norm(x, [x.shape[-1]], weight, eps)
        ctx.from_output = bool(weight.all())
        ctx.save_for_backward(y if ctx.from_output else x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, grad):
        kept, weight, rstd = ctx.saved_tensors
        if not ctx.needs_input_grad[1]:
            grad_x = fused.rms_norm_backward(grad, kept, weight, rstd, ctx.from_output)
            if grad_x is not None:
                return grad_x, None, None
        normed = kept / weight if ctx.from_output else kept * rstd
        grad_normed = grad * weight
        # d/dx of x * rstd: rstd * (g - normed * mean(g * normed)), over the last dimension.
        mean = torch.linalg.vecdot(grad_normed, normed).unsqueeze(-1).div_(kept.shape[-1])
        grad_x = (grad_normed - normed * mean).mul_(rstd)
        grad_weight = (grad * normed).reshape(-1, kept.shape[-1]).sum(0) if ctx.needs_input_grad[1] else None
        return grad_x, grad_weight, None


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, the gated activation of LLaMA's MLP; under autograd `SwiGLUFunction` keeps less."""
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return SwiGLUFunction.apply(gate, up)
    hidden = fused.swiglu(gate, up)
    return F.silu(gate) * up if hidden is None else hidden


class SwiGLUFunction(torch.autograd.Function):
    """silu(gate) * up, whose backward keeps gate and up only (autograd also keeps silu(gate))."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        y = fused.swiglu(gate, up)
        return F.silu(gate) * up if y is None else y

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        grads = fused.swiglu_backward(grad, gate, up)
        if grads is not None:
            return grads
        return torch.ops.aten.silu_backward(grad * up, gate), grad * F.silu(gate)


def rope_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    mask: torch.Tensor | None = None,
    is_causal: bool = True,
    kv_cache: KVCache | None = None,
    input_pos: torch.Tensor | None = None,
    prefix: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Grouped-query attention of rotary-embedded queries over rotary-embedded keys: (B, T, nh*hd).

    Args:
        q: (B, T, nh*hd), k and v: (B, T, nkv*hd), the projections as they come out of the linears.
        cos, sin: (B, 1, T, hd), the cosine and signed sine tables of `apply_rope`.
        mask: (B, 1, T, S) True where a query may see a key; or None, causal when `is_causal`.
        kv_cache: the layer's cache; the rotated keys and values are written at `input_pos` (T,)
            and the queries attend over every cached position S.
        prefix: prefix tuning's keys and values (1, nkv, P, hd), seen by every query (`with_prefix`).

    The C kernel (`fused.rope_attention`) rotates and attends in one pass, keeping less for the
    backward pass, where nothing else is asked for: causal, no mask, no cache, no prefix (training,
    scoring); a prefix takes the PyTorch path.
    """
    if mask is None and is_causal and kv_cache is None and prefix is None:
        y = fused.rope_attention(q, k, v, cos, sin, num_heads, num_kv_heads)
        if y is not None:
            return y
    B, T, width = q.shape
    head_dim = width // num_heads
    q = q.view(B, T, num_heads, head_dim).transpose(1, 2)  # (B, nh, T, hd)
    k = k.view(B, T, num_kv_heads, head_dim).transpose(1, 2)  # (B, nkv, T, hd)
    v = v.view(B, T, num_kv_heads, head_dim).transpose(1, 2)  # (B, nkv, T, hd)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if kv_cache is not None:
        k, v = kv_cache.update(input_pos, k, v)  # (B, nkv, S, hd)
    if prefix is not None:
        k, v, mask, is_causal = with_prefix(k, v, mask, is_causal, prefix)
    y = attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=num_kv_heads != num_heads)  # (B, nh, T, hd)
    return y.transpose(1, 2).reshape(B, T, width)


def with_prefix(
    k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, is_causal: bool, prefix: tuple[torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, bool]:
    """Keys and values (B, nkv, P+S, hd) with prefix tuning's P first, and the mask that lets every
    query see them: they come before every token, unrotated, as in PEFT's `past_key_values`.

    k, v: (B, nkv, S, hd), rotated; mask: (B, 1, T, S) or None (causal when `is_causal`: the T
    queries are the last T of the S keys); prefix: (1, nkv, P, hd) each.
    """
    prefix_k, prefix_v = prefix
    B, P, S = k.shape[0], prefix_k.shape[2], k.shape[2]
    k = torch.cat((prefix_k.to(k.dtype).expand(B, -1, -1, -1), k), dim=2)  # (B, nkv, P+S, hd)
    v = torch.cat((prefix_v.to(v.dtype).expand(B, -1, -1, -1), v), dim=2)
    if mask is not None:
        mask = torch.cat((mask.new_ones(*mask.shape[:-1], P), mask), dim=-1)  # (B, 1, T, P+S)
    elif is_causal:
        mask = torch.ones(S, P + S, dtype=torch.bool, device=k.device).tril(P)  # (T, P+S), T == S
    return k, v, mask, False


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Hugging Face's `x * cos + rotate_half(x) * sin`, with rotate_half's negation folded into the sine.

    x: (B, nh, T, hd); cos, signed_sin: (B, 1, T, hd), signed_sin = cat(-sin1, sin2). `roll` swaps
    the halves in one op where rotate_half takes a chunk, a negation and a cat, in every layer.
    """
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs) -> torch.Tensor:
    """`F.scaled_dot_product_attention`, in float32 under autocast.

    PyTorch's bf16 attention backward on the CPU takes ~4x as long as float32's, and attention
    holds a small share of a step's FLOPs, so bf16 training (`train.bf16`) keeps it float32.
    """
    if torch.is_autocast_enabled(q.device.type):
        with torch.autocast(q.device.type, enabled=False):
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **kwargs)
    return F.scaled_dot_product_attention(q, k, v, **kwargs)
