"""The `finegrain train` processes that `tune` (a trial each) and `compare` (a cell each) start:
Ctrl-C reaches them with the parent's, and a child stopped so is an interruption, not a failure."""

from __future__ import annotations

import signal
import subprocess

STOP_SECONDS = 30  # how long a child may take to stop after Ctrl-C before it is terminated
INTERRUPTED = (130, -signal.SIGINT)  # a child's exit status after Ctrl-C: `finegrain`'s own, or the signal's


def stop(process: subprocess.Popen) -> None:
    """Stop a child as Ctrl-C does; one started with SIGINT ignored (by a parent run as `cmd &`) is
    terminated instead."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=STOP_SECONDS)
    except subprocess.TimeoutExpired:
        process.terminate()
        process.wait()


def check_interrupted(process: subprocess.Popen) -> None:
    """KeyboardInterrupt where Ctrl-C stopped the (finished) child: the parent was interrupted too."""
    if process.returncode in INTERRUPTED:
        raise KeyboardInterrupt
