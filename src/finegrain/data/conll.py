"""Read word-tagged examples for token classification (NER): CoNLL columns and JSON lines.

Formats, picked by extension (after an optional `.gz`/`.bz2`/`.xz`):
- CoNLL columns (`.conll`, `.txt`, `.tsv`, `.iob`, `.bio`, `.bioes`, `.tags`): one word a
  line, columns split by tabs (or by spaces when a line has no tab), the word in the first
  column and the tag in `tag_column` (default the last); a blank line ends a sentence;
  `-DOCSTART-` lines are skipped. CoNLL-2003 (`EU NNP B-NP B-ORG`) and WNUT (`word<TAB>tag`)
  both read as they are.
- JSON lines (`.jsonl`, `.json`), each line either
  `{"tokens": ["EU", "rejects", ...], "tags": ["B-ORG", "O", ...]}` or
  `{"text": "EU rejects ...", "entities": [{"start": 0, "end": 2, "type": "ORG"}]}` with
  character offsets (`end` exclusive; `label` is accepted for `type`). Span texts are split
  into words as raw text is at prediction time (`split_words`: punctuation apart, URLs,
  @mentions and #hashtags whole) and also at every entity boundary, so an entity never
  shares a word with its neighbour; offsets stay those of the original text.

Text without spaces between words (Chinese, Japanese) reads with `char_level=True`: words
are joined with no separator, and span texts become one word per character.

With `scheme="plain"` a tag is whatever the file holds (`NNP`, `B-NP`), one per word: parts of
speech, chunks or error tags, read and predicted as they are, with no entities. Plain tags come
in CoNLL columns or JSON `tags`, not entity spans.

Every problem is one line naming `file:line`: spans outside the text or overlapping, tags
that break the scheme (`I-PER` after `O` in BIO), a tag count that differs from the word
count. `repair=True` reads broken tag sequences the way conlleval does (`O I-PER` becomes
`O B-PER`, recorded in `repaired`); `skip_bad_rows=True` drops bad sentences instead.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from itertools import accumulate
from operator import add
from pathlib import Path
from typing import Any

from finegrain.data import pipeline
from finegrain.data.files import SKIP_HINT, BadRow, check_file, content_suffix, open_text, reading, skip_or_raise
from finegrain.data.pipeline import Splits, bundled_loader
from finegrain.data.readers import TAGGED_WORD_EXTENSIONS, Example
from finegrain.data.split import stratified_split
from finegrain.errors import FinegrainError
from finegrain.tags import (
    PLAIN,
    check_tags,
    entities_to_tags,
    normalize_scheme,
    parse_tag,
    repair_tags,
    tags_to_entities,
)

__all__ = [
    "TokenExample",
    "TokenReadResult",
    "TokenSplits",
    "entity_types",
    "join_words",
    "load_token_splits",
    "read_conll",
    "read_token_examples",
    "read_token_jsonl",
    "span_example",
    "split_token_examples",
    "split_words",
    "tag_types",
    "write_token_examples",
]

_COLUMN_EXTENSIONS = TAGGED_WORD_EXTENSIONS | {".txt", ".tsv"}
_JSON_EXTENSIONS = {".jsonl", ".json", ".ndjson"}
# Words for raw text at prediction time: URLs, @mentions and #hashtags whole, clitics ('s, n't)
# apart, every other punctuation mark on its own, as tweet and news NER data are tokenized.
_WORD = re.compile(r"https?://\S+|www\.\S+|[@#]?\w+(?=n't\b)|n't\b|[@#]?\w+|'\w+|[^\w\s]", re.UNICODE)


@dataclass
class TokenExample:
    """One sentence of words with one tag each (or no tags, for prediction).

    Attributes:
        words: the words, each non-empty.
        tags: one tag per word as the file has them (any scheme), or None.
        source: `file:line` of the sentence's first line.
        text: the sentence as text: the original for span-annotated JSON, otherwise the
            words joined by one space (none with `char_level`).
        offsets: (start, end) of each word in `text`, `end` exclusive.
        extra: the row's other fields (JSON), or data such as the bundled datasets' `split`.
    """

    words: list[str]
    tags: list[str] | None
    source: str
    text: str = ""
    offsets: list[tuple[int, int]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.offsets:
            self.text, self.offsets = join_words(self.words)

    @classmethod
    def from_words(
        cls, words: Sequence[str], tags: Sequence[str] | None, source: str, char_level: bool = False, **extra: Any
    ) -> TokenExample:
        """Words joined by a space (nothing with `char_level`) into `text`, offsets computed."""
        text, offsets = join_words(words, "" if char_level else " ")
        return cls(list(words), None if tags is None else list(tags), source, text, offsets, dict(extra))

    @classmethod
    def from_text(cls, text: str, source: str = "input", char_level: bool = False) -> TokenExample:
        """An unlabelled example from raw text, split by `split_words`."""
        spans = split_words(text, char_level)
        if not spans:
            raise FinegrainError(f"{source}: empty text; every input needs some words")
        return cls([text[s:e] for s, e in spans], None, source, text, spans)

    @property
    def label(self) -> list[str] | None:
        """The tags, under the name the classification code uses for gold labels."""
        return self.tags

    @property
    def entities(self) -> list[dict[str, Any]]:
        """The tagged entities (default mode): `type`, `start`/`end` characters, `text`, `words` [first, end)."""
        if self.tags is None:
            return []
        return [
            {
                "type": type_,
                "start": self.offsets[first][0],
                "end": self.offsets[end - 1][1],
                "text": self.text[self.offsets[first][0] : self.offsets[end - 1][1]],
                "words": [first, end],
            }
            for type_, first, end in tags_to_entities(self.tags)
        ]


@dataclass
class TokenReadResult:
    """What a reader found: the examples, and one `file:line: reason` per skipped or repaired sentence."""

    examples: list[TokenExample]
    skipped: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)


def join_words(words: Sequence[str], separator: str = " ") -> tuple[str, list[tuple[int, int]]]:
    """The words joined by `separator`, and each word's (start, end) in the result."""
    lengths = list(map(len, words))
    gap = len(separator)
    starts = list(accumulate((n + gap for n in lengths[:-1]), initial=0)) if words else []
    return separator.join(words), list(zip(starts, map(add, starts, lengths)))


