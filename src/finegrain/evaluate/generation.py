"""Metrics of generated text against references: exact match, token F1, ROUGE-L, generative classification.

Exact match and token F1 are SQuAD's (`finegrain.evaluate.squad`): both texts are normalised
(lower case, punctuation and the articles a/an/the removed, whitespace collapsed) and F1
counts the tokens the two share. ROUGE-L is the F-measure of the longest common
subsequence of tokens, as Google's `rouge-score` package computes it without stemming:
text lower-cased, every run of characters other than a-z and 0-9 a token boundary.

Generative classification. When references are labels (a few short outputs repeated across
the training set, such as "positive"/"negative"), a generation is mapped to a label by this
rule, on SQuAD-normalised text: the label the generation starts with (the longest, when
several do); otherwise the one label whose words occur in it as a whole-word sequence;
otherwise none, and the generation counts as unmappable (and wrong).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

from finegrain.evaluate.squad import exact_match, f1_score, normalize_answer

# A reference is label-like when it has at most this many words and at least this many
# training examples share it; a label set needs two such references.
LABEL_MAX_WORDS = 3
LABEL_MIN_COUNT = 3

_NON_ALPHANUMERIC = re.compile(r"[^a-z0-9]+")


def rouge_tokens(text: str) -> list[str]:
    """Tokens as `rouge-score`'s default tokenizer makes them: lower case, runs of [a-z0-9]."""
    return _NON_ALPHANUMERIC.sub(" ", text.lower()).split()


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token lists (dynamic programming, O(len(a)·len(b)))."""
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure: 2PR / (P + R) with P = LCS / predicted tokens, R = LCS / reference tokens."""
    predicted, gold = rouge_tokens(prediction), rouge_tokens(reference)
    if not predicted or not gold:
        return 0.0
    common = lcs_length(predicted, gold)
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def label_set(references: Sequence[str]) -> list[str]:
    """The labels among training references: short ones that many examples share (see the module doc).

    Returns:
        The label-like references, sorted; empty when fewer than two qualify.
    """
    counts = Counter(r.strip() for r in references if len(normalize_answer(r).split()) in range(1, LABEL_MAX_WORDS + 1))
    labels = sorted(r for r, n in counts.items() if n >= LABEL_MIN_COUNT)
    return labels if len(labels) >= 2 else []


def map_to_label(generated: str, labels: Sequence[str]) -> str | None:
    """The label a generation means: the one it starts with, else the one it contains, else None."""
    text = normalize_answer(generated)
    normalized = {label: normalize_answer(label) for label in labels}
    starts = [label for label, norm in normalized.items() if text == norm or text.startswith(norm + " ")]
    if starts:
        return max(starts, key=lambda label: len(normalized[label]))
    padded = f" {text} "
    contained = [label for label, norm in normalized.items() if f" {norm} " in padded]
    return contained[0] if len(contained) == 1 else None


def generation_metrics(
    generated: Sequence[str], references: Sequence[str], labels: Sequence[str] = ()
) -> dict[str, Any]:
    """Mean exact match, token F1 and ROUGE-L (0-1), and generative classification over label references.

    Args:
        generated: one generated text per example.
        references: the reference answer of each example.
        labels: the label set (`label_set` of the training references); examples whose reference
            is one of them are scored as classification too.

    Returns:
        `num_examples`, `exact_match`, `token_f1`, `rougeL`; with labels and label references also
        `label_examples`, `generative_accuracy`, `unmappable` (share of those examples whose
        generation maps to no label) and `per_label` ({label: {support, accuracy}}).
    """
    if len(generated) != len(references):
        raise ValueError(f"{len(generated)} generations but {len(references)} references")
    n = max(len(references), 1)
    metrics: dict[str, Any] = {
        "num_examples": len(references),
        "exact_match": sum(map(exact_match, generated, references)) / n,
        "token_f1": sum(map(f1_score, generated, references)) / n,
        "rougeL": sum(map(rouge_l, generated, references)) / n,
    }
    label_of = {normalize_answer(label): label for label in labels}
    scored = [(g, label_of[normalize_answer(r)]) for g, r in zip(generated, references) if normalize_answer(r) in label_of]
    if scored:
        mapped = [map_to_label(g, labels) for g, _ in scored]
        metrics["label_examples"] = len(scored)
        metrics["generative_accuracy"] = sum(m == gold for m, (_, gold) in zip(mapped, scored)) / len(scored)
        metrics["unmappable"] = sum(m is None for m in mapped) / len(scored)
        per_label: dict[str, dict[str, Any]] = {}
        for label in labels:
            hits = [m == gold for m, (_, gold) in zip(mapped, scored) if gold == label]
            if hits:
                per_label[label] = {"support": len(hits), "accuracy": sum(hits) / len(hits)}
        metrics["per_label"] = per_label
    return metrics
