"""One split pipeline for every task: a training pool, the validation and test parts, capped.

A task brings a reader (path -> examples and skipped rows) and a split function (examples,
fractions, seed -> parts, stratified the task's way: by label, rarest entity type, context);
`load_splits` does the rest the same way for all of them. Bundled datasets come in as a loader
passed by the task layer (`finegrain.datasets.load`): `data` sits below `datasets` and never
imports it.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from finegrain.config import DataConfig
from finegrain.data.readers import check_labels
from finegrain.data.split import stratified_split, stratified_subset
from finegrain.errors import FinegrainError

__all__ = [
    "SPLITS", "Splits", "bundled_loader", "carve_splits", "check_split_labels", "limit_splits", "load_splits",
    "origins", "read_given", "sample",
]

SPLITS = ("train", "validation", "test")


@dataclass
class Splits:
    """The examples of a run, split: what `Task.load_splits` returns and the trainer reads.

    The example type is the task's (`Example`, `TokenExample`, `RelationExample`, `QAExample`,
    `ChatExample`); `labels` are the task's label set, taken from `train`.
    """

    train: list
    validation: list
    test: list
    labels: list[str]
    skipped: list[str] = field(default_factory=list)  # one line per skipped bad row
    origin: dict[str, str] = field(default_factory=dict)  # split name -> file, dataset or "split of ..."


class ReadResult(Protocol):
    """What a reader returns: the examples of a file and one `file:line: reason` per skipped row."""

    examples: list
    skipped: list[str]


Reader = Callable[[str], ReadResult]
Splitter = Callable[..., tuple[list, ...]]  # (examples, fractions, seed=...) -> one list per fraction


def load_splits(
    config: DataConfig,
    read: Reader,
    split: Splitter = stratified_split,
    *,
    bundled: Callable[..., list] | None = None,
    task: str = "",
    files: str = "a file",
) -> Splits:
    """Train, validation and test examples of a run's `data` section, for any task.

    The training pool is the bundled dataset `data.dataset` or the file `data.train`; the files
    `data.validation` and `data.test` are used as they are. A bundled dataset whose every example
    has `extra["split"]` brings its own split; otherwise the parts not given as files are cut
    from the pool in the proportions of `data.split`. `data.max_train_examples` and
    `data.max_eval_examples` then cap the parts with samples drawn by `split`.

    Args:
        config: the run's `data` section.
        read: path -> a result with `examples` and `skipped`.
        split: (examples, fractions, seed=...) -> one list per fraction, stratified the task's way.
        bundled: (name, **options) -> examples; None when the task has no bundled datasets.
        task, files: for the errors: the task's name and what `data.train` should be.

    Returns:
        `Splits` with empty `labels`: the task takes them from `train`.
    """
    pool, origin, skipped = training_pool(config, read, bundled, task, files)
    given, skipped_given = read_given(config, read)
    if config.folds:
        parts = fold_splits(config, pool, given, split)
    elif config.dataset and all("split" in getattr(ex, "extra", {}) for ex in pool):  # the dataset's fixed split
        parts = {name: [ex for ex in pool if ex.extra["split"] == name] for name in SPLITS} | given
    else:
        parts = carve_splits(config, pool, given, split)
    parts = limit_splits(config, parts, split)
    if config.shots:
        parts["train"] = per_class(parts["train"], config.shots, config.split_seed)
    skipped += skipped_given
    return Splits(parts["train"], parts["validation"], parts["test"], [], skipped, origins(config, origin))


def training_pool(
    config: DataConfig, read: Reader, bundled: Callable[..., list] | None, task: str, files: str
) -> tuple[list, str, list[str]]:
    """The examples to train on (before splitting), where they came from, and the skipped-row lines."""
    if config.dataset:
        if config.train:
            raise FinegrainError("data: set either data.dataset or data.train, not both")
        if bundled is None:
            raise FinegrainError(f"data.dataset: task {task} has no bundled dataset; set data.train to {files}")
        pool, origin, skipped = bundled(config.dataset, **config.dataset_options), f"dataset {config.dataset}", []
    elif config.train:
        result = read(config.train)
        pool, origin, skipped = result.examples, config.train, list(result.skipped)
    else:
        wanted = "data.dataset or data.train" if bundled else f"data.train to {files}"
        raise FinegrainError(f"data: no training data; set {wanted}")
    if not pool:
        raise FinegrainError(f"{origin}: no usable examples")
    return pool, origin, skipped


def bundled_loader(datasets: Any, kind: type, wrong_kind: str) -> Callable[..., list]:
    """`datasets.load` (the `finegrain.datasets` module, passed in by the task layer), refusing a set
    whose examples are not `kind` with `wrong_kind` (formatted with the set's `name`)."""

    def load(name: str, **options: Any) -> list:
        if datasets is None:
            raise ValueError("bundled datasets are loaded by finegrain.datasets, which the caller passes in")
        pool = datasets.load(name, **options)
        if pool and not isinstance(pool[0], kind):
            raise FinegrainError(wrong_kind.format(name=name))
        return pool

    return load


def read_given(config: DataConfig, read: Callable[[str], Any]) -> tuple[dict[str, list], list[str]]:
    """The validation and test files that `config` names, each read with `read(path)` (which
    returns a result with `examples` and `skipped`), and the skipped-row lines of all of them."""
    given, skipped = {}, []
    for name in SPLITS[1:]:
        path = getattr(config, name)
        if path:
            result = read(path)
            given[name] = result.examples
            skipped += result.skipped
    return given, skipped


def carve_splits(config: DataConfig, pool: list, given: dict[str, list], split: Callable = stratified_split) -> dict[str, list]:
    """Train, validation and test parts: those in `given` as they are, the others cut out of the
    training `pool` in the proportions of `data.split` by `split(pool, fractions, seed=...)`."""
    fractions = dict(zip(SPLITS, config.split))
    wanted = ["train"] + [name for name in SPLITS[1:] if name not in given]
    parts = {"train": list(pool)}
    if len(wanted) > 1:
        total = sum(fractions[name] for name in wanted)
        parts = dict(zip(wanted, split(pool, [fractions[name] / total for name in wanted], seed=config.split_seed)))
    return {**parts, **given}


def fold_splits(config: DataConfig, pool: list, given: dict[str, list], split: Callable = stratified_split) -> dict[str, list]:
    """k-fold cross-validation (`data.folds`): the pool cut into k stratified folds by
    `split(pool, [1/k] * k, seed=data.split_seed)`; fold `data.fold` is the test split, the rest is
    train and validation in the proportions of `data.split` (a `data.validation` file replaces
    the latter). Every example is tested once over the k runs."""
    k = config.folds
    if len(pool) < k:
        raise FinegrainError(f"data.folds: {k} folds need at least {k} training examples; there are {len(pool)}")
    folds = split(pool, [1 / k] * k, seed=config.split_seed)
    rest = [ex for i, fold in enumerate(folds) if i != config.fold for ex in fold]
    train_share, validation_share = config.split[0], config.split[1]
    if "validation" in given or validation_share == 0:
        return {"train": rest, "validation": given.get("validation", []), "test": folds[config.fold]}
    total = train_share + validation_share
    train, validation = split(rest, [train_share / total, validation_share / total], seed=config.split_seed)
    return {"train": train, "validation": validation, "test": folds[config.fold]}


def per_class(examples: list, shots: int, seed: int) -> list:
    """`shots` examples of each label (all of a label that has fewer), drawn with `seed`, in input
    order: the k-shot training sets of few-shot studies (`data.shots`).

    Raises:
        FinegrainError: the examples have no single label per example (NER, QA, multi-label).
    """
    by_label: dict[str, list[int]] = {}
    for i, example in enumerate(examples):
        label = getattr(example, "label", None)
        if not isinstance(label, str):
            raise FinegrainError("data.shots: k examples per class needs one class label per example "
                                 "(classification or relation); use data.max_train_examples for this task")
        by_label.setdefault(label, []).append(i)
    rng = random.Random(seed)
    kept = sorted(i for label in sorted(by_label) for i in rng.sample(by_label[label], min(shots, len(by_label[label]))))
    return [examples[i] for i in kept]


def sample(examples: list, limit: int | None, seed: int, split: Callable | None = None) -> list:
    """At most `limit` of `examples`, drawn as `split(examples, fractions, seed=...)` draws a part
    (default: stratified by label), or all of them."""
    if limit is None or limit >= len(examples):
        return list(examples)
    if split is None:
        return stratified_subset(examples, limit, seed=seed)
    return split(examples, (limit / len(examples), 1 - limit / len(examples)), seed=seed)[0]


def limit_splits(config: DataConfig, parts: dict[str, list], split: Callable | None = None) -> dict[str, list]:
    """`parts` with train cut to `data.max_train_examples` and validation and test each to
    `data.max_eval_examples` (a large held-out set costs a CPU more than training)."""
    limits = {"train": config.max_train_examples, "validation": config.max_eval_examples, "test": config.max_eval_examples}
    return {name: sample(parts[name], limits[name], config.split_seed, split) for name in SPLITS}


def origins(config: DataConfig, origin: str) -> dict[str, str]:
    """Where each split came from: its file, or the part of `origin` it was split off."""
    return {"train": origin, **{name: getattr(config, name) or f"{origin} ({name} split)" for name in SPLITS[1:]}}


def check_split_labels(config: DataConfig, splits: Splits, origin: str) -> list[str]:
    """Drop (with `skip_bad_rows`) or refuse validation and test examples whose label is not in
    `splits.labels`, in place; returns the skipped-row lines."""
    skipped = []
    for name in SPLITS[1:]:
        checked = check_labels(getattr(splits, name), splits.labels, getattr(config, name) or origin,
                               skip_bad_rows=config.skip_bad_rows)
        setattr(splits, name, checked.examples)
        skipped += checked.skipped
    return skipped
