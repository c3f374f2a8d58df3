"""Atomic writes: the final name holds the old or the new content, never a partial one."""

import json
import os
import signal
import stat
from pathlib import Path

import pytest

from finegrain import atomic
from finegrain.atomic import atomic_dir, atomic_path, atomic_write_bytes, atomic_write_json, atomic_write_text
from finegrain.errors import FinegrainError


def _leftovers(directory: Path, keep: set[str]) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name not in keep)


def test_write_text_bytes_json(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "er" / "notes.txt"  # parents are created
    assert atomic_write_text(target, "héllo\n") == target
    assert target.read_text(encoding="utf-8") == "héllo\n"
    atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    atomic_write_json(tmp_path / "m.json", {"acc": 0.5, "label": "naïve"})
    text = (tmp_path / "m.json").read_text(encoding="utf-8")
    assert json.loads(text) == {"acc": 0.5, "label": "naïve"} and "naïve" in text and text.endswith("\n")
    assert _leftovers(tmp_path, {"deep", "b.bin", "m.json"}) == []


def test_new_file_gets_umask_mode_and_replacement_keeps_mode(tmp_path: Path) -> None:
    target = tmp_path / "f.txt"
    atomic_write_text(target, "one")
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~atomic._UMASK
    os.chmod(target, 0o640)
    atomic_write_text(target, "two")
    assert target.read_text() == "two"
    assert stat.S_IMODE(target.stat().st_mode) == 0o640


def test_atomic_path_keeps_suffix_and_replaces_on_success(tmp_path: Path) -> None:
    target = tmp_path / "plot.png"
    target.write_bytes(b"old")
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".png" and tmp != target
        tmp.write_bytes(b"new")
        assert target.read_bytes() == b"old"  # not visible until the block ends
    assert target.read_bytes() == b"new"
    assert _leftovers(tmp_path, {"plot.png"}) == []


def test_atomic_path_error_leaves_original_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"good")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half-writ")
        raise RuntimeError("disk full")
    assert target.read_bytes() == b"good"
    assert _leftovers(tmp_path, {"model.safetensors"}) == []


def test_failed_rename_cleans_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "a.txt"
    target.write_text("old")

    def broken_replace(src: str, dst: str) -> None:
        raise OSError("simulated crash at rename")

    monkeypatch.setattr(atomic.os, "replace", broken_replace)
    with pytest.raises(OSError):
        atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert _leftovers(tmp_path, {"a.txt"}) == []


def test_json_that_cannot_serialize_touches_nothing(tmp_path: Path) -> None:
    target = tmp_path / "m.json"
    target.write_text("{}")
    with pytest.raises(TypeError):
        atomic_write_json(target, {"x": object()})
    assert target.read_text() == "{}"
    assert _leftovers(tmp_path, {"m.json"}) == []


def test_atomic_dir_creates_and_replaces(tmp_path: Path) -> None:
    target = tmp_path / "checkpoint"
    with atomic_dir(target) as tmp:
        assert not target.exists()
        (tmp / "a.bin").write_bytes(b"1")
    assert (target / "a.bin").read_bytes() == b"1"
    with atomic_dir(target) as tmp:
        (tmp / "b.bin").write_bytes(b"2")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "c.txt").write_text("3")
        assert (target / "a.bin").exists()  # the old one stays until the new one is complete
    assert sorted(p.name for p in target.iterdir()) == ["b.bin", "sub"]
    assert (target / "sub" / "c.txt").read_text() == "3"
    assert stat.S_IMODE(target.stat().st_mode) == 0o777 & ~atomic._UMASK
    assert _leftovers(tmp_path, {"checkpoint"}) == []


def test_atomic_dir_error_keeps_old(tmp_path: Path) -> None:
    target = tmp_path / "adapter"
    target.mkdir()
    (target / "old.bin").write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt), atomic_dir(target) as tmp:
        (tmp / "new.bin").write_bytes(b"partial")
        raise KeyboardInterrupt
    assert sorted(p.name for p in target.iterdir()) == ["old.bin"]
    assert _leftovers(tmp_path, {"adapter"}) == []


