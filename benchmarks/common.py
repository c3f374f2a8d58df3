"""Shared by the benchmarks: machine facts, the matmul ceiling, peak RSS, side-by-side subprocesses."""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time

import torch


def machine_facts() -> dict:
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
    }


def matmul_ceiling_gflops(n: int = 2048, repeats: int = 3) -> float:
    """GFLOP/s of a large fp32 matmul on all cores: the dense-compute ceiling of this machine."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_side(script: str, side: str, args: list[str]) -> dict:
    """Run one side of a benchmark in its own process (so peak RSS is its own); it prints JSON last."""
    result = subprocess.run(
        [sys.executable, script, "--side", side, *args], capture_output=True, text=True,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
    )
    if result.returncode != 0:
        sys.stderr.write(result.stderr[-4000:])
        raise SystemExit(f"{side} side failed (exit {result.returncode})")
    return json.loads(result.stdout.strip().splitlines()[-1])


def print_facts(facts: dict) -> None:
    print("machine: " + ", ".join(f"{k} {v}" for k, v in facts.items()))
