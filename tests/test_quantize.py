"""Int8 weights (an opt-in approximation): close to float32, never taken for it."""

import dataclasses

import pytest
import torch
from conftest import random_llama

from finegrain.checkpoint.load import load_model
from finegrain.generation import generate
from finegrain.model import native
from finegrain.model.quantize import Int8Linear, quantize_int8


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_int8_linear_stays_close_to_float32(bias):
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 96, bias=bias)
    x = torch.randn(2, 5, 64)
    expected = linear(x).detach()
    out = Int8Linear(linear)(x)
    assert out.shape == expected.shape
    error = (out - expected).abs().max() / expected.abs().max()
    assert 0 < error < 0.02


def test_int8_model_stays_close_to_float32(tiny_model_dir):
    model, tokenizer = load_model(tiny_model_dir, progress=False)
    with torch.no_grad():  # a random model that still prefers some tokens, as in test_generate
        model.lm_head.weight.mul_(8)
    ids = torch.tensor([tokenizer.encode("The capital of France is Paris.")])
    prompt = "The capital of France is"
    with torch.no_grad():
        reference = model(ids)
        reference_text = generate(model, tokenizer, prompt, max_new_tokens=4)
        quantize_int8(model)
        quantized = model(ids)
        model.setup_cache(batch_size=1, max_len=ids.shape[1])
        steps = [model(ids[:, :4], input_pos=torch.arange(4))]
        steps += [model(ids[:, t : t + 1], input_pos=torch.tensor([t])) for t in range(4, ids.shape[1])]
        model.clear_cache()
    assert not any(type(m) is torch.nn.Linear for m in model.modules())  # really swapped, the head too
    for logits in (quantized, torch.cat(steps, dim=1)):
        error = (logits - reference).abs().max() / reference.abs().max()
        assert 0 < error < 0.05
    assert generate(model, tokenizer, prompt, max_new_tokens=4) == reference_text


def _int8_tiny_model(tiny_config, bias: bool):
    return quantize_int8(random_llama(dataclasses.replace(tiny_config, attention_bias=bias, attention_out_bias=bias)))


def test_c_matmul_equals_the_pytorch_fallback(monkeypatch):
    torch.manual_seed(0)
    layer = Int8Linear(torch.nn.Linear(72, 40, bias=True))  # 72: not a multiple of the vector width
    for rows in (1, 3, 4, 9):  # one row, a block of four, and the ragged mixes
        x = torch.randn(rows, 72)
        native_out = layer(x)
        with monkeypatch.context() as patch:
            patch.setattr(native, "library", lambda: None)
            fallback = layer(x)
        torch.testing.assert_close(native_out, fallback, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_c_decoding_step_equals_the_pytorch_step(tiny_config, bias):
    model = _int8_tiny_model(tiny_config, bias)
    assert model.int8_decoder is not None
    # 5 sequences: the C matmul's block of four rows and a single row, in every step
    ids = torch.randint(0, tiny_config.vocab_size, (5, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(5, 12, dtype=torch.long)
    mask[0, :3] = 0  # left padding, as `generate` batches prompts
    mask[2, :1] = 0

    def decode(decoder):
        model.int8_decoder = decoder
        model.setup_cache(batch_size=5, max_len=12)
        with torch.inference_mode():
            steps = [model(ids[:, :5], attention_mask=mask, input_pos=torch.arange(5))]
            steps += [model(ids[:, t : t + 1], attention_mask=mask, input_pos=torch.tensor([t])) for t in range(5, 12)]
        model.clear_cache()
        return torch.cat(steps, dim=1)

    decoder, calls = model.int8_decoder, []

    def counting(*args):
        calls.append(args)
        return decoder(*args)

    in_c = decode(counting)
    in_pytorch = decode(None)
    assert len(calls) == 7  # every one-token step ran in C
    torch.testing.assert_close(in_c, in_pytorch, rtol=1e-5, atol=1e-5)


def test_c_decoding_step_refuses_a_slot_outside_the_cache(tiny_config):
    model = _int8_tiny_model(tiny_config, bias=False)
    model.setup_cache(batch_size=1, max_len=4)
    with torch.inference_mode(), pytest.raises(IndexError, match="does not fit the KV cache"):
        model(torch.tensor([[5]]), input_pos=torch.tensor([4]))


def test_without_a_compiler_int8_falls_back_to_pytorch(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("FINEGRAIN_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a compiler that always fails
    native.library.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="could not build its C kernels.*Install a C compiler"):
            quantize_int8(tiny_model)
        assert tiny_model.int8_decoder is None
        assert list((tmp_path / "native").iterdir()) == []  # no half-written library left behind
        with torch.no_grad():
            assert tiny_model(torch.tensor([[1, 5, 7]])).shape == (1, 3, 128)
    finally:
        native.library.cache_clear()
