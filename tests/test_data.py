"""Readers, label checks and splits: the data a user brings, read or refused precisely."""

import bz2
import gzip
import json
import lzma
import zipfile
from collections import Counter
from pathlib import Path

import pytest

from finegrain.data import (
    Example,
    check_labels,
    infer_labels,
    read_examples,
    stratified_split,
    stratified_subset,
    write_examples,
)
from finegrain.errors import FinegrainError


def _write(path: Path, content: str | bytes) -> Path:
    if isinstance(content, str):
        content = content.encode("utf-8")
    path.write_bytes(content)
    return path


def _error(path: Path, **kwargs) -> str:
    with pytest.raises(FinegrainError) as info:
        read_examples(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message, "user errors are one line"
    return message


def _jsonl(*rows: dict) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


# --- reading good files ------------------------------------------------------------------


def test_jsonl_sources_extra_and_label_normalisation(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "train.jsonl",
        _jsonl({"text": "a", "label": 1, "id": 7}, {"text": "b", "label": 1.0})
        + "\n"  # blank lines are skipped but still counted
        + _jsonl({"text": "c", "label": " 1 "}, {"text": "d", "label": True}, {"text": "e", "label": 0.5}),
    )
    result = read_examples(path)
    assert [ex.label for ex in result.examples] == ["1", "1", "1", "true", "0.5"]
    assert [ex.source for ex in result.examples] == [f"{path}:{n}" for n in (1, 2, 4, 5, 6)]
    assert result.examples[0].extra == {"id": 7}
    assert result.skipped == [] and result.fields == ["text", "label", "id"]


def test_csv_multiline_record_reports_its_first_line(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "d.csv",
        'id,text,label\n1,"first, with comma",pos\n2,"two\nline\ntext",neg\n\n3,plain,pos\n',
    )
    result = read_examples(path)
    assert [(ex.text, ex.label) for ex in result.examples] == [
        ("first, with comma", "pos"),
        ("two\nline\ntext", "neg"),
        ("plain", "pos"),
    ]
    assert [ex.source.rsplit(":", 1)[1] for ex in result.examples] == ["2", "3", "7"]
    assert result.examples[0].extra == {"id": "1"}


def test_tsv_bom_and_custom_fields(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.tsv", "\ufeffsentence\tcategory\nhello there\tgreet\n")
    (ex,) = read_examples(path, text_field="sentence", label_field="category").examples
    assert (ex.text, ex.label) == ("hello there", "greet")


@pytest.mark.parametrize(
    "name, body",
    [
        # A header line put in front of a file with a BOM: the BOM now opens line 2.
        ("d.csv", 'label,text\n\ufeff"1","Prelingual deafness"\n"-1",In children\n'),
        # Two JSONL files joined with cat, the second saved with a BOM.
        ("d.jsonl", _jsonl({"label": "-1", "text": "In children"}) + "\ufeff" + _jsonl({"label": "1", "text": "Prelingual deafness"})),
    ],
)
def test_a_bom_inside_the_file_is_dropped(tmp_path: Path, name: str, body: str) -> None:
    labels = {ex.text: ex.label for ex in read_examples(_write(tmp_path / name, body)).examples}
    assert labels == {"Prelingual deafness": "1", "In children": "-1"}  # not a third class '\ufeff"1"'


@pytest.mark.parametrize(
    ("name", "compress"),
    [("d.jsonl.gz", gzip.compress), ("d.csv.bz2", bz2.compress), ("d.jsonl.xz", lzma.compress)],
)
def test_compressed(tmp_path: Path, name: str, compress) -> None:
    body = "text,label\nhi,a\n" if ".csv" in name else _jsonl({"text": "hi", "label": "a"})
    result = read_examples(_write(tmp_path / name, compress(body.encode())))
    assert [(ex.text, ex.label) for ex in result.examples] == [("hi", "a")]


def test_json_array_with_line_numbers_and_json_lines_in_dot_json(tmp_path: Path) -> None:
    array = '[\n  {"text": "a", "label": "x"},\n  {"text": "b",\n   "label": "y"}, {"text": "c", "label": "x"}\n]\n'
    result = read_examples(_write(tmp_path / "d.json", array))
    assert [ex.source.rsplit(":", 1)[1] for ex in result.examples] == ["2", "3", "4"]
    lines = read_examples(_write(tmp_path / "e.json", _jsonl({"text": "a", "label": "x"})))
    assert lines.examples[0].label == "x"
    assert read_examples(_write(tmp_path / "d.txt", "text\tlabel\nq\tz\n"), format="tsv").examples[0].label == "z"


def test_multi_label(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "d.jsonl",
        _jsonl({"text": "a", "label": ["x", "y", "x"]}, {"text": "b", "label": []}, {"text": "c", "label": "y|z"}),
    )
    assert [ex.label for ex in read_examples(path, multi_label=True).examples] == [["x", "y"], [], ["y", "z"]]
    csv_path = _write(tmp_path / "d.csv", "text,label\na, x | y \nb,\n")
    assert [ex.label for ex in read_examples(csv_path, multi_label=True).examples] == [["x", "y"], []]


def test_list_label_without_multi_label_says_what_to_set(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.jsonl", _jsonl({"text": "a", "label": ["x", "y"]}))
    assert "d.jsonl:1: label is a list" in _error(path)
    assert "data.multi_label: true" in _error(path)


def test_regression_and_unlabelled(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.csv", "text,score\na,0.5\nb,-2\n")
    assert [ex.label for ex in read_examples(path, label_field="score", regression=True).examples] == [0.5, -2.0]
    bad = _write(tmp_path / "bad.csv", "text,score\na,high\n")
    assert "bad.csv:2: label 'high' is not a number" in _error(bad, label_field="score", regression=True)
    unlabelled = _write(tmp_path / "u.jsonl", _jsonl({"text": "a"}, {"text": "b", "label": "x"}))
    assert [ex.label for ex in read_examples(unlabelled, require_label=False).examples] == [None, "x"]


# --- refusing bad files, naming the line -------------------------------------------------


def test_missing_field_message_names_line_fields_and_key(tmp_path: Path) -> None:
    path = _write(tmp_path / "train.jsonl", _jsonl({"text": "a", "category": "x"}))
    assert _error(path) == f"{path}:1: missing field 'label' (fields: text, category); rename that field to 'label' (or, to train, set data.label_field)"
    # Missing from one row when earlier rows had it: that row is the problem.
    later = _write(tmp_path / "t2.jsonl", _jsonl({"text": "a", "label": "x"}, {"text": "b"}))
    assert _error(later).startswith(f"{later}:2: missing field 'label'")
    assert "skip_bad_rows" in _error(later)


def test_missing_csv_column_suggests_the_nearest(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.csv", "text,Label\na,x\n")
    message = _error(path)
    assert message.startswith(f"{path}:1: no column 'label' in the header (columns: text, Label)")
    assert "did you mean 'Label'?" in message and "data.label_field" in message
    tsv_in_csv = _write(tmp_path / "e.csv", "text\tlabel\na\tx\n")
    assert "is this TSV?" in _error(tsv_in_csv)
    semicolons = _write(tmp_path / "f.csv", "text;label\na;x\n")  # a spreadsheet's export in many locales
    assert "the header has ';' separators: save the file with ',' separators" in _error(semicolons)
    headless = _write(tmp_path / "g.tsv", "a fine film\tpos\na poor film\tneg\n")
    assert _error(headless) == (f"{headless}:1: no column 'text' in the header (columns: a fine film, pos); rename that "
                                "column to 'text' (or, to train, set data.text_field), or if line 1 is a row, add a first "
                                "line 'text\\tlabel'")
    label_first = _write(tmp_path / "h.csv", '"1","Prelingual deafness"\n"-1","In children, it can isolate."\n')
    assert _error(label_first).endswith("or if line 1 is a row, add a first line 'label,text'")


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("d.jsonl", _jsonl({"text": "ok", "label": "x"}) + '{"text": "a", "label": }\n', ":2: invalid JSON"),
        (
            "d.jsonl",
            _jsonl({"text": "ok", "label": "x"}, {"text": "  ", "label": "x"}),
            ":2: empty text in field 'text'",
        ),
        ("d.jsonl", _jsonl({"text": "ok", "label": "x"}, {"text": "a", "label": None}), ":2: empty label"),
        ("d.jsonl", _jsonl({"text": "ok", "label": "x"}) + "[1, 2]\n", ":2: expected a JSON object, got a list"),
        ("d.jsonl", _jsonl({"text": "ok", "label": "x"}, {"text": ["a"], "label": "x"}), ":2: field 'text' is a list"),
        ("d.csv", "text,label\nok,x\n,y\n", ":3: empty text"),
        ("d.csv", "text,label\nok,x\na,b,c\n", ":3: 3 fields but the header has 2"),
    ],
)
def test_bad_rows(tmp_path: Path, name: str, content: str, expected: str) -> None:
    path = _write(tmp_path / name, content)
    assert expected in _error(path)
    result = read_examples(path, skip_bad_rows=True)
    assert [ex.text for ex in result.examples] == ["ok"]
    assert len(result.skipped) == 1 and expected in result.skipped[0] and str(path) in result.skipped[0]


def test_undecodable_bytes_name_the_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.jsonl", b'{"text": "ok", "label": "x"}\n{"text": "caf\xe9", "label": "x"}\n')
    assert ":2: byte 0xe9 at column 14 is not UTF-8" in _error(path)
    csv_path = _write(tmp_path / "d.csv", b'text,label\nok,x\n"multi\nline caf\xe9",x\n')
    assert ":3: byte 0xe9 in field 'text' is not UTF-8" in _error(csv_path)
    assert len(read_examples(csv_path, skip_bad_rows=True).examples) == 1


def test_trailing_empty_cells_are_tolerated(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.csv", "text,label\na,x,,\n")
    assert read_examples(path).examples[0].label == "x"


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("d.csv", '[{"text": "a", "label": "x"}]', "looks like a JSON array, not CSV; rename it to d.json"),
        ("d.csv", _jsonl({"text": "a", "label": "x"}), "looks like JSON lines, not CSV; rename it to d.jsonl"),
        (
            "d.jsonl",
            "text,label\na,x\n",
            ":1: not a JSON object ('text,label'); this looks like CSV, rename it to d.csv",
        ),
        ("d.jsonl", '[{"text": "a", "label": "x"}]', "is a JSON array, not JSON lines"),
        ("d.jsonl", '{\n  "text": "a",\n  "label": "x"\n}\n', "spread over several lines"),
        ("d.csv", b"text,label\x00\x01\x02", "binary data (a NUL byte at byte 10)"),
        ("d.jsonl", bytes(range(128, 256)) * 2, "binary data (most bytes are not UTF-8 text)"),  # was "looks like CSV"
        ("d.csv", gzip.compress(b"text,label\n"), "gzip-compressed but not named so; rename it to d.csv.gz"),
        ("d.csv", "\ufefftext".encode("utf-16"), "UTF-16 encoded; save it as UTF-8"),
        ("d.csv", "", "empty file"),
        ("d.jsonl", "\n\n  \n", "empty file"),
        ("d.csv", "text,label\n", "no rows"),
        ("d.json", "[]", "no rows"),
        ("d.txt", "text,label\na,x\n", "extension '.txt', so the format is unknown"),
        # Tagged words given to classification (no task: ner): what the file is and which task reads it.
        ("wsj.conll.gz", gzip.compress(b"Pierre\tB-NNP\n"), "wsj.conll.gz: .conll holds tagged words, which task: ner "
         "reads (--set task=ner); texts with labels come as .jsonl"),
        ("d.json", '[{"text": "a", "label": "x"} {"text": "b"}]', ":1: invalid JSON"),
    ],
)
def test_file_is_not_what_its_name_says(tmp_path: Path, name: str, content: str | bytes, expected: str) -> None:
    message = _error(_write(tmp_path / name, content))
    assert expected in message


def test_zip_renamed_to_csv(tmp_path: Path) -> None:
    path = tmp_path / "book.csv"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("sheet.xml", "<x/>")
    assert "a ZIP archive (an .xlsx workbook is one), not CSV text; export it as CSV" in _error(path)


def test_corrupt_compressed_file(tmp_path: Path) -> None:
    data = gzip.compress(("text,label\n" + "hello,x\n" * 5000).encode())
    path = _write(tmp_path / "d.csv.gz", data[: len(data) // 2])
    assert "not a valid gzip file" in _error(path)


def test_plain_file_named_compressed(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.csv.gz", "text,label\na,x\n")
    assert _error(path) == f"{path}: not gzip-compressed; rename it to d.csv"


def test_missing_file_and_directory(tmp_path: Path) -> None:
    assert "file not found (relative paths are resolved from" in _error(tmp_path / "nope.jsonl")
    (tmp_path / "dir.jsonl").mkdir()
    assert "is a directory" in _error(tmp_path / "dir.jsonl")
    # said before what the name says (it was "no extension, so the format is unknown")
    assert _error(tmp_path) == f"{tmp_path}: is a directory; expected a .jsonl, .json, .csv or .tsv (optionally .gz, .bz2 or .xz compressed) file"
    assert "file not found" in _error(tmp_path / "notes.txt")


def test_all_rows_bad_is_an_error_even_when_skipping(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.jsonl", _jsonl({"txt": "a", "label": "x"}, {"txt": "b", "label": "y"}))
    message = _error(path, skip_bad_rows=True)
    assert "all 2 rows were skipped" in message and "missing field 'text'" in message


# --- label checks ------------------------------------------------------------------------


def test_check_labels(tmp_path: Path) -> None:
    examples = [Example("a", "fresh", "val.jsonl:1"), Example("b", "rottne", "val.jsonl:2"), Example("c", None, "v:3")]
    with pytest.raises(FinegrainError) as info:
        check_labels(examples, ["fresh", "rotten"], "val.jsonl")
    message = str(info.value)
    assert message.startswith("val.jsonl:2: unknown label 'rottne' (known: fresh, rotten); did you mean 'rotten'?")
    assert "\n" not in message
    result = check_labels(examples, ["fresh", "rotten"], skip_bad_rows=True)
    assert [ex.text for ex in result.examples] == ["a", "c"] and result.skipped[0].startswith("val.jsonl:2:")
    multi = [Example("a", ["x", "q"], "m:1")]
    with pytest.raises(FinegrainError, match="m:1: unknown label 'q'"):
        check_labels(multi, ["x", "y"])
    with pytest.raises(FinegrainError, match="every example"):
        check_labels(multi, ["x", "y"], "m", skip_bad_rows=True)
    # No label of the file is one the run knows: the classes are named another way, not bad rows.
    renamed = [Example("a", "1", "test.csv:2"), Example("b", "-1", "test.csv:3")]
    with pytest.raises(FinegrainError, match=r"^test.csv: none of its labels \(-1, 1\) is one the model was trained on "
                       r"\(certain, uncertain\); write them as the training data does$"):
        check_labels(renamed, ["certain", "uncertain"])
    with pytest.raises(FinegrainError, match="every example has a label unknown"):
        check_labels(renamed, ["certain", "uncertain"], "test.csv", skip_bad_rows=True)


def test_check_labels_shortens_long_label_lists() -> None:
    with pytest.raises(FinegrainError, match=r"\.\.\. \(50 in all\)"):
        check_labels([Example("a", "nope", "f:1")], [f"label{i}" for i in range(50)])
    # Labels that are whole reviews (text and label columns swapped) stay one short line each.
    review = "A long review, line one.\nAnd line two of it, " + "more " * 200
    with pytest.raises(FinegrainError) as info:
        check_labels([Example("b", "Another review", "f:1"), Example("a", review, "f:2")], [review + "!", "Another review"])
    message = str(info.value)
    assert "\n" not in message and len(message) < 300
    assert message.startswith("f:2: unknown label 'A long review, line one.\\nAnd line two...' (known: A long review, line")


def test_columns_swapped_by_the_header_are_named(tmp_path: Path) -> None:
    """Pattern's German reviews, headed 'text,label' where the file holds label then text, trained 146
    classes of whole reviews and failed on a validation review with a message of thousands of characters."""
    from finegrain.config import DataConfig
    from finegrain.data.load import load_splits
    from finegrain.data.split import text_like_labels

    reviews = [f"Review {i}: the plot was {'dull' if i % 2 else 'gripping'} and the ending came far too late." for i in range(40)]
    swapped = _write(tmp_path / "swapped.csv", "text,label\n" + "".join(f"{i % 2},{r}\n" for i, r in enumerate(reviews)))
    with pytest.raises(FinegrainError, match=rf"^{swapped}: its 32 training labels read as texts \(median 13 words\) and "
                       r"its 2 distinct texts as labels \('0', '1'\): are the columns swapped\? fix the header line, or "
                       r"--set data.text_field=label --set data.label_field=text$"):
        load_splits(DataConfig(train=str(swapped)))
    fixed = load_splits(DataConfig(train=str(swapped), text_field="label", label_field="text"))
    assert fixed.labels == ["0", "1"]
    # Short or repeated labels, or labels shorter than the texts, are left alone.
    examples = [Example(r, f"intent {i}", f"f:{i}") for i, r in enumerate(reviews)]
    assert text_like_labels(examples, "text", "label") is None
    examples = [Example("hi", f"a label of six words {i}", f"f:{i}") for i in range(10)]
    assert text_like_labels(examples, "text", "label") is None  # fewer than 20 labels


# --- writing -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["out.jsonl", "out.csv", "out.tsv.gz"])
def test_write_then_read_round_trip(tmp_path: Path, name: str) -> None:
    examples = [Example('a, "quoted"\nline', ["x", "y"], "s:1", {"id": "1"}), Example("b", ["y"], "s:2", {"id": "2"})]
    assert write_examples(tmp_path / name, examples) == 2
    back = read_examples(tmp_path / name, multi_label=True).examples
    assert [(ex.text, ex.label, ex.extra) for ex in back] == [(ex.text, ex.label, ex.extra) for ex in examples]


# --- splitting ---------------------------------------------------------------------------


def _examples(counts: dict[str, int]) -> list[Example]:
    out = []
    for label, count in counts.items():
        out += [Example(f"{label} {i}", label, f"f:{len(out) + i + 1}") for i in range(count)]
    return out


def test_stratified_split_sizes_proportions_and_determinism() -> None:
    examples = _examples({"a": 503, "b": 211, "c": 37, "d": 3, "e": 1})
    train, val, test = stratified_split(examples, (0.8, 0.1, 0.1), seed=0)
    assert (len(train), len(val), len(test)) == (604, 76, 75)  # exact: largest remainder of 755 * f
    ids = [id(ex) for part in (train, val, test) for ex in part]
    assert len(set(ids)) == len(examples)
    for part, fraction in ((train, 0.8), (val, 0.1), (test, 0.1)):
        counts = Counter(ex.label for ex in part)
        for label, total in (("a", 503), ("b", 211), ("c", 37)):
            assert abs(counts[label] - fraction * total) <= 1.0
        assert [examples.index(ex) for ex in part] == sorted(examples.index(ex) for ex in part)  # input order
    assert Counter(ex.label for ex in train)["e"] == 1  # a singleton goes where the largest share is
    again = stratified_split(examples, (0.8, 0.1, 0.1), seed=0)
    assert [[ex.text for ex in part] for part in again] == [[ex.text for ex in part] for part in (train, val, test)]
    other = stratified_split(examples, (0.8, 0.1, 0.1), seed=1)
    assert [ex.text for ex in other[1]] != [ex.text for ex in val]


def test_two_way_and_degenerate_splits() -> None:
    examples = _examples({"a": 10, "b": 10})
    train, test = stratified_split(examples, (0.7, 0.3))
    assert (len(train), len(test)) == (14, 6)
    assert Counter(ex.label for ex in test) == {"a": 3, "b": 3}
    assert stratified_split([], (0.5, 0.5)) == ([], [])
    assert [len(p) for p in stratified_split(examples[:1], (0.8, 0.1, 0.1))] == [1, 0, 0]
    with pytest.raises(FinegrainError, match="sum to 1"):
        stratified_split(examples, (0.8, 0.3))
    with pytest.raises(FinegrainError, match="non-negative"):
        stratified_split(examples, (1.2, -0.2))


def test_multi_label_split_keeps_rare_labels_in_every_part() -> None:
    examples = [Example(f"t{i}", ["common"] + (["rare"] if i % 10 == 0 else []), f"f:{i}") for i in range(100)]
    parts = stratified_split(examples, (0.8, 0.1, 0.1), seed=3)
    assert [sum("rare" in ex.label for ex in part) for part in parts] == [8, 1, 1]


def test_regression_split_spans_the_range() -> None:
    examples = [Example(f"t{i}", float(i), f"f:{i}") for i in range(100)]
    _, val, _ = stratified_split(examples, (0.8, 0.1, 0.1))
    assert sorted(int(ex.label) // 10 for ex in val) == list(range(10))  # one from each decile


def test_stratified_subset() -> None:
    examples = _examples({"a": 300, "b": 100})  # sorted by label, as files often are
    subset = stratified_subset(examples, 41, seed=2)
    assert len(subset) == 41 and Counter(ex.label for ex in subset) == {"a": 31, "b": 10}
    assert stratified_subset(examples, 1000) == examples and stratified_subset(examples, 0) == []
    for size in range(1, 400, 37):
        assert len(stratified_subset(examples, size)) == size


def test_infer_labels() -> None:
    assert infer_labels(_examples({"b": 1, "a": 2})) == ["a", "b"]
    numeric = [Example("x", label, "f:1") for label in ("10", "2", "1")]
    assert infer_labels(numeric) == ["1", "2", "10"]
    multi = [Example("x", ["z", "y"], "f:1"), Example("x", [], "f:2"), Example("x", None, "f:3")]
    assert infer_labels(multi) == ["y", "z"]
    with pytest.raises(ValueError):
        infer_labels([Example("x", 0.5, "f:1")])


def test_numbers_with_a_fraction_as_class_labels_point_at_regression(tmp_path: Path) -> None:
    """A file of scores trained as classification made a class of each value, then failed on the first
    validation value it had not seen ("unknown label '0.03'; did you mean '0.53'?")."""
    from finegrain.config import DataConfig
    from finegrain.data.load import load_splits
    from finegrain.data.split import score_like_labels

    assert score_like_labels(["1", "2", "3", "4", "5"]) is None and score_like_labels(["1.0", "2.0"]) is None
    assert score_like_labels([str(i) for i in range(77)]) is None  # class ids
    assert score_like_labels(["neg", "0.5"]) is None and score_like_labels(["nan", "0.5"]) is None
    scores = tmp_path / "scores.jsonl"
    scores.write_text("".join(json.dumps({"text": f"text {i}", "label": round(i * 0.37 - 3, 2)}) + "\n" for i in range(40)))
    with pytest.raises(FinegrainError, match=rf"^{scores}: its 32 training labels are all numbers \(-3, -2.63, "
                       r"-2.26, \.\.\. 11.43\): to predict a score, set task: regression \(--set task=regression\); "
                       r"to classify them, list the classes in data.labels$"):
        load_splits(DataConfig(train=str(scores)))
    labels = infer_labels(read_examples(scores).examples)
    assert load_splits(DataConfig(train=str(scores), labels=labels)).labels == labels
    assert load_splits(DataConfig(train=str(scores)), regression=True).labels == ["label"]


def test_labels_written_two_ways_are_named() -> None:
    from finegrain.data.split import look_alike_labels

    assert look_alike_labels(["neg", "pos", "spam", "ham"]) is None
    assert look_alike_labels(["+", "-", "B-PER", "I-PER", "Cause-Effect(e1,e2)", "Cause-Effect(e2,e1)"]) is None
    line = look_alike_labels(["Pos", "neg", "not spam", "not_spam", "pos"])
    assert line.startswith("labels: 'Pos' and 'pos'; 'not spam' and 'not_spam' differ only in case, spaces or "
                           "punctuation and train as different classes"), line


def test_label_ids_as_hugging_face_writes_them_read_with_their_names(tmp_path: Path) -> None:
    """`ds.to_json()` of a Hugging Face classification set writes label ids (`"label": 1`): with
    data.label_names they train, report and predict as names; an id past the list is one line."""
    from finegrain.config import DataConfig
    from finegrain.data.load import load_splits, read_file

    path = tmp_path / "ids.jsonl"
    path.write_text("".join(json.dumps({"text": f"text {i}", "label": i % 3}) + "\n" for i in range(30)))
    names = ["world", "sports", "business"]
    splits = load_splits(DataConfig(train=str(path), label_names=names))
    assert splits.labels == ["business", "sports", "world"]
    assert {e.label for e in splits.test} <= set(names) and [e.label for e in read_file(
        DataConfig(label_names=names), str(path)).examples[:3]] == names
    with pytest.raises(FinegrainError, match=rf"^{path}:3: label '2' is not an id of data.label_names, which names 2 "
                       r"\(ids 0 to 1\); list the name of every id there, or drop data.label_names"):
        load_splits(DataConfig(train=str(path), label_names=names[:2], skip_bad_rows=True))
    multi = tmp_path / "multi.jsonl"
    multi.write_text(json.dumps({"text": "a", "label": [0, 2]}) + "\n")
    assert read_file(DataConfig(label_names=names, multi_label=True), str(multi)).examples[0].label == ["world", "business"]
    assert read_file(DataConfig(label_names=names[:1]), str(path), require_label=False).examples  # predict reads no label


def test_labels_that_are_ids_point_at_label_names() -> None:
    from finegrain.data.split import id_labels

    assert id_labels(["1", "2", "3", "4", "5"]) is None and id_labels(["0"]) is None and id_labels(["0", "2"]) is None
    assert id_labels([str(i) for i in range(6)]) == (
        "labels: 0, 1, 2, 3 ... read as ids, and reports and predictions will name them so; if they stand for names "
        "(a Hugging Face set's ClassLabel), list the names in id order in data.label_names")


def test_labels_that_join_other_labels_point_at_multi_label() -> None:
    """A multi-label file read without data.multi_label trained each combination as a class, in silence."""
    from finegrain.data.split import joined_labels

    assert joined_labels(["neg", "pos"]) is None
    assert joined_labels(["Cause-Effect(e1,e2)", "Cause-Effect(e2,e1)", "Other"]) is None  # relation labels
    assert joined_labels(["a|b", "c"]) is None  # no part stands alone
    assert joined_labels(["politics", "sports", "sports|politics", "tech", "tech|politics"]) == (
        "labels: 'sports|politics', 'tech|politics' join labels that also stand alone: if a text can carry several "
        "labels, set data.multi_label: true; as they are, each combination trains as a class of its own")
    assert "set data.multi_label: true and join a text's labels with '|' instead of ',' (or give a JSON list)" in \
        joined_labels(["politics", "sports", "sports, politics"])


def test_evaluation_texts_that_are_also_training_texts_are_counted() -> None:
    from finegrain.data.pipeline import Splits
    from finegrain.data.split import shared_line, shared_with_training
    from finegrain.data.squad import QAExample

    train = [Example("A good  film", "pos", "t.jsonl:1"), Example("dull", "neg", "t.jsonl:2")]
    test = [Example("new text", "pos", "e.jsonl:1"), Example("a GOOD film", "neg", "e.jsonl:2")]
    shared = shared_with_training(Splits(train, [Example("other", "pos", "v:1")], test, ["neg", "pos"]))
    assert shared == {"test": {"examples": 1, "of": 2, "first": "e.jsonl:2 is t.jsonl:1"}}
    line = shared_line(shared, {"test": "e.jsonl"})
    assert line.startswith("note: 1 of 2 test texts are also training texts, case and spacing aside (the first: e.jsonl:2 is "
                           "t.jsonl:1)") and line.endswith("drop the copies from one side"), line
    assert "keep one row of each text" in shared_line(shared, {"test": "t.jsonl (test split)"})
    question = QAExample("Who?", "Anna came.", None, "q1", "q.json:1")
    assert shared_with_training(Splits([question], [], [QAExample("Who?", "Anna came.", None, "q2", "q.json:9")], []))["test"]["examples"] == 1
    assert shared_with_training(Splits(train, [], [], ["neg", "pos"])) == {}


def test_max_eval_examples_caps_validation_and_test_with_a_stratified_sample(tmp_path) -> None:
    from finegrain.config import DataConfig
    from finegrain.data.load import load_splits

    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"text": f"text {i}", "label": "ab"[i % 2]}) + "\n" for i in range(200)))
    full = load_splits(DataConfig(train=str(path)))
    capped = load_splits(DataConfig(train=str(path), max_eval_examples=6))
    assert (len(capped.train), len(capped.validation), len(capped.test)) == (160, 6, 6)
    assert [e.text for e in capped.train] == [e.text for e in full.train]
    assert {e.text for e in capped.test} < {e.text for e in full.test}
    assert sorted(e.label for e in capped.test) == ["a", "a", "a", "b", "b", "b"]


# --- one split pipeline for every reader ------------------------------------------------------

_PARIS = {"text": "Paris", "answer_start": 0}


def _bad_row_files(tmp_path: Path) -> dict:
    """A reader per task and a file whose line 2 is bad, for the shared bad-row rules."""
    from finegrain.data.conll import read_token_examples
    from finegrain.data.relation import read_relation_file
    from finegrain.data.squad import read_squad

    good_qa = {"id": "1", "question": "Capital?", "context": "Paris is big.", "answers": [_PARIS]}
    bad_qa = {**good_qa, "id": "2", "answers": [{"text": "Lyon", "answer_start": 0}]}
    relation = {"text": "<e1>Rain</e1> causes <e2>floods</e2>.", "label": "Cause-Effect(e1,e2)"}
    return {
        "text": (read_examples, _jsonl({"text": "a", "label": "x"}, {"text": "b"})),
        "tokens": (
            read_token_examples, _jsonl({"tokens": ["a"], "tags": ["O"]}, {"tokens": ["b", "c"], "tags": ["O"]})
        ),
        "relation": (read_relation_file, _jsonl(relation, {"text": "no markers", "label": "Other"})),
        "squad": (read_squad, _jsonl(good_qa, bad_qa)),
    }


def test_every_reader_reports_and_skips_bad_rows_alike(tmp_path: Path) -> None:
    for name, (read, content) in _bad_row_files(tmp_path).items():
        path = _write(tmp_path / f"{name}.jsonl", content)
        with pytest.raises(FinegrainError) as info:
            read(path)
        assert str(info.value).startswith(f"{path}:2: "), name
        assert str(info.value).endswith("; fix the row or skip bad rows (--skip-bad-rows, or data.skip_bad_rows: true)"), name
        result = read(path, skip_bad_rows=True)
        assert len(result.examples) == 1 and len(result.skipped) == 1, name
        assert result.skipped[0].startswith(f"{path}:2: ") and "skip_bad_rows" not in result.skipped[0], name


@pytest.mark.parametrize("suffix, compress", [(".gz", gzip.compress), (".bz2", bz2.compress), (".xz", lzma.compress)])
def test_every_reader_opens_compressed_files(tmp_path: Path, suffix: str, compress) -> None:
    from finegrain.data.relation import read_relation_file
    from finegrain.data.squad import read_squad

    semeval = Path(__file__).resolve().parent.parent / "examples" / "data" / "semeval" / "train.txt"
    squad = _jsonl(
        {"id": "1", "question": "Capital?", "context": "Paris is big.", "answers": [_PARIS]}
    )
    for read, plain in ((read_relation_file, semeval), (read_squad, _write(tmp_path / "q.jsonl", squad))):
        packed = _write(tmp_path / (plain.name + suffix), compress(plain.read_bytes()))
        expected = [(e.text if hasattr(e, "text") else e.question, e.label) for e in read(plain).examples]
        got = [(e.text if hasattr(e, "text") else e.question, e.label) for e in read(packed).examples]
        assert got == expected and got


def test_the_pipeline_splits_and_caps_with_the_task_split_and_refuses_what_the_task_lacks(tmp_path: Path) -> None:
    from finegrain.config import DataConfig
    from finegrain.data import pipeline
    from finegrain.data.readers import ReadResult

    calls = []

    def read(path: str) -> ReadResult:
        examples = [Example(f"{path} {i}", "ab"[i % 2], f"{path}:{i + 1}") for i in range(20)]
        return ReadResult(examples, [f"{path}:99: bad"])

    def halves(examples, fractions, seed=0):  # a task's own split: in file order, by the fractions
        calls.append(len(fractions))
        cuts = [0]
        for fraction in fractions:
            cuts.append(cuts[-1] + round(fraction * len(examples)))
        cuts[-1] = len(examples)
        return tuple(list(examples[a:b]) for a, b in zip(cuts, cuts[1:]))

    config = DataConfig(train="t.jsonl", test="x.jsonl", split=[0.5, 0.25, 0.25], max_train_examples=5)
    splits = pipeline.load_splits(config, read, halves, task="demo", files="a demo file")
    assert [e.text for e in splits.train] == [f"t.jsonl {i}" for i in range(5)]  # capped by `halves`, not stratified
    # test given as a file: train and validation share the pool 0.5 : 0.25, i.e. 13 : 7 of 20
    assert [e.text for e in splits.validation] == [f"t.jsonl {i}" for i in range(13, 20)]
    assert len(splits.test) == 20 and splits.labels == [] and calls == [2, 2]
    assert splits.skipped == ["t.jsonl:99: bad", "x.jsonl:99: bad"]
    assert splits.origin == {"train": "t.jsonl", "validation": "t.jsonl (validation split)", "test": "x.jsonl"}

    def bundled(name, **options):  # a bundled set with its own split: taken as it is
        return [Example(str(i), "a", f"{name}:{i}", {"split": pipeline.SPLITS[i % 3]}) for i in range(9)]

    fixed = pipeline.load_splits(DataConfig(dataset="demo"), read, bundled=bundled)
    assert [len(fixed.train), len(fixed.validation), len(fixed.test)] == [3, 3, 3]
    no_bundled = "^data.dataset: task demo has no bundled dataset; set data.train to a demo file$"
    with pytest.raises(FinegrainError, match=no_bundled):
        pipeline.load_splits(DataConfig(dataset="demo"), read, task="demo", files="a demo file")
    with pytest.raises(FinegrainError, match="^data: no training data; set data.train to a demo file$"):
        pipeline.load_splits(DataConfig(), read, task="demo", files="a demo file")
    with pytest.raises(FinegrainError, match="not both"):
        pipeline.load_splits(DataConfig(dataset="demo", train="t.jsonl"), read, bundled=bundled)


def test_bundled_datasets_come_from_the_caller_not_from_the_data_layer(tmp_path: Path) -> None:
    from finegrain.config import DataConfig
    from finegrain.data.load import load_splits

    class Bundled:
        @staticmethod
        def load(name, **options):
            return [Example(f"text {i}", "ab"[i % 2], f"{name}:{i}") for i in range(40)]

    splits = load_splits(DataConfig(dataset="fake"), datasets_module=Bundled)
    assert splits.labels == ["a", "b"] and splits.origin["train"] == "dataset fake"
    with pytest.raises(ValueError, match="the caller passes in"):
        load_splits(DataConfig(dataset="fake"))
