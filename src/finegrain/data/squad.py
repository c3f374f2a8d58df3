"""Read extractive question answering data: SQuAD JSON (v1.1 and v2.0) and JSON lines.

Formats:
- SQuAD JSON (`.json`): `{"version": "v2.0", "data": [{"title": ..., "paragraphs": [{"context": ...,
  "qas": [{"id", "question", "answers": [{"text", "answer_start"}], "is_impossible"}]}]}]}`.
  v1.1 files have no `is_impossible`: every question has an answer. v2.0 unanswerable questions
  have `"is_impossible": true` and no answers (their `plausible_answers` are ignored).
- JSON lines (`.jsonl`, or a `.json` file of one object a line), the Hugging Face `datasets`
  layout: `{"id", "question", "context", "answers": {"text": [...], "answer_start": [...]}}`;
  empty lists mean unanswerable. `answers` may also be a list of `{"text", "answer_start"}`.

Every answer must be where it says: `context[answer_start : answer_start + len(text)] == text`.
Problems are one line naming `file:line` (the line of the question's object, or of the
paragraph for a bad context) and the fix: a missing question or context, an answer that is
not at its `answer_start` (with where the text does occur), an `answer_start` outside the
context, `is_impossible` with answers, an answerable question without answers, a duplicate id.
With `skip_bad_rows=True` the bad question is dropped and the reason kept instead.
"""

from __future__ import annotations

import bisect
import json
import json.decoder
import json.scanner
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from finegrain.data import pipeline
from finegrain.data.files import BadRow, read_text, skip_or_raise
from finegrain.data.pipeline import Splits
from finegrain.data.readers import Example
from finegrain.data.split import stratified_split
from finegrain.errors import FinegrainError

__all__ = ["Answer", "QAExample", "QAReadResult", "load_qa_splits", "read_squad", "split_qa_examples"]


class Answer(NamedTuple):
    """A gold answer: its text and the character offset where it starts in the context."""

    text: str
    start: int


@dataclass
class QAExample:
    """One question about one context.

    Attributes:
        question: the question text.
        context: the passage the answer is read from.
        answers: the gold answers (several annotators may give several), `[]` for an unanswerable
            question, `None` when the example is unlabelled (prediction).
        id: the question id (SQuAD's `id`; the source when the file has none).
        source: `file:line` of the question.
        title: the article title (SQuAD), if any.
    """

    question: str
    context: str
    answers: list[Answer] | None
    id: str
    source: str
    title: str = ""

    @property
    def label(self) -> list[str] | None:
        """The gold answer texts (empty for unanswerable), as the evaluation takes them."""
        return None if self.answers is None else [a.text for a in self.answers]


@dataclass
class QAReadResult:
    """What `read_squad` found: the questions, and one `file:line: reason` per skipped question."""

    examples: list[QAExample]
    skipped: list[str] = field(default_factory=list)


def read_squad(path: str | Path, skip_bad_rows: bool = False, require_answers: bool = True) -> QAReadResult:
    """Read questions from a SQuAD JSON or JSON-lines file (see the module docstring).

    Args:
        path: the file (SQuAD `.json`, or JSON lines in a `.jsonl` or `.json`).
        skip_bad_rows: drop bad questions (listed in `skipped`) instead of failing on the first.
        require_answers: every question needs answers or `is_impossible: true`; when False,
            a question without either is read unlabelled (`answers=None`), for prediction.

    Returns:
        The examples in file order and the reasons questions were skipped.
    """
    name = str(path)
    text = read_text(path, "a SQuAD .json or a .jsonl file")
    first = len(text) - len(text.lstrip())
    if first == len(text):
        raise FinegrainError(f"{name}: the file is empty; expected SQuAD JSON or JSON lines")
    examples, skipped, seen = [], [], {}
    rows = _squad_rows(text, name) if _is_squad_document(text, first) else _jsonl_rows(text, name)
    for line, context_line, row in rows:
        try:
            example = _example(row, line, context_line, name, require_answers)
            if example.id in seen:
                raise BadRow.at(line, f"id {example.id!r} is already used at line {seen[example.id]}; make ids unique")
            seen[example.id] = line
            examples.append(example)
        except BadRow as bad:
            skip_or_raise(bad, f"{name}:{bad.line}", skip_bad_rows, skipped)
    return QAReadResult(examples, skipped)


