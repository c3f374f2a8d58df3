"""Turn a run's `data` section into train, validation and test examples of labelled texts
(classification and regression): the text reader and label rules on the split pipeline."""

from __future__ import annotations

from typing import Any

from finegrain.config import DataConfig
from finegrain.data import pipeline
from finegrain.data.pipeline import SPLITS, Splits, bundled_loader, check_split_labels, sample
from finegrain.data.readers import Example, named_labels, read_examples
from finegrain.data.split import infer_labels, score_like_labels, text_like_labels
from finegrain.errors import FinegrainError

__all__ = ["SPLITS", "Splits", "load_splits", "read_file", "sample"]


def read_file(config: DataConfig, path: str, require_label: bool = True, regression: bool = False):
    result = read_examples(
        path, text_field=config.text_field, label_field=config.label_field, multi_label=config.multi_label,
        skip_bad_rows=config.skip_bad_rows, require_label=require_label, regression=regression,
    )
    return result if regression or not require_label else named_labels(result, config.label_names)  # predict reads none


def load_splits(config: DataConfig, regression: bool = False, datasets_module: Any = None) -> Splits:
    """Read the configured files or bundled dataset; split off what is not given as a file.

    Labels come from the training examples; a validation or test label outside them is an
    error (or a skipped row with `skip_bad_rows`). With `regression`, labels are numbers and
    the splits are stratified by value bins; `labels` is then `[data.label_field]`.

    Args:
        config: the run's `data` section.
        regression: labels are numbers.
        datasets_module: where bundled datasets are loaded from (`finegrain.datasets`, passed in
            by the task layer: `data` does not import it).
    """
    bundled = bundled_loader(
        datasets_module, Example, "data.dataset: {name!r} is a set of tagged words; train it with task: ner"
    )
    splits = pipeline.load_splits(config, lambda path: read_file(config, path, regression=regression), bundled=bundled)
    origin = splits.origin["train"]
    if regression:
        if not all(isinstance(e.label, float) for e in splits.train):
            raise FinegrainError(f"{origin}: task regression needs numeric labels in '{config.label_field}'")
        splits.labels = [config.label_field]
        return splits
    splits.labels = infer_labels(splits.train)
    if not config.labels and (scores := score_like_labels(splits.labels)):
        raise FinegrainError(f"{origin}: {scores}")
    if not config.labels and (swapped := text_like_labels(splits.train, config.text_field, config.label_field)):
        raise FinegrainError(f"{origin}: {swapped}")
    if config.labels:  # a fixed label set in head order (continual learning: the classes seen so far)
        extra = [label for label in splits.labels if label not in config.labels]
        if extra:
            raise FinegrainError(f"{origin}: label '{extra[0]}' is not in data.labels ({', '.join(config.labels)}); "
                                 "add it there or drop data.labels")
        splits.labels = list(config.labels)
    if len(splits.labels) < 2 and not config.multi_label:
        raise FinegrainError(
            f"{origin}: the training data has {len(splits.labels)} label(s); classification needs at least 2"
        )
    splits.skipped += check_split_labels(config, splits, origin)
    return splits
