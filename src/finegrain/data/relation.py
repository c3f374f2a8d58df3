"""Read relation examples: a text, two entity spans (head and tail) and the relation between them.

Two formats:

* SemEval-2010 Task 8 text (`.txt`), as the task distributed it: a record is a sentence line
  `ID<TAB>"text with <e1>head</e1> and <e2>tail</e2>"`, a label line (`Cause-Effect(e2,e1)`,
  `Other`), a `Comment:` line and a blank line. The unlabelled test file's records are sentence
  lines alone, one after another; those read with `require_label=False`. CRLF line ends are fine.
* JSON lines (or any file `read_examples` reads): `{"text": ..., "head": [start, end], "tail":
  [start, end], "label": ...}` with character offsets (`end` exclusive), or a text with inline
  SemEval markers instead of `head` and `tail`. `data.text_field` and `data.label_field` name
  the text and label fields; an `id` field is kept.

The head is entity 1 (`<e1>`) and the tail entity 2 (`<e2>`), whatever their order in the text,
so `Cause-Effect(e1,e2)` reads "head causes tail". Spans must lie inside the text, be non-empty
and not overlap. Every example remembers where it came from (`file:line`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from finegrain.data import pipeline
from finegrain.data.files import (
    READ_ERRORS, SKIP_HINT, BadRow, check_file, content_suffix, open_binary, skip_or_raise,
)
from finegrain.data.pipeline import Splits, check_split_labels
from finegrain.data.readers import ReadResult, named_labels, read_examples
from finegrain.data.split import infer_labels
from finegrain.errors import FinegrainError

__all__ = [
    "MARKERS", "RelationExample", "check_spans", "example_from_input", "load_relation_splits", "parse_marked",
    "read_relation_file",
]

MARKERS = ("<e1>", "</e1>", "<e2>", "</e2>")  # head start, head end, tail start, tail end
_MARKER = re.compile(r"</?e[12]>")
_SENTENCE = re.compile(r'^(\d+)\s+"(.*)"\s*$')
_LABEL = re.compile(r"^[^\s()]+(\((e1,e2|e2,e1)\))?$")


@dataclass
class RelationExample:
    """One text with two entities and, when labelled, their relation.

    Attributes:
        text: the text, without markers.
        head: character offsets [start, end) of entity 1 (`<e1>`).
        tail: character offsets [start, end) of entity 2 (`<e2>`).
        label: the relation (`Cause-Effect(e1,e2)`, `Other`, ...), or None.
        source: `file:line` (the sentence line of a SemEval record), or `input:N`.
        id: the SemEval sentence id or the JSON `id` field, when there is one.
    """

    text: str
    head: tuple[int, int]
    tail: tuple[int, int]
    label: str | None
    source: str
    id: str | None = None

    def span(self, which: str) -> dict[str, Any]:
        """`{"start", "end", "text"}` of the "head" or the "tail"."""
        start, end = getattr(self, which)
        return {"start": start, "end": end, "text": self.text[start:end]}


def parse_marked(marked: str) -> tuple[str, tuple[int, int], tuple[int, int]]:
    """The plain text and the head and tail spans of a text with inline `<e1>`/`<e2>` markers.

    Raises:
        BadRow: a marker missing or repeated, out of order, an empty entity, overlapping entities.
    """
    found = list(_MARKER.finditer(marked))
    order = [m.group() for m in found]
    for marker in MARKERS:
        if order.count(marker) != 1:
            problem = f"no {marker}" if marker not in order else f"{marker} {order.count(marker)} times"
            raise BadRow(f"{problem} in the sentence; mark each entity once as <e1>...</e1> and <e2>...</e2>")
    for name in ("e1", "e2"):
        if order.index(f"</{name}>") < order.index(f"<{name}>"):
            raise BadRow(f"</{name}> comes before <{name}>")
    pieces, offsets, last, length = [], {}, 0, 0
    for m in found:
        pieces.append(marked[last : m.start()])
        length += m.start() - last
        offsets[m.group()] = length
        last = m.end()
    pieces.append(marked[last:])
    text = "".join(pieces)
    head = (offsets["<e1>"], offsets["</e1>"])
    tail = (offsets["<e2>"], offsets["</e2>"])
    check_spans(text, head, tail)
    return text, head, tail


def check_spans(text: str, head: Any, tail: Any) -> tuple[tuple[int, int], tuple[int, int]]:
    """The spans as (start, end) tuples, checked against the text and each other.

    Raises:
        BadRow: a span that is not two integers, lies outside the text, is empty or blank, or
            overlaps the other; a text that contains a marker string.
    """
    for marker in MARKERS:
        if marker in text:
            raise BadRow(f"the text contains {marker!r}, which marks entities; give offsets or markers, not both")
    spans = []
    for name, span in (("head", head), ("tail", tail)):
        if not (
            isinstance(span, (list, tuple)) and len(span) == 2
            and all(isinstance(x, int) and not isinstance(x, bool) for x in span)
        ):
            raise BadRow(f"'{name}' must be [start, end] character offsets, got {span!r}")
        start, end = span
        if not 0 <= start < end <= len(text):
            what = "empty" if start == end else "reversed" if start > end else "outside the text"
            raise BadRow(f"'{name}' [{start}, {end}] is {what} (the text has {len(text)} characters)")
        if not text[start:end].strip():
            raise BadRow(f"'{name}' [{start}, {end}] covers only whitespace")
        spans.append((start, end))
    (h0, h1), (t0, t1) = spans
    if max(h0, t0) < min(h1, t1):
        raise BadRow(f"head [{h0}, {h1}] and tail [{t0}, {t1}] overlap; entities must be disjoint")
    return spans[0], spans[1]


def read_relation_file(
    path: str, text_field: str = "text", label_field: str = "label", require_label: bool = True,
    skip_bad_rows: bool = False, label_names: list[str] | None = None,
) -> ReadResult:
    """Relation examples from a SemEval-2010 Task 8 `.txt` file or a JSON lines (JSON) file.

    Args:
        path: the file; `.txt` is read as SemEval text, anything else by `read_examples`.
        text_field, label_field: the JSON fields of the text and the label.
        require_label: a record without a label is bad; when False its label is None.
        skip_bad_rows: drop bad records (each reason kept in `skipped`) instead of raising.
        label_names: labels written as ids (Hugging Face's ClassLabel): the name of each id (`data.label_names`).

    Raises:
        FinegrainError: a missing or unreadable file, or (unless `skip_bad_rows`) a bad record,
            naming `file:line` and the fix.
    """
    names = label_names if require_label else None  # predict reads no label
    if content_suffix(path) == ".txt":
        return named_labels(_read_semeval(path, require_label, skip_bad_rows), names)
    read = read_examples(
        path, text_field=text_field, label_field=label_field, skip_bad_rows=skip_bad_rows, require_label=require_label
    )
    examples, skipped = [], list(read.skipped)
    for row in read.examples:
        try:
            examples.append(_from_fields(row.text, row.extra, row.label, row.source))
        except BadRow as bad:
            skip_or_raise(bad, row.source, skip_bad_rows, skipped)
    if not examples:
        raise FinegrainError(f"{path}: every row was skipped (first: {skipped[0]}); fix the file")
    return named_labels(ReadResult(examples, skipped, read.fields), names)


def _from_fields(text: str, fields: dict[str, Any], label: Any, source: str) -> RelationExample:
    """An example from a text and its other fields: `head` and `tail` offsets, or markers in the text."""
    example_id = str(fields["id"]) if fields.get("id") is not None else None
    if "head" not in fields and "tail" not in fields:
        if "<e1>" not in text and "<e2>" not in text:
            raise BadRow("no 'head' and 'tail' offsets and no <e1>...</e1> <e2>...</e2> markers in the text")
        text, head, tail = parse_marked(text)
    else:
        head, tail = check_spans(text, fields.get("head"), fields.get("tail"))
    return RelationExample(text, head, tail, label, source, example_id)


def example_from_input(value: Any, source: str) -> RelationExample:
    """An unlabelled example from what a caller passes: a `RelationExample` (as it is), a text with
    inline markers, or a dict `{"text", "head": [start, end], "tail": [start, end]}`.

    Raises:
        FinegrainError: anything else, or bad spans or markers, naming `source`.
    """
    if isinstance(value, RelationExample):
        return value
    try:
        if isinstance(value, str):
            text, head, tail = parse_marked(value)
            return RelationExample(text, head, tail, None, source)
        if isinstance(value, dict) and isinstance(value.get("text"), str):
            return _from_fields(value["text"], value, None, source)
    except BadRow as bad:
        raise FinegrainError(f"{source}: {bad}") from None
    raise FinegrainError(
        f"{source}: expected a text with <e1>...</e1> and <e2>...</e2> markers or "
        f'{{"text": ..., "head": [start, end], "tail": [start, end]}}, got {type(value).__name__}'
    )


def _read_semeval(path: str, require_label: bool, skip_bad_rows: bool) -> ReadResult:
    """Records of the SemEval-2010 Task 8 text format (see the module docstring)."""
    check_file(path, "a SemEval-2010 Task 8 .txt file")
    try:
        with open_binary(path) as f:
            content = f.read()
    except READ_ERRORS as exc:
        raise FinegrainError(f"{path}: cannot read the file ({exc})") from None
    records: list[dict[str, Any]] = []  # line, id, sentence, label, label_line, comment
    bad: list[tuple[int, str]] = []
    current: dict[str, Any] | None = None
    resync = False  # after a bad line: ignore the rest of its record, up to a blank line
    for number, raw in enumerate(content.splitlines(), 1):
        try:
            line = raw.decode("utf-8-sig").strip()  # a BOM on any line: files joined with cat
        except UnicodeDecodeError:
            raise FinegrainError(f"{path}:{number}: not UTF-8 text; re-save the file as UTF-8") from None
        if not line:
            current, resync = None, False
            continue
        sentence = _SENTENCE.match(line)
        if sentence:
            current, resync = {"line": number, "id": sentence.group(1), "sentence": sentence.group(2)}, False
            records.append(current)
        elif resync:
            continue
        elif current is None:
            bad.append((number, f"expected a sentence line ID<TAB>\"...\" (like 8001\t\"The <e1>...</e1> ... "
                                f"<e2>...</e2>.\"), got {_clip(line)!r}"))
            resync = True
        elif line.startswith("Comment:"):
            current["comment"] = True
        elif "label" not in current and "comment" not in current:
            current["label"], current["label_line"] = line, number
        else:
            bad.append((number, f"unexpected line {_clip(line)!r}; a record is a sentence line, a label line, "
                                "a Comment: line and a blank line"))
            resync = True

    seen: dict[str, int] = {}
    for record in records:
        number = record["line"]
        try:
            if record["id"] in seen:
                raise BadRow(f"sentence id {record['id']} is used again (first at line {seen[record['id']]}); "
                             "ids must be unique")
            seen[record["id"]] = number
            label = record.get("label")
            if label is not None and not _LABEL.match(label):
                number = record["label_line"]
                raise BadRow(f"label line {_clip(label)!r} is not a relation label like Cause-Effect(e2,e1) or Other")
            if label is None and require_label:
                raise BadRow("no label line after the sentence (a relation like Cause-Effect(e2,e1), or Other)")
            text, head, tail = parse_marked(record["sentence"])
            record["example"] = RelationExample(text, head, tail, label, f"{path}:{record['line']}", record["id"])
        except BadRow as exc:
            bad.append((number, str(exc)))
    bad.sort()
    if bad and not skip_bad_rows:
        number, reason = bad[0]
        raise FinegrainError(f"{path}:{number}: {reason}; {SKIP_HINT}")
    examples = [r["example"] for r in records if "example" in r]
    if not examples:
        first = f" (first: line {bad[0][0]}: {bad[0][1]})" if bad else ""
        raise FinegrainError(f"{path}: no usable records{first}; expected the SemEval-2010 Task 8 format")
    return ReadResult(examples, [f"{path}:{n}: {reason}" for n, reason in bad])


def load_relation_splits(data) -> Splits:
    """Train, validation and test examples for `task: relation` from a run's `data` section.

    Files given for validation or test are used as they are; the parts not given are split off
    the training file with `data.split` and `data.split_seed`, stratified by relation. Labels
    come from the training examples; a validation or test label outside them is an error (or a
    skipped row with `data.skip_bad_rows`).
    """

    def read(path: str) -> ReadResult:
        return read_relation_file(path, data.text_field, data.label_field, skip_bad_rows=data.skip_bad_rows,
                                  label_names=data.label_names)

    files = "a SemEval-2010 Task 8 .txt file or JSON lines (see examples/relation.yaml)"
    splits = pipeline.load_splits(data, read, task="relation", files=files)
    splits.labels = infer_labels(splits.train)
    if len(splits.labels) < 2:
        raise FinegrainError(f"{data.train}: the training data has {len(splits.labels)} relation(s); at least 2 are needed")
    splits.skipped += check_split_labels(data, splits, data.train)
    return splits


def _clip(text: str, width: int = 60) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."

