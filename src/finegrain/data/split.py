"""Deterministic stratified splits and label sets."""

from __future__ import annotations

import math
import random
import statistics
from collections import Counter, defaultdict
from collections.abc import Hashable, Sequence
from typing import Any

from finegrain.data.readers import Example
from finegrain.errors import FinegrainError

__all__ = ["infer_labels", "stratified_split", "stratified_subset"]

# Regression targets are stratified by quantile bin so every split spans the full range.
_REGRESSION_BINS = 10


def stratified_split(
    examples: Sequence[Example],
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
) -> tuple[list[Example], ...]:
    """Split examples into parts of the given sizes, keeping label proportions in each.

    The part sizes are exact (largest remainder rounding of `len(examples) * fraction`)
    and each label is spread over the parts as close to `fractions` as whole examples
    allow. Strata: the label for single-label data; for multi-label data the example's
    rarest label (a set of labels would make most strata singletons, which cannot be
    stratified, while the rarest label keeps rare classes in every part); for numeric
    labels, one of ten quantile bins. The same examples and seed give the same split, on
    any machine; the global `random` state is neither used nor changed.

    Args:
        examples: the examples to split.
        fractions: one fraction per part, non-negative, summing to 1 (e.g. `(0.9, 0.1)`).
        seed: the shuffle seed.

    Returns:
        One list per fraction (train, validation, test for three), each in input order.

    Raises:
        FinegrainError: fractions that are negative or do not sum to 1.
    """
    fractions = [float(f) for f in fractions]
    if not fractions or any(f < 0 or not math.isfinite(f) for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise FinegrainError(f"split fractions {tuple(fractions)} must be non-negative and sum to 1")
    total = sum(fractions)
    fractions = [f / total for f in fractions]  # so rounding error cannot overshoot
    n = len(examples)
    num_parts = len(fractions)
    totals = _largest_remainder(n, fractions)

    keys = _strata(examples)
    strata: dict[Hashable, list[int]] = defaultdict(list)
    for index, key in enumerate(keys):
        strata[key].append(index)
    rng = random.Random(seed)
    # Sorting by repr gives one order for keys of mixed types (None, str, tuples, ints).
    ordered = sorted(strata, key=repr)

    # Floor counts per stratum, then hand out the leftover examples one at a time to the
    # (stratum, part) pairs whose ideal share was cut most, while both still need one.
    # Column sums of the floors never exceed the part totals, and the leftovers of the
    # strata add up to what the parts still need, so the hand-out always completes.
    counts = {key: [math.floor(len(strata[key]) * f) for f in fractions] for key in ordered}
    need = [totals[k] - sum(counts[key][k] for key in ordered) for k in range(num_parts)]
    left = {key: len(strata[key]) - sum(counts[key]) for key in ordered}
    candidates = [
        (len(strata[key]) * fractions[k] - counts[key][k], rng.random(), key_index, k)
        for key_index, key in enumerate(ordered)
        for k in range(num_parts)
    ]
    candidates.sort(key=lambda c: (-c[0], c[1]))
    for _remainder, _tiebreak, key_index, k in candidates:
        key = ordered[key_index]
        if left[key] > 0 and need[k] > 0:
            counts[key][k] += 1
            left[key] -= 1
            need[k] -= 1
    for key in ordered:  # only reached when a part's fraction was cut to zero remainder
        for k in range(num_parts):
            while left[key] > 0 and need[k] > 0:
                counts[key][k] += 1
                left[key] -= 1
                need[k] -= 1

    parts: list[list[int]] = [[] for _ in fractions]
    for key in ordered:
        members = strata[key][:]
        rng.shuffle(members)
        start = 0
        for k, count in enumerate(counts[key]):
            parts[k].extend(members[start : start + count])
            start += count
    return tuple([examples[i] for i in sorted(part)] for part in parts)


def stratified_subset(examples: Sequence[Example], size: int, seed: int = 0) -> list[Example]:
    """Exactly `size` examples, drawn with the label proportions of `examples`.

    For capping the training set (`max_train_examples`): taking the first `size` rows
    instead would take whatever order the file has, often sorted by label.

    Args:
        examples: the examples to draw from.
        size: how many to keep; all of them when `size >= len(examples)`.
        seed: the shuffle seed.

    Returns:
        The subset, in input order.
    """
    if size >= len(examples):
        return list(examples)
    if size <= 0:
        return []
    kept, _ = stratified_split(examples, (size / len(examples), 1 - size / len(examples)), seed=seed)
    return kept


def infer_labels(examples: Sequence[Example]) -> list[str]:
    """The sorted set of class labels (for multi-label data, the union of all sets).

    Labels that are all numbers (`"0"`, `"2"`, `"10"`) sort numerically, others as text, so
    the order (and with it each label's index in the model head) is the same every run.

    Args:
        examples: examples with string or list labels; `None` labels are ignored.

    Returns:
        The labels, sorted.

    Raises:
        ValueError: numeric (regression) labels, which have no label set.
    """
    labels: set[str] = set()
    for ex in examples:
        if isinstance(ex.label, list):
            labels.update(ex.label)
        elif isinstance(ex.label, str):
            labels.add(ex.label)
        elif ex.label is not None:
            raise ValueError(f"{ex.source}: numeric label {ex.label!r}; regression data has no label set")
    try:
        return sorted(labels, key=float)
    except ValueError:
        return sorted(labels)


def score_like_labels(labels: Sequence[str]) -> str | None:
    """What to say of class labels that are all numbers, some with a fraction ("0.25", "-1.5"): a
    score, which classification would split into as many classes of a few examples each, most
    validation and test values unseen; None for labels that read as classes (names, or whole
    numbers such as star ratings or class ids)."""
    try:
        values = [float(label) for label in labels]
    except ValueError:
        return None
    if not values or not all(math.isfinite(v) for v in values) or all(v.is_integer() for v in values):
        return None
    shown = ", ".join(labels[:3]) + (f", ... {labels[-1]}" if len(labels) > 3 else "")
    return (f"its {len(labels)} training labels are all numbers ({shown}): to predict a score, set task: regression "
            "(--set task=regression); to classify them, list the classes in data.labels")


def text_like_labels(examples: Sequence[Example], text_field: str, label_field: str) -> str | None:
    """One line for class labels that read as texts, most of them unique and longer than the texts: the
    text and label columns swapped (a header line written in the wrong order); None otherwise."""
    labels = [ex.label for ex in examples if isinstance(ex.label, str)]
    distinct = set(labels)
    if not labels or len(distinct) < max(20, len(labels) // 2):
        return None
    label_words = statistics.median(len(label.split()) for label in labels)
    if label_words < 5 or label_words <= statistics.median(len(ex.text.split()) for ex in examples):
        return None
    texts = sorted({ex.text for ex in examples})
    shown = ", ".join(repr(text[:20]) for text in texts[:4]) + (" ..." if len(texts) > 4 else "")
    return (f"its {len(distinct)} training labels read as texts (median {label_words:g} words) and its "
            f"{len(texts)} distinct texts as labels ({shown}): are the columns swapped? fix the header line, or "
            f"--set data.text_field={label_field} --set data.label_field={text_field}")


def look_alike_labels(labels: Sequence[str], punctuation: bool = True) -> str | None:
    """One line naming labels that differ only in case, spaces or punctuation ("Pos" and "pos",
    "not_spam" and "not spam"): likely one class written two ways, which trains as two; None if
    there are none. With `punctuation=False` a mark tells labels apart (the tags `PRP` and `PRP$`)."""
    groups: dict[str, list[str]] = {}
    for label in (label for label in labels if isinstance(label, str)):  # a regression keeps its mean and std there
        key = "".join(ch for ch in label.casefold() if ch.isalnum() or not (punctuation or ch.isspace() or ch == "_"))
        groups.setdefault(key or label, []).append(label)
    alike = [" and ".join(repr(label) for label in group) for group in groups.values() if len(group) > 1]
    if not alike:
        return None
    how = "case, spaces or punctuation" if punctuation else "case or spaces"
    return (f"labels: {'; '.join(alike)} differ only in {how} and train as different classes; "
            "if each group is one class, write it one way in the data")


def id_labels(labels: Sequence[str]) -> str | None:
    """One line for labels that are exactly the ids 0 to K-1 (a Hugging Face set's ClassLabel, written
    with `to_json`): the reports and predictions will say "2" where a name was meant; None otherwise."""
    if len(labels) < 2 or list(labels) != [str(i) for i in range(len(labels))]:
        return None
    shown = ", ".join(labels[:4]) + (" ..." if len(labels) > 4 else "")
    return (f"labels: {shown} read as ids, and reports and predictions will name them so; if they stand for names "
            "(a Hugging Face set's ClassLabel), list the names in id order in data.label_names")


def joined_labels(labels: Sequence[str]) -> str | None:
    """One line naming labels that join other labels of the set ("sports|politics" beside "sports" and
    "politics"): likely multi-label data read without `data.multi_label`, where each combination trains
    as a class of its own; None if there are none."""
    alone = {label for label in labels if isinstance(label, str)}
    for separator in ("|", ",", ";"):
        joined = [label for label in alone if separator in label
                  and all(part.strip() in alone for part in label.split(separator))]
        if joined:
            joined.sort(key=list(labels).index)
            named = ", ".join(repr(label) for label in joined[:3]) + (" ..." if len(joined) > 3 else "")
            how = "" if separator == "|" else f" and join a text's labels with '|' instead of {separator!r} (or give a JSON list)"
            return (f"labels: {named} join labels that also stand alone: if a text can carry several labels, set "
                    f"data.multi_label: true{how}; as they are, each combination trains as a class of its own")
    return None


def _strata(examples: Sequence[Example]) -> list[Hashable]:
    if any(isinstance(ex.label, (int, float)) and not isinstance(ex.label, bool) for ex in examples):
        values = sorted(float(ex.label) for ex in examples if isinstance(ex.label, (int, float)))
        edges = [values[len(values) * b // _REGRESSION_BINS] for b in range(1, _REGRESSION_BINS)]
        return [
            None if not isinstance(ex.label, (int, float)) else sum(float(ex.label) >= e for e in edges)
            for ex in examples
        ]
    frequency: Counter[str] = Counter()
    for ex in examples:
        if isinstance(ex.label, list):
            frequency.update(ex.label)
    keys: list[Hashable] = []
    for ex in examples:
        if isinstance(ex.label, list):
            keys.append(min(ex.label, key=lambda label: (frequency[label], label)) if ex.label else ())
        else:
            keys.append(ex.label)
    return keys


def _largest_remainder(n: int, fractions: Sequence[float]) -> list[int]:
    """Whole counts summing to `n`, as close to `n * fraction` as possible (ties: earlier part)."""
    counts = [math.floor(n * f) for f in fractions]
    order = sorted(range(len(fractions)), key=lambda k: (-(n * fractions[k] - counts[k]), k))
    for k in order[: max(0, n - sum(counts))]:
        counts[k] += 1
    return counts


def _text_key(example: Any) -> str | None:
    """What an example reads, case and spacing aside: its text, or a QA example's question and context;
    None for a conversation (instruct), which this check leaves alone."""
    text = getattr(example, "text", None)
    if text is None and hasattr(example, "question"):
        text = f"{example.question}\n{example.context}"
    return " ".join(text.casefold().split()) if isinstance(text, str) else None


def shared_texts(train: Sequence[Any], examples: Sequence[Any]) -> dict[str, Any] | None:
    """Of `examples`, those whose text is also a text of `train`, case and spacing aside: `examples`
    (how many), `of` (how many there are) and `first` (where the first one is, and where it is in
    `train`); None when they share none."""
    seen: dict[str, str] = {}
    for example in train:
        key = _text_key(example)
        if key is not None:
            seen.setdefault(key, example.source)
    hits = [(e.source, seen[key]) for e in examples if (key := _text_key(e)) is not None and key in seen]
    if not hits:
        return None
    return {"examples": len(hits), "of": len(examples), "first": f"{hits[0][0]} is {hits[0][1]}"}


def shared_with_training(splits: Any) -> dict[str, dict[str, Any]]:
    """`shared_texts` of each evaluation split (validation, test) with the training split; only the
    splits that share any are listed.

    A score on texts the model was trained on says how well it remembers, not how it does on new text:
    a user's own files often hold the same text twice (a review posted twice, a template message), and a
    split of one file then puts copies on both sides."""
    shared = {name: shared_texts(splits.train, getattr(splits, name) or []) for name in ("validation", "test")}
    return {name: counts for name, counts in shared.items() if counts}


def shared_line(shared: dict[str, dict[str, Any]], origin: dict[str, str]) -> str:
    """The note `train` prints for `shared_with_training`'s counts; `origin` is the splits' (`Splits.origin`)."""
    counts = " and ".join(f"{s['examples']} of {s['of']} {name} texts" for name, s in shared.items())
    first = next(iter(shared.values()))["first"]
    split_of_one = any(origin.get(name, "").endswith("split)") for name in shared)
    fix = ("the split of one file put copies of a text on both sides: keep one row of each text in it" if split_of_one
           else "drop the copies from one side")
    return (f"note: {counts} are also training texts, case and spacing aside (the first: {first}); their scores "
            f"tell how well the run remembers, not how it does on new text; {fix}")


def file_shared_line(shared: dict[str, Any], path: str) -> str:
    """The note `evaluate --data FILE` prints for `shared_texts` of the file with the run's training split."""
    return (f"note: {shared['examples']} of {shared['of']} texts of {path} are also training texts of the run, case and "
            f"spacing aside (the first: {shared['first']}); their score tells how well the run remembers, not how it "
            "does on new text")
