"""Atomic writes: a file or directory appears complete under its final name, or not at all.

Checkpoints, adapters and reports are written to a temporary name in the same directory,
flushed to disk, then renamed into place. A crash (or Ctrl-C) half-way through leaves the
previous version intact instead of a truncated file that fails to load later. The temporary
name is in the same directory because `os.replace` is only atomic within one filesystem.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from finegrain.errors import FinegrainError

__all__ = [
    "atomic_dir", "atomic_path", "atomic_write_bytes", "atomic_write_json", "atomic_write_text",
    "exclusive_lock", "fault_point", "recover_dir", "remove_stale_temps",
]


def _read_umask() -> int:
    # os.umask can only be read by setting it; do that once, at import, rather than on
    # every write where another thread could create a file in between.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def _fsync_dir(directory: Path) -> None:
    # The rename itself lives in the directory entry; without this a power loss can undo it.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows, where directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def output_directory(path: str | os.PathLike[str]) -> Path:
    """`path` as a Path, refused (FinegrainError) when a file stands where a command's --output
    directory of several files would go."""
    output = Path(path)
    if output.exists() and not output.is_dir():
        raise FinegrainError(f"{output}: exists and is a file; choose another --output directory")
    return output


def _prepare_parent(path: Path) -> Path:
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise FinegrainError(f"{parent}: exists and is not a directory; choose another output path") from None
    except PermissionError:
        raise FinegrainError(
            f"{parent}: permission denied creating the directory; choose another output path"
        ) from None
    return parent


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary file path that replaces `path` when the block exits cleanly.

    For libraries that open the file themselves (`safetensors.torch.save_file`,
    `Figure.savefig`, `torch.save`). The temporary file sits next to `path` and keeps its
    extension, so libraries that infer the format from the name still do. On success it is
    fsync'ed and `os.replace`'d onto `path`; on an exception it is removed and `path` is
    left as it was. Missing parent directories are created.

    Args:
        path: the final file name.

    Yields:
        The temporary path to write to (it already exists, empty).

    Raises:
        FinegrainError: `path` is a directory.
    """
    final = Path(path)
    if final.is_dir():  # os.replace would fail only after the whole file was written
        raise FinegrainError(f"{final}: is a directory, not a file; give a file name (e.g. {final / 'out.json'})")
    parent = _prepare_parent(final)
    fd, tmp_name = tempfile.mkstemp(dir=parent, prefix=f".{final.name}.", suffix=f".tmp{final.suffix}")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        _fsync_file(tmp)
        # mkstemp creates files readable by the owner only; give the result the mode an
        # ordinary open() would have, or keep the mode of the file being replaced.
        try:
            mode = final.stat().st_mode & 0o7777
        except FileNotFoundError:
            mode = 0o666 & ~_UMASK
        os.chmod(tmp, mode)
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    _fsync_dir(parent)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write `data` to `path` atomically (see `atomic_path`).

    Args:
        path: the file to write; parent directories are created.
        data: the bytes to write.

    Returns:
        `path` as a `Path`.
    """
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> Path:
    """Write `text` to `path` atomically (see `atomic_path`).

    Args:
        path: the file to write; parent directories are created.
        text: the text; newlines are written as given (no platform translation).
        encoding: the text encoding.

    Returns:
        `path` as a `Path`.
    """
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: str | os.PathLike[str], obj: Any, indent: int | None = 2) -> Path:
    """Write `obj` as JSON (UTF-8, non-ASCII kept, trailing newline) to `path` atomically.

    The object is serialized before anything touches the disk, so an object that is not
    JSON-serializable raises `TypeError` and leaves `path` unchanged.

    Args:
        path: the file to write; parent directories are created.
        obj: a JSON-serializable object.
        indent: passed to `json.dumps`; `None` writes one line.

    Returns:
        `path` as a `Path`.
    """
    text = json.dumps(obj, indent=indent, ensure_ascii=False) + "\n"
    return atomic_write_text(path, text)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary directory that becomes `path` when the block exits cleanly.

    Everything written inside is fsync'ed, then the directory is renamed to `path`. An
    existing directory at `path` is first renamed aside and deleted only once the new one
    is in place, so at every moment either the old or the new complete directory exists
    (under `path` or, for an instant, under the aside name). On an exception the
    temporary directory is deleted and `path` is untouched.

    Args:
        path: the final directory name; parent directories are created.

    Yields:
        The temporary directory (empty) to write into.

    Raises:
        FinegrainError: `path` exists and is a file.
    """
    final = Path(path)
    if final.exists() and not final.is_dir():
        raise FinegrainError(f"{final}: exists and is a file, not a directory; choose another output path")
    parent = _prepare_parent(final)
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        yield tmp
        for root, _dirs, files in os.walk(tmp):
            for name in files:
                _fsync_file(Path(root, name))
            _fsync_dir(Path(root))
        # mkdtemp makes the directory owner-only (0700); give it an ordinary mode.
        os.chmod(tmp, 0o777 & ~_UMASK)
        aside: Path | None = None
        if final.exists():
            aside = parent / f".{final.name}.{uuid.uuid4().hex[:8]}.old"
            os.replace(final, aside)
        try:
            os.replace(tmp, final)
        except BaseException:
            if aside is not None:
                os.replace(aside, final)
            raise
        _fsync_dir(parent)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def recover_dir(path: str | os.PathLike[str]) -> Path:
    """Undo what a process killed inside `atomic_dir` left behind.

    A kill between moving the old directory aside and renaming the new one into place
    leaves only the aside copy: it is moved back. Unfinished temporary directories are removed.
    """
    final = Path(path)
    parent = final.parent
    if not parent.exists():
        return final
    for tmp in parent.glob(f".{final.name}.*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True)
    asides = sorted(parent.glob(f".{final.name}.*.old"), key=lambda p: p.stat().st_mtime)
    if asides and not final.exists():
        os.replace(asides.pop(), final)
    for aside in asides:
        shutil.rmtree(aside, ignore_errors=True)
    return final


# The names the functions above give their temporaries: `.NAME.XXXXXXXX.tmp[.suffix]` (mkstemp
# and mkdtemp draw 8 characters from [a-z0-9_]) and `.NAME.XXXXXXXX.old` for a directory moved aside.
_TEMP_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp(\.[^.]+)?$")
_ASIDE_NAME = re.compile(r"^\.(.+)\.[0-9a-f]{8}\.old$")
_PREFIX_CACHE_NAME = re.compile(r"^\.prefix-cache-")  # finegrain.train.prefix_cache, unlinked at once unless killed


def remove_stale_temps(directory: str | os.PathLike[str]) -> list[Path]:
    """Delete what atomic writes killed half-way left in `directory` (not below it); returns what went.

    A SIGKILL inside `atomic_path` or `atomic_dir` leaves a hidden temporary that no later
    write reuses (each draws a new name), so without this they pile up. A directory moved aside
    by `atomic_dir` is put back by `recover_dir` when it is the only copy, never deleted blind.
    Only the one directory is looked at, so that a wrong path (a home directory) costs no walk
    and no other program's files. Call it only while nothing else writes into `directory`
    (hold `exclusive_lock`).
    """
    root = Path(directory)
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    for entry in sorted(root.iterdir()):
        aside = _ASIDE_NAME.match(entry.name)
        if aside and entry.is_dir():
            recover_dir(root / aside.group(1))
        elif _TEMP_NAME.match(entry.name) and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
        elif _TEMP_NAME.match(entry.name) or _PREFIX_CACHE_NAME.match(entry.name):
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
            removed.append(entry)
    return removed


@contextlib.contextmanager
def exclusive_lock(directory: str | os.PathLike[str], what: str = "process") -> Iterator[Path]:
    """Hold an exclusive lock on `directory` (a `.lock` file inside it) for the block's lifetime.

    `flock` is released by the kernel when the process dies, however it dies, so a SIGKILL
    leaves no stale lock. A second holder gets a FinegrainError at once instead of waiting.
    Where `fcntl` does not exist (Windows) the block runs unlocked.

    Args:
        directory: created if missing.
        what: what holds the lock, for the message (e.g. "finegrain train").

    Raises:
        FinegrainError: another process holds the lock.
    """
    root = Path(directory)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield root
        return
    _prepare_parent(root / ".lock")
    try:
        handle = open(root / ".lock", "a+", encoding="utf-8")
    except OSError as exc:
        raise FinegrainError(f"{root / '.lock'}: cannot be created ({exc.strerror}); choose a directory you can write") from None
    with handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise FinegrainError(
                f"{root}: in use by {holder}; wait for it to end or choose another directory"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{what} (pid {os.getpid()})")
        handle.flush()
        try:
            yield root
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


_FAULT_HITS: dict[str, int] = {}


def fault_point(phase: str) -> None:
    """Test-only: SIGKILL this process here when FINEGRAIN_FAULT names `phase`.

    `FINEGRAIN_FAULT=adapter_write` kills at the first pass through `fault_point("adapter_write")`,
    `FINEGRAIN_FAULT=train_step:3` at the third; `train_step:1:stop` sends SIGSTOP instead (a
    process frozen while it holds the run directory's lock), `train_step:1:int` SIGINT (Ctrl-C).
    tests/test_faults.py uses it to interrupt a real `finegrain train` at a chosen moment; unset
    (always, outside those tests) it costs one environment lookup.
    """
    wanted = os.environ.get("FINEGRAIN_FAULT")
    if not wanted:
        return
    name, count, action = (wanted.split(":") + ["", ""])[:3]
    if name != phase:
        return
    _FAULT_HITS[phase] = _FAULT_HITS.get(phase, 0) + 1
    if _FAULT_HITS[phase] >= int(count or 1):
        os.kill(os.getpid(), {"stop": signal.SIGSTOP, "int": signal.SIGINT}.get(action, signal.SIGKILL))
