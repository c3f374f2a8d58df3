"""SQuAD exact match and F1, with the official v2.0 evaluation's rules, and the QA report.

The rules (`evaluate-v2.0.py` of the SQuAD site): answers are normalised (lower case,
punctuation removed, the articles a/an/the removed, whitespace collapsed); exact match
compares the normalised strings; F1 compares their bags of whitespace tokens; each
prediction scores the maximum over the gold answers whose normalisation is not empty, and a
question with none (unanswerable) has the single gold answer "". An empty prediction means
"no answer". Scores here are fractions in [0, 1] (the official script prints percentages).
"""

from __future__ import annotations

import base64
import html
import os
import re
import string
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from finegrain.atomic import atomic_write_text

__all__ = ["exact_match", "f1_score", "normalize_answer", "squad_metrics", "write_qa_report", "format_qa_text"]

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = set(string.punctuation)
# Length buckets of the breakdowns: (label, lowest, highest) in whitespace words, inclusive.
CONTEXT_BUCKETS = (
    ("1-50", 1, 50), ("51-100", 51, 100), ("101-200", 101, 200), ("201-400", 201, 400), (">400", 401, None),
)
ANSWER_BUCKETS = (("no answer", 0, 0), ("1", 1, 1), ("2", 2, 2), ("3-4", 3, 4), ("5-8", 5, 8), (">8", 9, None))
_GROUPS = (("all", "all questions"), ("has_answer", "has answer"), ("no_answer", "no answer"))
_BREAKDOWNS = (("by_answer_length", "by gold answer length (words)"), ("by_context_length", "by context length (words)"))
_PLOT = "f1_by_length.png"
_IMAGES = ((_PLOT, "Scores by length"), ("learning_curve.png", "Learning curve"))


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles (a, an, the), single spaces: the official `normalize_answer`."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, gold: str) -> int:
    """1 when the normalised strings are equal, else 0."""
    return int(normalize_answer(prediction) == normalize_answer(gold))


