"""Int8 weights (an opt-in approximation): close to float32, never taken for it."""

import pytest
import torch

from finegrain.checkpoint.load import load_model
from finegrain.generation import generate
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