def split_words(text: str, char_level: bool = False) -> list[tuple[int, int]]:
    """Word (start, end) offsets of raw text: punctuation apart, URLs/@mentions/#tags whole; or each character."""
    if char_level:
        return [(i, i + 1) for i, ch in enumerate(text) if not ch.isspace()]
    return [m.span() for m in _WORD.finditer(text)]


# --- dispatch ---------------------------------------------------------------------------


def read_token_examples(
    path: str | os.PathLike[str],
    *,
    scheme: str = "BIO",
    tag_column: int = -1,
    char_level: bool = False,
    repair: bool = False,
    skip_bad_rows: bool = False,
    require_tags: bool = True,
    text_field: str = "text",
    tokens_field: str = "tokens",
    tags_field: str = "tags",
    entities_field: str = "entities",
    format: str | None = None,
    tag_names: Sequence[str] | None = None,
) -> TokenReadResult:
    """Read word-tagged sentences from a CoNLL-column or JSON-lines file (see the module docstring).

    Args:
        path: the file; its extension picks the format unless `format` ("conll" or "jsonl") is given.
        scheme: the tagging scheme of the file (BIO/IOB2, IOB1, BIOES/IOBES, IO), checked per sentence.
        tag_column: CoNLL: the column of the tag (0-based; negative counts from the end).
        char_level: words are written without spaces between them (Chinese, Japanese).
        repair: read tags that break `scheme` as conlleval does instead of failing.
        skip_bad_rows: drop bad sentences (listed in `skipped`) instead of failing on the first.
        require_tags: when False, sentences without tags are read with `tags=None` (for prediction).
        text_field, tokens_field, tags_field, entities_field: JSON keys.
        tag_names: JSON lines whose tags are ids (Hugging Face's `ner_tags`): the tag of each id.

    Returns:
        The sentences in file order with the reasons some were skipped or repaired.

    Raises:
        FinegrainError: a missing or unreadable file, or (without `skip_bad_rows`) a bad sentence,
            named by `file:line`.
    """
    scheme = _scheme(scheme, path)
    fmt = format or _format(check_file(path, "a CoNLL or JSON-lines file"))
    common = dict(
        scheme=scheme, char_level=char_level, repair=repair, skip_bad_rows=skip_bad_rows, require_tags=require_tags
    )
    if fmt == "conll":
        return read_conll(path, tag_column=tag_column, **common)
    if fmt == "jsonl":
        return read_token_jsonl(
            path,
            text_field=text_field,
            tokens_field=tokens_field,
            tags_field=tags_field,
            entities_field=entities_field,
            tag_names=tag_names,
            **common,
        )
    raise FinegrainError(f"{path}: unknown format {fmt!r}; use conll or jsonl")


