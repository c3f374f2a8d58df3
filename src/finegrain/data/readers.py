"""Read labelled examples from JSON lines, JSON or CSV/TSV files (optionally compressed).

Every example remembers where it came from (`file:line`), so any later complaint about it
(an unknown label, a text too long) can name the line to fix. Problems are caught early
and named precisely: a file that is not what its extension says (a JSON array in a
`.csv`, CSV in a `.jsonl`, an Excel workbook renamed to `.csv`), bytes that are not UTF-8,
a missing column. With `skip_bad_rows=True` bad rows are dropped and each reason kept.
"""

from __future__ import annotations

import copy
import csv
import difflib
import io
import json
import math
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from finegrain.atomic import atomic_write_bytes
from finegrain.data.files import COMPRESSION, READ_ERRORS, SKIP, SKIP_HINT, BadRow, check_file, skip_or_raise, utf8_lines
from finegrain.errors import FinegrainError

__all__ = [
    "TAGGED_WORD_EXTENSIONS", "Example", "ReadResult", "check_labels", "named_labels", "read_examples", "without_labels",
    "write_examples",
]

Label = str | list[str] | float | None

_FORMATS = {
    ".jsonl": "jsonl",
    ".json-lines": "jsonl",
    ".jsonlines": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "tsv",
}
_COMPRESSED_MAGIC = {"gzip": (b"\x1f\x8b",), "bzip2": (b"BZh",), "xz": (b"\xfd7zXZ\x00",)}
_SUPPORTED = ".jsonl, .json, .csv or .tsv (optionally .gz, .bz2 or .xz compressed)"
# Extensions that only hold tagged words (CoNLL columns): the NER reader's, never a table of texts.
TAGGED_WORD_EXTENSIONS = {".conll", ".conllx", ".iob", ".iob2", ".bio", ".bioes", ".tags"}
_SNIFF_BYTES = 8192
# Lone surrogates are how errors="surrogateescape" marks bytes that are not valid UTF-8.
_UNDECODABLE = re.compile("[\udc80-\udcff]")

# Python's csv module refuses fields over 128 KiB by default; a long document in one cell
# is legitimate data, not an error.
csv.field_size_limit(2**31 - 1)


@dataclass
class Example:
    """One labelled (or unlabelled) text.

    Attributes:
        text: the input text, unmodified.
        label: a class name (`str`), a list of class names (multi-label), a number
            (regression), or `None` when the file has no label for it.
        source: where it came from, `file:line` (the line a CSV record starts on).
        extra: the row's other fields, by name.
    """

    text: str
    label: Label
    source: str
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class ReadResult:
    """What `read_examples` found.

    Attributes:
        examples: the good rows, in file order.
        skipped: one line per skipped row, `file:line: reason` (empty unless
            `skip_bad_rows=True`).
        fields: the column names (CSV) or the keys of the first object (JSON).
    """

    examples: list[Example]
    skipped: list[str] = field(default_factory=list)
    fields: list[str] = field(default_factory=list)


