"""Fused float32 CPU kernels for training (train_kernels.c), called from ops.py and peft/lora.py.

Each function returns None where its kernel does not apply (another dtype or device, autocast,
a layout it does not take, no C compiler, `FINEGRAIN_NATIVE=0`), and the caller runs its
PyTorch code instead (for the decoder, the reference in `ops`): the same computation, to
float32 rounding. The one exception is the dropout mask, drawn by a different generator (see
`keep_mask`).
"""

from __future__ import annotations

import ctypes

import torch

from finegrain.model import native

# Longest sequence for the C attention. It works on blocks of 64 queries and skips the causally
# masked key blocks; see docs/PERFORMANCE.md for its speed against RoPE + PyTorch's flash
# attention at 32-512 tokens. Longer sequences go to SDPA.
MAX_ATTENTION_LENGTH = 512


def kernels(*tensors: torch.Tensor) -> ctypes.CDLL | None:
    """The compiled library, when every tensor is a contiguous float32 CPU tensor outside autocast."""
    if torch.is_autocast_enabled("cpu"):
        return None
    for tensor in tensors:
        if tensor.device.type != "cpu" or tensor.dtype != torch.float32 or not tensor.is_contiguous():
            return None
    return native.library()


def rope_attention(q, k, v, cos, sin, num_heads: int, num_kv_heads: int) -> torch.Tensor | None:
    """Causal attention over rotary-embedded q, k and v: (B, T, nh*hd) from the projections
    q (B, T, nh*hd) and k, v (B, T, nkv*hd), with cos and signed sin (B, 1, T, hd) as
    `ops.apply_rope` takes them; what `ops.rope_attention` computes when there is no mask and
    no cache. None for long sequences or odd head sizes.
    Without autograd (the prefix-cache pass, scoring) nothing is kept for a backward pass."""
    B, T, width = q.shape
    head_dim = width // num_heads
    if T > MAX_ATTENTION_LENGTH or head_dim % 16 or cos.shape[-1] != head_dim:
        return None
    cos, sin = (table.expand(B, 1, T, head_dim).reshape(B, T, head_dim).contiguous() for table in (cos, sin))
    lib = kernels(q, k, v, cos, sin)
    if lib is None:
        return None
    if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
        return RopeAttention.apply(q, k, v, cos, sin, num_heads, num_kv_heads)
    out = torch.empty_like(q)
    lib.fg_attention_forward(*_pointers(q, k, v, cos, sin), B, T, num_heads, num_kv_heads, head_dim, head_dim**-0.5,
                             out.data_ptr(), None, None, None)
    return out


class RopeAttention(torch.autograd.Function):
    """Keeps the rotated q and k, v and each query's log-sum-exp; the backward pass recomputes
    the probabilities from them (SDPA keeps the output as well)."""

    @staticmethod
    def forward(ctx, q, k, v, cos, sin, num_heads: int, num_kv_heads: int):
        B, T, width = q.shape
        head_dim = width // num_heads
        out = torch.empty_like(q)
        q_rot = q.new_empty(B, num_heads, T, head_dim)
        k_rot = q.new_empty(B, num_kv_heads, T, head_dim)
        lse = q.new_empty(B, num_heads, T)
        native.library().fg_attention_forward(
            *_pointers(q, k, v, cos, sin), B, T, num_heads, num_kv_heads, head_dim, head_dim**-0.5,
            *_pointers(out, q_rot, k_rot, lse),
        )
        ctx.save_for_backward(q_rot, k_rot, v, lse, cos, sin)
        return out

    @staticmethod
    def backward(ctx, grad):
        q_rot, k_rot, v, lse, cos, sin = ctx.saved_tensors
        B, num_heads, T, head_dim = q_rot.shape
        num_kv_heads = k_rot.shape[1]
        grad = grad.contiguous()
        dq, dk, dv = torch.empty_like(grad), torch.empty_like(v), torch.empty_like(v)
        native.library().fg_attention_backward(
            *_pointers(grad, q_rot, k_rot, v, lse, cos, sin), B, T, num_heads, num_kv_heads, head_dim,
            head_dim**-0.5, *_pointers(dq, dk, dv),
        )
        return dq, dk, dv, None, None, None, None


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor | None:
    """silu(gate) * up."""
    lib = kernels(gate, up)
    if lib is None:
        return None
    y = torch.empty_like(gate)
    lib.fg_swiglu_forward(*_pointers(gate, up, y), y.numel())
    return y