def _scheme(scheme: str, path: Any) -> str:
    try:
        return normalize_scheme(scheme)
    except ValueError as exc:
        raise FinegrainError(f"data.scheme: {exc}") from None


def _format(p: Path) -> str:
    ext = content_suffix(p)
    if ext in _COLUMN_EXTENSIONS:
        return "conll"
    if ext in _JSON_EXTENSIONS:
        return "jsonl"
    shown = f"extension {ext!r}" if ext else "no extension"
    raise FinegrainError(
        f"{p}: {shown}, so the format is unknown; NER data is CoNLL columns (.conll, .txt, .tsv, .iob) "
        "or JSON lines (.jsonl), optionally .gz/.bz2/.xz"
    )


def _lines(path: str | os.PathLike[str]) -> Iterator[tuple[int, str]]:
    check_file(path, "a CoNLL or JSON-lines file")
    with reading(path), open_text(path) as f:
        yield from enumerate(f, 1)


class _Collector:
    """Checks each sentence's tags against the scheme and gathers examples, skips and repairs."""

    def __init__(self, path: Any, scheme: str, repair: bool, skip_bad_rows: bool):
        self.path, self.scheme, self.repair, self.skip_bad_rows = str(path), scheme, repair, skip_bad_rows
        self.result = TokenReadResult([])
        self.rows = 0

    def add(self, build) -> None:
        """`build()` returns an example or raises BadRow."""
        self.rows += 1
        try:
            example = build()
            if example.tags is not None:
                self._check(example)
            self.result.examples.append(example)
        except BadRow as bad:
            skip_or_raise(bad, f"{self.path}:{bad.line}", self.skip_bad_rows, self.result.skipped)

    def _check(self, example: TokenExample) -> None:
        line = int(example.source.rsplit(":", 1)[1])
        for tag in example.tags if self.scheme != PLAIN else ():
            try:
                parse_tag(tag)
            except ValueError as exc:
                at = _word_line(example, example.tags.index(tag), line)
                hint = ("for a CoNLL file, is data.tag_column right? tags of one word each (parts of speech, chunks) "
                        f"read as they are with data.scheme: plain (--set data.scheme=plain); else {SKIP_HINT}")
                raise BadRow(str(exc), at, hint) from None
        problems = check_tags(example.tags, self.scheme)
        if not problems:
            return
        index, reason = problems[0]
        at = _word_line(example, index, line)
        if self.scheme == PLAIN:  # nothing to repair: a word without a tag
            raise BadRow.at(at, f"word {example.words[index]!r}: {reason}")
        if not self.repair:
            more = f" ({len(problems)} problems in the sentence)" if len(problems) > 1 else ""
            raise BadRow.at(
                at,
                f"word {example.words[index]!r}: {reason}{more}; "
                "or set data.repair_tags: true to read it as conlleval does",
            )
        fixed = repair_tags(example.tags, self.scheme)
        self.result.repaired.append(
            f"{self.path}:{at}: {reason}; read as {' '.join(fixed[max(0, index - 1) : index + 2])}"
        )
        example.tags = fixed

    def finish(self) -> TokenReadResult:
        if self.rows == 0:
            raise FinegrainError(
                f"{self.path}: no sentences (empty file or only blank lines); add examples or fix the path"
            )
        if not self.result.examples:
            raise FinegrainError(
                f"{self.path}: every sentence was skipped (first: {self.result.skipped[0]}); fix the file"
            )
        return self.result