def read_examples(
    path: str | os.PathLike[str],
    text_field: str = "text",
    label_field: str = "label",
    multi_label: bool = False,
    skip_bad_rows: bool = False,
    require_label: bool = True,
    *,
    regression: bool = False,
    label_separator: str = "|",
    format: str | None = None,
) -> ReadResult:
    """Read examples from a `.jsonl`, `.json`, `.csv` or `.tsv` file.

    The format comes from the extension (`.jsonl`/`.json-lines`/`.ndjson`, `.json`,
    `.csv`, `.tsv`), after an optional `.gz`/`.bz2`/`.xz`. A `.json` file holds either an
    array of objects or JSON lines. Files must be UTF-8 (a BOM is allowed).

    Labels: JSON numbers and CSV cells become strings for classification (`1` and `1.0`
    both become `"1"`), surrounding whitespace is stripped. For multi-label data a label is
    a JSON list, or a string split on `label_separator` (`"sports|politics"`); an empty
    CSV cell or `[]` means "no label applies". With `regression=True` labels are floats.

    Args:
        path: the file.
        text_field: the column or key holding the text.
        label_field: the column or key holding the label.
        multi_label: labels are sets of class names.
        skip_bad_rows: drop bad rows (recording why) instead of raising on the first.
        require_label: a row without a label is bad; when False it gets `label=None`.
        regression: labels are numbers (returned as `float`).
        label_separator: splits a string label into several when `multi_label`.
        format: `"jsonl"`, `"json"`, `"csv"` or `"tsv"` to override the extension.

    Returns:
        The examples and the reasons rows were skipped.

    Raises:
        FinegrainError: a missing, empty or mislabelled file, a missing column, or (unless
            `skip_bad_rows`) a bad row. The message names `file:line` and what to do.
    """
    if multi_label and regression:
        raise ValueError("multi_label and regression cannot both be set")
    p = Path(path)
    name = str(path)
    check_file(path, f"a {_SUPPORTED} file")  # a missing file or a directory, before what its name says
    fmt, opener, compression = _detect_format(p, name, format)

    parser = _RowParser(name, text_field, label_field, multi_label, require_label, regression, label_separator)
    examples: list[Example] = []
    skipped: list[str] = []
    rows = 0
    try:
        head = _sniff(p, name, opener, compression, fmt)
        with opener(p, "rb") as binary:
            stream = utf8_lines(binary, newline="", errors="surrogateescape")
            records = _RECORD_READERS[fmt](stream, name, head, parser)
            for line, record in records:
                rows += 1
                source = f"{name}:{line}"
                try:
                    if isinstance(record, BadRow):
                        raise record
                    examples.append(parser.example(record, source))
                except BadRow as bad:
                    skip_or_raise(bad, source, skip_bad_rows, skipped)
    except READ_ERRORS as exc:
        if not compression:
            raise FinegrainError(f"{name}: cannot read the file ({exc})") from None
        with open(p, "rb") as raw:
            start = raw.read(6)
        if not any(start.startswith(magic) for magic in _COMPRESSED_MAGIC[compression]):
            plain = p.name[: -len(p.suffix)]
            raise FinegrainError(f"{name}: not {compression}-compressed; rename it to {plain}") from None
        # A truncated or corrupt archive fails mid-stream, after some rows were read.
        raise FinegrainError(f"{name}: not a valid {compression} file ({exc}); re-create or re-download it") from None

    if rows == 0:
        raise FinegrainError(f"{name}: no rows (only a header or blank lines); add examples or fix the path")
    if not examples:
        which = "the only row was" if rows == 1 else f"all {rows} rows were"
        raise FinegrainError(f"{name}: {which} skipped (first: {skipped[0]}); fix the file or the field names")
    return ReadResult(examples, skipped, parser.fields)


