"""What every data reader shares: opening a (compressed) file, the bad-row exception, the skip hint.

Each reader (classification rows, CoNLL and JSON-lines tags, SemEval relations, SQuAD
questions) raises `BadRow` for an example it cannot build; `skip_or_raise` turns it into
the one-line `file:line: reason; fix` error, or, with `data.skip_bad_rows`, into a line of the
run's skipped-rows list. A `.gz`, `.bz2` or `.xz` file opens as its content for every reader.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import io
import lzma
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from finegrain.errors import FinegrainError

__all__ = [
    "COMPRESSION", "READ_ERRORS", "reading", "SKIP", "SKIP_HINT", "BadRow", "check_file", "compression_of", "content_suffix",
    "open_binary", "open_text", "read_text", "skip_or_raise", "utf8_lines",
]

SKIP = "skip bad rows (--skip-bad-rows, or data.skip_bad_rows: true)"
SKIP_HINT = f"fix the row or {SKIP}"
# suffix -> (name, opener, compress); `compress` writes what the opener reads (gzip without a timestamp).
COMPRESSION: dict[str, tuple[str, Callable[..., IO[bytes]], Callable[[bytes], bytes]]] = {
    ".gz": ("gzip", gzip.open, lambda data: gzip.compress(data, mtime=0)),
    ".bz2": ("bzip2", bz2.open, bz2.compress),
    ".xz": ("xz", lzma.open, lzma.compress),
}
# What a damaged or truncated (compressed) file raises mid-read.
READ_ERRORS = (OSError, EOFError, lzma.LZMAError)


class BadRow(ValueError):
    """A row (record, sentence, question) that cannot become an example: skippable, or reported.

    Args:
        reason: what is wrong, without the place.
        line: the line to name, when the reader knows it better than its caller.
        hint: the fix shown when the row is not skipped.
    """

    def __init__(self, reason: str, line: int | None = None, hint: str = SKIP_HINT) -> None:
        super().__init__(reason)
        self.reason, self.line, self.hint = reason, line, hint

    @classmethod
    def at(cls, line: int, reason: str) -> BadRow:
        """A bad row at `line` of its file."""
        return cls(reason, line)


def skip_or_raise(bad: BadRow, where: str, skip_bad_rows: bool, skipped: list[str]) -> None:
    """Record `where: reason` in `skipped` with `skip_bad_rows`; otherwise raise it with its fix."""
    if not skip_bad_rows:
        raise FinegrainError(f"{where}: {bad.reason}; {bad.hint}") from None
    skipped.append(f"{where}: {bad.reason}")


def compression_of(path: str | os.PathLike[str]) -> str | None:
    """The compression suffix of `path` (`.gz`, `.bz2`, `.xz`), or None."""
    suffix = Path(path).suffix.lower()
    return suffix if suffix in COMPRESSION else None


def content_suffix(path: str | os.PathLike[str]) -> str:
    """The extension of what the file holds, lowercased: `.txt` for `train.txt.gz`; "" for none."""
    suffixes = [suffix.lower() for suffix in Path(path).suffixes]
    if suffixes and suffixes[-1] in COMPRESSION:
        suffixes.pop()
    return suffixes[-1] if suffixes else ""


def check_file(path: str | os.PathLike[str], expected: str) -> Path:
    """`path` as a Path, refused when missing or a directory (`expected` names the file wanted)."""
    p = Path(path)
    if not p.exists():
        raise FinegrainError(f"{path}: file not found (relative paths are resolved from {Path.cwd()})")
    if p.is_dir():
        raise FinegrainError(f"{path}: is a directory; expected {expected}")
    return p


def open_binary(path: str | os.PathLike[str]) -> IO[bytes]:
    """The file's bytes, decompressed when its name ends in `.gz`, `.bz2` or `.xz`."""
    suffix = compression_of(path)
    return COMPRESSION[suffix][1](path, "rb") if suffix else open(path, "rb")


class _Utf8Lines(io.TextIOWrapper):
    """UTF-8 text whose lines drop a leading BOM, not only the file's first.

    Files joined with `cat` (or a header line put in front of a file that had a BOM) keep the
    second file's BOM mid-file, where it would glue itself to the line's first label or token.
    """

    def readline(self, size: int = -1) -> str:  # iteration over a subclass goes through here
        line = super().readline(size)
        return line[1:] if line.startswith("\ufeff") else line


def utf8_lines(binary: IO[bytes], newline: str | None = None, errors: str = "strict") -> IO[str]:
    """`binary` as UTF-8 text whose lines drop a leading BOM."""
    return _Utf8Lines(binary, encoding="utf-8-sig", errors=errors, newline=newline)


def open_text(path: str | os.PathLike[str], newline: str | None = None, errors: str = "strict") -> IO[str]:
    """The file as UTF-8 text (a BOM at any line's start is dropped), decompressed as `open_binary` does."""
    return utf8_lines(open_binary(path), newline, errors)


@contextlib.contextmanager
def reading(path: str | os.PathLike[str]) -> Iterator[None]:
    """Within the block, a decoding or I/O failure while reading `path` is one line naming the file."""
    try:
        yield
    except UnicodeDecodeError as exc:
        raise FinegrainError(
            f"{path}: not UTF-8 ({exc.reason} at byte {exc.start}); re-save the file as UTF-8"
        ) from None
    except READ_ERRORS as exc:
        raise FinegrainError(f"{path}: cannot read the file ({exc})") from None


def read_text(path: str | os.PathLike[str], expected: str) -> str:
    """The whole (decompressed) file as UTF-8 text, every failure one line naming the file."""
    check_file(path, expected)
    with reading(path), open_binary(path) as f:
        return f.read().decode("utf-8-sig")
