"""The decoder's ops (finegrain.model.ops): each op's C path against its PyTorch reference, values
and gradients, and the references against transformers' modules."""

import pytest
import torch
from torch.testing import assert_close
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from finegrain.model import fused, native, ops
from finegrain.model.kv_cache import KVCache

needs_kernels = pytest.mark.skipif(native.library() is None, reason="no C compiler")


def rope_tables(B, T, hd):
    """cos and signed sin (B, 1, T, hd) as LlamaModel._rope makes them, at positions 0..T-1."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))
    freqs = torch.arange(T).float()[None, :, None].expand(B, T, hd // 2) * inv_freq
    cos, sin = freqs.cos(), freqs.sin()
    return torch.cat((cos, cos), -1)[:, None], torch.cat((-sin, sin), -1)[:, None]


def outputs_and_gradients(op, inputs):
    """op(*inputs), and the gradients of the inputs that require them under a fixed output gradient."""
    out = op(*inputs)
    leaves = [x for x in inputs if x.requires_grad]
    if not leaves:
        return out, ()
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    return out.detach(), torch.autograd.grad(out, leaves, grad)


def c_path_and_reference(monkeypatch, kernel_names, op, inputs):
    """The op run with finegrain's C kernels, then with none (as without a compiler); fails unless
    every kernel named ran on the first pass."""
    ran = set()

    def spy(name, kernel):
        def run(*args):
            result = kernel(*args)
            if result is not None:
                ran.add(name)
            return result
        return run

    for name in kernel_names:
        monkeypatch.setattr(fused, name, spy(name, getattr(fused, name)))
    ours = outputs_and_gradients(op, inputs)
    assert ran == set(kernel_names), f"C kernels that did not run: {set(kernel_names) - ran}"
    monkeypatch.setattr(native, "library", lambda: None)
    return ours, outputs_and_gradients(op, inputs)


@needs_kernels
@pytest.mark.parametrize("autograd", [False, True], ids=["no-grad", "autograd"])
def test_rms_norm_c_path_equals_reference(monkeypatch, autograd):
    torch.manual_seed(0)
    x = (torch.randn(2, 16, 64) * 3).requires_grad_(autograd)
    weight = torch.rand(64) + 0.5
    kernels = ["rms_norm", "rms_norm_backward"] if autograd else ["rms_norm"]
    ours, reference = c_path_and_reference(monkeypatch, kernels, lambda x: ops.rms_norm(x, weight, 1e-5), [x])
    assert_close(ours, reference)


@needs_kernels
@pytest.mark.parametrize("autograd", [False, True], ids=["no-grad", "autograd"])
def test_swiglu_c_path_equals_reference(monkeypatch, autograd):
    torch.manual_seed(0)
    gate, up = (torch.randn(3, 20, 128).requires_grad_(autograd) for _ in range(2))
    kernels = ["swiglu", "swiglu_backward"] if autograd else ["swiglu"]
    ours, reference = c_path_and_reference(monkeypatch, kernels, ops.swiglu, [gate, up])
    assert_close(ours, reference, atol=1e-6, rtol=1e-5)


@needs_kernels
@pytest.mark.parametrize("autograd", [False, True], ids=["no-grad", "autograd"])
@pytest.mark.parametrize("num_kv_heads", [4, 2])
def test_rope_attention_c_path_equals_reference(monkeypatch, autograd, num_kv_heads):
    torch.manual_seed(0)
    B, T, num_heads, head_dim = 2, 24, 4, 16
    q = torch.randn(B, T, num_heads * head_dim).requires_grad_(autograd)
    k, v = (torch.randn(B, T, num_kv_heads * head_dim).requires_grad_(autograd) for _ in range(2))
    cos, sin = rope_tables(B, T, head_dim)

    def op(q, k, v):
        return ops.rope_attention(q, k, v, cos, sin, num_heads, num_kv_heads)

    ours, reference = c_path_and_reference(monkeypatch, ["rope_attention"], op, [q, k, v])
    assert_close(ours, reference, atol=1e-5, rtol=1e-5)


def test_rope_attention_through_a_kv_cache_equals_attention_without_one():
    # A prefill of 5 positions and then one token at a time, each written to the cache first.
    torch.manual_seed(0)
    B, T, num_heads, num_kv_heads, head_dim = 2, 9, 4, 2, 16
    q = torch.randn(B, T, num_heads * head_dim)
    k, v = (torch.randn(B, T, num_kv_heads * head_dim) for _ in range(2))
    cos, sin = rope_tables(B, T, head_dim)
    with torch.no_grad():
        expected = ops.rope_attention(q, k, v, cos, sin, num_heads, num_kv_heads)
        cache = KVCache(B, T, num_kv_heads, head_dim, torch.float32)
        causal = torch.ones(5, 5, dtype=torch.bool).tril()[None, None].expand(B, 1, 5, 5)
        steps = [ops.rope_attention(q[:, :5], k[:, :5], v[:, :5], cos[:, :, :5], sin[:, :, :5], num_heads,
                                    num_kv_heads, causal, False, cache, torch.arange(5))]
        for t in range(5, T):
            at = slice(t, t + 1)
            steps.append(ops.rope_attention(q[:, at], k[:, at], v[:, at], cos[:, :, at], sin[:, :, at], num_heads,
                                            num_kv_heads, None, False, cache, torch.tensor([t])))
    assert_close(torch.cat(steps, dim=1), expected, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_equals_transformers(dtype):
    torch.manual_seed(0)
    reference = LlamaRMSNorm(64, eps=1e-5).to(dtype)
    with torch.no_grad():
        reference.weight.normal_(1.0, 0.2)
    x = (torch.randn(3, 20, 64) * 3).to(dtype)
    with torch.no_grad():
        assert_close(ops.rms_norm(x, reference.weight, 1e-5), reference(x))