def _word_line(example: TokenExample, index: int, line: int) -> int:
    # CoNLL: each word is on its own line, so point at the word's line.
    lines = example.extra.get("_lines")
    return lines[index] if lines else line


# --- CoNLL columns ----------------------------------------------------------------------


def read_conll(
    path: str | os.PathLike[str],
    *,
    tag_column: int = -1,
    scheme: str = "BIO",
    char_level: bool = False,
    repair: bool = False,
    skip_bad_rows: bool = False,
    require_tags: bool = True,
) -> TokenReadResult:
    """Read CoNLL-style columns: a word and its tag per line, a blank line between sentences.

    With `require_tags=False`, a sentence whose lines have a single column is read untagged.
    """
    scheme = _scheme(scheme, path)
    collector = _Collector(path, scheme, repair, skip_bad_rows)
    rows: list[tuple[int, list[str]]] = []

    def build(rows: list[tuple[int, list[str]]]) -> TokenExample:
        first_line = rows[0][0]
        widths = {len(cells) for _, cells in rows}
        words = [cells[0] for _, cells in rows]
        if widths == {1} and not require_tags:
            tags = None
        else:
            tags = []
            for line, cells in rows:
                try:
                    tags.append(cells[tag_column])
                except IndexError:
                    raise BadRow.at(
                        line, f"{len(cells)} column(s) but data.tag_column is {tag_column}; a line is: word ... tag"
                    ) from None
                if len(cells) < 2:
                    raise BadRow.at(line, f"only one column ({cells[0]!r}); a line is: word ... tag")
        example = TokenExample.from_words(words, tags, f"{path}:{first_line}", char_level)
        example.extra["_lines"] = [line for line, _ in rows]
        return example

    for line_number, raw in _lines(path):
        line = raw.rstrip("\r\n")
        if not line.strip():
            if rows:
                collector.add(lambda rows=rows: build(rows))
                rows = []
            continue
        cells = line.split("\t") if "\t" in line else line.split()
        cells = [c.strip() for c in cells]
        if cells[0] == "-DOCSTART-":
            continue
        if not cells[0]:
            collector.add(lambda n=line_number: _raise(BadRow.at(n, "empty word in the first column")))
            continue
        rows.append((line_number, cells))
    if rows:
        collector.add(lambda rows=rows: build(rows))
    result = collector.finish()
    for example in result.examples:
        example.extra.pop("_lines", None)
    return result


def _raise(exc: Exception):
    raise exc


# --- JSON lines -------------------------------------------------------------------------


def read_token_jsonl(
    path: str | os.PathLike[str],
    *,
    scheme: str = "BIO",
    char_level: bool = False,
    repair: bool = False,
    skip_bad_rows: bool = False,
    require_tags: bool = True,
    text_field: str = "text",
    tokens_field: str = "tokens",
    tags_field: str = "tags",
    entities_field: str = "entities",
    tag_names: Sequence[str] | None = None,
) -> TokenReadResult:
    """Read JSON lines of `{"tokens": [...], "tags": [...]}` or `{"text": ..., "entities": [...]}`.

    Hugging Face's token-classification sets write `ner_tags`, tag ids, beside `tokens`: `ner_tags`
    is read where there is no `tags`, and ids become tags through `tag_names` (the set's
    `features["ner_tags"].feature.names`, in id order)."""
    scheme = _scheme(scheme, path)
    collector = _Collector(path, scheme, repair, skip_bad_rows)
    fields = (text_field, tokens_field, tags_field, entities_field)
    for line_number, raw in _lines(path):
        line = raw.strip()
        if not line:
            continue
        collector.add(
            lambda n=line_number, line=line: _json_example(
                line, n, str(path), fields, char_level, require_tags, tag_names, spans=scheme != PLAIN
            )
        )
    return collector.finish()


