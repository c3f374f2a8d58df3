"""Metrics against scikit-learn and scipy on random data, including the awkward cases:
classes never predicted, labels absent from y_true, predictions outside the label set."""

import json
import math

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import (
    accuracy_score,
    classification_report,
    confusion_matrix,
    hamming_loss,
    mean_absolute_error,
    mean_squared_error,
    precision_recall_fscore_support,
    r2_score,
)

from finegrain.evaluate import classification_metrics, multilabel_metrics, regression_metrics
from finegrain.evaluate.metrics import higher_is_better

LABELS = ["ant", "bee", "cat", "dog", "eel", "fox"]


def _assert_close(ours: dict, precision: float, recall: float, f1: float) -> None:
    assert ours["precision"] == pytest.approx(precision, abs=1e-12)
    assert ours["recall"] == pytest.approx(recall, abs=1e-12)
    assert ours["f1"] == pytest.approx(f1, abs=1e-12)


def _random_single_label(seed: int, n: int) -> tuple[list[str], list[str]]:
    rng = np.random.default_rng(seed)
    # "eel" is never true, "fox" is never predicted; skewed class frequencies.
    y_true = list(rng.choice(["ant", "bee", "cat", "dog", "fox"], size=n, p=[0.5, 0.2, 0.15, 0.1, 0.05]))
    y_pred = [t if rng.random() < 0.6 else str(rng.choice(LABELS[:5])) for t in y_true]
    return [str(t) for t in y_true], y_pred


