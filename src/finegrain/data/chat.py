"""Conversations for instruction tuning: chat JSONL (`messages`) and instruction/input/output JSONL.

One JSON object per line, either

    {"messages": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."},
                  {"role": "assistant", "content": "..."}]}

or, as in Alpaca-style files,

    {"instruction": "...", "input": "... (optional)", "output": "..."}

which becomes a user turn (the instruction, then a blank line and the input when there is
one) and an assistant turn (the output). Roles are system, user and assistant. A labelled
conversation (for training and evaluation) ends with an assistant turn: its content is the
reference, and everything before it is the prompt. Unlabelled ones (for `predict`) may end
with a user turn, which the model answers. As for every reader (`data.files`), a `.gz`, `.bz2`
or `.xz` file opens as its content, and a bad row raises `BadRow`: reported as `file:line`, or
skipped with `data.skip_bad_rows`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from finegrain.data.files import BadRow, check_file, content_suffix, open_text, reading, skip_or_raise
from finegrain.errors import FinegrainError

ROLES = ("system", "user", "assistant")
SUFFIXES = (".jsonl", ".json", ".ndjson")  # after an optional .gz, .bz2 or .xz


@dataclass
class ChatExample:
    """One conversation.

    Attributes:
        messages: [{"role": ..., "content": ...}, ...] in order.
        source: where it came from, `file:line` (or `input:N`).
    """

    messages: list[dict[str, str]]
    source: str

    @property
    def label(self) -> str | None:
        """The reference answer: the content of the final assistant turn, None when the conversation ends otherwise."""
        last = self.messages[-1]
        return last["content"] if last["role"] == "assistant" else None

    @property
    def prompt_messages(self) -> list[dict[str, str]]:
        """The turns the model answers: all of them but a final assistant turn."""
        return self.messages[:-1] if self.label is not None else list(self.messages)

    @property
    def text(self) -> str:
        """The last user turn of the prompt, to show next to a generation."""
        return next((m["content"] for m in reversed(self.prompt_messages) if m["role"] == "user"), "")


@dataclass
class ChatReadResult:
    examples: list[ChatExample]
    skipped: list[str] = field(default_factory=list)  # `file:line: reason`, with skip_bad_rows


def messages_from_record(record: Any, require_reference: bool) -> list[dict[str, str]]:
    """The conversation of one JSON object (chat or instruction format); `BadRow` says what is wrong.

    Args:
        record: the parsed JSON line.
        require_reference: the conversation must end with an assistant turn (training, evaluation).
    """
    if not isinstance(record, dict):
        raise BadRow(f"expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        messages = check_messages(record["messages"])
    elif "instruction" in record:
        messages = _instruction_messages(record, require_reference)
    else:
        raise BadRow(
            f"no 'messages' (chat format) nor 'instruction' (instruction/input/output format); "
            f"the keys are {', '.join(map(repr, record)) or 'none'}"
        )
    if require_reference:
        if not any(m["role"] == "assistant" for m in messages):
            raise BadRow("the conversation has no assistant turn to learn from; add one")
        if messages[-1]["role"] != "assistant":
            raise BadRow(f"the last turn is '{messages[-1]['role']}', not 'assistant'; end with the answer to learn")
    return messages


def check_messages(messages: Any) -> list[dict[str, str]]:
    """Validated copies of chat messages: a non-empty list of {role, content} with a known role."""
    if not isinstance(messages, list) or not messages:
        raise BadRow("'messages' must be a non-empty list of {\"role\": ..., \"content\": ...} objects")
    checked = []
    for number, message in enumerate(messages, 1):
        if not isinstance(message, dict):
            raise BadRow(f"message {number} is not an object with 'role' and 'content'")
        for key in ("role", "content"):
            if key not in message:
                raise BadRow(f"message {number} has no '{key}'")
            if not isinstance(message[key], str):
                raise BadRow(f"message {number}: '{key}' must be a string, not {type(message[key]).__name__}")
        if message["role"] not in ROLES:
            raise BadRow(f"message {number}: unknown role '{message['role']}'; use {', '.join(ROLES)}")
        checked.append({"role": message["role"], "content": message["content"]})
    return checked


def _instruction_messages(record: dict[str, Any], require_reference: bool) -> list[dict[str, str]]:
    for key in ("instruction", "input", "output", "system"):
        if record.get(key) is not None and not isinstance(record[key], str):
            raise BadRow(f"'{key}' must be a string, not {type(record[key]).__name__}")
    if not record["instruction"].strip():
        raise BadRow("'instruction' is empty")
    user = record["instruction"] + (f"\n\n{record['input']}" if (record.get("input") or "").strip() else "")
    messages = [{"role": "system", "content": record["system"]}] if record.get("system") else []
    messages.append({"role": "user", "content": user})
    if record.get("output") is not None:
        messages.append({"role": "assistant", "content": record["output"]})
    elif require_reference:
        raise BadRow("an instruction row without 'output'; add the expected answer")
    return messages


def read_chat_examples(
    path: str | os.PathLike[str], require_reference: bool = True, skip_bad_rows: bool = False
) -> ChatReadResult:
    """Conversations from a JSONL file (or a `.gz`, `.bz2` or `.xz` of one), one per non-empty line.

    Raises:
        FinegrainError: a missing or unreadable file, or a bad row (`file:line: what; the fix`)
            unless `skip_bad_rows`, which records it in `skipped` instead.
    """
    name = str(path)
    check_file(path, 'a chat JSONL file (one {"messages": [...]} per line)')
    if content_suffix(path) not in SUFFIXES:
        raise FinegrainError(f"{name}: task instruct reads JSON lines; save the conversations as .jsonl")
    examples, skipped = [], []
    with reading(path), open_text(path) as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where = f"{name}:{number}"
            try:
                examples.append(ChatExample(messages_from_record(parse_line(line), require_reference), where))
            except BadRow as bad:
                skip_or_raise(bad, where, skip_bad_rows, skipped)
    return ChatReadResult(examples, skipped)


def parse_line(line: str) -> Any:
    """The JSON value of one line; `BadRow` names the column of a syntax error."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise BadRow(f"invalid JSON ({exc.msg} at column {exc.colno})") from None