HF_TAGS = "ner_tags"  # Hugging Face's key for a sentence's tag ids


def _json_example(
    line: str, n: int, path: str, fields: tuple[str, str, str, str], char_level: bool, require_tags: bool,
    tag_names: Sequence[str] | None = None, spans: bool = True,
) -> TokenExample:
    text_field, tokens_field, tags_field, entities_field = fields
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise BadRow.at(n, f"invalid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise BadRow.at(n, "expected a JSON object per line")
    source = f"{path}:{n}"
    if tags_field not in obj and HF_TAGS in obj:
        tags_field = HF_TAGS
    extra = {k: v for k, v in obj.items() if k not in (*fields, tags_field)}
    if tokens_field in obj:
        words = obj[tokens_field]
        if not isinstance(words, list) or not words or not all(isinstance(w, str) and w.strip() for w in words):
            raise BadRow.at(n, f"{tokens_field!r} must be a non-empty list of non-empty strings")
        words = [w.strip() for w in words]
        tags = obj.get(tags_field)
        if isinstance(tags, list) and tags and all(isinstance(t, int) and not isinstance(t, bool) for t in tags):
            # ids without names are no matter where no tag is read (predict)
            tags = _named_tags(tags, tag_names, tags_field, f"{path}:{n}") if require_tags or tag_names else None
        if tags is None:
            if require_tags:
                raise BadRow.at(n, f"no {tags_field!r} next to {tokens_field!r} (fields: {', '.join(obj)})")
        elif not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise BadRow.at(
                n, f"{tags_field!r} must be a list of tag strings such as 'B-PER', or of tag ids with data.tag_names"
            )
        elif len(tags) != len(words):
            raise BadRow.at(n, f"{len(words)} tokens but {len(tags)} tags")
        example = TokenExample.from_words(
            words, None if tags is None else [t.strip() for t in tags], source, char_level
        )
        example.extra.update(extra)
        return example
    if text_field not in obj:
        raise BadRow.at(
            n,
            f"neither {tokens_field!r} (with {tags_field!r}) nor {text_field!r} (with {entities_field!r}); "
            f"fields: {', '.join(obj) or 'none'}",
        )
    text = obj[text_field]
    if not isinstance(text, str) or not text.strip():
        raise BadRow.at(n, f"{text_field!r} must be a non-empty string")
    if not spans and obj.get(entities_field) is not None:
        raise BadRow.at(n, f"{entities_field!r} spans are entities, and data.scheme: plain reads a tag per word: "
                        f"write {tokens_field!r} with {tags_field!r}, or use data.scheme: BIO")
    spans = obj.get(entities_field)
    if spans is None and require_tags:
        raise BadRow.at(n, f"no {entities_field!r} next to {text_field!r}; write [] for a text without entities")
    entities = _check_spans(spans or [], text, n, entities_field) if spans is not None else []
    example = span_example(text, entities, source, char_level, tagged=spans is not None)
    example.extra.update(extra)
    return example


def _named_tags(ids: list[int], tag_names: Sequence[str] | None, key: str, where: str) -> list[str]:
    """A sentence's tag ids as tags, through `data.tag_names`. Ids without names are the config's to
    fix, not the row's: no row of such a file would be read, so it is an error, never a skipped row."""
    if tag_names is None:
        raise FinegrainError(f"{where}: {key!r} holds tag ids ({', '.join(map(str, ids[:4]))}{', ...' if len(ids) > 4 else ''}); "
                             "list the tag of each id in data.tag_names, in id order (a Hugging Face set's "
                             f"features[{key!r}].feature.names), e.g. train --set 'data.tag_names=[O, B-PER, I-PER]'; "
                             "a run evaluates such a file when it was trained with them")
    unknown = [i for i in ids if not 0 <= i < len(tag_names)]
    if unknown:
        raise FinegrainError(f"{where}: {key!r} holds tag id {unknown[0]}, and data.tag_names names {len(tag_names)} "
                             f"(ids 0 to {len(tag_names) - 1}); list the tag of every id there")
    return [tag_names[i] for i in ids]


def _check_spans(spans: Any, text: str, n: int, key: str) -> list[tuple[str, int, int]]:
    if not isinstance(spans, list):
        raise BadRow.at(n, f"{key!r} must be a list of {{start, end, type}} objects")
    entities = []
    for k, span in enumerate(spans):
        if not isinstance(span, dict):
            raise BadRow.at(n, f"{key}[{k}] must be an object with start, end and type")
        type_ = span.get("type", span.get("label"))
        start, end = span.get("start"), span.get("end")
        if not isinstance(type_, str) or not type_.strip() or any(c.isspace() for c in type_.strip()):
            raise BadRow.at(n, f"{key}[{k}] needs a 'type' (a string without spaces), got {type_!r}")
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in (start, end)):
            raise BadRow.at(n, f"{key}[{k}]: start and end must be integers, got {start!r} and {end!r}")
        if not 0 <= start < end <= len(text):
            raise BadRow.at(
                n, f"{key}[{k}] ({type_}) spans characters {start}-{end}, outside the text of {len(text)} characters"
            )
        stripped = text[start:end]
        start += len(stripped) - len(stripped.lstrip())
        end -= len(stripped) - len(stripped.rstrip())
        if start >= end:
            raise BadRow.at(n, f"{key}[{k}] ({type_}) at {start}-{end} covers only whitespace")
        entities.append((type_.strip(), start, end))
    entities.sort(key=lambda e: (e[1], e[2]))
    for a, b in zip(entities, entities[1:]):
        if b[1] < a[2]:
            raise BadRow.at(
                n,
                f"entities overlap: {a[0]} {text[a[1] : a[2]]!r} ({a[1]}-{a[2]}) and {b[0]} {text[b[1] : b[2]]!r} "
                f"({b[1]}-{b[2]}); flat NER needs disjoint spans, keep one",
            )
    return entities


