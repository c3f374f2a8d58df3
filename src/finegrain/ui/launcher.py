"""Launching runs from the dashboard: `finegrain train` in a subprocess, one at a time, others queued.

A config is checked before it is queued (the YAML, every key, the task and the PEFT method: the
checks `finegrain train` makes before it creates anything), so a mistake shows up in the editor,
with its line, rather than in a failed run. Each run goes to `RUNS_DIR/NAME`; its config file and
the command's output are kept in `RUNS_DIR/.launch/`. Cancelling sends Ctrl-C (SIGINT) to the
run's process group: `train` stops, and the run is left interrupted, resumable with `--resume`.
"""

from __future__ import annotations

import itertools
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finegrain.atomic import atomic_write_text
from finegrain.config import load_config
from finegrain.errors import FinegrainError
from finegrain.peft import method_options
from finegrain.tasks import task_class

LAUNCH_DIR = ".launch"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
PROGRESS = re.compile(r"training:\s+\d+%\|[^|\r\n]*\|\s*(\d+)/(\d+)")
QUEUED, RUNNING, FINISHED, FAILED, CANCELLED = "queued", "running", "finished", "failed", "cancelled"
CANCEL_GRACE = 15.0  # seconds a cancelled run has to save and exit after Ctrl-C before it is killed


@dataclass
class Job:
    """One launched run."""

    id: int
    name: str
    config_file: Path
    output: Path
    log_file: Path
    state: str = QUEUED
    returncode: int | None = None
    submitted: float = field(default_factory=time.time)
    started: float | None = None
    ended: float | None = None
    cancel_requested: bool = False
    process: subprocess.Popen | None = None

    def describe(self) -> dict[str, Any]:
        done, total = self.progress()
        return {"id": self.id, "name": self.name, "state": self.state, "returncode": self.returncode,
                "submitted": self.submitted, "started": self.started, "ended": self.ended,
                "step": done, "total": total, "tail": self.tail() if self.state != QUEUED else ""}

    def output_text(self, last_bytes: int = 16384) -> str:
        """The end of the command's output (a progress bar redrawn every step makes it long)."""
        try:
            with open(self.log_file, "rb") as log:
                log.seek(max(0, log.seek(0, os.SEEK_END) - last_bytes))
                return log.read().decode("utf-8", errors="replace")
        except OSError:
            return ""

    def progress(self) -> tuple[int | None, int | None]:
        """(steps done, steps in all) from the last training progress bar `train` printed."""
        found = PROGRESS.findall(self.output_text(4000))
        return (int(found[-1][0]), int(found[-1][1])) if found else (None, None)

    def tail(self, lines: int = 6) -> str:
        """The command's last lines of output (progress bars collapsed to their latest state)."""
        kept = []
        for line in self.output_text().replace("\r\n", "\n").split("\n"):
            pieces = [piece for piece in line.split("\r") if piece.strip()]
            if pieces:
                kept.append(pieces[-1])
        return "\n".join(kept[-lines:])


