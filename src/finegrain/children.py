"""The `finegrain train` processes that `tune` (a trial each) and `compare` (a cell each) start:
Ctrl-C reaches them with the parent's, and a child stopped so is an interruption, not a failure."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

from finegrain import rundir
from finegrain.config import load_config

STOP_SECONDS = 30  # how long a child may take to stop after Ctrl-C before it is terminated
INTERRUPTED = (130, -signal.SIGINT)  # a child's exit status after Ctrl-C: `finegrain`'s own, or the signal's


def refuse_other_settings(config_path: str | None, run_dir: Path, overrides: Sequence[str]) -> None:
    """Refuse a child's run directory whose run was started with other settings than the config and
    overrides give now (`rundir.refuse_other_settings`)."""
    if (run_dir / rundir.CONFIG).is_file():
        rundir.refuse_other_settings(run_dir, load_config(config_path, list(overrides)))


def train_args(config_path: str | None, run_dir: Path, overrides: Sequence[str]) -> list[str]:
    """The arguments after `finegrain train` for a child's run: `--resume` where an earlier attempt
    stopped part-way (its checkpoint is there), else the config, its overrides and `--output`."""
    if rundir.has_checkpoint(run_dir):
        return ["--resume", str(run_dir)]
    return [*([config_path] if config_path else []), *[a for o in overrides for a in ("--set", o)], "--output", str(run_dir)]


def watch(process: subprocess.Popen, follow: Callable[[], None] | None = None) -> None:
    """Wait until the child ends (`follow`, which returns then, or a plain wait). KeyboardInterrupt
    where Ctrl-C reached this process (the child is stopped first) or the child alone."""
    try:
        (follow or process.wait)()
    except KeyboardInterrupt:
        _stop(process)
        raise
    if process.returncode in INTERRUPTED:
        raise KeyboardInterrupt


def _stop(process: subprocess.Popen) -> None:
    """Stop a child as Ctrl-C does; one started with SIGINT ignored (by a parent run as `cmd &`) is
    terminated instead."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=STOP_SECONDS)
    except subprocess.TimeoutExpired:
        process.terminate()
        process.wait()

