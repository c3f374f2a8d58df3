"""The fused C kernels for training (finegrain.model.fused) against the PyTorch code they replace."""

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from finegrain.model import fused, native
from finegrain.model.ops import RMSNormFunction, SwiGLUFunction, apply_rope
from finegrain.peft.lora import LoraMatmul, keep_mask

pytestmark = pytest.mark.skipif(native.library() is None, reason="no C compiler")


def rope_tables(B, T, hd):
    """cos and signed sin (B, 1, T, hd) as LlamaModel._rope makes them, at shuffled positions."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))
    positions = torch.stack([torch.randperm(T) for _ in range(B)]).float()
    freqs = positions[..., None] * inv_freq
    cos, sin = freqs.cos(), freqs.sin()
    return torch.cat((cos, cos), -1)[:, None], torch.cat((-sin, sin), -1)[:, None]


def reference_attention(q, k, v, cos, sin, nh, nkv):
    B, T, _ = q.shape
    hd = q.shape[-1] // nh
    q = apply_rope(q.view(B, T, nh, hd).transpose(1, 2), cos, sin)
    k = apply_rope(k.view(B, T, nkv, hd).transpose(1, 2), cos, sin)
    y = F.scaled_dot_product_attention(q, k, v.view(B, T, nkv, hd).transpose(1, 2), is_causal=True, enable_gqa=True)
    return y.transpose(1, 2).reshape(B, T, nh * hd)


ATTENTION_SHAPES = [
    (3, 13, 4, 2, 16), (2, 1, 4, 4, 32), (2, 64, 6, 2, 16), (1, 40, 9, 3, 64), (1, 128, 4, 2, 16),
    # past one block of 64 queries: partial last blocks, odd lengths, GQA groups of 3 and 2
    (2, 129, 6, 2, 16), (1, 200, 9, 3, 64), (2, 255, 4, 2, 32), (1, 256, 9, 3, 64), (1, 333, 6, 3, 16),
    (1, 512, 9, 3, 64),
    # eight or more (sequence, KV head) pairs: the kernel splits work by pair, not by query block
    (4, 150, 4, 2, 16), (8, 37, 6, 3, 16),
]


@pytest.mark.parametrize("B,T,nh,nkv,hd", ATTENTION_SHAPES)
def test_attention_equals_rope_and_sdpa_with_gradients(B, T, nh, nkv, hd):
    torch.manual_seed(0)
    q = (torch.randn(B, T, nh * hd) * 2).requires_grad_()
    k = (torch.randn(B, T, nkv * hd) * 2).requires_grad_()
    v = torch.randn(B, T, nkv * hd, requires_grad=True)
    cos, sin = rope_tables(B, T, hd)
    ours = fused.rope_attention(q, k, v, cos, sin, nh, nkv)
    assert ours.grad_fn.name().startswith("RopeAttention")
    plain = reference_attention(q, k, v, cos, sin, nh, nkv)
    assert_close(ours, plain, atol=2e-5, rtol=1e-5)
    grad = torch.randn_like(plain)
    for ours_grad, plain_grad in zip(torch.autograd.grad(ours, (q, k, v), grad), torch.autograd.grad(plain, (q, k, v), grad)):
        assert_close(ours_grad, plain_grad, atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("B,T,nh,nkv,hd", ATTENTION_SHAPES)
def test_attention_without_autograd_equals_rope_and_sdpa(B, T, nh, nkv, hd):
    """The forward-only path (prefix cache, scoring) keeps nothing and computes the same output."""
    torch.manual_seed(1)
    q, k, v = torch.randn(B, T, nh * hd) * 2, torch.randn(B, T, nkv * hd) * 2, torch.randn(B, T, nkv * hd)
    cos, sin = rope_tables(B, T, hd)
    with torch.no_grad():
        ours = fused.rope_attention(q, k, v, cos, sin, nh, nkv)
    assert ours.grad_fn is None
    assert_close(ours, reference_attention(q, k, v, cos, sin, nh, nkv), atol=2e-5, rtol=1e-5)
    with_autograd = fused.rope_attention(q.requires_grad_(), k, v, cos, sin, nh, nkv)
    assert torch.equal(ours, with_autograd.detach())


@pytest.mark.parametrize("B,T,nh,nkv,hd", [(1, 200, 9, 3, 64), (4, 150, 4, 2, 16)], ids=["by-block", "by-pair"])
def test_attention_gradients_do_not_depend_on_the_thread_count(B, T, nh, nkv, hd):
    """Key and value gradients are summed over a group's heads in a fixed order, not as threads finish."""
    torch.manual_seed(2)
    q, k, v = (torch.randn(B, T, n * hd, requires_grad=True) for n in (nh, nkv, nkv))
    cos, sin = rope_tables(B, T, hd)
    grad = torch.randn(B, T, nh * hd)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 3):
            torch.set_num_threads(count)
            results.append(torch.autograd.grad(fused.rope_attention(q, k, v, cos, sin, nh, nkv), (q, k, v), grad))
    finally:
        torch.set_num_threads(threads)
    for one, three in zip(*results):
        assert torch.equal(one, three)


