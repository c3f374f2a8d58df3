"""Reports of evaluation results: terminal text, Markdown, self-contained HTML and PNG plots.

`write_classification_report` takes the dict from `classification_metrics` (or
`multilabel_metrics`) and writes `report.md`, `report.html` and `confusion_matrix.png`
into a run directory; `plot_learning_curve` draws the training log. Plots use
matplotlib's object API with the Agg canvas (no pyplot, no display, no global backend
switch), and matplotlib is imported only when a plot is drawn because it is slow to import.
Every file is written atomically.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finegrain.atomic import atomic_path, atomic_write_text
from finegrain.errors import FinegrainError
from finegrain.evaluate.metrics import higher_is_better

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "format_report_text",
    "plot_confusion_matrix",
    "plot_learning_curve",
    "plot_reliability_diagram",
    "write_classification_report",
]

_AVERAGE_ROWS = (
    ("micro", "micro avg"),
    ("macro", "macro avg"),
    ("weighted", "weighted avg"),
    ("samples", "samples avg"),
)
_PLOTS = (
    ("confusion_matrix.png", "Confusion matrix"),
    ("reliability_diagram.png", "Reliability diagram"),
    ("learning_curve.png", "Learning curve"),
)
# Beyond this many classes only the non-zero counts are printed; beyond the second, none
# (the cells are too small for digits; the colours still read).
_MAX_ANNOTATED_LABELS = 30
_MAX_COUNTED_LABELS = 100
# Beyond this many classes the report holds no matrix table (it would be hundreds of columns
# wide): the figure and the list of most frequent mistakes say the same, readably.
_MAX_TABLE_LABELS = 20
_LARGE_MATRIX_NOTE = (
    "{} classes: too many for a table; see the figure, the most frequent mistakes below, "
    "and `confusion_matrix` in metrics.json (rows: true label; columns: predicted, in label order)."
)


def format_report_text(metrics: dict[str, Any], digits: int = 4) -> str:
    """Format metrics for a terminal, laid out like scikit-learn's `classification_report`.

    Args:
        metrics: a dict from `classification_metrics`, `multilabel_metrics` or
            `regression_metrics`.
        digits: decimals shown.

    Returns:
        The report, ending in a newline.
    """
    task = metrics.get("task", "classification")
    if task == "regression":
        keys = ("mse", "rmse", "mae", "r2", "pearson", "spearman")
        width = max(len(k) for k in keys)
        lines = [f"{k:>{width}s}  {_number(metrics[k], digits)}" for k in keys]
        lines.append(f"{'n':>{width}s}  {metrics['num_examples']}")
        return "\n".join(lines) + "\n"

    labels = [str(label) for label in metrics["labels"]]
    width = max([len(label) for label in labels] + [len("weighted avg"), digits])
    head = f"{'':>{width}s} " + "".join(f" {h:>9s}" for h in ("precision", "recall", "f1-score", "support"))
    row = "{:>{width}s} " + " {:>9.{digits}f}" * 3 + " {:>9}"
    lines = [head, ""]
    for label, scores in zip(labels, metrics["per_class"].values()):
        lines.append(row.format(label, *_prf(scores), scores["support"], width=width, digits=digits))
    lines.append("")
    if task == "classification":
        # As scikit-learn: when every prediction is a class, micro P = R = F1 = accuracy,
        # so one accuracy line replaces the micro row.
        lines.append(
            f"{'accuracy':>{width}s} " + " " * 20 + f" {metrics['accuracy']:>9.{digits}f} {metrics['num_examples']:>9}"
        )
    for key, name in _AVERAGE_ROWS:
        if key not in metrics or (task == "classification" and key == "micro" and not metrics["num_outside_labels"]):
            continue
        scores = metrics[key]
        lines.append(row.format(name, *_prf(scores), scores["support"], width=width, digits=digits))
    if task == "multilabel":
        lines.append("")
        lines.append(f"{'subset accuracy':>{width}s}  {metrics['subset_accuracy']:.{digits}f}")
        lines.append(f"{'hamming loss':>{width}s}  {metrics['hamming_loss']:.{digits}f}")
    if metrics.get("num_outside_labels"):
        lines.append("")
        lines.append(f"{metrics['num_outside_labels']} predictions were not one of the labels (counted as wrong)")
    return "\n".join(lines) + "\n"


def write_classification_report(
    out_dir: str | os.PathLike[str],
    metrics: dict[str, Any],
    split_name: str = "test",
    title: str | None = None,
) -> dict[str, Path]:
    """Write `report.md`, `report.html` and (single-label) `confusion_matrix.png` to `out_dir`.

    The HTML is one self-contained file: styles inline and every PNG in `out_dir` that
    the report knows (`confusion_matrix.png`, `learning_curve.png`) embedded as base64, so
    it can be mailed or attached as is. The Markdown links the PNGs by relative name.

    Args:
        out_dir: the directory (created if missing).
        metrics: a dict from `classification_metrics` or `multilabel_metrics`.
        split_name: which split was evaluated, for the headings.
        title: the report title; default "Evaluation on the {split_name} split".

    Returns:
        The files written, by kind (`"markdown"`, `"html"`, `"confusion_matrix"`).
    """
    out = Path(out_dir)
    title = title or f"Evaluation on the {split_name} split"
    written: dict[str, Path] = {}
    if metrics.get("task", "classification") == "classification":
        written["confusion_matrix"] = plot_confusion_matrix(
            metrics, out / "confusion_matrix.png", title=f"{title}: confusion matrix"
        )
    if "calibration" in metrics:
        written["reliability_diagram"] = plot_reliability_diagram(
            metrics["calibration"], out / "reliability_diagram.png", title=f"{title}: reliability"
        )
    images = [
        (name, caption) for name, caption in _PLOTS
        if (out / name).is_file() and (name != "reliability_diagram.png" or "calibration" in metrics)
    ]
    written["markdown"] = atomic_write_text(out / "report.md", _markdown(metrics, split_name, title, images))
    embedded = [
        (name, caption, base64.b64encode((out / name).read_bytes()).decode("ascii")) for name, caption in images
    ]
    written["html"] = atomic_write_text(out / "report.html", _html(metrics, split_name, title, embedded))
    return written


def plot_confusion_matrix(metrics: dict[str, Any], out_png: str | os.PathLike[str], title: str | None = None) -> Path:
    """Draw the confusion matrix: colours are row-normalised (recall), cells show counts.

    Normalising each row (the fraction of each true class predicted as each class) keeps
    a rare class readable next to a frequent one; the count in each cell, and each true
    class's support beside its name, keep the sizes honest. The figure grows with the number
    of classes up to a screen's size; beyond that the cells shrink, the tick labels get
    smaller and turn upright, a faint grid keeps rows and columns followable, and counts are
    printed only where they fit (past 30 classes only the non-zero ones, past 100 none).

    Args:
        metrics: a dict from `classification_metrics`.
        out_png: the PNG to write.
        title: the figure title; the accuracy is added below it.

    Returns:
        `out_png` as a `Path`.
    """
    import numpy as np

    labels = [_shorten(str(label), 24) for label in metrics["labels"]]
    n = len(labels)
    counts = np.asarray(metrics["confusion_matrix"], dtype=np.int64).reshape(n, n)
    row_totals = counts.sum(axis=1, keepdims=True)
    fractions = np.divide(counts, row_totals, out=np.zeros(counts.shape), where=row_totals > 0)
    supports = [scores["support"] for scores in metrics["per_class"].values()]
    true_labels = [f"{label} ({support})" for label, support in zip(labels, supports)]
    longest = max([len(label) for label in true_labels] + [1])
    # Cells of ~0.5 inch fit a 4-digit count; past ~28 classes the cells shrink rather
    # than the figure outgrowing a screen. Room on the left/bottom for the labels.
    side = min(14.0, max(3.5, 0.5 * n)) + 0.08 * longest
    fig = _figure(figsize=(side + 1.6, side + 0.6))
    ax = fig.add_subplot()
    image = ax.imshow(fractions, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    colorbar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    colorbar.set_label("fraction of the true class (recall on the diagonal)")
    tick_size = 10 if n <= 12 else 8 if n <= 30 else 6 if n <= 60 else 5
    rotation = 0 if n <= 3 and longest <= 8 else 45 if n <= 30 else 90
    ax.set_xticks(range(n), labels, rotation=rotation, ha="right" if rotation else "center", rotation_mode="anchor")
    ax.set_yticks(range(n), true_labels)
    ax.tick_params(labelsize=tick_size)
    if n > 12:  # faint cell borders: the eye loses its row across dozens of columns without them
        ax.set_xticks(np.arange(n + 1) - 0.5, minor=True)
        ax.set_yticks(np.arange(n + 1) - 0.5, minor=True)
        ax.grid(which="minor", color="#d8d8d8", linewidth=0.4)
        ax.tick_params(which="minor", length=0)
    ax.set_xlabel("predicted label")
    ax.set_ylabel("true label (support)")
    font_size = _count_font_size(n)
    if font_size:
        for i in range(n):
            for j in range(n):
                if n > _MAX_ANNOTATED_LABELS and not counts[i, j]:
                    continue  # dozens of zeros per row hide the counts that matter
                # Percentages only where there is room, i.e. few classes.
                share = f"\n{fractions[i, j]:.0%}" if n <= 8 and row_totals[i, 0] else ""
                ax.text(
                    j,
                    i,
                    f"{counts[i, j]}{share}",
                    ha="center",
                    va="center",
                    fontsize=font_size,
                    # Zeros in grey so the mistakes that did happen stand out.
                    color="white" if fractions[i, j] > 0.55 else "#222222" if counts[i, j] else "#b0b0b0",
                )
    heading = title or "Confusion matrix"
    ax.set_title(f"{heading}\naccuracy {metrics['accuracy']:.4f} on {metrics['num_examples']:,} examples", fontsize=11)
    return _save(fig, out_png)


def plot_reliability_diagram(
    calibration: dict[str, Any], out_png: str | os.PathLike[str], title: str | None = None
) -> Path:
    """Draw the reliability diagram: each confidence bin's accuracy beside the diagonal of perfect calibration.

    Bars are the accuracy of each non-empty bin, red gaps the distance to its mean confidence
    (what ECE weighs by the bin's share of the examples); the lower panel is how many examples
    each bin holds, since a gap over a handful of examples means little.

    Args:
        calibration: a dict from `calibration_metrics`.
        out_png: the PNG to write.
        title: the figure title; the ECE is added below it.

    Returns:
        `out_png` as a `Path`.
    """
    bins = calibration["bins"]
    width = 1.0 / calibration["num_bins"]
    centres = [(b["lower"] + b["upper"]) / 2 for b in bins]
    fig = _figure(figsize=(5.2, 6.0))
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    filled = [(c, b) for c, b in zip(centres, bins) if b["count"]]
    top.bar([c for c, _ in filled], [b["accuracy"] for _, b in filled], width=width, color="#4a7fb5",
            edgecolor="#23415f", label="accuracy")
    top.bar([c for c, _ in filled], [b["confidence"] - b["accuracy"] for _, b in filled],
            bottom=[b["accuracy"] for _, b in filled], width=width, color="#d9534f", alpha=0.35,
            edgecolor="#a40000", label="gap to confidence")
    top.plot([0, 1], [0, 1], linestyle="--", color="#555555", linewidth=1, label="perfect calibration")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.legend(loc="upper left", fontsize=8)
    bottom.bar(centres, [b["count"] for b in bins], width=width, color="#888888")
    bottom.set_xlabel("confidence (largest probability)")
    bottom.set_ylabel("examples")
    heading = title or "Reliability diagram"
    top.set_title(f"{heading}\nECE {calibration['ece']:.4f} ({calibration['num_bins']} bins)", fontsize=11)
    return _save(fig, out_png)


def _count_font_size(num_labels: int) -> float | None:
    """The font size of the counts in the cells, or None where cells are too small for digits.

    The figure stops growing at ~28 classes, so a cell is ~14 in / n wide: at 60 classes
    ~17 points, room for a 4-digit count in 6 points; at 100, ~10 points, 2 digits in 5.
    """
    for most, size in ((6, 11), (12, 9), (20, 8), (30, 7), (60, 6), (_MAX_COUNTED_LABELS, 5)):
        if num_labels <= most:
            return size
    return None


def plot_learning_curve(
    metrics_jsonl_path: str | os.PathLike[str],
    out_png: str | os.PathLike[str],
    metric_name: str = "accuracy",
) -> Path:
    """Plot training loss (left axis) and a validation metric (right axis) against steps.

    Reads JSON lines such as `{"step": 10, "epoch": 0.1, "train_loss": 0.7}` and
    `{"step": 100, "split": "validation", "accuracy": 0.85}`. `metric_name` may be dotted
    to reach into nested records (`"macro.f1"`). Many noisy loss points are drawn faintly
    with a smoothed line over them. The best validation point is marked. A last line cut
    short (a run killed while writing) is ignored.

    Args:
        metrics_jsonl_path: the training log.
        out_png: the PNG to write.
        metric_name: the validation metric to plot.

    Returns:
        `out_png` as a `Path`.

    Raises:
        FinegrainError: a missing file, invalid JSON before the last line, or no
            training loss and no validation metric in the log.
    """
    name = str(metrics_jsonl_path)
    path = Path(metrics_jsonl_path)
    if not path.is_file():
        raise FinegrainError(f"{name}: file not found; pass the metrics.jsonl a training run wrote")
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    loss_steps: list[float] = []
    losses: list[float] = []
    metric_steps: list[float] = []
    values: list[float] = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if i == last:
                break
            raise FinegrainError(f"{name}:{i + 1}: invalid JSON ({exc.msg}); fix or delete the line") from None
        if not isinstance(record, dict):
            continue
        step = record.get("step", i)
        loss = record.get("train_loss")
        if _is_number(loss) and _is_number(step):
            loss_steps.append(float(step))
            losses.append(float(loss))
        value = _lookup(record, metric_name)
        if record.get("split") == "validation" and _is_number(value) and _is_number(step):
            metric_steps.append(float(step))
            values.append(float(value))
    if not losses and not values:
        raise FinegrainError(
            f"{name}: no 'train_loss' records and no validation {metric_name!r} records to plot; check metric_name"
        )

    fig = _figure(figsize=(8.0, 4.5))
    ax = fig.add_subplot()
    handles = []
    loss_colour, metric_colour = "#1f77b4", "#d62728"
    if losses:
        smooth = len(losses) >= 30
        (raw,) = ax.plot(
            loss_steps,
            losses,
            color=loss_colour,
            alpha=0.3 if smooth else 1.0,
            linewidth=1.0,
            label="train loss" + (" (raw)" if smooth else ""),
        )
        handles.append(raw)
        if smooth:
            (line,) = ax.plot(
                loss_steps, _ema(losses, 0.9), color=loss_colour, linewidth=2.0, label="train loss (smoothed)"
            )
            handles.append(line)
        ax.set_ylabel("train loss", color=loss_colour)
        ax.tick_params(axis="y", colors=loss_colour)
    ax.set_xlabel("step")
    ax.grid(True, alpha=0.3)
    if values:
        right = ax.twinx() if losses else ax
        (line,) = right.plot(
            metric_steps,
            values,
            color=metric_colour,
            marker="o",
            markersize=4,
            linewidth=1.5,
            label=f"validation {metric_name}",
        )
        handles.append(line)
        # The direction comes from the one rule the trainer also uses (neg_mse is maximised).
        pick = max if higher_is_better(metric_name) else min
        best = pick(range(len(values)), key=values.__getitem__)
        (marker,) = right.plot(
            [metric_steps[best]],
            [values[best]],
            marker="*",
            markersize=14,
            color=metric_colour,
            linestyle="none",
            label=f"best {metric_name} {values[best]:.4f} (step {metric_steps[best]:g})",
        )
        handles.append(marker)
        right.set_ylabel(f"validation {metric_name}", color=metric_colour)
        right.tick_params(axis="y", colors=metric_colour)
    # Below the axes: inside, the legend would hide the curves it explains.
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, fontsize=9, frameon=False)
    ax.set_title("Learning curve")
    return _save(fig, out_png)


# --- Markdown and HTML ------------------------------------------------------------------


def _summary(metrics: dict[str, Any], split_name: str) -> str:
    count = f"{metrics['num_examples']:,} examples"
    if "num_sentences" in metrics:  # plain tags: every word is an example
        count = f"{metrics['num_examples']:,} words in {metrics['num_sentences']:,} sentences"
    parts = [f"split: {split_name}", count, f"{len(metrics['labels'])} labels"]
    if metrics.get("task") == "multilabel":
        parts += [f"micro F1 {metrics['micro']['f1']:.4f}", f"subset accuracy {metrics['subset_accuracy']:.4f}"]
        parts.append(f"hamming loss {metrics['hamming_loss']:.4f}")
    else:
        parts += [f"accuracy {metrics['accuracy']:.4f}", f"macro F1 {metrics['macro']['f1']:.4f}"]
    if "calibration" in metrics:
        parts.append(f"ECE {metrics['calibration']['ece']:.4f} ({metrics['calibration']['num_bins']} bins)")
    return " · ".join(parts)


def training_line(metrics: dict[str, Any]) -> str | None:
    """What augmentation added to the training split, from `metrics["training"]` (metrics.json's
    `train` section, which `finegrain.run.write_results` adds to the report's metrics): the copies
    per kind beside the originals, the paraphrases kept of those tried and, under `augment.judge:
    current`, the rows the model agreed with as it trained; None where nothing was added."""
    train = metrics.get("training") or {}
    added = train.get("augmented")
    if not added:
        return None
    copies = sum(added.values())
    kinds = ", ".join(f"{kind} {count:,}" for kind, count in added.items())
    if "sampled_from" in train:  # train.fine_tune_examples drew from the originals and the copies
        line = f"trained on {train['examples']:,} examples drawn from {train['sampled_from'] - copies:,} and "
    else:
        line = f"trained on {train['examples'] - copies:,} examples and "
    line += f"{copies:,} augmented copies of them ({kinds}); validation and test hold none"
    if "paraphrases" in train:
        line += f"; {added.get('paraphrase', 0):,} of {train['paraphrases']:,} paraphrases kept"
    if "paraphrase_agreement" in train:
        agreement = train["paraphrase_agreement"]
        line += f"; as it trained, the model agreed with {agreement['agreed']:,} of {agreement['seen']:,} paraphrase rows"
    return line


def _score_rows(metrics: dict[str, Any]) -> list[tuple[str, dict[str, Any], bool]]:
    """(name, scores, is_average) for each table row."""
    rows = [(str(label), scores, False) for label, scores in metrics["per_class"].items()]
    for key, name in _AVERAGE_ROWS:
        if key not in metrics:
            continue
        if key == "micro" and metrics.get("task") == "classification" and not metrics.get("num_outside_labels"):
            continue  # equal to the accuracy in the summary line
        rows.append((name, metrics[key], True))
    return rows


def _never_predicted(metrics: dict[str, Any]) -> str:
    """A line naming the classes present in the split that the model never predicted, rarest
    last; empty when there are none. Imbalanced data hides them: accuracy can be 0.9 with a
    rare class at F1 0, and in a 50-row table that zero is easy to miss."""
    if "confusion_matrix" not in metrics:
        return ""
    predicted = [sum(column) for column in zip(*metrics["confusion_matrix"])]
    missed = [
        (str(label), scores["support"])
        for (label, scores), count in zip(metrics["per_class"].items(), predicted)
        if scores["support"] and not count
    ]
    if not missed:
        return ""
    missed.sort(key=lambda item: -item[1])
    names = ", ".join(f"{label} ({support})" for label, support in missed)
    return f"Never predicted: {len(missed)} of {len(predicted)} classes (support in the split): {names}."


def _confused_pairs(metrics: dict[str, Any]) -> list[tuple[str, str, int, float]]:
    """The most frequent mistakes: (true, predicted, count, share of the true class).

    Ten of them; 25 past 20 classes, where the report shows no matrix table and this list is
    how one reads which classes are taken for which."""
    labels = metrics["labels"]
    limit = 10 if len(labels) <= _MAX_TABLE_LABELS else 25
    matrix = metrics["confusion_matrix"]
    pairs = []
    for i, row in enumerate(matrix):
        total = sum(row)
        for j, count in enumerate(row):
            if i != j and count:
                pairs.append((str(labels[i]), str(labels[j]), count, count / total))
    pairs.sort(key=lambda p: (-p[2], p[0], p[1]))
    return pairs[:limit]


def _copies_warning(metrics: dict[str, Any], split_name: str) -> str | None:
    """The report's line on the split's texts that are also training texts (`shared_with_training`)."""
    shared = metrics.get("shared_with_training")
    if not shared:
        return None
    return (f"{shared['examples']} of {shared['of']} {split_name} texts are also training texts, case and spacing aside "
            f"(the first: {shared['first']}): the scores on them tell how well the run remembers, not how it does on new text.")


def _md_cell(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _markdown(metrics: dict[str, Any], split_name: str, title: str, images: list[tuple[str, str]]) -> str:
    out = [f"# {_md_cell(title)}", "", _summary(metrics, split_name), ""]
    line = training_line(metrics)
    if line:
        out += [_md_cell(line), ""]
    if metrics.get("baselines", {}).get("warning"):
        out += [f"**{_md_cell(metrics['baselines']['warning'])}** (see [Against baselines](#against-baselines))", ""]
    if copies := _copies_warning(metrics, split_name):
        out += [f"**{_md_cell(copies)}**", ""]
    out += ["| label | precision | recall | f1 | support |", "|---|---:|---:|---:|---:|"]
    for name, scores, is_average in _score_rows(metrics):
        cell = f"**{_md_cell(name)}**" if is_average else _md_cell(name)
        p, r, f = _prf(scores)
        out.append(f"| {cell} | {p:.4f} | {r:.4f} | {f:.4f} | {scores['support']} |")
    if metrics.get("num_outside_labels"):
        out += ["", f"{metrics['num_outside_labels']} predictions were not one of the labels (counted as wrong)."]
    if _never_predicted(metrics):
        out += ["", _md_cell(_never_predicted(metrics))]
    if metrics.get("baselines"):
        columns, rows, notes = _baseline_table(metrics)
        out += ["", "## Against baselines", ""] + [f"{_md_cell(note)}  " for note in notes] + [""]
        out += ["| " + " | ".join(map(_md_cell, columns)) + " |", "|---|" + "---:|" * (len(columns) - 1)]
        out += ["| " + " | ".join(_md_cell(_cell(v)) for v in row) + " |" for row in rows]
    if "confusion_matrix" in metrics:
        labels = [_md_cell(str(label)) for label in metrics["labels"]]
        out += ["", "## Confusion matrix", ""]
        if len(labels) > _MAX_TABLE_LABELS:
            out.append(_LARGE_MATRIX_NOTE.format(len(labels)))
        else:
            out += ["Rows: true label; columns: predicted label.", ""]
            out.append("| true \\ predicted | " + " | ".join(labels) + " |")
            out.append("|---|" + "---:|" * len(labels))
            for label, row in zip(labels, metrics["confusion_matrix"]):
                out.append(f"| **{label}** | " + " | ".join(str(c) for c in row) + " |")
        if any(file_name == "confusion_matrix.png" for file_name, _ in images):
            out += ["", "![Confusion matrix](confusion_matrix.png)"]
        pairs = _confused_pairs(metrics)
        if pairs:
            out += ["", "## Most frequent mistakes", "", "| true | predicted | count | share of true |"]
            out.append("|---|---|---:|---:|")
            out += [f"| {_md_cell(t)} | {_md_cell(p)} | {c} | {s:.1%} |" for t, p, c, s in pairs]
    for file_name, caption in images:
        if file_name != "confusion_matrix.png" or "confusion_matrix" not in metrics:
            out += ["", f"## {caption}", "", f"![{caption}]({file_name})"]
    return "\n".join(out) + "\n"


_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1100px;
       padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; }
.summary { color: #555; }
.warning { color: #a40000; font-weight: bold; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 0.3em 0.6em; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.avg td { font-weight: bold; background: #f6f6f6; }
table.cm td { text-align: center; min-width: 2.5em; font-variant-numeric: tabular-nums; }
table.cm th.corner { font-weight: normal; font-size: 0.85em; color: #555; }
table.cm td.diag { outline: 2px solid #444; outline-offset: -2px; }
img { max-width: 100%; border: 1px solid #eee; }
""".strip()


def _html(metrics: dict[str, Any], split_name: str, title: str, images: list[tuple[str, str, str]]) -> str:
    e = html.escape
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{e(title)}</title>",
        f"<style>\n{_CSS}\n</style></head><body>",
        f"<h1>{e(title)}</h1>",
        f'<p class="summary">{e(_summary(metrics, split_name))}</p>',
        *(f'<p class="summary">{e(line)}</p>' for line in [training_line(metrics)] if line),
        *(f"<p class=warning>{e(w)}</p>" for w in [metrics.get("baselines", {}).get("warning"),
                                                    _copies_warning(metrics, split_name)] if w),
        "<table><thead><tr><th>label</th><th>precision</th><th>recall</th><th>f1</th><th>support</th></tr></thead>",
        "<tbody>",
    ]
    for name, scores, is_average in _score_rows(metrics):
        p, r, f = _prf(scores)
        out.append(
            f"<tr{' class=avg' if is_average else ''}><td>{e(name)}</td><td class=num>{p:.4f}</td>"
            f"<td class=num>{r:.4f}</td><td class=num>{f:.4f}</td><td class=num>{scores['support']}</td></tr>"
        )
    out.append("</tbody></table>")
    if metrics.get("num_outside_labels"):
        out.append(f"<p>{metrics['num_outside_labels']} predictions were not one of the labels (counted as wrong).</p>")
    if _never_predicted(metrics):
        out.append(f"<p>{e(_never_predicted(metrics))}</p>")
    if metrics.get("baselines"):
        out += _html_baselines(metrics)
    if "confusion_matrix" in metrics:
        out += _html_confusion(metrics)
        out += [_html_image(caption, data) for name, caption, data in images if name == "confusion_matrix.png"]
        pairs = _confused_pairs(metrics)
        if pairs:
            out.append("<h2>Most frequent mistakes</h2>")
            out.append(
                "<table><thead><tr><th>true</th><th>predicted</th><th>count</th><th>share of true</th></tr></thead>"
            )
            out += [
                f"<tr><td>{e(t)}</td><td>{e(p)}</td><td class=num>{c}</td><td class=num>{s:.1%}</td></tr>"
                for t, p, c, s in pairs
            ]
            out.append("</table>")
    for name, caption, data in images:
        if name != "confusion_matrix.png" or "confusion_matrix" not in metrics:
            out += [f"<h2>{e(caption)}</h2>", _html_image(caption, data)]
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _baseline_table(metrics: dict[str, Any]) -> tuple[list[str], list[list[Any]], list[str]]:
    """finegrain beside the baselines (`metrics["baselines"]`, from `add_baselines`): the columns,
    the rows (headline scores, F1 of each class, seconds) and the lines to print above them
    (which split and texts, a skipped baseline). The warning that TF-IDF wins goes at the top."""
    from finegrain.evaluate.baselines import WORD_FEATURES, headline_scores, strong_baseline

    baselines = metrics["baselines"]
    strong, strong_name = strong_baseline(baselines)
    majority = baselines["majority"]
    tagger = "linear" in baselines
    if tagger:
        columns = ["", "finegrain", f"{strong_name} ({WORD_FEATURES})", "each word's most frequent training tag"]
    else:
        predicts = majority.get("predicts")
        if isinstance(predicts, list):  # multi-label: the labels most training examples have
            predicts = ", ".join(map(str, predicts)) or "no label"
        columns = ["", "finegrain", f"TF-IDF ({strong.get('features', 'n-grams')}) + linear SVM", f"majority ({predicts})"]
    if metrics.get("task") == "multilabel":
        scores = {"subset accuracy": (metrics["subset_accuracy"], "subset_accuracy"), **headline_scores(metrics)}
    else:
        scores = headline_scores(metrics)
    # The fine-tuned model without the TF-IDF or word model's probabilities mixed in (head.tfidf_mix,
    # head.word_mix), when they are.
    alone = baselines.get("model_alone")
    others = [strong, majority] if alone is None else [alone, strong, majority]
    if alone is not None:
        columns.insert(2, "finegrain, model alone")
    rows = [[name, value, *(other.get(key) for other in others)] for name, (value, key) in scores.items()]
    for label, per_class in metrics["per_class"].items():
        rows.append([f"F1 {label}", per_class["f1"], *(other.get("per_class", {}).get(label) for other in others)])
    seconds = (baselines.get("finegrain_seconds"), *(other.get("seconds") for other in others))
    rows.append(["seconds", *(None if t is None else f"{t:.1f}" if t >= 1 else f"{t:.3f}" for t in seconds)])
    if tagger:
        notes = [f"Fitted on the same training sentences and scored on the same {baselines['split']} split as "
                 "finegrain, with its metrics; finegrain's seconds are its whole run."]
    else:
        notes = [
            f"Fitted on the same training split and scored on the same {baselines['split']} split as finegrain, "
            "on the raw texts (data.template is not applied); finegrain's seconds are its whole run."
        ]
    if alone is not None:
        key = "word_mix" if "word_mix_weight" in alone else "tfidf_mix"
        what = "the logistic regression's tag" if key == "word_mix" else "a TF-IDF + logistic regression's"
        notes.append(
            f"finegrain mixes {what} probabilities into the fine-tuned model's at weight {alone[f'{key}_weight']} "
            f"(head.{key}, chosen on validation); \"model alone\" is the fine-tuned model without them."
        )
    if baselines["split"] == "validation":
        notes.append("There is no test split: finegrain chose its checkpoint on this one, so its figures are optimistic.")
    if "skipped" in strong:
        notes.append(f"{strong_name} baseline skipped: {strong['skipped']}")
    return columns, rows, notes


def _html_baselines(metrics: dict[str, Any]) -> list[str]:
    e = html.escape
    columns, rows, notes = _baseline_table(metrics)
    out = ["<h2>Against baselines</h2>"]
    out += [f"<p>{e(note)}</p>" for note in notes]
    out.append("<table><thead><tr>" + "".join(f"<th>{e(c)}</th>" for c in columns) + "</tr></thead><tbody>")
    for row in rows:
        cells = "".join(f"<td class=num>{e(_cell(v))}</td>" for v in row[1:])
        out.append(f"<tr><td>{e(row[0])}</td>{cells}</tr>")
    out.append("</tbody></table>")
    return out


def _html_image(caption: str, base64_png: str) -> str:
    return f'<p><img alt="{html.escape(caption)}" src="data:image/png;base64,{base64_png}"></p>'


def _html_confusion(metrics: dict[str, Any]) -> list[str]:
    e = html.escape
    labels = [str(label) for label in metrics["labels"]]
    if len(labels) > _MAX_TABLE_LABELS:
        return ["<h2>Confusion matrix</h2>", f"<p>{e(_LARGE_MATRIX_NOTE.format(len(labels)))}</p>"]
    out = [
        "<h2>Confusion matrix</h2>",
        "<p>Rows: true label; columns: predicted label. Shade: fraction of the true class.</p>",
        '<table class="cm"><tr><th class="corner">true \\ predicted</th>'
        + "".join(f"<th>{e(label)}</th>" for label in labels)
        + "</tr>",
    ]
    for i, (label, row) in enumerate(zip(labels, metrics["confusion_matrix"])):
        total = sum(row)
        cells = []
        for j, count in enumerate(row):
            share = count / total if total else 0.0
            background, foreground = _blues(share)
            tip = f"true {label}, predicted {labels[j]}: {count} ({share:.1%} of {label})"
            cells.append(
                f'<td{" class=diag" if i == j else ""} style="background:{background};color:{foreground}" '
                f'title="{e(tip)}">{count}</td>'
            )
        out.append(f"<tr><th>{e(label)}</th>{''.join(cells)}</tr>")
    out.append("</table>")
    return out


def _blues(share: float) -> tuple[str, str]:
    """A white-to-dark-blue shade for `share` in [0, 1] (matplotlib's Blues ends), and a readable text colour."""
    low, high = (247, 251, 255), (8, 48, 107)
    rgb = tuple(round(a + (b - a) * share) for a, b in zip(low, high))
    return f"rgb{rgb}", "#fff" if share > 0.55 else "#222"


# --- small helpers ----------------------------------------------------------------------


def _prf(scores: dict[str, Any]) -> tuple[float, float, float]:
    return scores["precision"], scores["recall"], scores["f1"]


def _number(value: Any, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _lookup(record: dict[str, Any], dotted: str) -> Any:
    value: Any = record
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _ema(values: Sequence[float], weight: float) -> list[float]:
    """Exponential moving average, bias-corrected so the first points are not pulled to 0."""
    smoothed, average = [], 0.0
    for i, value in enumerate(values, 1):
        average = weight * average + (1 - weight) * value
        smoothed.append(average / (1 - weight**i))
    return smoothed


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _figure(figsize: tuple[float, float]) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, out_png: str | os.PathLike[str]) -> Path:
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png")
    return Path(out_png)


# --- reports of any task --------------------------------------------------------------------


@dataclass
class Table:
    """A table of a report: a heading, column names and rows of cells (numbers are formatted)."""

    heading: str
    columns: list[str]
    rows: list[list[Any]]


def write_report(
    out_dir: str | os.PathLike[str], title: str, summary: str, tables: Sequence[Table] = (),
    images: Sequence[tuple[str, str]] = (), note: str | None = None,
) -> dict[str, Path]:
    """Write `report.md` and a self-contained `report.html` for any task's metrics.

    Args:
        out_dir: the run directory (or any directory).
        title: the report's heading.
        summary: one line of headline figures.
        note: a line under it (`training_line`), or None.
        tables: the tables, in order.
        images: (PNG file name in `out_dir`, caption); the learning curve is added when present.
            Missing files are left out.

    Returns:
        The files written, by kind (`"markdown"`, `"html"`).
    """
    out = Path(out_dir)
    images = [*images, ("learning_curve.png", "Learning curve")]
    images = [(name, caption) for name, caption in dict(images).items() if (out / name).is_file()]

    md = [f"# {_md_cell(title)}", "", _md_cell(summary), *(["", _md_cell(note)] if note else [])]
    for table in tables:
        md += ["", f"## {_md_cell(table.heading)}", "", "| " + " | ".join(map(_md_cell, table.columns)) + " |"]
        md.append("|" + "---|" * len(table.columns))
        md += ["| " + " | ".join(_md_cell(_cell(v)) for v in row) + " |" for row in table.rows]
    for name, caption in images:
        md += ["", f"## {caption}", "", f"![{caption}]({name})"]

    e = html.escape
    page = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{e(title)}</title>",
        f"<style>\n{_CSS}\n</style></head><body>", f"<h1>{e(title)}</h1>", f'<p class="summary">{e(summary)}</p>',
        *([f'<p class="summary">{e(note)}</p>'] if note else []),
    ]
    for table in tables:
        page += [f"<h2>{e(table.heading)}</h2>", "<table><thead><tr>"]
        page.append("".join(f"<th>{e(c)}</th>" for c in table.columns) + "</tr></thead><tbody>")
        for row in table.rows:
            page.append(
                "<tr>" + "".join(
                    f"<td class=num>{e(_cell(v))}</td>" if _is_number(v) else f"<td>{e(_cell(v))}</td>" for v in row
                ) + "</tr>"
            )
        page.append("</tbody></table>")
    for name, caption in images:
        page += [f"<h2>{e(caption)}</h2>", _html_image(caption, base64.b64encode((out / name).read_bytes()).decode("ascii"))]
    page.append("</body></html>")
    return {
        "markdown": atomic_write_text(out / "report.md", "\n".join(md) + "\n"),
        "html": atomic_write_text(out / "report.html", "\n".join(page) + "\n"),
    }


def _cell(value: Any) -> str:
    if isinstance(value, float) and _is_number(value):
        return _number(value, 4)
    return "n/a" if value is None else str(value)


def plot_bars(
    out_png: str | os.PathLike[str], title: str, groups: Sequence[str], series: dict[str, Sequence[float]],
    ylabel: str = "", reference: Sequence[float] | None = None,
) -> Path:
    """A grouped bar chart: one group per name in `groups`, one bar per series; `reference`
    (one value per group) is drawn as a dashed line, e.g. the true mean beside predictions."""
    fig = _figure((max(4.5, 0.9 * len(groups) + 2), 3.6))
    ax = fig.add_subplot()
    width = 0.8 / max(len(series), 1)
    positions = range(len(groups))
    for k, (name, values) in enumerate(series.items()):
        ax.bar([p + (k - (len(series) - 1) / 2) * width for p in positions], values, width, label=name)
    if reference is not None:
        ax.plot(list(positions), reference, "k--", marker="o", linewidth=1, label="reference")
    ax.set_xticks(list(positions), [_shorten(g, 18) for g in groups], rotation=30 if len(groups) > 5 else 0, ha="right" if len(groups) > 5 else "center")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8, frameon=False)
    return _save(fig, out_png)