@pytest.mark.parametrize("seed", range(5))
def test_classification_parity_with_sklearn(seed: int) -> None:
    y_true, y_pred = _random_single_label(seed, n=int(np.random.default_rng(seed).integers(5, 300)))
    ours = classification_metrics(y_true, y_pred, LABELS)
    report = classification_report(y_true, y_pred, labels=LABELS, output_dict=True, zero_division=0)
    assert ours["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    assert ours["accuracy"] == pytest.approx(report["accuracy"])
    for label in LABELS:
        ref = report[label]
        _assert_close(ours["per_class"][label], ref["precision"], ref["recall"], ref["f1-score"])
        assert ours["per_class"][label]["support"] == ref["support"]
    for ours_key, ref_key in (("macro", "macro avg"), ("weighted", "weighted avg")):
        ref = report[ref_key]
        _assert_close(ours[ours_key], ref["precision"], ref["recall"], ref["f1-score"])
        assert ours[ours_key]["support"] == ref["support"] == len(y_true)
    for average in ("micro", "macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=LABELS, average=average, zero_division=0)
        _assert_close(ours[average], p, r, f)
    assert ours["confusion_matrix"] == confusion_matrix(y_true, y_pred, labels=LABELS).tolist()
    assert ours["num_outside_labels"] == 0 and ours["labels"] == LABELS
    json.dumps(ours)  # plain Python numbers only


def test_predictions_outside_the_labels_count_as_wrong() -> None:
    y_true = ["ant", "bee", "ant", "cat", "bee", "ant"]
    y_pred = ["ant", "I think bee", "bee", "cat", "bee", "???"]
    labels = ["ant", "bee", "cat"]
    ours = classification_metrics(y_true, y_pred, labels)
    assert ours["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred)) == pytest.approx(3 / 6)
    assert ours["num_outside_labels"] == 2
    for average in ("micro", "macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=labels, average=average, zero_division=0)
        _assert_close(ours[average], p, r, f)
    p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    for i, label in enumerate(labels):
        _assert_close(ours["per_class"][label], p[i], r[i], f[i])
    assert ours["confusion_matrix"] == confusion_matrix(y_true, y_pred, labels=labels).tolist()


def test_default_labels_and_edge_cases() -> None:
    ours = classification_metrics(["b", "a"], ["a", "c"])
    assert ours["labels"] == ["a", "b", "c"] and ours["accuracy"] == 0.0
    empty = classification_metrics([], [], ["a", "b"])
    assert empty["accuracy"] == 0.0 and empty["macro"]["f1"] == 0.0 and empty["confusion_matrix"] == [[0, 0], [0, 0]]
    with pytest.raises(ValueError, match="not in labels"):
        classification_metrics(["z"], ["a"], ["a"])
    with pytest.raises(ValueError, match="items"):
        classification_metrics(["a"], ["a", "a"], ["a"])


def _random_multilabel(seed: int, n: int, num_labels: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    truth = rng.random((n, num_labels)) < np.linspace(0.5, 0.0, num_labels)  # the last label never true
    guess = np.where(rng.random((n, num_labels)) < 0.7, truth, rng.random((n, num_labels)) < 0.3)
    guess[:, 0] = False  # the first label never predicted
    truth[: n // 10] = False  # some examples with no true label
    guess[: n // 20] = False  # ... and some of those with no prediction either
    return truth, guess


@pytest.mark.parametrize("seed", range(4))
def test_multilabel_parity_with_sklearn(seed: int) -> None:
    labels = LABELS
    truth, guess = _random_multilabel(seed, n=120, num_labels=len(labels))

    def to_sets(matrix: np.ndarray) -> list[set[str]]:
        return [{labels[j] for j in np.flatnonzero(row)} for row in matrix]

    ours = multilabel_metrics(to_sets(truth), to_sets(guess), labels)
    for average in ("micro", "macro", "weighted", "samples"):
        p, r, f, _ = precision_recall_fscore_support(truth, guess, average=average, zero_division=0)
        _assert_close(ours[average], p, r, f)
    p, r, f, s = precision_recall_fscore_support(truth, guess, zero_division=0)
    for j, label in enumerate(labels):
        _assert_close(ours["per_class"][label], p[j], r[j], f[j])
        assert ours["per_class"][label]["support"] == s[j]
    report = classification_report(truth, guess, target_names=labels, output_dict=True, zero_division=0)
    assert ours["samples"]["f1"] == pytest.approx(report["samples avg"]["f1-score"])
    assert ours["subset_accuracy"] == pytest.approx(accuracy_score(truth, guess))
    assert ours["hamming_loss"] == pytest.approx(hamming_loss(truth, guess))
    json.dumps(ours)


def test_multilabel_outside_labels_and_errors() -> None:
    ours = multilabel_metrics([["a"], ["a", "b"]], [["a", "zzz"], []], ["a", "b"])
    assert ours["num_outside_labels"] == 1 and ours["subset_accuracy"] == 0.5
    assert ours["per_class"]["b"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    with pytest.raises(ValueError, match="not in labels"):
        multilabel_metrics([["q"]], [[]], ["a"])
    with pytest.raises(ValueError, match="items"):
        multilabel_metrics([["a"]], [], ["a"])


@pytest.mark.parametrize("seed", range(3))
def test_regression_parity(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y_true = rng.normal(size=50).round(1)  # rounding makes ties for the Spearman ranks
    y_pred = (y_true + rng.normal(scale=0.5, size=50)).round(1)
    ours = regression_metrics(y_true.tolist(), y_pred.tolist())
    assert ours["mse"] == pytest.approx(mean_squared_error(y_true, y_pred))
    assert ours["rmse"] == pytest.approx(math.sqrt(mean_squared_error(y_true, y_pred)))
    assert ours["mae"] == pytest.approx(mean_absolute_error(y_true, y_pred))
    assert ours["r2"] == pytest.approx(r2_score(y_true, y_pred))
    assert ours["pearson"] == pytest.approx(stats.pearsonr(y_true, y_pred)[0])
    assert ours["spearman"] == pytest.approx(stats.spearmanr(y_true, y_pred)[0])
    assert ours["num_examples"] == 50


def test_regression_degenerate_inputs() -> None:
    constant = regression_metrics([2.0, 2.0, 2.0], [1.0, 2.0, 3.0])
    assert constant["r2"] == r2_score([2.0, 2.0, 2.0], [1.0, 2.0, 3.0]) == 0.0
    assert constant["pearson"] is None and constant["spearman"] is None
    assert regression_metrics([2.0, 2.0], [2.0, 2.0])["r2"] == 1.0
    single = regression_metrics([1.0], [3.0])
    assert single["mse"] == 4.0 and single["r2"] is None and single["pearson"] is None
    with pytest.raises(ValueError):
        regression_metrics([], [])
    with pytest.raises(ValueError):
        regression_metrics([1.0], [1.0, 2.0])


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("accuracy", True),
        ("macro.f1", True),
        ("r2", True),
        ("neg_mse", True),
        ("exact_match", True),
        ("mse", False),
        ("rmse", False),
        ("mae", False),
        ("loss", False),
        ("train_loss", False),
        ("validation.loss", False),
        ("hamming_loss", False),
        ("perplexity", False),
    ],
)
def test_higher_is_better(name: str, expected: bool) -> None:
    assert higher_is_better(name) is expected
