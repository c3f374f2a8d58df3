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
# A phone number: an optional +country code, then 7+ digits that may be broken by spaces, dots,
# dashes or parentheses; ID-like numbers: 6+ digits, possibly in dash/space groups (123-45-6789).
_PHONE = re.compile(r"(?<![\w+])(?:\+\d{1,3}[\s.-]?)?(?:\(\d{1,4}\)[\s.-]?)?\d{2,4}(?:[\s.-]\d{2,4}){2,4}(?!\w)")
_ID_NUMBER = re.compile(r"(?<!\w)(?:\d[ -]?){5,}\d(?!\w)")


def mask_pii(text: str) -> str:
    """`text` with e-mails, phone numbers and long digit runs replaced by <email>, <phone>, <number>."""
    text = _EMAIL.sub("<email>", text)
    text = _PHONE.sub("<phone>", text)
    return _ID_NUMBER.sub("<number>", text)


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