def test_attention_declines_what_it_does_not_compute():
    cos, sin = rope_tables(1, 8, 16)
    q, kv = torch.randn(1, 8, 64), torch.randn(1, 8, 32)
    assert fused.rope_attention(q, kv, kv, cos, sin, 4, 2) is not None
    assert fused.rope_attention(q.double(), kv.double(), kv.double(), cos.double(), sin.double(), 4, 2) is None
    odd_cos, odd_sin = rope_tables(1, 8, 8)
    assert fused.rope_attention(q, kv, kv, odd_cos, odd_sin, 8, 4) is None  # head_dim 8: not a multiple of 16
    T = fused.MAX_ATTENTION_LENGTH + 1
    long_cos, long_sin = rope_tables(1, T, 16)
    assert fused.rope_attention(torch.randn(1, T, 64), torch.randn(1, T, 32), torch.randn(1, T, 32), long_cos, long_sin, 4, 2) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fused.rope_attention(q, kv, kv, cos, sin, 4, 2) is None


def test_swiglu_equals_silu_times_up_with_gradients():
    torch.manual_seed(0)
    gate = torch.cat([torch.randn(5000) * 4, torch.tensor([-200.0, -90.0, 0.0, 90.0, 200.0])]).requires_grad_()
    up = torch.randn(5005, requires_grad=True)
    ours = SwiGLUFunction.apply(gate, up)
    plain = F.silu(gate) * up
    assert_close(ours, plain, atol=1e-6, rtol=1e-5)
    grad = torch.randn(5005)
    for ours_grad, plain_grad in zip(torch.autograd.grad(ours, (gate, up), grad), torch.autograd.grad(plain, (gate, up), grad)):
        assert_close(ours_grad, plain_grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("zero_in_weight", [False, True], ids=["from-output", "from-input"])
def test_rms_norm_equals_the_plain_expression_with_gradients(zero_in_weight):
    torch.manual_seed(0)
    x = (torch.randn(3, 7, 40) * 3).requires_grad_()
    weight = torch.rand(40) + 0.5
    if zero_in_weight:
        weight[3] = 0.0
    ours = RMSNormFunction.apply(x, weight, 1e-5)
    plain = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * weight
    assert_close(ours, plain)
    grad = torch.randn_like(plain)
    assert_close(torch.autograd.grad(ours, x, grad), torch.autograd.grad(plain, x, grad))


@pytest.mark.parametrize("in_features", [40, 64])
def test_lora_dropout_kernels_equal_the_plain_expression(in_features):
    torch.manual_seed(0)
    x = torch.randn(3, 11, in_features, requires_grad=True)
    weight, bias = torch.randn(24, in_features), torch.randn(24)
    A = torch.randn(4, in_features, requires_grad=True)
    B = torch.randn(24, 4, requires_grad=True)
    keep = keep_mask(x.shape, 0.3, x.device)
    assert fused.lora_down(x.detach().reshape(-1, in_features), keep, A.detach()) is not None  # the C path runs
    ours = LoraMatmul.apply(x, weight, bias, A, B, 1.5 / 0.7, keep)
    plain = x @ weight.T + bias + (x * keep / 0.7) @ A.T @ B.T * 1.5
    assert_close(ours, plain, atol=1e-5, rtol=1e-5)
    grad = torch.randn_like(plain)
    for ours_grad, plain_grad in zip(torch.autograd.grad(ours, (x, A, B), grad), torch.autograd.grad(plain, (x, A, B), grad)):
        assert_close(ours_grad, plain_grad, atol=1e-4, rtol=1e-5)


def test_keep_mask_follows_the_torch_seed_and_not_the_thread_count():
    threads = torch.get_num_threads()
    try:
        masks = []
        for num_threads in (1, 2):
            torch.set_num_threads(num_threads)
            torch.manual_seed(3)
            masks.append(keep_mask((64, 999), 0.1, torch.device("cpu")))
        assert torch.equal(masks[0], masks[1])
        torch.manual_seed(4)
        assert not torch.equal(masks[0], keep_mask((64, 999), 0.1, torch.device("cpu")))
    finally:
        torch.set_num_threads(threads)


def test_a_training_step_gives_the_same_gradients_without_the_kernels(tiny_model, monkeypatch):
    """Every kernel at once, in the decoder, against the PyTorch fallback. Both runs draw their
    dropout masks in PyTorch, from the same seed, so that they drop the same elements."""
    from finegrain.peft import LoraConfig, apply_lora

    monkeypatch.setattr(fused, "keep_mask", lambda shape, least_kept: None)
    apply_lora(tiny_model, LoraConfig(r=4, dropout=0.3, targets="all-linear"))
    for name, parameter in tiny_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.1)
    tiny_model.train()
    input_ids = torch.randint(0, 128, (3, 20))

    def gradients():
        torch.manual_seed(1)
        tiny_model.zero_grad()
        tiny_model(input_ids).logsumexp(-1).mean().backward()
        return {name: p.grad.clone() for name, p in tiny_model.named_parameters() if p.grad is not None}

    used = set()

    def spy(name, kernel):
        def run(*args):
            result = kernel(*args)
            if result is not None:
                used.add(name)
            return result
        return run

    for name in ("rope_attention", "swiglu", "rms_norm", "lora_down", "lora_grad_A"):
        monkeypatch.setattr(fused, name, spy(name, getattr(fused, name)))
    ours = gradients()
    assert used == {"rope_attention", "swiglu", "rms_norm", "lora_down", "lora_grad_A"}
    monkeypatch.setattr(native, "library", lambda: None)
    plain = gradients()
    assert ours.keys() == plain.keys() and len(ours) == 2 * 7 * 2
    for name in ours:
        assert_close(ours[name], plain[name], atol=1e-5, rtol=1e-4, msg=name)