def swiglu_backward(grad, gate, up) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The gradients of gate and up in `silu(gate) * up`."""
    grad = grad.contiguous()
    lib = kernels(grad, gate, up)
    if lib is None:
        return None
    grad_gate, grad_up = torch.empty_like(gate), torch.empty_like(up)
    lib.fg_swiglu_backward(*_pointers(grad, gate, up, grad_gate, grad_up), grad.numel())
    return grad_gate, grad_up


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """RMSNorm's output and 1 / rms of each row (..., 1), as `torch.ops.aten._fused_rms_norm`
    returns them (PyTorch runs that as five passes on the CPU)."""
    x = x.contiguous()
    lib = kernels(x, weight)
    if lib is None:
        return None
    H = x.shape[-1]
    y, rstd = torch.empty_like(x), x.new_empty(*x.shape[:-1], 1)
    lib.fg_rms_norm_forward(x.data_ptr(), weight.data_ptr(), eps, x.numel() // H, H, y.data_ptr(), rstd.data_ptr())
    return y, rstd


def rms_norm_backward(grad, kept, weight, rstd, from_output: bool) -> torch.Tensor | None:
    """The input gradient of RMSNorm (see `ops.RMSNormFunction`): `kept` is its output when
    `from_output`, else its input; `rstd` (..., 1) is 1 / rms of each row."""
    grad = grad.contiguous()
    lib = kernels(grad, kept, weight, rstd)
    if lib is None:
        return None
    grad_x = torch.empty_like(kept)
    H = kept.shape[-1]
    lib.fg_rms_norm_backward(*_pointers(grad, kept, weight, rstd), int(from_output), kept.numel() // H, H,
                             grad_x.data_ptr())
    return grad_x


def keep_mask(shape: torch.Size, least_kept: int) -> torch.Tensor | None:
    """A bool dropout mask from `fg_keep_mask`: 16 random bits per element against `least_kept`
    (see `peft.lora.keep_mask`). Its seed is one draw from torch's default generator, so
    `torch.manual_seed` and a saved RNG state still fix every mask; the masks differ from the
    PyTorch fallback's."""
    lib = native.library()
    if lib is None:
        return None
    seed = int(torch.empty((), dtype=torch.int64).random_())
    keep = torch.empty(shape, dtype=torch.bool)
    lib.fg_keep_mask(keep.data_ptr(), keep.numel(), seed, least_kept)
    return keep


def lora_down(x2, keep, lora_A) -> torch.Tensor | None:
    """(x2 * keep) @ lora_A^T: x2 (N, in), keep (N, in) bool, lora_A (r, in)."""
    lib = kernels(x2, lora_A)
    if lib is None or not keep.is_contiguous():
        return None
    (N, dim), r = x2.shape, lora_A.shape[0]
    a = x2.new_empty(N, r)
    lib.fg_lora_down(*_pointers(x2, keep, lora_A, a), N, dim, r)
    return a


def lora_grad_A(grad_a, x2, keep) -> torch.Tensor | None:
    """grad_a^T @ (x2 * keep): the gradient of lora_A (r, in)."""
    lib = kernels(grad_a, x2)
    if lib is None or not keep.is_contiguous():
        return None
    (N, dim), r = x2.shape, grad_a.shape[1]
    grad_A = x2.new_empty(r, dim)
    lib.fg_lora_grad_A(*_pointers(grad_a, x2, keep, grad_A), N, dim, r)
    return grad_A


def lora_add_grad_x(grad_x, grad_a, lora_A, keep) -> bool:
    """grad_x += (grad_a @ lora_A) * keep in place; False (and nothing done) where it does not apply."""
    lib = kernels(grad_x, grad_a, lora_A)
    if lib is None or not keep.is_contiguous():
        return False
    N, dim = grad_x.shape
    lib.fg_lora_grad_x(*_pointers(grad_a, lora_A, keep, grad_x), N, dim, lora_A.shape[0])
    return True


def _pointers(*tensors: torch.Tensor) -> list[int]:
    return [tensor.data_ptr() for tensor in tensors]