def span_example(
    text: str, entities: Sequence[tuple[str, int, int]], source: str, char_level: bool = False, tagged: bool = True
) -> TokenExample:
    """Words of `text` (`split_words`, also cut at each entity boundary) with BIO tags of the entities.

    Args:
        text: the raw text.
        entities: (type, start, end) character spans, disjoint.
        source: `file:line`.
        char_level: one word per non-space character.
        tagged: False for an unlabelled example (`tags=None`).
    """
    cuts = sorted({c for _, s, e in entities for c in (s, e)})
    spans: list[tuple[int, int]] = []
    for start, end in split_words(text, char_level):
        inner = [c for c in cuts if start < c < end]
        edges = [start, *inner, end]
        spans.extend(zip(edges, edges[1:]))
    words = [text[s:e] for s, e in spans]
    if not tagged:
        return TokenExample(words, None, source, text, spans)
    starts = {s: i for i, (s, _) in enumerate(spans)}
    ends = {e: i + 1 for i, (_, e) in enumerate(spans)}
    word_entities = [(t, starts[s], ends[e]) for t, s, e in entities]
    return TokenExample(words, entities_to_tags(word_entities, len(words), "BIO"), source, text, spans)


def write_token_examples(path: str | os.PathLike[str], examples: Sequence[TokenExample]) -> int:
    """Write examples as JSON lines of `{"tokens", "tags"}` (plus `text` and `extra`), atomically; returns the count."""
    from finegrain.atomic import atomic_write_text

    lines = []
    for ex in examples:
        row: dict[str, Any] = {"tokens": ex.words}
        if ex.tags is not None:
            row["tags"] = ex.tags
        row.update({k: v for k, v in ex.extra.items() if k not in row})
        lines.append(json.dumps(row, ensure_ascii=False))
    atomic_write_text(Path(path), "".join(line + "\n" for line in lines))
    return len(lines)


