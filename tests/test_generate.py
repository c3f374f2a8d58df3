"""Generation: cached decoding, batching with left padding, sampling controls, stop strings, streaming."""

import pytest
import torch
from torch.testing import assert_close

from finegrain.checkpoint.load import load_model
from finegrain.errors import FinegrainError
from finegrain.generation import apply_repetition_penalty, filter_logits, generate

PROMPTS = ["The capital of France is", "A gripping, funny film", "Two hours"]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    model, tokenizer = load_model(tiny_model_dir, progress=False)
    with torch.no_grad():  # a random model that still prefers some tokens
        model.lm_head.weight.mul_(8)
    return model, tokenizer


def test_greedy_equals_argmax_of_full_forward(tiny):
    model, tokenizer = tiny
    ids = tokenizer.encode(PROMPTS[0])
    out = generate(model, tokenizer, PROMPTS[0], max_new_tokens=6)
    expected = list(ids)
    with torch.no_grad():
        for _ in range(6):
            next_id = int(model(torch.tensor([expected]))[0, -1].argmax())
            if next_id in tokenizer.eos_token_ids:
                break
            expected.append(next_id)
    assert out == tokenizer.decode(expected[len(ids):], skip_special_tokens=True)


def test_batched_left_padded_equals_one_by_one(tiny):
    model, tokenizer = tiny
    batched = generate(model, tokenizer, PROMPTS, max_new_tokens=8)
    assert batched == [generate(model, tokenizer, p, max_new_tokens=8) for p in PROMPTS]


def test_sampling_is_reproducible_with_a_seed(tiny):
    model, tokenizer = tiny
    a = generate(model, tokenizer, PROMPTS[1], max_new_tokens=8, temperature=1.0, top_p=0.9, seed=3)
    b = generate(model, tokenizer, PROMPTS[1], max_new_tokens=8, temperature=1.0, top_p=0.9, seed=3)
    assert a == b


def test_stop_string_and_streaming(tiny):
    model, tokenizer = tiny
    full = generate(model, tokenizer, PROMPTS[0], max_new_tokens=10)
    assert len(full) > 2
    stop = full[1:3]
    pieces = []
    cut = generate(model, tokenizer, PROMPTS[0], max_new_tokens=10, stop=[stop], stream=pieces.append)
    assert cut == full[: full.index(stop)]
    assert "".join(pieces) == cut


def test_chat_template_prompt(tiny):
    model, tokenizer = tiny
    text = generate(model, tokenizer, "hi", max_new_tokens=4, chat=True)
    assert isinstance(text, str)


def test_an_empty_prompt_is_refused_and_no_prompts_give_none(tiny):
    """An empty prompt encodes to no token, which was an IndexError from the decoding loop."""
    model, tokenizer = tiny
    with pytest.raises(FinegrainError, match="prompt 1: empty, so there is nothing to continue"):
        generate(model, tokenizer, ["hi", ""], max_new_tokens=2)
    assert generate(model, tokenizer, [], max_new_tokens=2) == []


def test_top_k_top_p_filtering():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    assert torch.isinf(filter_logits(logits, top_k=2)[0, 2:]).all()
    probs = logits.softmax(-1)[0]  # 0.64, 0.24, 0.09, 0.03
    kept = ~torch.isinf(filter_logits(logits, top_p=0.8))[0]
    assert kept.tolist() == [True, True, False, False]
    assert probs[0] < 0.8 <= probs[:2].sum()
    assert_close(filter_logits(logits, temperature=2.0), logits / 2)


def test_repetition_penalty():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    out = apply_repetition_penalty(logits, torch.tensor([[0, 1]]), 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0]]


@pytest.mark.real_model
def test_real_model_batched_equals_single():
    model, tokenizer = load_model(progress=False)
    prompts = ["The capital of France is", "Water boils at"]
    batched = generate(model, tokenizer, prompts, max_new_tokens=6)
    assert batched == [generate(model, tokenizer, p, max_new_tokens=6) for p in prompts]
    assert "Paris" in batched[0]

