"""Tagging schemes, entity extraction and entity-level metrics: parity with seqeval, broken sequences included."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
from seqeval.metrics import accuracy_score, classification_report
from seqeval.metrics.sequence_labeling import get_entities
from seqeval.metrics.sequence_labeling import precision_recall_fscore_support as prfs_default
from seqeval.metrics.v1 import precision_recall_fscore_support as prfs_strict
from seqeval.scheme import IOB2, IOBES, Tokens

from finegrain.evaluate.entities import (
    allowed_transitions,
    check_tags,
    convert_tags,
    entities_to_tags,
    entity_errors,
    entity_metrics,
    normalize_scheme,
    parse_tag,
    repair_tags,
    tag_set,
    tags_to_entities,
)
from finegrain.tasks.tokens import viterbi

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::RuntimeWarning")

TYPES = ("PER", "LOC", "geo-loc")  # a dash inside a type, as WNUT has


def random_tags(rng: random.Random, prefixes: str, length: int) -> list[str]:
    return ["O" if rng.random() < 0.35 else f"{rng.choice(prefixes)}-{rng.choice(TYPES)}" for _ in range(length)]


def corpus(seed: int, prefixes: str, n: int = 60) -> list[list[str]]:
    rng = random.Random(seed)
    return [random_tags(rng, prefixes, rng.randint(0, 12)) for _ in range(n)]


def noisy_copy(seed: int, sentences: list[list[str]], prefixes: str) -> list[list[str]]:
    """A 'prediction': the gold tags with some replaced, so that many but not all entities match."""
    rng = random.Random(seed)
    return [[t if rng.random() < 0.7 else random_tags(rng, prefixes, 1)[0] for t in s] for s in sentences]


def assert_same_as_seqeval(ours: dict, prfs, y_true, y_pred, **kwargs) -> None:
    p, r, f, s = prfs(y_true, y_pred, average=None, **kwargs)
    assert ours["labels"] == sorted(ours["per_class"])
    assert [ours["per_class"][t]["precision"] for t in ours["labels"]] == list(p)
    assert [ours["per_class"][t]["recall"] for t in ours["labels"]] == list(r)
    assert [ours["per_class"][t]["f1"] for t in ours["labels"]] == list(f)
    assert [ours["per_class"][t]["support"] for t in ours["labels"]] == list(s)
    for average in ("micro", "macro", "weighted"):
        p, r, f, s = prfs(y_true, y_pred, average=average, **kwargs)
        assert (ours[average]["precision"], ours[average]["recall"], ours[average]["f1"]) == (p, r, f), average
        assert ours[average]["support"] == s


@pytest.mark.parametrize("seed", range(6))
def test_default_mode_matches_seqeval_on_broken_sequences(seed):
    # Every prefix in any order: I after O, E without B, type changes inside an entity...
    y_true = corpus(seed, "BIES")
    y_pred = noisy_copy(seed + 100, y_true, "BIES")
    ours = entity_metrics(y_true, y_pred)
    assert_same_as_seqeval(ours, prfs_default, y_true, y_pred)
    assert ours["accuracy"] == accuracy_score(y_true, y_pred)
    assert ours["f1"] == ours["micro"]["f1"] and 0 < ours["f1"] < 1
    report = classification_report(y_true, y_pred, output_dict=True)
    for type_ in ours["labels"]:
        assert ours["per_class"][type_]["f1"] == report[type_]["f1-score"]
    assert ours["macro"]["f1"] == report["macro avg"]["f1-score"]


@pytest.mark.parametrize("scheme, seqeval_scheme, prefixes", [("BIO", IOB2, "BI"), ("BIOES", IOBES, "BIES")])
@pytest.mark.parametrize("seed", range(4))
def test_strict_mode_matches_seqeval(seed, scheme, seqeval_scheme, prefixes):
    y_true = corpus(seed, prefixes)
    y_pred = noisy_copy(seed + 7, y_true, prefixes)
    ours = entity_metrics(y_true, y_pred, mode="strict", scheme=scheme)
    assert_same_as_seqeval(ours, prfs_strict, y_true, y_pred, scheme=seqeval_scheme)
    report = classification_report(y_true, y_pred, mode="strict", scheme=seqeval_scheme, output_dict=True)
    assert ours["micro"]["f1"] == report["micro avg"]["f1-score"]


@pytest.mark.parametrize("seed", range(3))
def test_extraction_matches_seqeval_sentence_by_sentence(seed):
    for tags in corpus(seed, "BIES", n=300):
        expected = [(t, s, e + 1) for t, s, e in get_entities(tags)]  # seqeval's end is inclusive
        assert tags_to_entities(tags) == expected, tags
    for scheme, seqeval_scheme, prefixes in (("BIO", IOB2, "BI"), ("BIOES", IOBES, "BIES")):
        for tags in corpus(seed, prefixes, n=300):
            expected = [(e.tag, e.start, e.end) for e in Tokens(tags, seqeval_scheme).entities]
            assert tags_to_entities(tags, "strict", scheme) == expected, tags


def test_strict_mode_refuses_prefixes_the_scheme_lacks_as_seqeval_does():
    tags = ["B-PER", "E-PER"]
    with pytest.raises(ValueError):
        Tokens(tags, IOB2).entities
    with pytest.raises(ValueError, match="not a BIO tag"):
        tags_to_entities(tags, "strict", "BIO")
    with pytest.raises(ValueError, match="strict mode reads"):
        tags_to_entities(tags, "strict", "IO")


def test_the_two_modes_on_textbook_cases():
    assert tags_to_entities(["O", "I-PER", "I-PER", "O"]) == [("PER", 1, 3)]  # conlleval: I after O starts one
    assert tags_to_entities(["O", "I-PER", "I-PER", "O"], "strict", "BIO") == []
    assert tags_to_entities(["B-PER", "I-LOC"]) == [("PER", 0, 1), ("LOC", 1, 2)]
    assert tags_to_entities(["B-PER", "I-PER", "O"], "strict", "BIOES") == []  # never ends with E
    assert tags_to_entities(["B-PER", "E-PER", "S-LOC"], "strict", "BIOES") == [("PER", 0, 2), ("LOC", 2, 3)]
    assert tags_to_entities(["I-LOC", "B-LOC", "O"]) == [("LOC", 0, 1), ("LOC", 1, 2)]  # IOB1


def test_parse_tag_and_schemes():
    assert parse_tag("B-geo-loc") == ("B", "geo-loc") and parse_tag("O") == ("O", "")
    for bad in ("B", "X-PER", "B-", "o", ""):
        with pytest.raises(ValueError):
            parse_tag(bad)
    assert normalize_scheme("iob2") == "BIO" and normalize_scheme("IOBES") == "BIOES"
    with pytest.raises(ValueError, match="unknown tagging scheme"):
        normalize_scheme("BILOU")
    assert tag_set(["LOC", "PER"], "BIOES") == [
        "O",
        "B-LOC",
        "I-LOC",
        "E-LOC",
        "S-LOC",
        "B-PER",
        "I-PER",
        "E-PER",
        "S-PER",
    ]
    assert tag_set(["LOC"], "IO") == ["O", "I-LOC"]


@pytest.mark.parametrize("seed", range(3))
def test_conversion_keeps_the_entities(seed):
    for tags in corpus(seed, "BIES", n=200):
        entities = tags_to_entities(tags)
        for scheme in ("BIO", "BIOES"):
            converted = convert_tags(tags, scheme)
            assert tags_to_entities(converted) == entities
            assert tags_to_entities(converted, "strict", scheme) == entities  # valid in the scheme
            assert check_tags(converted, scheme) == []
        assert convert_tags(convert_tags(tags, "BIOES"), "BIO") == convert_tags(tags, "BIO")
        io = convert_tags(tags, "IO")
        assert all(t == "O" or t.startswith("I-") for t in io)
        # IO merges adjacent entities of one type and nothing else.
        merged = []
        for entity in entities:
            if merged and merged[-1][0] == entity[0] and merged[-1][2] == entity[1]:
                merged[-1] = (entity[0], merged[-1][1], entity[2])
            else:
                merged.append(entity)
        assert tags_to_entities(io) == merged


def test_entities_to_tags_checks_its_input():
    assert entities_to_tags([("PER", 0, 2), ("LOC", 3, 4)], 4, "BIOES") == ["B-PER", "E-PER", "O", "S-LOC"]
    with pytest.raises(ValueError, match="overlaps"):
        entities_to_tags([("PER", 0, 2), ("LOC", 1, 3)], 4)
    with pytest.raises(ValueError, match="outside"):
        entities_to_tags([("PER", 3, 5)], 4)
    with pytest.raises(ValueError, match="IOB1 tags are not written from entities"):
        entities_to_tags([], 1, "IOB1")


def test_check_and_repair():
    assert check_tags(["O", "B-PER", "I-PER"], "BIO") == []
    problems = check_tags(["O", "I-PER", "B-LOC", "I-PER"], "BIO")
    assert [i for i, _ in problems] == [1, 3] and "I-PER after O" in problems[0][1]
    assert [i for i, _ in check_tags(["B-PER", "O", "S-LOC", "I-LOC", "E-LOC"], "BIOES")] == [0, 3]
    assert check_tags(["I-PER", "I-PER", "B-PER", "O"], "IOB1") == []
    assert [i for i, _ in check_tags(["O", "B-PER"], "IOB1")] == [1]
    assert [i for i, _ in check_tags(["B-PER"], "IO")] == [0]
    assert "neither" in check_tags(["PER"], "BIO")[0][1]
    broken = ["O", "I-PER", "I-PER", "I-LOC", "O"]
    fixed = repair_tags(broken, "BIO")
    assert fixed == ["O", "B-PER", "I-PER", "B-LOC", "O"]
    assert tags_to_entities(fixed) == tags_to_entities(broken)
    assert repair_tags(["B-PER", "I-PER", "O"], "BIOES") == ["B-PER", "E-PER", "O"]


def test_entity_errors():
    gold = [["B-PER", "I-PER", "O", "B-LOC", "O", "B-ORG", "O", "B-LOC"]]
    pred = [["B-PER", "I-PER", "O", "B-ORG", "O", "B-ORG", "I-ORG", "O"]]
    errors = entity_errors(gold, pred)
    assert errors == {
        "correct": 1,
        "wrong_type": 1,
        "wrong_span": 1,
        "wrong_type_and_span": 0,
        "missed": 1,
        "spurious": 0,
    }


def test_no_entities_anywhere_gives_zeros_not_nan():
    metrics = entity_metrics([["O", "O"]], [["O", "O"]])
    assert metrics["labels"] == [] and metrics["f1"] == 0.0 and metrics["macro"]["f1"] == 0.0
    assert metrics["accuracy"] == 1.0
    with pytest.raises(ValueError, match="2 gold tags but 1"):
        entity_metrics([["O", "O"]], [["O"]])


@pytest.mark.parametrize("scheme", ["BIO", "BIOES"])
def test_viterbi_finds_the_best_valid_sequence(scheme):
    tags = tag_set(["A", "B"], scheme)
    first, pairs, last = allowed_transitions(tags, scheme)
    rng = np.random.default_rng(0)
    for _ in range(20):
        scores = np.log(rng.dirichlet(np.ones(len(tags)), size=3))
        best = max(
            (
                seq
                for seq in itertools.product(range(len(tags)), repeat=3)
                if not check_tags([tags[i] for i in seq], scheme)
            ),
            key=lambda seq: sum(scores[w, c] for w, c in enumerate(seq)),
        )
        assert tuple(viterbi(scores, first, pairs, last)) == best
