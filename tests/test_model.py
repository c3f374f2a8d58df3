"""Our LLaMA against transformers' LlamaForCausalLM, loaded from a checkpoint transformers saved."""

import copy

import pytest
import torch
import transformers
from torch.testing import assert_close

from finegrain.model.config import LlamaConfig
from finegrain.model.llama import Llama
from finegrain.model.ops import RMSNormFunction, SwiGLUFunction, attention

LLAMA3_ROPE = {
    "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}


def tiny_hf_config(num_kv_heads=2, attention_bias=False, rope_scaling=None, tie=False):
    return transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=num_kv_heads, attention_bias=attention_bias, rope_scaling=rope_scaling,
        max_position_embeddings=256, tie_word_embeddings=tie, rope_theta=10000.0,
    )


def randomize_biases(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.normal_(0.0 if name.endswith("bias") else 1.0, 0.1)


@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])  # GQA ratios 1, 2, 4
@pytest.mark.parametrize("rope_scaling", [None, LLAMA3_ROPE], ids=["default-rope", "llama3-rope"])
@pytest.mark.parametrize("attention_bias", [False, True], ids=["no-bias", "qkv-bias"])
def test_logits_equal_transformers(tmp_path, num_kv_heads, rope_scaling, attention_bias):
    torch.manual_seed(0)
    reference = transformers.LlamaForCausalLM(tiny_hf_config(num_kv_heads, attention_bias, rope_scaling)).eval()
    randomize_biases(reference)
    reference.save_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text("")  # not used here
    model = _load_weights_only(tmp_path)
    input_ids = torch.randint(0, 128, (2, 48))  # longer than the llama3 original context
    with torch.no_grad():
        assert_close(model(input_ids), reference(input_ids).logits, atol=1e-4, rtol=0)


def test_qwen2_style_bias_equals_transformers():
    torch.manual_seed(0)
    hf_config = transformers.Qwen2Config(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
    )
    reference = transformers.Qwen2ForCausalLM(hf_config).eval()
    randomize_biases(reference)
    model = Llama(LlamaConfig.from_hf(hf_config.to_dict())).eval()
    model.load_state_dict(reference.state_dict())
    input_ids = torch.randint(0, 128, (2, 20))
    with torch.no_grad():
        assert_close(model(input_ids), reference(input_ids).logits, atol=1e-4, rtol=0)


def test_padding_mask_and_positions_equal_transformers():
    torch.manual_seed(0)
    reference = transformers.LlamaForCausalLM(tiny_hf_config()).eval()
    model = Llama(LlamaConfig.from_hf(reference.config.to_dict())).eval()
    model.load_state_dict(reference.state_dict())
    input_ids = torch.randint(0, 128, (3, 16))
    mask = torch.ones(3, 16, dtype=torch.long)
    mask[0, :5] = 0  # left padding
    mask[1, :1] = 0
    with torch.no_grad():
        ours, theirs = model(input_ids, attention_mask=mask), reference(input_ids, attention_mask=mask).logits
    real = mask.bool()
    assert_close(ours[real], theirs[real], atol=1e-4, rtol=0)


def test_left_padding_does_not_change_real_tokens(tiny_model):
    input_ids = torch.randint(0, 128, (1, 10))
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), input_ids], dim=1)
    mask = torch.cat([torch.zeros(1, 4), torch.ones(1, 10)], dim=1).long()
    with torch.no_grad():
        assert_close(tiny_model(padded, attention_mask=mask)[:, 4:], tiny_model(input_ids), atol=1e-5, rtol=0)


def test_kv_cache_equals_full_forward(tiny_model):
    input_ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        full = tiny_model(input_ids)
        tiny_model.setup_cache(batch_size=2, max_len=16)
        steps = [tiny_model(input_ids[:, :5], input_pos=torch.arange(5))]
        for t in range(5, 12):
            steps.append(tiny_model(input_ids[:, t : t + 1], input_pos=torch.tensor([t])))
        tiny_model.clear_cache()
    # The full forward runs finegrain's C attention, the cached steps PyTorch's: two float32 roundings.
    assert_close(torch.cat(steps, dim=1), full, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "qkv-bias"])
