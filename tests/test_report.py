"""Reports: terminal text laid out as scikit-learn's, Markdown/HTML/PNG files written atomically."""

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import classification_report

import finegrain.evaluate.report as report_module
from finegrain.errors import FinegrainError
from finegrain.evaluate import (
    classification_metrics,
    format_report_text,
    multilabel_metrics,
    plot_learning_curve,
    regression_metrics,
    write_classification_report,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    return struct.unpack(">II", data[16:24])


def _predictions(seed: int = 0) -> tuple[list[str], list[str], list[str]]:
    rng = np.random.default_rng(seed)
    labels = ["negative", "neutral", "positive", "<b>&amp</b>"]  # a label that needs escaping
    y_true = [str(x) for x in rng.choice(labels[:3], size=200)]
    y_pred = [t if rng.random() < 0.7 else str(rng.choice(labels)) for t in y_true]
    return y_true, y_pred, labels


def test_text_report_matches_sklearn_layout() -> None:
    y_true, y_pred, labels = _predictions()
    ours = format_report_text(classification_metrics(y_true, y_pred, labels))
    assert ours == classification_report(y_true, y_pred, labels=labels, digits=4, zero_division=0)
    short = format_report_text(classification_metrics(y_true, y_pred, labels), digits=2)
    assert short == classification_report(y_true, y_pred, labels=labels, digits=2, zero_division=0)


def test_text_report_multilabel_and_regression() -> None:
    truth = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 0]])
    guess = np.array([[1, 0, 0], [0, 1, 1], [1, 0, 0], [0, 0, 0]])
    names = ["a", "b", "c"]

    def to_sets(matrix: np.ndarray) -> list[list[str]]:
        return [[names[j] for j in np.flatnonzero(row)] for row in matrix]

    text = format_report_text(multilabel_metrics(to_sets(truth), to_sets(guess), names))
    reference = classification_report(truth, guess, target_names=names, digits=4, zero_division=0)
    assert text.startswith(reference)
    assert "subset accuracy" in text and "hamming loss" in text
    regression = format_report_text(regression_metrics([1.0, 2.0, 3.0], [1.0, 2.5, 2.0]))
    assert "rmse" in regression and "spearman" in regression


def test_text_report_notes_predictions_outside_labels() -> None:
    text = format_report_text(classification_metrics(["a", "b"], ["a", "maybe b"], ["a", "b"]))
    assert "micro avg" in text and "1 predictions were not one of the labels" in text


def test_write_classification_report(tmp_path: Path) -> None:
    y_true, y_pred, labels = _predictions()
    metrics = classification_metrics(y_true, y_pred, labels)
    out = tmp_path / "run" / "eval"
    out.mkdir(parents=True)
    log = tmp_path / "metrics.jsonl"
    log.write_text(
        "".join(json.dumps({"step": s, "epoch": s / 10, "train_loss": 1 / s}) + "\n" for s in range(1, 40))
        + json.dumps({"step": 20, "split": "validation", "accuracy": 0.7})
        + "\n"
        + json.dumps({"step": 39, "split": "validation", "accuracy": 0.8})
        + "\n"
    )
    plot_learning_curve(log, out / "learning_curve.png", "accuracy")
    written = write_classification_report(out, metrics, split_name="validation", title="Sentiment")
    assert set(written) == {"markdown", "html", "confusion_matrix"}
    assert sorted(p.name for p in out.iterdir()) == [
        "confusion_matrix.png",
        "learning_curve.png",
        "report.html",
        "report.md",
    ]

    width, height = _png_size(out / "confusion_matrix.png")
    assert 300 < width < 2500 and 300 < height < 2500

    markdown = (out / "report.md").read_text(encoding="utf-8")
    assert markdown.startswith("# Sentiment\n")
    assert "split: validation" in markdown and f"accuracy {metrics['accuracy']:.4f}" in markdown
    neutral = metrics["per_class"]["neutral"]
    scores = " | ".join(f"{neutral[key]:.4f}" for key in ("precision", "recall", "f1"))
    assert f"| neutral | {scores} | {neutral['support']} |" in markdown
    assert "| **negative** | " + " | ".join(map(str, metrics["confusion_matrix"][0])) + " |" in markdown
    assert "![Confusion matrix](confusion_matrix.png)" in markdown and "(learning_curve.png)" in markdown

    page = (out / "report.html").read_text(encoding="utf-8")
    assert page.count("data:image/png;base64,") == 2
    assert "&lt;b&gt;&amp;amp&lt;/b&gt;" in page and "<b>&amp</b>" not in page
    assert "http://" not in page and "https://" not in page  # self-contained
    assert 'class=diag style="background:' in page


