"""Turn a run's `data` section into train, validation and test examples."""

from __future__ import annotations

from dataclasses import dataclass, field

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

    given = {}
    for name in ("validation", "test"):
        path = getattr(config, name)
        if path:
            result = read_file(config, path, regression=regression)
            given[name] = result.examples
            skipped += result.skipped

    # Carve the splits that were not given out of the training pool, stratified by label.
    fractions = dict(zip(("train", "validation", "test"), config.split))
    wanted = ["train"] + [name for name in ("validation", "test") if name not in given]
    parts = {"train": pool}
    if len(wanted) > 1:
        total = sum(fractions[name] for name in wanted)
        pieces = stratified_split(pool, [fractions[name] / total for name in wanted], seed=config.split_seed)
        parts = dict(zip(wanted, pieces))
    parts.update(given)
    train = parts["train"]
    if config.max_train_examples is not None:
        train = stratified_subset(train, min(config.max_train_examples, len(train)), seed=config.split_seed)
    if regression:
        if not all(isinstance(e.label, float) for e in train):
            raise FinegrainError(f"{origin}: task regression needs numeric labels in '{config.label_field}'")
        origins = {name: (getattr(config, name) or f"{origin} ({name} split)") for name in ("validation", "test")}
        return Splits(train, parts["validation"], parts["test"], [config.label_field], skipped, {"train": origin, **origins})
    labels = infer_labels(train)
    if len(labels) < 2 and not config.multi_label:
        raise FinegrainError(f"{origin}: the training data has {len(labels)} label(s); classification needs at least 2")
    for name in ("validation", "test"):
        checked = check_labels(parts[name], labels, getattr(config, name) or origin, skip_bad_rows=config.skip_bad_rows)
        parts[name] = checked.examples
        skipped += checked.skipped
    origins = {name: (getattr(config, name) or f"{origin} ({name} split)") for name in ("validation", "test")}
    origins["train"] = origin
    return Splits(train, parts["validation"], parts["test"], labels, skipped, origins)