# --- files ------------------------------------------------------------------------------


def _is_squad_document(text: str, first: int) -> bool:
    """Whether the file is one SQuAD document rather than one question object a line."""
    try:
        row = json.loads(text[first:].split("\n", 1)[0])
    except json.JSONDecodeError:
        return True  # a pretty-printed document, or a broken one whose line the parser names
    return not isinstance(row, dict) or "data" in row


def _squad_rows(text: str, name: str) -> Iterator[tuple[int, int, dict[str, Any]]]:
    """(line of the question, line of its paragraph, the question with its context and title) per question."""
    document, line_of = _parse_with_lines(text, name)
    articles = document.get("data") if isinstance(document, dict) else None
    if not isinstance(articles, list):
        raise FinegrainError(f"{name}:{line_of(document)}: 'data' must be a list of articles; this is not SQuAD JSON")
    for article in articles:
        if not isinstance(article, dict) or not isinstance(article.get("paragraphs"), list):
            raise FinegrainError(f"{name}:{line_of(article)}: an article needs a 'paragraphs' list; not SQuAD JSON")
        title = str(article.get("title", ""))
        for paragraph in article["paragraphs"]:
            if not isinstance(paragraph, dict) or not isinstance(paragraph.get("qas"), list):
                raise FinegrainError(f"{name}:{line_of(paragraph)}: a paragraph needs a 'qas' list; not SQuAD JSON")
            for qa in paragraph["qas"]:
                if not isinstance(qa, dict):
                    raise FinegrainError(f"{name}:{line_of(paragraph)}: every entry of 'qas' must be an object")
                yield line_of(qa), line_of(paragraph), {**qa, "context": paragraph.get("context"), "title": title}


def _jsonl_rows(text: str, name: str) -> Iterator[tuple[int, int, dict[str, Any]]]:
    for number, line in enumerate(text.split("\n"), 1):  # not splitlines: JSON strings may hold U+2028
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise FinegrainError(
                f"{name}:{number}: invalid JSON ({exc.msg} at column {exc.colno}); expected SQuAD JSON or one "
                '{"question", "context", "answers"} object a line'
            ) from None
        if not isinstance(row, dict):
            raise FinegrainError(f"{name}:{number}: expected a JSON object, got {type(row).__name__}")
        yield number, number, row


def _parse_with_lines(text: str, name: str):
    """The JSON document, and a function giving the line where any of its objects starts.

    Python's pure scanner lets us see each object's offset (the C scanner does not); it reads
    about 3 MB/s, so SQuAD v2's 40 MB training file takes some seconds.
    """
    starts: dict[int, int] = {}

    def parse_object(s_and_end, *args):
        obj, end = json.decoder.JSONObject(s_and_end, *args)
        starts[id(obj)] = s_and_end[1] - 1  # the offset of "{"
        return obj, end

    decoder = json.JSONDecoder()
    decoder.parse_object = parse_object
    decoder.scan_once = json.scanner.py_make_scanner(decoder)
    try:
        document = decoder.decode(text)
    except json.JSONDecodeError as exc:
        raise FinegrainError(
            f"{name}:{exc.lineno}: invalid JSON ({exc.msg} at column {exc.colno}); fix the syntax"
        ) from None
    newlines = [m.start() for m in re.finditer("\n", text)]

    def line_of(obj: Any) -> int:
        return bisect.bisect_left(newlines, starts.get(id(obj), 0)) + 1

    return document, line_of


# --- questions --------------------------------------------------------------------------


