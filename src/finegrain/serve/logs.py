"""Structured logs: one JSON object a line, on standard error.

Request bodies are never logged unless `--log-bodies` is given, and then only after
`mask_pii` replaced e-mail addresses, phone numbers and ID-like numbers (account, card,
national ID numbers) with placeholders.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time

LOGGER = "finegrain.serve"

_EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
# A run of digits broken only by spaces, dots, dashes or parentheses (phone, card, social security
# numbers, dates of birth), and a word with 6+ digits in it (account numbers, IBANs, ID numbers).
_DIGIT_RUN = re.compile(r"(?<!\w)\+?\(?\d[\d ().-]{5,}\d(?!\w)")
_ID_WORD = re.compile(r"\b[\w-]*\d[\w-]*\b")


def _digit_run(match: re.Match) -> str:
    text = match.group()
    if sum(c.isdigit() for c in text) < 7:
        return text
    return "<phone>" if text[0] in "+(" else "<number>"


def _id_word(match: re.Match) -> str:
    return "<number>" if sum(c.isdigit() for c in match.group()) >= 6 else match.group()


def mask_pii(text: str) -> str:
    """`text` with e-mail addresses, phone numbers and ID-like numbers replaced by <email>, <phone>, <number>."""
    text = _EMAIL.sub("<email>", text)
    text = _DIGIT_RUN.sub(_digit_run, text)
    return _ID_WORD.sub(_id_word, text)


class JsonFormatter(logging.Formatter):
    """`{"ts", "level", "logger", "event", ...extra fields}`; an exception adds `exc`."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def setup_logging(level: str = "info", stream=None) -> None:
    """Send finegrain's and uvicorn's logs through one JSON handler."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    for name in (LOGGER, "uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level.upper())
        logger.propagate = False
    logging.getLogger("uvicorn.access").disabled = True  # the request log below replaces it


def log(event: str, level: int = logging.INFO, exc_info=None, **fields) -> None:
    logging.getLogger(LOGGER).log(level, event, exc_info=exc_info, extra={"fields": fields})