class Launcher:
    """The queue of runs to train, and the thread that runs them one after another.

    Args:
        root: the runs directory; each run goes to `root/NAME`.
        command: the command that trains, before its config file and `--output` (default:
            this Python running `finegrain train`).
        env: extra environment variables for the command.
    """

    def __init__(self, root: Path, command: list[str] | None = None, env: dict[str, str] | None = None):
        self.root = Path(root)
        self.directory = self.root / LAUNCH_DIR
        self.command = command or [sys.executable, "-m", "finegrain.cli", "train"]
        self.env = {**os.environ, **(env or {})}
        self.jobs: dict[int, Job] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="finegrain-launch", daemon=True)
        self._thread.start()

    # -- checking and queueing -------------------------------------------------------------

    def check(self, name: str, text: str) -> Path:
        """Write the config to `.launch/NAME.yaml` and check it as `finegrain train` would; returns
        the file. Raises FinegrainError naming the line (`NAME.yaml:12: ...`) or the name."""
        if not NAME.fullmatch(name or ""):
            raise FinegrainError(f"name '{name}': use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")
        output = self.root / name
        with self._lock:
            taken = any(job.name == name and job.state in (QUEUED, RUNNING) for job in self.jobs.values())
        if taken or output.exists():
            raise FinegrainError(f"name '{name}': {output} already exists or is queued; choose another name")
        path = self.directory / f"{name}.yaml"
        atomic_write_text(path, text)
        config = load_config(path)
        try:
            task_class(config.task)  # as `train` checks it: the table sits above the config layer
        except FinegrainError as exc:
            raise FinegrainError(f"{getattr(config, 'sources', {}).get('task', path)}: {exc}") from None
        method_options(config)
        return path

    def submit(self, name: str, text: str) -> Job:
        """Check the config and queue its run."""
        config_file = self.check(name, text)
        with self._lock:
            job_id = next(self._ids)
            job = Job(job_id, name, config_file, self.root / name, self.directory / f"{name}.{job_id}.log")
            self.jobs[job_id] = job
            self._wake.notify_all()
        return job

    def cancel(self, job_id: int) -> Job:
        """Cancel a queued run, or stop a running one with SIGINT (its checkpoint is kept)."""
        with self._lock:
            job = self.jobs.get(job_id)
            if job is None:
                raise FinegrainError(f"job {job_id}: no such launched run")
            job.cancel_requested = True
            if job.state == QUEUED:
                job.state, job.ended = CANCELLED, time.time()
            elif job.state == RUNNING and job.process is not None:
                _signal_group(job.process, signal.SIGINT)
                # A run busy where Ctrl-C waits (a C kernel, a checkpoint write) still ends in time.
                threading.Thread(target=_stop, args=(job.process, CANCEL_GRACE), daemon=True).start()
        return job

    def describe(self) -> list[dict[str, Any]]:
        with self._lock:
            return [job.describe() for job in sorted(self.jobs.values(), key=lambda j: -j.id)]

    def close(self, wait: float = 10.0) -> None:
        """Stop the queue: queued runs are cancelled, a running one is stopped (SIGINT, then SIGKILL)."""
        with self._lock:
            self._closed = True
            running = [job for job in self.jobs.values() if job.state == RUNNING]
            self._wake.notify_all()
        for job in self.jobs.values():
            if job.state in (QUEUED, RUNNING):
                self.cancel(job.id)
        for job in running:
            _stop(job.process, wait)
        self._thread.join(wait)

    # -- the worker ------------------------------------------------------------------------

    def _next(self) -> Job | None:
        with self._lock:
            while not self._closed:
                queued = [job for job in self.jobs.values() if job.state == QUEUED]
                if queued:
                    job = min(queued, key=lambda j: j.id)
                    job.state, job.started = RUNNING, time.time()
                    return job
                self._wake.wait()
        return None

    def _work(self) -> None:
        while (job := self._next()) is not None:
            with open(job.log_file, "w", encoding="utf-8") as log:
                try:
                    process = subprocess.Popen(
                        [*self.command, str(job.config_file), "--output", str(job.output)], stdout=log,
                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env, start_new_session=True,
                    )
                except OSError as exc:
                    log.write(f"cannot start {self.command[0]}: {exc}\n")
                    process = None
                with self._lock:
                    job.process = process
                    if process is not None and job.cancel_requested:  # cancelled while it was starting
                        _signal_group(process, signal.SIGINT)
                returncode = process.wait() if process is not None else -1
            with self._lock:
                job.returncode, job.ended, job.process = returncode, time.time(), None
                job.state = CANCELLED if job.cancel_requested else FINISHED if returncode == 0 else FAILED


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass


def _stop(process: subprocess.Popen | None, wait: float) -> None:
    """Give a stopping run `wait` seconds to save and exit after SIGINT, then kill it."""
    if process is None:
        return
    try:
        process.wait(wait)
    except subprocess.TimeoutExpired:
        _signal_group(process, signal.SIGKILL)
        process.wait()
