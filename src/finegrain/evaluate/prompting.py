"""Prompted baselines: the base model labelling texts with no training (zero-shot) or from k
examples per class in the prompt (in-context, k-shot).

The question a reviewer asks of a fine-tuned score from a few dozen labels: would the model
have done as well by being asked? Each text becomes one user turn under the model's chat
template, "Classify the text as one of: a, b, c." with the k examples per class (from the
training split) before it as "Text: ... / Label: ..." lines, and the answer is the label whose
words the model finds most likely after the assistant turn starts (the mean log-probability per
token of each label, so longer label names are not penalised). Scored with finegrain's own
classification metrics on the same test split as the run.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from finegrain.evaluate.metrics import classification_metrics

MAX_PROMPT_TOKENS = 1024  # a k-shot prompt is cut from the front (the oldest examples) beyond this


def prompt_messages(text: str, labels: Sequence[str], shots: Sequence[Any] = ()) -> list[dict[str, str]]:
    """The one user turn that asks for `text`'s label, with the `shots` (examples) before it."""
    lines = [f"Classify the text as one of: {', '.join(labels)}. Answer with the label only.", ""]
    for example in shots:
        lines += [f"Text: {' '.join(example.text.split())}", f"Label: {example.label}", ""]
    lines += [f"Text: {' '.join(text.split())}", "Label:"]
    return [{"role": "user", "content": "\n".join(lines)}]


def choose_shots(train: Sequence[Any], labels: Sequence[str], k: int, seed: int) -> list[Any]:
    """k training examples of each label, interleaved label by label, drawn with `seed`."""
    rng = random.Random(seed)
    by_label = {label: [e for e in train if e.label == label] for label in labels}
    drawn = {label: rng.sample(examples, min(k, len(examples))) for label, examples in by_label.items()}
    return [drawn[label][i] for i in range(k) for label in labels if i < len(drawn[label])]


@torch.no_grad()
def prompted_labels(llama, tokenizer, texts: Sequence[str], labels: Sequence[str], shots: Sequence[Any] = (),
                    batch_size: int = 16) -> list[str]:
    """Each text's label by the base model's mean log-probability of each label's tokens."""
    label_ids = [tokenizer.encode(" " + label, add_special_tokens=False) or [0] for label in labels]
    rows: list[tuple[int, int, list[int], int]] = []  # (text, label, ids, where the label starts)
    for t, text in enumerate(texts):
        prompt = tokenizer.encode(tokenizer.apply_chat_template(prompt_messages(text, labels, shots)),
                                  add_special_tokens=False)[-MAX_PROMPT_TOKENS:]
        for j, ids in enumerate(label_ids):
            rows.append((t, j, prompt + ids, len(prompt)))
    scores = torch.full((len(texts), len(labels)), float("-inf"))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][2]))  # similar lengths together: little padding
    was_training = llama.training
    llama.eval()
    for start in range(0, len(order), batch_size):
        chunk = [rows[i] for i in order[start : start + batch_size]]
        T = max(len(ids) for _, _, ids, _ in chunk)
        input_ids = torch.tensor([ids + [pad] * (T - len(ids)) for _, _, ids, _ in chunk])
        logits = llama(input_ids)  # right padding cannot reach real tokens under a causal mask
        logprobs = F.log_softmax(logits.float(), dim=-1)
        for row, (t, j, ids, begin) in enumerate(chunk):
            positions = torch.arange(begin - 1, len(ids) - 1)  # each label token's logits come one step earlier
            targets = torch.tensor(ids[begin:])
            scores[t, j] = logprobs[row, positions, targets].mean()
    llama.train(was_training)
    return [labels[int(i)] for i in scores.argmax(dim=1)]


def prompted_baseline(llama, tokenizer, train: Sequence[Any], test: Sequence[Any], labels: Sequence[str], k: int = 0,
                      seed: int = 0, max_examples: int | None = 200) -> dict[str, Any]:
    """Metrics of the k-shot (0: zero-shot) prompted base model on (at most `max_examples` of) `test`."""
    test = list(test)
    if max_examples is not None and len(test) > max_examples:
        test = random.Random(seed).sample(test, max_examples)
    shots = choose_shots(train, labels, k, seed) if k else []
    predicted = prompted_labels(llama, tokenizer, [e.text for e in test], labels, shots)
    metrics = classification_metrics([e.label for e in test], predicted, list(labels))
    return {"accuracy": metrics["accuracy"], "macro_f1": metrics["macro"]["f1"], "shots": k,
            "examples": len(test)}