def test_multilabel_report_has_no_confusion_matrix(tmp_path: Path) -> None:
    metrics = multilabel_metrics([["a"], ["a", "b"], []], [["a"], ["b"], ["b"]], ["a", "b"])
    written = write_classification_report(tmp_path, metrics)
    assert set(written) == {"markdown", "html"}
    markdown = (tmp_path / "report.md").read_text()
    assert "**samples avg**" in markdown and "subset accuracy" in markdown
    assert not (tmp_path / "confusion_matrix.png").exists()


def test_many_labels_plot(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    labels = [f"COARSE:fine_label_{i:02d}" for i in range(32)]
    y_true = [str(x) for x in rng.choice(labels, size=500)]
    y_pred = [t if rng.random() < 0.6 else str(rng.choice(labels)) for t in y_true]
    written = write_classification_report(tmp_path, classification_metrics(y_true, y_pred, labels))
    width, height = _png_size(written["confusion_matrix"])
    assert width < 2200 and height < 2200  # grows with the labels, but stays screen-sized


def test_learning_curve_reads_logs_robustly(tmp_path: Path) -> None:
    log = tmp_path / "metrics.jsonl"
    records = [{"step": 5, "train_loss": 0.9}, {"step": 10, "split": "validation", "macro": {"f1": 0.5}}]
    log.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 15, "train_lo')  # killed mid-write
    out = plot_learning_curve(log, tmp_path / "curve.png", "macro.f1")
    assert out.read_bytes().startswith(PNG_SIGNATURE)

    log.write_text('{"step": 1, "train_loss": 1.0}\nnot json\n{"step": 2, "train_loss": 0.5}\n')
    with pytest.raises(FinegrainError, match=r"metrics.jsonl:2: invalid JSON"):
        plot_learning_curve(log, tmp_path / "curve.png")
    log.write_text('{"step": 1, "split": "validation", "f1": 0.5}\n')
    with pytest.raises(FinegrainError, match="no 'train_loss' records and no validation 'accuracy'"):
        plot_learning_curve(log, tmp_path / "curve.png", "accuracy")
    with pytest.raises(FinegrainError, match="file not found"):
        plot_learning_curve(tmp_path / "missing.jsonl", tmp_path / "curve.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curve.png", "metrics.jsonl"]  # no temp files left


@pytest.mark.parametrize(
    ("metric_name", "values", "best_step"),
    [
        ("neg_mse", [-0.9, -0.1, -0.5], 20),  # higher is better: -0.1 is the best, not -0.9
        ("rmse", [0.9, 0.1, 0.5], 20),
        ("macro.f1", [0.2, 0.7, 0.9], 30),
        ("loss", [0.3, 0.2, 0.4], 20),
    ],
)
def test_learning_curve_star_on_best_point(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, metric_name: str, values: list[float], best_step: int
) -> None:
    log = tmp_path / "metrics.jsonl"
    records = [{"step": 10 * (i + 1), "split": "validation", **_nested(metric_name, v)} for i, v in enumerate(values)]
    log.write_text("".join(json.dumps(r) + "\n" for r in records))
    drawn = []
    real_save = report_module._save
    monkeypatch.setattr(report_module, "_save", lambda fig, out: drawn.append(fig) or real_save(fig, out))
    plot_learning_curve(log, tmp_path / "curve.png", metric_name)
    stars = [line for ax in drawn[0].axes for line in ax.get_lines() if line.get_marker() == "*"]
    assert len(stars) == 1 and list(stars[0].get_xdata()) == [best_step]


def _nested(dotted: str, value: float) -> dict:
    """{"macro": {"f1": v}} for "macro.f1", as the training log writes nested metrics."""
    record: dict = {}
    inner = record
    *parents, last = dotted.split(".")
    for part in parents:
        inner = inner.setdefault(part, {})
    inner[last] = value
    return record


def test_confusion_matrix_readable_with_50_classes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    drawn = []
    real_save = report_module._save
    monkeypatch.setattr(report_module, "_save", lambda fig, out: drawn.append(fig) or real_save(fig, out))
    rng = np.random.default_rng(2)
    sizes, figures, reports = {}, {}, {}
    for n in (8, 50):
        labels = [f"{('ABBR', 'DESC', 'ENTY', 'HUM', 'LOC', 'NUM')[i % 6]}:fine_{i:02d}" for i in range(n)]
        skew = rng.dirichlet(np.full(n, 0.5))  # imbalanced, some classes absent from the split
        y_true = [str(x) for x in rng.choice(labels, size=600, p=skew)]
        y_pred = [t if rng.random() < 0.6 else str(rng.choice(labels)) for t in y_true]
        metrics = classification_metrics(y_true, y_pred, labels)
        written = write_classification_report(tmp_path / str(n), metrics)
        sizes[n], figures[n], reports[n] = _png_size(written["confusion_matrix"]), drawn[-1], (metrics, written)

    assert sizes[50][0] > sizes[8][0] and sizes[50][1] > sizes[8][1]  # the figure scales with the classes
    assert max(sizes[50]) < 2200  # ... up to a screen's size
    metrics, written = reports[50]
    ax = figures[50].axes[0]
    nonzero = sum(count > 0 for row in metrics["confusion_matrix"] for count in row)
    assert len(ax.texts) == nonzero and all(t.get_fontsize() <= 6 for t in ax.texts)  # counts where they fit
    assert len(figures[8].axes[0].texts) == 8 * 8  # few classes: every cell, zeros too
    support = metrics["per_class"][metrics["labels"][0]]["support"]
    assert ax.get_yticklabels()[0].get_text() == f"{metrics['labels'][0]} ({support})"
    assert all(label.get_rotation() == 90 for label in ax.get_xticklabels())

    markdown = written["markdown"].read_text()
    assert "50 classes: too many for a table" in markdown and "| true \\ predicted |" not in markdown
    mistakes = markdown.split("## Most frequent mistakes")[1].split("\n## ")[0]
    assert mistakes.count("\n| ") - 1 == 25  # the 25 most confused pairs, under the header row
    assert "| true \\ predicted |" in reports[8][1]["markdown"].read_text()


def test_report_names_classes_never_predicted(tmp_path: Path) -> None:
    labels = ["common", "rare", "rarer", "absent"]
    y_true = ["common"] * 8 + ["rare"] * 3 + ["rarer"] * 2
    y_pred = ["common"] * 8 + ["common", "common", "common"] + ["rare", "common"]  # rarer never predicted
    written = write_classification_report(tmp_path, classification_metrics(y_true, y_pred, labels))
    line = "Never predicted: 1 of 4 classes (support in the split): rarer (2)."
    assert line in written["markdown"].read_text() and line in written["html"].read_text()
    perfect = write_classification_report(tmp_path / "ok", classification_metrics(y_true, y_true, labels))
    assert "Never predicted" not in perfect["markdown"].read_text()  # "absent" has no support: not a miss


def test_the_report_says_what_augmentation_added(tmp_path: Path) -> None:
    """`training_line`, from the run's train section: nothing without copies; beside a drawn subset
    (train.fine_tune_examples) it names what the draw was from; any task's report carries it."""
    train = {"examples": 130, "augmented": {"typos": 20, "paraphrase": 10}, "paraphrases": 16}
    assert report_module.training_line({"training": train}) == (
        "trained on 100 examples and 30 augmented copies of them (typos 20, paraphrase 10); validation and test "
        "hold none; 10 of 16 paraphrases kept")
    sampled = {**train, "examples": 50, "sampled_from": 130, "paraphrase_agreement": {"seen": 20, "agreed": 7}}
    assert report_module.training_line({"training": sampled}) == (
        "trained on 50 examples drawn from 100 and 30 augmented copies of them (typos 20, paraphrase 10); validation "
        "and test hold none; 10 of 16 paraphrases kept; as it trained, the model agreed with 7 of 20 paraphrase rows")
    assert report_module.training_line({"training": {"examples": 100}}) is None and report_module.training_line({}) is None
    written = report_module.write_report(tmp_path, "regression: test", "split: test", note="trained on 100 examples and more")
    assert all("trained on 100 examples and more" in path.read_text() for path in written.values())
    plain = report_module.write_report(tmp_path / "plain", "regression: test", "split: test")
    assert plain["markdown"].read_text() == "# regression: test\n\nsplit: test\n"
