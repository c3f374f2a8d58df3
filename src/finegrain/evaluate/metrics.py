"""Classification, multi-label and regression metrics, in numpy.

The numbers match scikit-learn (`classification_report`, `precision_recall_fscore_support`,
`confusion_matrix`, `hamming_loss`, `r2_score` with `zero_division=0`); the tests check
that on random data. They stay in numpy although scikit-learn is now installed with
finegrain (for the baselines): importing it takes about a second, which `finegrain predict`
and `serve` should not pay for a few formulas.

Every function returns a plain dict of Python numbers, ready for `json.dumps`:
`{"task": ..., "num_examples": ..., <metrics>}`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

__all__ = [
    "calibration_metrics", "classification_metrics", "higher_is_better", "multilabel_metrics", "regression_metrics",
]

CALIBRATION_BINS = 15  # equal-width confidence bins of the expected calibration error (Guo et al. 2017)

# Words that make a metric an error to minimise. Matched against whole "_"-separated words of
# the last dotted part, so "mse" hits "val_mse" but not a name that merely contains the letters.
_LOWER_IS_BETTER_WORDS = frozenset(
    {"loss", "mse", "rmse", "mae", "mape", "error", "err", "perplexity", "ppl", "nll", "wer", "cer", "hamming"}
)


def higher_is_better(name: str) -> bool:
    """Whether a larger value of the metric `name` is better: the one place that says so.

    Model selection, early stopping and the learning curve's "best" star all ask this, so a
    metric cannot be maximised in one place and minimised in another. Loss-like names
    (`loss`, `mse`, `rmse`, `mae`, `perplexity`, `hamming_loss`, `error`...) are lower-is-better;
    `neg_*` names (regression's `neg_mse`, negated so that selection can maximise it) and
    everything else (accuracy, F1, r2, exact match...) are higher-is-better. A dotted name
    (`macro.f1`, `validation.loss`) is judged by its last part.

    Args:
        name: the metric's name, as in `metrics.json` or the training log.

    Returns:
        True when larger is better.
    """
    last = name.rsplit(".", 1)[-1].strip().lower()
    if last.startswith("neg_"):
        return True
    return not (_LOWER_IS_BETTER_WORDS & set(last.replace("-", "_").split("_")))


def classification_metrics(
    y_true: Sequence[str],
    y_pred: Sequence[str],
    labels: Sequence[str] | None = None,
    average_labels: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Accuracy, per-class and averaged precision/recall/F1, and the confusion matrix.

    A precision, recall or F1 whose denominator is zero (a class never predicted, or absent
    from `y_true`) is 0, as scikit-learn's `zero_division=0`. Averages run over all of
    `labels`, including classes with no support. A prediction outside `labels` (a
    generated answer that is no class) counts as wrong: it lowers accuracy and the true
    class's recall, is in no confusion-matrix column, and is counted in
    `num_outside_labels`.

    Args:
        y_true: the true class of each example.
        y_pred: the predicted class of each example.
        labels: the classes, in report order; default the sorted classes seen in either.
        average_labels: the classes the averages run over (scikit-learn's `labels=` of
            `precision_recall_fscore_support`); default all of `labels`. Relation extraction
            leaves out its no-relation class: predicting it is then neither a hit nor a false alarm.

    Returns:
        `task`, `num_examples`, `accuracy`, `labels`, `per_class` (label -> `precision`,
        `recall`, `f1`, `support`), `macro`, `micro` and `weighted` averages (same keys,
        `support` is the total), `confusion_matrix` (rows: true, columns: predicted, in
        `labels` order) and `num_outside_labels`.

    Raises:
        ValueError: lengths differ, or a true class is not in `labels`.
    """
    y_true, y_pred = list(y_true), list(y_pred)
    if len(y_true) != len(y_pred):
        raise ValueError(f"y_true has {len(y_true)} items but y_pred has {len(y_pred)}")
    labels = sorted(set(y_true) | set(y_pred)) if labels is None else list(labels)
    index = {label: i for i, label in enumerate(labels)}
    missing = [t for t in y_true if t not in index]
    if missing:
        raise ValueError(f"true label {missing[0]!r} is not in labels {labels}")
    true_index = np.array([index[t] for t in y_true], dtype=np.int64)
    pred_index = np.array([index.get(p, -1) for p in y_pred], dtype=np.int64)
    num_labels = len(labels)

    inside = pred_index >= 0
    confusion = np.zeros((num_labels, num_labels), dtype=np.int64)
    np.add.at(confusion, (true_index[inside], pred_index[inside]), 1)
    tp = np.diag(confusion)
    predicted = confusion.sum(axis=0)
    support = np.bincount(true_index, minlength=num_labels)
    precision, recall, f1 = _prf(tp, predicted, support)

    n = len(y_true)
    correct = int((true_index == pred_index).sum())
    keep = [index[label] for label in (labels if average_labels is None else average_labels)]
    return {
        "task": "classification",
        "num_examples": n,
        "accuracy": correct / n if n else 0.0,
        "labels": labels,
        "per_class": _per_class(labels, precision, recall, f1, support),
        **_averages(*(values[keep] for values in (tp, predicted, support, precision, recall, f1))),
        "confusion_matrix": confusion.tolist(),
        "num_outside_labels": int((~inside).sum()),
    }


def calibration_metrics(
    y_true: Sequence[str], probabilities: Sequence[Sequence[float]], labels: Sequence[str], num_bins: int = CALIBRATION_BINS,
) -> dict[str, Any]:
    """Expected calibration error and the reliability diagram's bins of single-label predictions.

    An example's confidence is its largest probability, and it is right when that class (the first
    one on a tie, as argmax) is the true one. Bin m of `num_bins` equal-width bins holds the
    confidences in ((m - 1) / M, m / M] (the first also 0). ECE = sum over bins of
    |bin| / n * |accuracy(bin) - confidence(bin)| (Guo et al. 2017, "On calibration of modern
    neural networks").

    Args:
        y_true: the true class of each example.
        probabilities: each example's probability of every class, in `labels` order.
        labels: the classes, in head order.
        num_bins: M.

    Returns:
        `ece`, `num_bins` and `bins`: per bin `lower`, `upper`, `count`, and (None when empty)
        `confidence` (the mean) and `accuracy`.
    """
    probs = np.asarray(probabilities, dtype=np.float64).reshape(len(y_true), len(labels))
    index = {label: i for i, label in enumerate(labels)}
    true_index = np.array([index.get(t, -1) for t in y_true], dtype=np.int64)
    confidence = probs.max(axis=1) if len(probs) else np.zeros(0)
    correct = probs.argmax(axis=1) == true_index if len(probs) else np.zeros(0, dtype=bool)
    bin_of = np.clip(np.ceil(confidence * num_bins).astype(np.int64) - 1, 0, num_bins - 1)
    bins, ece = [], 0.0
    for m in range(num_bins):
        inside = bin_of == m
        count = int(inside.sum())
        mean_confidence = float(confidence[inside].mean()) if count else None
        accuracy = float(correct[inside].mean()) if count else None
        if count:
            ece += count / len(probs) * abs(accuracy - mean_confidence)  # type: ignore[operator]
        bins.append({"lower": m / num_bins, "upper": (m + 1) / num_bins, "count": count,
                     "confidence": mean_confidence, "accuracy": accuracy})
    return {"ece": ece, "num_bins": num_bins, "bins": bins}


def multilabel_metrics(
    y_true_sets: Iterable[Iterable[str]], y_pred_sets: Iterable[Iterable[str]], labels: Sequence[str] | None = None
) -> dict[str, Any]:
    """Metrics for multi-label classification (each example has a set of labels).

    Each label is scored as its own binary problem; `micro` pools all decisions, `macro`
    averages the labels, `weighted` weights them by support and `samples` averages the
    per-example scores. Zero denominators give 0 (scikit-learn's `zero_division=0`),
    including `samples` scores of an example with no true and no predicted label.
    Predicted labels outside `labels` are ignored and counted in `num_outside_labels`.

    Args:
        y_true_sets: the true labels of each example (lists, sets or tuples).
        y_pred_sets: the predicted labels of each example.
        labels: the labels, in report order; default the sorted labels seen in either.

    Returns:
        `task`, `num_examples`, `labels`, `per_class`, `micro`, `macro`, `weighted`,
        `samples` (each with `precision`, `recall`, `f1`, `support`), `subset_accuracy`
        (exact set match), `hamming_loss` (fraction of wrong label decisions) and
        `num_outside_labels`.

    Raises:
        ValueError: lengths differ, or a true label is not in `labels`.
    """
    true_sets = [set(s) for s in y_true_sets]
    pred_sets = [set(s) for s in y_pred_sets]
    if len(true_sets) != len(pred_sets):
        raise ValueError(f"y_true_sets has {len(true_sets)} items but y_pred_sets has {len(pred_sets)}")
    if labels is None:
        labels = sorted(set().union(*true_sets, *pred_sets))
    labels = list(labels)
    index = {label: i for i, label in enumerate(labels)}
    n, num_labels = len(true_sets), len(labels)
    truth = np.zeros((n, num_labels), dtype=bool)
    guess = np.zeros((n, num_labels), dtype=bool)
    outside = 0
    for row, (true_set, pred_set) in enumerate(zip(true_sets, pred_sets)):
        for label in true_set:
            if label not in index:
                raise ValueError(f"true label {label!r} (example {row}) is not in labels {labels}")
            truth[row, index[label]] = True
        for label in pred_set:
            if label in index:
                guess[row, index[label]] = True
            else:
                outside += 1

    both = truth & guess
    tp = both.sum(axis=0)
    predicted = guess.sum(axis=0)
    support = truth.sum(axis=0)
    precision, recall, f1 = _prf(tp, predicted, support)

    sample_tp, sample_pred, sample_true = both.sum(axis=1), guess.sum(axis=1), truth.sum(axis=1)
    sample_p, sample_r, sample_f1 = _prf(sample_tp, sample_pred, sample_true)
    return {
        "task": "multilabel",
        "num_examples": n,
        "labels": labels,
        "per_class": _per_class(labels, precision, recall, f1, support),
        **_averages(tp, predicted, support, precision, recall, f1),
        "samples": {
            "precision": _mean(sample_p),
            "recall": _mean(sample_r),
            "f1": _mean(sample_f1),
            "support": int(support.sum()),
        },
        "subset_accuracy": float((truth == guess).all(axis=1).mean()) if n else 0.0,
        "hamming_loss": float((truth != guess).mean()) if truth.size else 0.0,
        "num_outside_labels": outside,
    }


def regression_metrics(y_true: Sequence[float], y_pred: Sequence[float]) -> dict[str, Any]:
    """Error and correlation metrics for numeric predictions.

    `r2` follows scikit-learn: 1.0 for a perfect fit of constant targets, 0.0 for an
    imperfect one. A correlation that is undefined (fewer than two examples, or constant
    inputs) is `None`, which stays valid JSON where NaN would not.

    Args:
        y_true: the true values.
        y_pred: the predicted values.

    Returns:
        `task`, `num_examples`, `mse`, `rmse`, `mae`, `r2`, `pearson`, `spearman`.

    Raises:
        ValueError: lengths differ, or no examples.
    """
    truth = np.asarray(y_true, dtype=np.float64)
    guess = np.asarray(y_pred, dtype=np.float64)
    if truth.shape != guess.shape or truth.ndim != 1:
        raise ValueError(f"y_true has shape {truth.shape} but y_pred has {guess.shape}; expected equal 1-D")
    if truth.size == 0:
        raise ValueError("no examples")
    error = guess - truth
    mse = float(np.mean(error**2))
    ss_res = float(np.sum(error**2))
    ss_tot = float(np.sum((truth - truth.mean()) ** 2))
    if truth.size < 2:
        r2: float | None = None
    elif ss_tot == 0:
        r2 = 1.0 if ss_res == 0 else 0.0
    else:
        r2 = 1.0 - ss_res / ss_tot
    return {
        "task": "regression",
        "num_examples": int(truth.size),
        "mse": mse,
        "rmse": math.sqrt(mse),
        "mae": float(np.mean(np.abs(error))),
        "r2": r2,
        "pearson": _pearson(truth, guess),
        "spearman": _pearson(_rank(truth), _rank(guess)),
    }


def _prf(tp: np.ndarray, predicted: np.ndarray, support: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall and F1 per position; 0 where a denominator is 0."""
    precision = _safe_divide(tp, predicted)
    recall = _safe_divide(tp, support)
    # 2TP / (2TP + FP + FN) equals the harmonic mean wherever that is defined, and is
    # defined (as 0) in more places: scikit-learn >= 1.3 computes it this way.
    f1 = _safe_divide(2 * tp, predicted + support)
    return precision, recall, f1


def _averages(
    tp: np.ndarray,
    predicted: np.ndarray,
    support: np.ndarray,
    precision: np.ndarray,
    recall: np.ndarray,
    f1: np.ndarray,
) -> dict[str, dict[str, float | int]]:
    total = int(support.sum())
    tp_sum, predicted_sum = int(tp.sum()), int(predicted.sum())

    def weighted(values: np.ndarray) -> float:
        # sum(value * support) / total, in the order np.average uses, as scikit-learn does:
        # otherwise a 0.705 can print as 0.70 in one report and 0.71 in the other.
        return float(np.sum(values * support) / total) if total else 0.0

    return {
        "macro": {
            "precision": _mean(precision),
            "recall": _mean(recall),
            "f1": _mean(f1),
            "support": total,
        },
        "micro": {
            "precision": tp_sum / predicted_sum if predicted_sum else 0.0,
            "recall": tp_sum / total if total else 0.0,
            "f1": 2 * tp_sum / (predicted_sum + total) if predicted_sum + total else 0.0,
            "support": total,
        },
        "weighted": {
            "precision": weighted(precision),
            "recall": weighted(recall),
            "f1": weighted(f1),
            "support": total,
        },
    }


def _per_class(
    labels: Sequence[str], precision: np.ndarray, recall: np.ndarray, f1: np.ndarray, support: np.ndarray
) -> dict[str, dict[str, float | int]]:
    return {
        label: {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
        for i, label in enumerate(labels)
    }


def _safe_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    numerator = numerator.astype(np.float64)
    denominator = denominator.astype(np.float64)
    out = np.zeros_like(numerator)
    np.divide(numerator, denominator, out=out, where=denominator != 0)
    return out


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if values.size else 0.0


def _pearson(x: np.ndarray, y: np.ndarray) -> float | None:
    if x.size < 2:
        return None
    dx, dy = x - x.mean(), y - y.mean()
    denominator = math.sqrt(float(np.sum(dx * dx)) * float(np.sum(dy * dy)))
    if denominator == 0:
        return None
    return max(-1.0, min(1.0, float(np.sum(dx * dy)) / denominator))


def _rank(values: np.ndarray) -> np.ndarray:
    """Ranks starting at 1, ties sharing their average rank (as `scipy.stats.rankdata`)."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    # Start of each run of equal values, and the average of the 1-based ranks in that run.
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], values.size]
    average = (starts + ends + 1) / 2.0
    ranks = np.empty(values.size, dtype=np.float64)
    ranks[order] = np.repeat(average, ends - starts)
    return ranks
