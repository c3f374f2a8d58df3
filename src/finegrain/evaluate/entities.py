"""Entity-level metrics (seqeval's numbers) over tag sequences.

The tagging schemes themselves (parsing, checking, converting, reading entities in "default"
and "strict" mode) live in `finegrain.tags`, which the data readers use too; they are
re-exported here, where they were first written.

`entity_metrics` gives the numbers of seqeval's `classification_report` (per type, micro,
macro, weighted, zero division as 0) in either mode; tests check that on random sequences,
broken ones included. One deliberate difference: where no entity exists in either sequence
seqeval's macro average is NaN (numpy's mean of nothing), ours 0.0, which JSON can hold.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from finegrain.tags import (
    SCHEMES,
    allowed_transitions,
    check_tags,
    convert_tags,
    default_entities,
    entities_to_tags,
    normalize_scheme,
    parse_tag,
    repair_tags,
    tag_set,
    tags_to_entities,
)

__all__ = [
    "SCHEMES",
    "accuracy",
    "allowed_transitions",
    "check_tags",
    "convert_tags",
    "entities_to_tags",
    "entity_errors",
    "entity_metrics",
    "normalize_scheme",
    "parse_tag",
    "repair_tags",
    "tag_set",
    "tags_to_entities",
]


# --- metrics ----------------------------------------------------------------------------


def entity_metrics(
    y_true: Sequence[Sequence[str]],
    y_pred: Sequence[Sequence[str]],
    mode: str = "default",
    scheme: str | None = None,
) -> dict[str, Any]:
    """Entity-level precision, recall and F1 per type and averaged, as seqeval computes them.

    An entity counts as found when its type, start and end all match. Types are those in
    either sequence, sorted (seqeval's `target_names`); `macro` averages them, `weighted`
    weights them by gold support, `micro` pools the counts. Zero denominators give 0.

    Args:
        y_true: gold tags, one list per sentence.
        y_pred: predicted tags, same lengths.
        mode: "default" or "strict" (see the module docstring).
        scheme: for strict mode, "BIO" or "BIOES".

    Returns:
        `task` ("ner"), `mode`, `num_examples`, `labels` (the types), `per_class` (type ->
        `precision`, `recall`, `f1`, `support`), `micro`, `macro`, `weighted`, the micro
        `precision`/`recall`/`f1` again at the top, `accuracy` (of tags, word by word),
        `num_entities` (`gold`, `predicted`, `correct`).

    Raises:
        ValueError: sentence counts or lengths differ, or a malformed tag.
    """
    if len(y_true) != len(y_pred):
        raise ValueError(f"y_true has {len(y_true)} sentences but y_pred has {len(y_pred)}")
    for k, (t, p) in enumerate(zip(y_true, y_pred)):
        if len(t) != len(p):
            raise ValueError(f"sentence {k}: {len(t)} gold tags but {len(p)} predicted")
    true_sets = _entity_sets(y_true, mode, scheme)
    pred_sets = _entity_sets(y_pred, mode, scheme)
    types = sorted(set(true_sets) | set(pred_sets))
    tp = np.array([len(true_sets.get(t, set()) & pred_sets.get(t, set())) for t in types], dtype=np.int64)
    predicted = np.array([len(pred_sets.get(t, set())) for t in types], dtype=np.int64)
    support = np.array([len(true_sets.get(t, set())) for t in types], dtype=np.int64)
    precision, recall, f1 = _prf(tp, predicted, support)
    micro_p, micro_r, micro_f = (
        float(x[0]) for x in _prf(tp.sum(keepdims=True), predicted.sum(keepdims=True), support.sum(keepdims=True))
    )
    total = int(support.sum())
    if total:
        weighted = {
            k: float(np.average(v, weights=support))
            for k, v in zip(("precision", "recall", "f1"), (precision, recall, f1))
        }
    else:  # seqeval's answer when there is no gold entity
        weighted = {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    return {
        "task": "ner",
        "mode": mode,
        "num_examples": len(y_true),
        "labels": types,
        "per_class": {
            t: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, t in enumerate(types)
        },
        "micro": {"precision": micro_p, "recall": micro_r, "f1": micro_f, "support": total},
        "macro": {
            "precision": float(np.average(precision)) if types else 0.0,
            "recall": float(np.average(recall)) if types else 0.0,
            "f1": float(np.average(f1)) if types else 0.0,
            "support": total,
        },
        "weighted": {**weighted, "support": total},
        "precision": micro_p,
        "recall": micro_r,
        "f1": micro_f,
        "accuracy": accuracy(y_true, y_pred),
        "num_entities": {"gold": total, "predicted": int(predicted.sum()), "correct": int(tp.sum())},
    }


def _entity_sets(
    sequences: Sequence[Sequence[str]], mode: str, scheme: str | None
) -> dict[str, set[tuple[int, int, int]]]:
    by_type: dict[str, set[tuple[int, int, int]]] = {}
    for k, tags in enumerate(sequences):
        for type_, start, end in tags_to_entities(tags, mode, scheme):
            by_type.setdefault(type_, set()).add((k, start, end))
    return by_type


def _prf(tp: np.ndarray, predicted: np.ndarray, support: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # The operations and their order are seqeval's, so the floats come out bit for bit the same.
    precision = tp / np.where(predicted == 0, 1, predicted)
    precision[predicted == 0] = 0.0
    recall = tp / np.where(support == 0, 1, support)
    recall[support == 0] = 0.0
    denominator = 1.0 * precision + recall
    denominator[denominator == 0.0] = 1
    return precision, recall, (1 + 1.0) * precision * recall / denominator


def accuracy(y_true: Sequence[Sequence[str]], y_pred: Sequence[Sequence[str]]) -> float:
    """The share of words whose predicted tag equals the gold tag (seqeval's `accuracy_score`)."""
    pairs = [(t, p) for ts, ps in zip(y_true, y_pred) for t, p in zip(ts, ps)]
    return sum(t == p for t, p in pairs) / len(pairs) if pairs else 0.0


def entity_errors(y_true: Sequence[Sequence[str]], y_pred: Sequence[Sequence[str]]) -> dict[str, int]:
    """What went wrong, entity by entity (default mode), for reports.

    Returns:
        `correct` (same type and span), `wrong_type` (same span), `wrong_span` (overlapping, same
        type), `wrong_type_and_span` (overlapping), `missed` (gold overlapping no prediction),
        `spurious` (a prediction overlapping no gold entity). A gold entity that overlaps
        several predictions is counted once, by its best match.
    """
    counts: Counter[str] = Counter()
    for tags_true, tags_pred in zip(y_true, y_pred):
        gold = default_entities(tags_true)
        pred = default_entities(tags_pred)
        for g_type, g_start, g_end in gold:
            overlapping = [(t, s, e) for t, s, e in pred if s < g_end and g_start < e]
            if (g_type, g_start, g_end) in overlapping:
                counts["correct"] += 1
            elif any((s, e) == (g_start, g_end) for _, s, e in overlapping):
                counts["wrong_type"] += 1
            elif any(t == g_type for t, _, _ in overlapping):
                counts["wrong_span"] += 1
            elif overlapping:
                counts["wrong_type_and_span"] += 1
            else:
                counts["missed"] += 1
        counts["spurious"] += sum(1 for _, s, e in pred if not any(gs < e and s < ge for _, gs, ge in gold))
    keys = ("correct", "wrong_type", "wrong_span", "wrong_type_and_span", "missed", "spurious")
    return {k: counts[k] for k in keys}