def test_atomic_dir_over_a_file_is_a_user_error(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.write_text("a file")
    with pytest.raises(FinegrainError, match="exists and is a file"), atomic_dir(target):
        pass


def _run_and_sigkill(code: str) -> None:
    """Run `code` in a fresh Python that SIGKILLs itself where the code says `die()`."""
    import signal
    import subprocess
    import sys

    prelude = "import os, signal\nfrom pathlib import Path\nfrom finegrain.atomic import *\ndie = lambda: os.kill(os.getpid(), signal.SIGKILL)\n"
    result = subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, timeout=60)
    assert result.returncode == -signal.SIGKILL, result.stderr


def test_remove_stale_temps_after_a_kill_mid_write(tmp_path: Path) -> None:
    run = tmp_path / "run"
    atomic_write_bytes(run / "adapter" / "adapter_model.safetensors", b"old")
    atomic_write_text(run / "checkpoint" / "state.json", "{}")
    _run_and_sigkill(
        f"with atomic_path(Path({str(run)!r}) / 'adapter' / 'adapter_model.safetensors') as tmp:\n"
        "    tmp.write_bytes(b'half')\n    die()\n"
    )
    _run_and_sigkill(f"with atomic_dir(Path({str(run)!r}) / 'checkpoint') as tmp:\n    (tmp / 'state.json').write_text('x')\n    die()\n")
    left = sorted(p.name for p in run.rglob(".*"))
    assert len(left) == 2 and all(".tmp" in name for name in left), left
    assert len(atomic.remove_stale_temps(run)) == 1  # the checkpoint's; not below the directory
    assert len(atomic.remove_stale_temps(run / "adapter")) == 1
    assert sorted(p.relative_to(run).as_posix() for p in run.rglob("*")) == [
        "adapter", "adapter/adapter_model.safetensors", "checkpoint", "checkpoint/state.json"]
    assert (run / "adapter" / "adapter_model.safetensors").read_bytes() == b"old"


def test_remove_stale_temps_puts_back_a_directory_moved_aside(tmp_path: Path) -> None:
    (tmp_path / ".checkpoint.0123abcd.old").mkdir()  # killed between moving aside and renaming in
    (tmp_path / ".checkpoint.0123abcd.old" / "state.json").write_text("{}")
    (tmp_path / ".lock").write_text("keep")  # not a temporary
    atomic.remove_stale_temps(tmp_path)
    assert (tmp_path / "checkpoint" / "state.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "checkpoint"]


def test_exclusive_lock_refuses_a_second_holder_and_dies_with_its_process(tmp_path: Path) -> None:
    with atomic.exclusive_lock(tmp_path, "finegrain train"):
        with pytest.raises(FinegrainError, match=r"in use by finegrain train \(pid \d+\); wait for it"):
            with atomic.exclusive_lock(tmp_path):
                pass
    _run_and_sigkill(f"with exclusive_lock(Path({str(tmp_path)!r})):\n    die()\n")
    with atomic.exclusive_lock(tmp_path):  # the kernel dropped the killed process's lock
        pass


def test_fault_point_kills_only_at_the_named_phase_and_count(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FINEGRAIN_FAULT", "phase_a:2")
    monkeypatch.setattr(atomic, "_FAULT_HITS", {})
    killed = []
    monkeypatch.setattr(atomic.os, "kill", lambda pid, sig: killed.append(sig))
    atomic.fault_point("phase_b")
    atomic.fault_point("phase_a")
    assert killed == []
    atomic.fault_point("phase_a")
    assert killed == [signal.SIGKILL]
    monkeypatch.setenv("FINEGRAIN_FAULT", "phase_c:1:stop")
    atomic.fault_point("phase_c")
    assert killed == [signal.SIGKILL, signal.SIGSTOP]


def test_exclusive_lock_that_cannot_be_created_is_a_user_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(path, *args, **kwargs):  # as in a read-only directory (root, which runs CI, may write anywhere)
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(atomic, "open", refuse, raising=False)
    with pytest.raises(FinegrainError, match=r"\.lock: cannot be created \(Permission denied\); choose a directory"):
        with atomic.exclusive_lock(tmp_path):
            pass


def test_a_file_write_onto_a_directory_is_a_user_error(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    with pytest.raises(FinegrainError, match=r"out: is a directory, not a file; give a file name"):
        atomic_write_json(tmp_path / "out", {"a": 1})
    assert list((tmp_path / "out").iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