def check_labels(
    examples: Sequence[Example],
    known_labels: Iterable[str],
    path: str | os.PathLike[str] | None = None,
    skip_bad_rows: bool = False,
) -> ReadResult:
    """Check that every label is one the model knows (the training labels).

    A validation or test label the model was never trained on would silently count as an
    error it could not avoid; better to say so. Examples with `label=None` or numeric
    labels pass unchecked.

    Args:
        examples: examples from `read_examples`.
        known_labels: the label set (usually from the training data).
        path: the file the examples came from, for the message when all are dropped.
        skip_bad_rows: drop examples with an unknown label instead of raising.

    Returns:
        The examples that passed and one line per dropped example.

    Raises:
        FinegrainError: an unknown label (naming `file:line` and the known labels), no label
            of the file known at all (another naming of the classes), or every example dropped.
    """
    known = list(known_labels)
    known_set = set(known)
    shown = [_one_line(label) for label in known]
    given = [_label_list(ex) for ex in examples]
    theirs = {label for labels in given for label in labels}
    if theirs and not theirs & known_set and not skip_bad_rows:  # another naming of the classes, not bad rows
        where = path if path is not None else examples[0].source.rsplit(":", 1)[0]
        mine = sorted(_one_line(label) for label in theirs)
        raise FinegrainError(f"{where}: none of its labels ({_short_list(mine)}) is one the model was trained on "
                             f"({_short_list(shown)}); write them as the training data does")
    kept: list[Example] = []
    skipped: list[str] = []
    for ex, labels in zip(examples, given):
        unknown = [label for label in labels if label not in known_set]
        if not unknown:
            kept.append(ex)
            continue
        reason = f"{ex.source}: unknown label {_clip(unknown[0])!r} (known: {_short_list(shown)})"
        close = difflib.get_close_matches(unknown[0], known, n=1)
        if close:
            reason += f"; did you mean {_clip(close[0])!r}?"
        if not skip_bad_rows:
            raise FinegrainError(f"{reason}; add it to the training data, {SKIP_HINT}")
        skipped.append(reason)
    if examples and not kept:
        where = f"{path}: " if path is not None else ""
        raise FinegrainError(f"{where}every example has a label unknown to the model, e.g. {skipped[0]}")
    return ReadResult(kept, skipped)


def _one_line(label: str) -> str:
    """A label as a message shows it: cut short, on one line (a whole text, where the columns are swapped)."""
    return _clip(label.replace("\n", " "))


def _label_list(example: Example) -> list[str]:
    """The class labels of `example`: none for an unlabelled or numeric one."""
    label = example.label
    return label if isinstance(label, list) else [label] if isinstance(label, str) else []


def write_examples(path: str | os.PathLike[str], examples: Iterable[Example], label_separator: str = "|") -> int:
    """Write examples to a `.jsonl`, `.csv` or `.tsv` file (optionally `.gz`/`.bz2`/`.xz`), atomically.

    Each row holds `text`, `label` (omitted when `None`) and the `extra` fields. In CSV a
    multi-label list is joined with `label_separator`. `read_examples` reads the file back.

    Args:
        path: the output file; its extension picks the format.
        examples: the examples to write.
        label_separator: joins multi-label lists in CSV/TSV.

    Returns:
        The number of examples written.
    """
    p = Path(path)
    fmt, _, compression = _detect_format(p, str(path), None)
    rows: list[dict[str, Any]] = []
    for ex in examples:
        row: dict[str, Any] = {"text": ex.text}
        if ex.label is not None:
            row["label"] = ex.label
        for key, value in ex.extra.items():
            row.setdefault(key, value)
        rows.append(row)
    if fmt in ("jsonl", "json"):
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    else:
        columns: dict[str, None] = {}
        for row in rows:
            columns.update(dict.fromkeys(row))
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, list(columns), delimiter="\t" if fmt == "tsv" else ",", lineterminator="\n")
        writer.writeheader()
        for row in rows:
            if isinstance(row.get("label"), list):
                row["label"] = label_separator.join(row["label"])
            writer.writerow(row)
        text = buffer.getvalue()
    data = text.encode("utf-8")
    if compression:
        data = next(c for c in COMPRESSION.values() if c[0] == compression)[2](data)
    atomic_write_bytes(p, data)
    return len(rows)


# --- format detection -------------------------------------------------------------------


def _detect_format(p: Path, name: str, override: str | None) -> tuple[str, Callable[..., IO[bytes]], str | None]:
    suffixes = [s.lower() for s in p.suffixes]
    opener: Callable[..., IO[bytes]] = open
    compression = None
    if suffixes and suffixes[-1] in COMPRESSION:
        compression, opener, _ = COMPRESSION[suffixes.pop()]
    if override is not None:
        if override not in ("jsonl", "json", "csv", "tsv"):
            raise FinegrainError(f"{name}: unknown data format {override!r}; use jsonl, json, csv or tsv")
        return override, opener, compression
    ext = suffixes[-1] if suffixes else ""
    if ext in TAGGED_WORD_EXTENSIONS:
        raise FinegrainError(f"{name}: {ext} holds tagged words, which task: ner reads (--set task=ner); "
                             f"texts with labels come as {_SUPPORTED}")
    if ext not in _FORMATS:
        shown = f"extension {ext!r}" if ext else "no extension"
        raise FinegrainError(f"{name}: {shown}, so the format is unknown; use {_SUPPORTED}")
    return _FORMATS[ext], opener, compression