def f1_score(prediction: str, gold: str) -> float:
    """Token-bag F1 of the normalised answers; 1 or 0 when either is empty (no answer)."""
    predicted, expected = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not predicted or not expected:
        return float(predicted == expected)
    same = sum((Counter(predicted) & Counter(expected)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(predicted), same / len(expected)
    return 2 * precision * recall / (precision + recall)


def best_scores(prediction: str, answers: Sequence[str]) -> tuple[int, float]:
    """(exact match, F1) of a prediction: the best over the gold answers, "" when none is left."""
    golds = [a for a in answers if normalize_answer(a)] or [""]
    return max(exact_match(prediction, g) for g in golds), max(f1_score(prediction, g) for g in golds)


def squad_metrics(
    predictions: Sequence[str], answers: Sequence[Sequence[str]], context_words: Sequence[int] | None = None
) -> dict[str, Any]:
    """Exact match and F1 overall and for answerable / unanswerable questions, and by length.

    Args:
        predictions: the predicted answer of each question ("" for no answer).
        answers: the gold answer texts of each question (empty for unanswerable).
        context_words: the whitespace word count of each question's context, for the breakdown
            by context length (left out when None).

    Returns:
        `num_examples`, `exact_match`, `f1` and, for `has_answer` and `no_answer`, `{group}_count`
        and (when the group has questions) `{group}_exact_match`, `{group}_f1`; `by_answer_length`
        and `by_context_length`: one row per non-empty bucket, {bucket, count, exact_match, f1}.
    """
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} questions")
    scores = [best_scores(p, a) for p, a in zip(predictions, answers)]
    has_answer = [bool(a) for a in answers]  # the official split: by the raw answer list
    metrics: dict[str, Any] = {"task": "qa", "num_examples": len(scores)}
    for group, members in (("all", scores), ("has_answer", [s for s, h in zip(scores, has_answer) if h]),
                           ("no_answer", [s for s, h in zip(scores, has_answer) if not h])):
        prefix = "" if group == "all" else f"{group}_"
        if group != "all":
            metrics[f"{prefix}count"] = len(members)
        if members:
            metrics[f"{prefix}exact_match"] = round(sum(e for e, _ in members) / len(members), 6)
            metrics[f"{prefix}f1"] = round(sum(f for _, f in members) / len(members), 6)
    answer_words = [len(a[0].split()) if a else 0 for a in answers]
    metrics["by_answer_length"] = _buckets(scores, answer_words, ANSWER_BUCKETS)
    if context_words is not None:
        metrics["by_context_length"] = _buckets(scores, context_words, CONTEXT_BUCKETS)
    return metrics


def _buckets(scores: list[tuple[int, float]], lengths: Sequence[int], buckets) -> list[dict[str, Any]]:
    rows = []
    for name, low, high in buckets:
        members = [s for s, n in zip(scores, lengths) if n >= low and (high is None or n <= high)]
        if members:
            rows.append({
                "bucket": name, "count": len(members),
                "exact_match": round(sum(e for e, _ in members) / len(members), 6),
                "f1": round(sum(f for _, f in members) / len(members), 6),
            })
    return rows


# --- reports ----------------------------------------------------------------------------


def _group_rows(metrics: dict[str, Any]) -> list[tuple[str, int, float | None, float | None]]:
    """(name, count, exact match, F1) for all questions and the has-answer / no-answer groups."""
    rows = []
    for group, name in _GROUPS:
        prefix = "" if group == "all" else f"{group}_"
        count = metrics["num_examples"] if group == "all" else metrics[f"{group}_count"]
        rows.append((name, count, metrics.get(f"{prefix}exact_match"), metrics.get(f"{prefix}f1")))
    return rows


def _cell(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def format_qa_text(metrics: dict[str, Any]) -> str:
    """The overall and per-group scores as a terminal table, ending in a newline."""
    lines = [f"{'':>16s} {'count':>7s} {'exact':>8s} {'f1':>8s}"]
    for name, count, exact, f1 in _group_rows(metrics):
        lines.append(f"{name:>16s} {count:>7d} {_cell(exact):>8s} {_cell(f1):>8s}")
    return "\n".join(lines) + "\n"


def plot_f1_by_length(metrics: dict[str, Any], out_png: str | os.PathLike[str]) -> Path:
    """Bars of exact match and F1 by gold answer length and by context length, counts on top."""
    from finegrain.evaluate.report import _figure, _save

    panels = [(key, title) for key, title in _BREAKDOWNS if metrics.get(key)]
    fig = _figure((5.0 * len(panels), 3.6))
    for k, (key, title) in enumerate(panels, 1):
        ax = fig.add_subplot(1, len(panels), k)
        rows = metrics[key]
        positions = range(len(rows))
        exact = [r["exact_match"] for r in rows]
        ax.bar([p - 0.2 for p in positions], exact, width=0.4, label="exact match", color="#9ecae1")
        bars = ax.bar([p + 0.2 for p in positions], [r["f1"] for r in rows], width=0.4, label="F1", color="#3182bd")
        for bar, row in zip(bars, rows):
            top = (bar.get_x() + bar.get_width() / 2, bar.get_height())
            ax.annotate(f"n={row['count']}", top, ha="center", va="bottom", fontsize=8)
        ax.set_xticks(list(positions), [r["bucket"] for r in rows])
        ax.set_ylim(0, 1.1)
        ax.set_title(title, fontsize=10)
        if k == 1:
            ax.set_ylabel("score")
            ax.legend(fontsize=8, loc="upper right")
    return _save(fig, out_png)


def write_qa_report(out_dir: str | os.PathLike[str], metrics: dict[str, Any], split_name: str, title: str) -> None:
    """`report.md` and a self-contained `report.html` (plots embedded as base64), and `f1_by_length.png`.

    Tables: exact match and F1 for all, answerable and unanswerable questions, then by gold
    answer length and by context length.
    """
    from finegrain.evaluate.report import _CSS, _html_image, _md_cell

    out = Path(out_dir)
    plot_f1_by_length(metrics, out / _PLOT)
    images = [(name, caption) for name, caption in _IMAGES if (out / name).is_file()]
    summary = (
        f"split: {split_name} · {metrics['num_examples']:,} questions · "
        f"exact match {_cell(metrics.get('exact_match'))} · F1 {_cell(metrics.get('f1'))}"
    )
    tables = [("Scores", _group_rows(metrics))]
    for key, title_part in _BREAKDOWNS:
        if metrics.get(key):
            rows = [(r["bucket"], r["count"], r["exact_match"], r["f1"]) for r in metrics[key]]
            tables.append((title_part.capitalize(), rows))
    columns = ("questions", "count", "exact match", "F1")

    md = [f"# {_md_cell(title)}", "", summary]
    for caption, rows in tables:
        md += ["", f"## {caption}", "", "| " + " | ".join(columns) + " |", "|---|---:|---:|---:|"]
        md += [f"| {_md_cell(str(n))} | {c} | {_cell(x)} | {_cell(f)} |" for n, c, x, f in rows]
    for name, caption in images:
        md += ["", f"## {caption}", "", f"![{caption}]({name})"]
    atomic_write_text(out / "report.md", "\n".join(md) + "\n")

    e = html.escape
    page = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{e(title)}</title>",
        f"<style>\n{_CSS}\n</style></head><body>", f"<h1>{e(title)}</h1>", f'<p class="summary">{e(summary)}</p>',
    ]
    for caption, rows in tables:
        page.append(f"<h2>{e(caption)}</h2>")
        page.append("<table><thead><tr>" + "".join(f"<th>{c}</th>" for c in columns) + "</tr></thead><tbody>")
        for n, c, x, f in rows:
            cells = "".join(f"<td class=num>{v}</td>" for v in (c, _cell(x), _cell(f)))
            page.append(f"<tr><td>{e(str(n))}</td>{cells}</tr>")
        page.append("</tbody></table>")
    for name, caption in images:
        data = base64.b64encode((out / name).read_bytes()).decode("ascii")
        page += [f"<h2>{e(caption)}</h2>", _html_image(caption, data)]
    page.append("</body></html>")
    atomic_write_text(out / "report.html", "\n".join(page) + "\n")