def test_fused_projections_equal_separate(tiny_config, bias):
    torch.manual_seed(0)
    separate = Llama(tiny_config.replace(attention_bias=bias)).eval()
    randomize_biases(separate)
    fused = copy.deepcopy(separate)
    fused.fuse_projections()
    assert not hasattr(fused.model.layers[0].self_attn, "q_proj")
    input_ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        expected = separate(input_ids)
        assert_close(fused(input_ids), expected, atol=1e-4, rtol=0)
        fused.setup_cache(batch_size=2, max_len=12)
        steps = [fused(input_ids[:, :5], input_pos=torch.arange(5))]
        steps += [fused(input_ids[:, t : t + 1], input_pos=torch.tensor([t])) for t in range(5, 12)]
    assert_close(torch.cat(steps, dim=1), expected, atol=1e-4, rtol=0)


def test_fusing_refuses_an_adapter_layer(tiny_model):
    from finegrain.peft.base import apply_lora
    from finegrain.peft.lora import LoraConfig

    apply_lora(tiny_model, LoraConfig(r=2, targets=("q_proj",)))
    with pytest.raises(TypeError, match="merge adapters"):
        tiny_model.fuse_projections()


def test_activation_checkpointing_gives_the_same_gradients(tiny_config):
    torch.manual_seed(0)
    plain = Llama(tiny_config).train()
    recomputed = copy.deepcopy(plain)
    recomputed.model.gradient_checkpointing = True
    input_ids = torch.randint(0, 128, (2, 12))
    for model in (plain, recomputed):
        model(input_ids).logsumexp(-1).mean().backward()
    for (name, p), q in zip(plain.named_parameters(), recomputed.parameters()):
        assert_close(q.grad, p.grad, atol=1e-6, rtol=0, msg=name)


def test_rms_norm_and_swiglu_functions_equal_autograd():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, dtype=torch.double, requires_grad=True)
    weight = torch.randn(8, dtype=torch.double, requires_grad=True)
    with_zero = torch.cat([torch.zeros(1, dtype=torch.double), weight[1:].detach()]).requires_grad_()  # input kept
    gate = torch.randn(2, 3, 8, dtype=torch.double, requires_grad=True)
    up = torch.randn(2, 3, 8, dtype=torch.double, requires_grad=True)
    pairs = [
        (RMSNormFunction.apply(x, w, 1e-5), torch.nn.functional.rms_norm(x, (8,), w, 1e-5), (x, w))
        for w in (weight, with_zero)
    ] + [(SwiGLUFunction.apply(gate, up), torch.nn.functional.silu(gate) * up, (gate, up))]
    for ours, plain, inputs in pairs:
        assert_close(ours, plain)
        grad = torch.randn_like(plain)
        assert_close(torch.autograd.grad(ours, inputs, grad), torch.autograd.grad(plain, inputs, grad))


def test_bidirectional_attention_sees_the_future(tiny_config):
    torch.manual_seed(0)
    causal = Llama(tiny_config).eval()
    bidirectional = Llama(tiny_config.replace(causal=False)).eval()
    bidirectional.load_state_dict(causal.state_dict())
    a = torch.randint(0, 128, (1, 8))
    b = a.clone()
    b[0, -1] = (a[0, -1] + 1) % 128
    with torch.no_grad():
        # Changing the last token leaves earlier causal outputs alone but moves bidirectional ones.
        assert_close(causal(a)[:, :-1], causal(b)[:, :-1])
        assert (bidirectional(a)[:, 0] - bidirectional(b)[:, 0]).abs().max() > 1e-4


def _load_weights_only(directory):
    from finegrain.checkpoint.hf import load_hf_dir
    from finegrain.checkpoint.load import build_model

    checkpoint = load_hf_dir(directory, progress=False)
    return build_model(checkpoint.config, checkpoint.state_dict)


def test_attention_runs_in_float32_under_bf16_autocast():
    """train.bf16 keeps attention float32 (PyTorch's bf16 attention backward is ~4x slower on a CPU)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 5, 8) for _ in range(3))
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention(q, k.bfloat16(), v.bfloat16(), is_causal=True)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, atol=0.02, rtol=0.02)  # k and v rounded to bf16, no more