# --- splits -----------------------------------------------------------------------------


def split_token_examples(
    examples: Sequence[TokenExample], fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0,
    scheme: str = "BIO",
) -> tuple[list[TokenExample], ...]:
    """Split sentences into parts of the given sizes, stratified by each sentence's rarest entity type
    (its rarest tag, for plain tags).

    Sentences without entities form their own stratum, so every part gets its share of them and of
    each type. Deterministic for a seed; parts keep file order.
    """
    frequency: dict[str, int] = {}
    types_of = []
    for ex in examples:
        types = tag_types(ex.tags, scheme)
        types_of.append(types)
        for t in types:
            frequency[t] = frequency.get(t, 0) + 1
    proxies = [
        Example(
            text="",
            label=min(types, key=lambda t: (frequency[t], t)) if types else "(none)",
            source=ex.source,
            extra={"index": i},
        )
        for i, (ex, types) in enumerate(zip(examples, types_of))
    ]
    parts = stratified_split(proxies, fractions, seed=seed)
    return tuple([examples[p.extra["index"]] for p in part] for part in parts)


def tag_types(tags: Sequence[str] | None, scheme: str = "BIO") -> set[str]:
    """The entity types in one sentence's tags (default mode); plain tags are their own types."""
    if not tags:
        return set()
    return set(tags) if normalize_scheme(scheme) == PLAIN else {t for t, _, _ in tags_to_entities(tags)}


def entity_types(examples: Sequence[TokenExample], scheme: str = "BIO") -> list[str]:
    """The sorted entity types tagged in `examples` (default mode), or the sorted plain tags."""
    return sorted(set().union(*(tag_types(ex.tags, scheme) for ex in examples)))


@dataclass
class TokenSplits(Splits):
    """`Splits` of `TokenExample`s, with one `file:line: reason` per sentence whose tags were repaired."""

    repaired: list[str] = field(default_factory=list)


def load_token_splits(config, datasets_module=None) -> TokenSplits:
    """Train, validation and test sentences for `task: ner` from a run's `data` section.

    A bundled dataset brings its fixed split (each example's `extra["split"]`); files given for
    validation or test are used as they are; otherwise the parts not given are split off the
    training data with `data.split` and `data.split_seed`, stratified by rarest entity type.

    Args:
        config: a `DataConfig` with the NER keys (`scheme`, `tag_column`, `repair_tags`, `char_level`).
        datasets_module: where bundled datasets are loaded from (`finegrain.datasets`, passed in by
            the task layer: `data` does not import it).

    Returns:
        `TokenSplits` (`finegrain.data.pipeline.Splits` plus `repaired`) whose `labels` are the entity
        types of the training data.
    """
    options = dict(
        scheme=getattr(config, "scheme", "BIO"),
        tag_column=getattr(config, "tag_column", -1),
        char_level=getattr(config, "char_level", False),
        repair=getattr(config, "repair_tags", False),
        skip_bad_rows=config.skip_bad_rows,
        text_field=config.text_field,
        tag_names=getattr(config, "tag_names", None),
    )
    repaired: list[str] = []

    def read(path: str) -> TokenReadResult:
        result = read_token_examples(path, **options)
        repaired.extend(result.repaired)
        return result

    wrong_kind = (
        "data.dataset: {name!r} is a classification dataset, not tagged words; "
        "for task: ner use wnut16, peoples_daily_ner or data.train"
    )
    bundled = bundled_loader(datasets_module, TokenExample, wrong_kind)
    split = partial(split_token_examples, scheme=options["scheme"])
    splits = pipeline.load_splits(config, read, split, bundled=bundled)
    labels = entity_types(splits.train, options["scheme"])
    if not labels:
        raise FinegrainError(
            f"{splits.origin['train']}: the training data has no entities; check data.tag_column and the tags"
        )
    return TokenSplits(**{**vars(splits), "labels": labels}, repaired=repaired)
