"""Turn a run's `data` section into train, validation and test examples."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from finegrain.config import DataConfig
from finegrain.data.readers import Example, check_labels, read_examples
from finegrain.data.split import infer_labels, stratified_split, stratified_subset
from finegrain.errors import FinegrainError


@dataclass
class Splits:
    train: list[Example]
    validation: list[Example]
    test: list[Example]
    labels: list[str]
    skipped: list[str] = field(default_factory=list)  # one line per skipped bad row
    origin: dict[str, str] = field(default_factory=dict)  # split name -> file, dataset or "split of ..."


def read_file(config: DataConfig, path: str, require_label: bool = True, regression: bool = False):
    return read_examples(
        path, text_field=config.text_field, label_field=config.label_field, multi_label=config.multi_label,
        skip_bad_rows=config.skip_bad_rows, require_label=require_label, regression=regression,
    )


SPLITS = ("train", "validation", "test")


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


def load_splits(config: DataConfig, regression: bool = False) -> Splits:
    """Read the configured files or bundled dataset; split off what is not given as a file.

    Labels come from the training examples; a validation or test label outside them is an
    error (or a skipped row with `skip_bad_rows`). With `regression`, labels are numbers and
    the splits are stratified by value bins; `labels` is then `[data.label_field]`.
    """
    from finegrain import datasets  # imports the NER sets, whose reader imports this module

    skipped: list[str] = []
    if config.dataset:
        if config.train:
            raise FinegrainError("data: set either data.dataset or data.train, not both")
        pool, origin = datasets.load(config.dataset, **config.dataset_options), f"dataset {config.dataset}"
        if pool and not isinstance(pool[0], Example):
            raise FinegrainError(f"data.dataset: {config.dataset!r} is a set of tagged words; train it with task: ner")
    elif config.train:
        result = read_file(config, config.train, regression=regression)
        pool, origin = result.examples, config.train
        skipped += result.skipped
    else:
        raise FinegrainError("data: no training data; set data.dataset or data.train")
    if not pool:
        raise FinegrainError(f"{origin}: no usable examples")

    given, skipped_given = read_given(config, lambda path: read_file(config, path, regression=regression))
    skipped += skipped_given
    parts = limit_splits(config, carve_splits(config, pool, given))
    train = parts["train"]
    if regression:
        if not all(isinstance(e.label, float) for e in train):
            raise FinegrainError(f"{origin}: task regression needs numeric labels in '{config.label_field}'")
        return Splits(train, parts["validation"], parts["test"], [config.label_field], skipped, origins(config, origin))
    labels = infer_labels(train)
    if len(labels) < 2 and not config.multi_label:
        raise FinegrainError(f"{origin}: the training data has {len(labels)} label(s); classification needs at least 2")
    skipped += check_split_labels(config, parts, labels, origin)
    return Splits(train, parts["validation"], parts["test"], labels, skipped, origins(config, origin))


def check_split_labels(config: DataConfig, parts: dict[str, list], labels: list[str], origin: str) -> list[str]:
    """Drop (with `skip_bad_rows`) or refuse validation and test examples whose label is not in
    `labels`, in place; returns the skipped-row lines."""
    skipped = []
    for name in SPLITS[1:]:
        checked = check_labels(parts[name], labels, getattr(config, name) or origin, skip_bad_rows=config.skip_bad_rows)
        parts[name] = checked.examples
        skipped += checked.skipped
    return skipped
