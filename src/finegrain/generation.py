"""Text generation with a KV cache: greedy or sampled, batched with left padding, streaming."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from finegrain.errors import FinegrainError
from finegrain.model.llama import Llama

if TYPE_CHECKING:
    from finegrain.tokenizer import Tokenizer


def filter_logits(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """Scale by temperature, keep the top-k tokens and the top-p nucleus; others get -inf. (B, V)."""
    logits = logits / max(temperature, 1e-5)
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token once the tokens before it already reach top_p; the best token always stays.
        drop = cumulative - sorted_logits.softmax(-1) >= top_p
        drop[:, 0] = False
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return logits


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty on tokens already present: positive logits divided, negative multiplied."""
    scores = logits.gather(1, seen)
    scores = torch.where(scores > 0, scores / penalty, scores * penalty)
    return logits.scatter(1, seen, scores)


@torch.inference_mode()
def generate(
    model: Llama,
    tokenizer: "Tokenizer",
    prompts: str | Sequence[str],
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    stop: Sequence[str] = (),
    seed: int | None = None,
    chat: bool = False,
    stream: Callable[[str], None] | None = None,
    ignore_eos: bool = False,
) -> str | list[str]:
    """Continue one prompt or a batch of prompts.

    Args:
        prompts: a string, or a list of strings run as one left-padded batch.
        temperature: 0 decodes greedily; above 0 samples (with `top_k`/`top_p` if given).
        repetition_penalty: > 1 discourages tokens already in the prompt or the output.
        stop: strings that end a sequence (not included in its output); EOS always does.
        chat: wrap each prompt as a user turn with the model's chat template.
        stream: called with each new piece of text of the first sequence as it is decoded.
        ignore_eos: keep going past EOS to exactly `max_new_tokens` (for benchmarks).

    Returns:
        The generated text (without the prompt): a string for a string prompt, else a list.
    """
    single = isinstance(prompts, str)
    texts = [prompts] if single else list(prompts)
    if not texts:
        return []
    if chat:  # the prompt's text stays text: a prompt cannot forge the template's markers (encode_chat)
        encoded = [tokenizer.encode_chat([{"role": "user", "content": t}]) for t in texts]
    else:
        encoded = [tokenizer.encode(t) for t in texts]
    empty = [i for i, ids in enumerate(encoded) if not ids]
    if empty:
        raise FinegrainError(f"prompt {empty[0]}: empty, so there is nothing to continue; give each prompt some text (or chat=True)")
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    device = model.model.embed_tokens.weight.device

    B, P = len(encoded), max(len(ids) for ids in encoded)
    total = P + max_new_tokens
    pad_id = tokenizer.pad_token_id
    input_ids = torch.full((B, P), pad_id, dtype=torch.long, device=device)
    mask = torch.ones(B, total, dtype=torch.long, device=device)  # over all cache slots
    for i, ids in enumerate(encoded):
        input_ids[i, P - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        mask[i, : P - len(ids)] = 0
    if all(len(ids) == P for ids in encoded):
        mask = None  # no padding: the model builds no mask for a decoding step

    eos_ids = torch.tensor([] if ignore_eos else sorted(tokenizer.eos_token_ids), dtype=torch.long, device=device)
    seen = input_ids.clone()
    outputs: list[list[int]] = [[] for _ in range(B)]
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    streamed = ""

    model.setup_cache(B, total)
    try:
        logits = model(input_ids, attention_mask=mask, input_pos=torch.arange(P, device=device), last_only=True)
        for step in range(max_new_tokens):
            next_logits = logits[:, -1].float()
            if repetition_penalty != 1.0:
                next_logits = apply_repetition_penalty(next_logits, seen, repetition_penalty)
            if temperature > 0:
                probs = filter_logits(next_logits, temperature, top_k, top_p).softmax(-1)
                next_token = torch.multinomial(probs, 1, generator=generator)[:, 0]
            else:
                next_token = next_logits.argmax(-1)
            next_token = torch.where(finished, pad_id, next_token)
            for i in (~finished).nonzero()[:, 0].tolist():
                outputs[i].append(int(next_token[i]))
            finished |= torch.isin(next_token, eos_ids)
            for i in (~finished).nonzero()[:, 0].tolist() if stop else ():
                if _find_stop(tokenizer.decode(outputs[i], skip_special_tokens=True), stop) >= 0:
                    finished[i] = True
            if stream is not None:
                final = bool(finished[0]) or step == max_new_tokens - 1
                text = _streamable(tokenizer.decode(_strip_eos(outputs[0], eos_ids), skip_special_tokens=True), stop, final)
                if len(text) > len(streamed):
                    stream(text[len(streamed) :])
                    streamed = text
            if bool(finished.all()) or step == max_new_tokens - 1:
                break
            seen = torch.cat([seen, next_token[:, None]], dim=1)
            pos = torch.tensor([P + step], device=device)
            logits = model(next_token[:, None], attention_mask=mask, input_pos=pos)
    finally:
        model.clear_cache()

    results = []
    for ids in outputs:
        text = tokenizer.decode(_strip_eos(ids, eos_ids), skip_special_tokens=True)
        cut = _find_stop(text, stop)
        results.append(text[:cut] if cut >= 0 else text)
    return results[0] if single else results


def _strip_eos(ids: list[int], eos_ids: torch.Tensor) -> list[int]:
    eos = set(eos_ids.tolist())
    for n, token in enumerate(ids):
        if token in eos:
            return ids[:n]
    return ids


def _streamable(text: str, stop: Sequence[str], final: bool) -> str:
    """The part of `text` safe to show: not past a stop string, nor a possible start of one."""
    cut = _find_stop(text, stop)
    if cut >= 0:
        return text[:cut]
    if final:
        return text
    hold = max((k for s in stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
    text = text[: len(text) - hold]
    return text[:-1] if text.endswith("\ufffd") else text  # an incomplete UTF-8 sequence


def _find_stop(text: str, stop: Sequence[str]) -> int:
    """Index of the earliest stop string in `text`, or -1."""
    hits = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return min(hits) if hits else -1