def _example(row: dict[str, Any], line: int, context_line: int, name: str, require_answers: bool) -> QAExample:
    """Check one question's row (flat: question, context, answers, is_impossible, id, title)."""
    question, context = row.get("question"), row.get("context")
    if not isinstance(question, str) or not question.strip():
        raise BadRow.at(line, "missing or empty 'question'")
    if not isinstance(context, str) or not context.strip():
        raise BadRow.at(context_line, "missing or empty 'context'")
    impossible = row.get("is_impossible", False)
    if not isinstance(impossible, bool):
        raise BadRow.at(line, f"'is_impossible' must be true or false, not {impossible!r}")
    answers = _answers(row.get("answers"), line)
    if impossible:
        if answers:
            raise BadRow.at(line, "'is_impossible' is true but there are answers; remove them or set it false")
        answers = []
    elif answers == [] and "is_impossible" in row:  # an explicit false: the answers are missing
        answers = None
    # Otherwise empty answers without `is_impossible` mean unanswerable (the `datasets` layout).
    if answers is None and require_answers:
        raise BadRow.at(line, "no 'answers'; give at least one or set \"is_impossible\": true")
    for answer in answers or ():
        _check_answer(answer, context, line)
    qid = row.get("id")
    source = f"{name}:{line}"
    qid = source if qid is None else str(qid)
    return QAExample(question, context, answers, qid, source, str(row.get("title", "")))


def _answers(value: Any, line: int) -> list[Answer] | None:
    """Answers from SQuAD's list of objects or the `datasets` layout of two lists; None if absent."""
    if value is None:
        return None
    if isinstance(value, dict):
        texts, starts = value.get("text"), value.get("answer_start")
        if not isinstance(texts, list) or not isinstance(starts, list) or len(texts) != len(starts):
            raise BadRow.at(line, "'answers' must hold lists 'text' and 'answer_start' of the same length")
        value = [{"text": t, "answer_start": s} for t, s in zip(texts, starts)]
    if not isinstance(value, list):
        raise BadRow.at(line, "'answers' must be a list of {\"text\", \"answer_start\"} objects")
    answers = []
    for item in value:
        if not isinstance(item, dict) or not isinstance(item.get("text"), str) or not item["text"].strip():
            raise BadRow.at(line, f"an answer needs a 'text' that is not empty or blank, got {item!r}")
        start = item.get("answer_start")
        if not isinstance(start, int) or isinstance(start, bool):
            raise BadRow.at(line, f"answer {item['text']!r} needs an integer 'answer_start', got {start!r}")
        answers.append(Answer(item["text"], start))
    return answers


def _check_answer(answer: Answer, context: str, line: int) -> None:
    end = answer.start + len(answer.text)
    if answer.start < 0 or end > len(context):
        raise BadRow.at(
            line, f"answer_start {answer.start} of {answer.text!r} runs outside the context ({len(context)} characters)"
        )
    found = context[answer.start : end]
    if found != answer.text:
        where = context.find(answer.text)
        hint = f"; the text occurs at {where}" if where >= 0 else "; the text does not occur in the context"
        raise BadRow.at(
            line, f"answer {answer.text!r} is not at answer_start {answer.start} (found {found!r}){hint}"
        )


# --- splits -----------------------------------------------------------------------------


def split_qa_examples(
    examples: Sequence[QAExample], fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0
) -> tuple[list[QAExample], ...]:
    """Split questions into parts, keeping every context's questions together.

    Contexts are split (questions on one passage would otherwise leak between train and test),
    stratified by whether a context has an unanswerable question. Deterministic for a seed;
    parts keep file order.
    """
    groups: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        groups.setdefault(ex.context, []).append(i)
    proxies = [
        Example(
            text="",
            label="no answer" if any(examples[i].answers == [] for i in members) else "answers",
            source=examples[members[0]].source,
            extra={"members": members},
        )
        for members in groups.values()
    ]
    parts = stratified_split(proxies, fractions, seed=seed)
    return tuple([examples[i] for i in sorted(i for p in part for i in p.extra["members"])] for part in parts)


def load_qa_splits(config) -> Splits:
    """Train, validation and test questions for `task: qa` from a run's `data` section.

    Files given for validation or test are used as they are; the parts not given are split off
    the training file by context with `data.split` and `data.split_seed`. `labels` is empty:
    answers are spans, not classes.
    """

    def read(path: str) -> QAReadResult:
        return read_squad(path, config.skip_bad_rows)

    return pipeline.load_splits(config, read, split_qa_examples, task="qa", files="a SQuAD .json or .jsonl file")