_MAGIC: list[tuple[bytes, str, str | None]] = [
    (b"\x1f\x8b", "gzip-compressed", ".gz"),
    (b"\xfd7zXZ\x00", "xz-compressed", ".xz"),
    (b"PK\x03\x04", "a ZIP archive (an .xlsx workbook is one)", None),
    (b"PAR1", "a Parquet file", None),
    (b"SQLite format 3\x00", "an SQLite database", None),
    (b"%PDF", "a PDF document", None),
    (b"\xd0\xcf\x11\xe0", "an old Office document (.xls/.doc)", None),
]


def _sniff(p: Path, name: str, opener: Callable[..., IO[bytes]], compression: str | None, fmt: str) -> str:
    """Check the start of the file is the text format its name promises; return that start."""
    with opener(p, "rb") as f:
        head = f.read(_SNIFF_BYTES)
    described = {"jsonl": "JSON lines", "json": "JSON", "csv": "CSV", "tsv": "TSV"}[fmt]
    if not head.strip():
        raise FinegrainError(f"{name}: empty file; expected {described} with examples")
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise FinegrainError(f"{name}: UTF-16 encoded; save it as UTF-8")
    is_bz2 = head[:3] == b"BZh" and head[4:10] == b"1AY&SY"
    for magic, what, ext in [*_MAGIC, (head[:10] if is_bz2 else b"\x00" * 11, "bzip2-compressed", ".bz2")]:
        if head.startswith(magic):
            if ext is not None:
                rename = p.name if compression else p.name + ext
                raise FinegrainError(f"{name}: {what} but not named so; rename it to {rename}")
            raise FinegrainError(f"{name}: {what}, not {described} text; export it as {described} (UTF-8)")
    nul = head.find(b"\x00")
    if nul >= 0:
        raise FinegrainError(f"{name}: binary data (a NUL byte at byte {nul}), not {described} text")
    text = head.decode("utf-8", errors="replace").lstrip("\ufeff")
    if text.count("\ufffd") > len(text) / 4:  # a latin-1 file has a few such bytes, binary data a third or more
        raise FinegrainError(f"{name}: binary data (most bytes are not UTF-8 text), not {described} text")
    start = text.lstrip()[:1]
    first_line = text.lstrip().split("\n", 1)[0].strip()
    if fmt in ("csv", "tsv") and start in ("{", "["):
        kind, rename = ("a JSON array", ".json") if start == "[" else ("JSON lines", ".jsonl")
        raise FinegrainError(f"{name}: looks like {kind}, not {described}; rename it to {p.stem}{rename}")
    if fmt == "jsonl" and start == "[":
        raise FinegrainError(
            f"{name}: is a JSON array, not JSON lines (one object per line); rename it to {p.stem}.json"
        )
    if fmt == "jsonl" and start != "{":
        looks = "CSV" if "," in first_line else "TSV" if "\t" in first_line else "plain text"
        hint = f"rename it to {p.stem}.{looks.lower()}" if looks != "plain text" else "write one JSON object per line"
        raise FinegrainError(f"{name}:1: not a JSON object ({_clip(first_line)!r}); this looks like {looks}, {hint}")
    if fmt == "json" and start not in ("{", "["):
        raise FinegrainError(
            f"{name}:1: not JSON ({_clip(first_line)!r}); expected an array of objects or one object per line"
        )
    if fmt in ("jsonl", "json") and first_line == "{":
        raise FinegrainError(
            f"{name}:1: a JSON object spread over several lines; write one object per line (JSON lines)"
        )
    return text


# --- record readers: yield (line, record dict or BadRow) -------------------------------

Record = tuple[int, "dict[str, Any] | BadRow"]


def _read_jsonl(stream: IO[str], name: str, head: str, parser: _RowParser) -> Iterator[Record]:
    for line_number, raw in enumerate(stream, 1):
        line = raw.strip()
        if not line:
            continue
        yield line_number, _parse_json_line(line, parser)


def _parse_json_line(line: str, parser: _RowParser) -> dict[str, Any] | BadRow:
    bad = _UNDECODABLE.search(line)
    if bad:
        return _undecodable(bad)
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        return BadRow(f"invalid JSON ({exc.msg} at column {exc.colno})")
    if not isinstance(obj, dict):
        return BadRow(f"expected a JSON object, got {_json_type(obj)}")
    parser.see_fields(obj)
    return obj


def _read_json(stream: IO[str], name: str, head: str, parser: _RowParser) -> Iterator[Record]:
    if head.lstrip()[:1] == "{":
        yield from _read_jsonl(stream, name, head, parser)
        return
    text = stream.read()
    decoder = json.JSONDecoder()
    pos = _skip_ws(text, text.index("[") + 1)
    line, counted = 1, 0

    def line_at(offset: int) -> int:
        # Count newlines incrementally: the array is walked once, left to right.
        nonlocal line, counted
        line += text.count("\n", counted, offset)
        counted = offset
        return line

    if text[pos : pos + 1] == "]":
        return
    while True:
        try:
            obj, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            # Inside an array there is no next line to resume at: the rest is unreadable.
            raise FinegrainError(f"{name}:{exc.lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from None
        if isinstance(obj, dict):
            parser.see_fields(obj)
            yield line_at(pos), obj
        else:
            yield line_at(pos), BadRow(f"expected a JSON object, got {_json_type(obj)}")
        pos = _skip_ws(text, end)
        if text[pos : pos + 1] == ",":
            pos = _skip_ws(text, pos + 1)
        elif text[pos : pos + 1] == "]":
            return
        else:
            raise FinegrainError(f"{name}:{line_at(pos)}: invalid JSON (expected ',' or ']' after an array item)")


def _read_delimited(stream: IO[str], name: str, delimiter: str, parser: _RowParser) -> Iterator[Record]:
    reader = csv.reader(stream, delimiter=delimiter)
    try:
        header = next(reader)
    except StopIteration:
        return
    except csv.Error as exc:
        raise FinegrainError(f"{name}:1: unreadable header ({exc})") from None
    header = [column.strip() for column in header]
    parser.set_header(header, delimiter)
    previous_end = reader.line_num
    while True:
        start = previous_end + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise FinegrainError(f"{name}:{reader.line_num}: unreadable CSV ({exc})") from None
        previous_end = reader.line_num
        if not row or (len(row) == 1 and not row[0].strip()):
            continue
        if len(row) > len(header) and not any(cell.strip() for cell in row[len(header) :]):
            row = row[: len(header)]  # trailing delimiters, as spreadsheets write them
        if len(row) != len(header):
            yield (
                start,
                BadRow(f"{len(row)} fields but the header has {len(header)}; quote fields that contain {delimiter!r}"),
            )
            continue
        yield start, dict(zip(header, row))


def _read_csv(stream: IO[str], name: str, head: str, parser: _RowParser) -> Iterator[Record]:
    return _read_delimited(stream, name, ",", parser)


def _read_tsv(stream: IO[str], name: str, head: str, parser: _RowParser) -> Iterator[Record]:
    return _read_delimited(stream, name, "\t", parser)


_RECORD_READERS: dict[str, Callable[[IO[str], str, str, _RowParser], Iterator[Record]]] = {
    "jsonl": _read_jsonl,
    "json": _read_json,
    "csv": _read_csv,
    "tsv": _read_tsv,
}


# --- turning a record into an Example ---------------------------------------------------


class _RowParser:
    """Turns one record (a dict of fields) into an `Example`, or raises `BadRow`."""

    def __init__(
        self,
        name: str,
        text_field: str,
        label_field: str,
        multi_label: bool,
        require_label: bool,
        regression: bool,
        label_separator: str,
    ) -> None:
        self.name = name
        self.text_field = text_field
        self.label_field = label_field
        self.multi_label = multi_label
        self.require_label = require_label
        self.regression = regression
        self.label_separator = label_separator
        self.fields: list[str] = []
        self.seen: set[str] = set()
        self.is_csv = False

    def set_header(self, header: list[str], delimiter: str) -> None:
        """Check a CSV header once: a missing column is the file's problem, not a row's."""
        self.is_csv = True
        self.fields = header
        self.seen = set(header)
        needed = [(self.text_field, "text_field")]
        if self.require_label:
            needed.append((self.label_field, "label_field"))
        for column, key in needed:
            if header.count(column) > 1:
                raise FinegrainError(f"{self.name}:1: column {column!r} appears twice in the header; rename one")
            if column in header:
                continue
            message = f"{self.name}:1: no column {column!r} in the header (columns: {_short_list(header)})"
            other = next((sep for sep in ("\t", ",", ";") if sep != delimiter and len(header) == 1 and sep in header[0]), None)
            if other in ("\t", ","):
                fmt = "TSV" if other == "\t" else "CSV"
                message += f"; the header has {other!r} separators, is this {fmt}? rename the file"
            elif other == ";":
                message += "; the header has ';' separators: save the file with ',' separators (.csv) or tabs (.tsv)"
            else:
                close = difflib.get_close_matches(column, header, n=1, cutoff=0.6)
                if close:
                    message += f"; did you mean {close[0]!r}?"
                message += f"; rename that column to {column!r} (or, to train, set data.{key})"
                if not close and not {self.text_field, self.label_field} & set(header):  # no header line at all?
                    order = [self.text_field, self.label_field][: len(header)]
                    if len(header) == 2 and len(header[0]) < len(header[1]):
                        order.reverse()  # line 1's longer cell is its text
                    message += f", or if line 1 is a row, add a first line {delimiter.join(order)!r}"
            raise FinegrainError(message)

    def see_fields(self, obj: dict[str, Any]) -> None:
        if not self.fields:
            self.fields = list(obj)
        self.seen.update(obj)

    def _missing(self, column: str, key: str, obj: dict[str, Any]) -> BadRow:
        reason = f"missing field {column!r} (fields: {_short_list(list(obj))})"
        if column in self.seen:
            return BadRow(reason)
        # Never seen in any row so far: the field name is wrong, not this row.
        close = difflib.get_close_matches(column, list(obj), n=1, cutoff=0.6)
        return BadRow(reason, hint=(f"did you mean {close[0]!r}? " if close else "")
                      + f"rename that field to {column!r} (or, to train, set data.{key})")

    def example(self, obj: dict[str, Any], source: str) -> Example:
        if self.text_field not in obj:
            raise self._missing(self.text_field, "text_field", obj)
        text = obj[self.text_field]
        if isinstance(text, bool) or not isinstance(text, (str, int, float)):
            raise BadRow(f"field {self.text_field!r} is {_json_type(text)}, expected a string")
        text = str(text)
        bad = _UNDECODABLE.search(text)
        if bad:
            raise _undecodable(bad, self.text_field)
        if not text.strip():
            raise BadRow(f"empty text in field {self.text_field!r}")

        if self.label_field not in obj:
            if self.require_label:
                raise self._missing(self.label_field, "label_field", obj)
            label: Label = None
        else:
            label = self._label(obj[self.label_field])
        extra = {k: v for k, v in obj.items() if k != self.text_field and k != self.label_field}
        return Example(text=text, label=label, source=source, extra=extra)

    def _label(self, value: Any) -> Label:
        field_name = self.label_field
        if isinstance(value, str):
            bad = _UNDECODABLE.search(value)
            if bad:
                raise _undecodable(bad, field_name)
            value = value.strip()
        missing = value is None or (value == "" and not self.multi_label)
        if missing:
            if self.require_label:
                raise BadRow(f"empty label in field {field_name!r}")
            return None
        if self.regression:
            if isinstance(value, bool) or not isinstance(value, (str, int, float)):
                raise BadRow(f"label is {_json_type(value)}, expected a number (regression)")
            try:
                number = float(value)
            except ValueError:
                raise BadRow(f"label {_clip(value)!r} is not a number (regression)") from None
            if not math.isfinite(number):
                raise BadRow(f"label {value!r} is not a finite number")
            return number
        if self.multi_label:
            if isinstance(value, str):
                parts = [part.strip() for part in value.split(self.label_separator)]
                return list(dict.fromkeys(part for part in parts if part))
            items = value if isinstance(value, list) else [value]
            labels = [_class_name(item, field_name) for item in items]
            return list(dict.fromkeys(labels))
        if isinstance(value, list):
            raise BadRow(
                f"label is a list {_clip(json.dumps(value))}; set data.multi_label: true for multi-label data",
                hint=SKIP_HINT,
            )
        return _class_name(value, field_name)


def _class_name(value: Any, field_name: str) -> str:
    """A class label as a string: JSON `1`, `1.0` and CSV `"1"` must all be the same class."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise BadRow(f"label {value!r} in field {field_name!r} is not a class name")
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, str):
        if not value.strip():
            raise BadRow(f"empty label in field {field_name!r}")
        return value.strip()
    raise BadRow(f"label in field {field_name!r} is {_json_type(value)}, expected a string")


# --- small helpers ----------------------------------------------------------------------


def _undecodable(match: re.Match[str], field_name: str | None = None) -> BadRow:
    byte = ord(match.group()) - 0xDC00
    where = f"in field {field_name!r}" if field_name else f"at column {match.start() + 1}"
    return BadRow(
        f"byte 0x{byte:02x} {where} is not UTF-8", hint=f"re-save the file as UTF-8, or {SKIP}"
    )


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return "a string"


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _clip(value: Any, width: int = 40) -> str:
    text = str(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def _short_list(items: Sequence[str], limit: int = 12) -> str:
    shown = ", ".join(str(item) for item in items[:limit])
    return shown if len(items) <= limit else f"{shown}, ... ({len(items)} in all)"


def without_labels(examples: list) -> list:
    """Copies of `examples` with no label (`label`, NER's `tags`): what a model predicts for."""
    copies = []
    for example in examples:
        example = copy.copy(example)
        for name in ("label", "tags"):
            if vars(example).get(name) is not None:  # a field, not a property derived from one (TokenExample.label)
                setattr(example, name, None)
        copies.append(example)
    return copies


def named_labels(result: ReadResult, names: Sequence[str] | None) -> ReadResult:
    """`result` with its examples' label ids (Hugging Face's ClassLabel: `"label": 2`) as the names of
    `data.label_names` (`names`; None: as it is). An id past the list, or a label that is no id, is
    the config's to fix, not the row's: an error, never a skipped row."""
    if not names:
        return result

    def name(label: str, source: str) -> str:
        try:
            value = float(label)
        except ValueError:
            value = None
        if value is None or not value.is_integer() or not 0 <= value < len(names):
            raise FinegrainError(f"{source}: label {label!r} is not an id of data.label_names, which names "
                                 f"{len(names)} (ids 0 to {len(names) - 1}); list the name of every id there, or "
                                 "drop data.label_names for labels written as names")
        return names[int(value)]

    examples = []
    for example in result.examples:
        example, label = copy.copy(example), example.label
        if isinstance(label, list):
            example.label = [name(part, example.source) for part in label]
        elif isinstance(label, str):
            example.label = name(label, example.source)
        examples.append(example)
    return ReadResult(examples, result.skipped, result.fields)
