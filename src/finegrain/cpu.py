"""The CPU finegrain runs on: how many cores it may use, how its OpenMP threads wait, and
whether bf16 autocast pays (read from /proc/cpuinfo).

On a CPU without bf16 instructions (AVX-512 BF16 or AMX), bf16 matmuls are emulated in
float32 with extra conversions: slower than plain float32 and less exact, so finegrain keeps
float32 there.

torch is imported inside the functions that need it: `quiet_openmp` must run before torch
(and with it libgomp, which reads its environment once, when it loads) is imported.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import MutableMapping
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

CPUINFO = Path("/proc/cpuinfo")
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
LOADAVG = Path("/proc/loadavg")
# Who decides how OpenMP threads wait: a user who set any of these keeps their choice.
WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def quiet_openmp(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Make OpenMP threads sleep, not spin, while they wait; returns the variables it set.

    libgomp (torch's OpenMP, which MKL and finegrain's C kernels share) lets a thread that
    finished its share spin for ~3 ms before it sleeps. On a CPU that another process also
    uses, the spinning thread takes the core from the one everybody waits for, at every one of
    the thousands of parallel regions of a forward pass: a single request that takes 0.1 s
    alone took 3.4 s beside a 2-thread neighbour. `OMP_WAIT_POLICY=PASSIVE` makes waiting
    threads sleep at once, so a neighbour costs its share of the CPU, not 20x.

    It must run before torch is imported: libgomp reads its environment once, when it loads.
    `OMP_WAIT_POLICY` or `GOMP_SPINCOUNT` already set (by the user) are left as they are.
    """
    environ = os.environ if environ is None else environ
    if any(name in environ for name in WAIT_VARIABLES):
        return {}
    environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return {"OMP_WAIT_POLICY": "PASSIVE"}


def configure_openmp(threads: int | None = None, environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set OpenMP's environment for a finegrain process, before torch is imported; returns what it set.

    Waiting threads sleep (`quiet_openmp`), and `OMP_NUM_THREADS` is `threads` when given (a
    `--threads` flag), else, unless the user set it, the cores this process may use
    (`available_cpus`). The variable, not only `torch.set_num_threads`, matters: that sets the
    count for the calling thread only, while the server's batching thread and finegrain's C
    kernels start their parallel regions with OpenMP's default, read from this variable.
    """
    environ = os.environ if environ is None else environ
    changed = quiet_openmp(environ)
    if threads is not None or "OMP_NUM_THREADS" not in environ:
        environ["OMP_NUM_THREADS"] = changed["OMP_NUM_THREADS"] = str(threads or available_cpus())
    return changed


def cgroup_cpu_limit(cpu_max: Path = CGROUP_CPU_MAX) -> int | None:
    """The CPUs a cgroup v2 quota allows (`cpu.max`: "200000 100000" is 2), rounded up; None without a quota."""
    try:
        fields = cpu_max.read_text().split()
    except OSError:
        return None
    quota, period = (fields + ["", ""])[:2]
    if not quota.isdigit() or not period.isdigit() or int(period) == 0:  # "max": no quota
        return None
    return max(1, math.ceil(int(quota) / int(period)))


def available_cpus(cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """The cores this process may run on: its affinity mask (taskset, cpusets), capped by a cgroup
    CPU quota (a container's `--cpus`). `os.cpu_count()` counts the machine's cores, and more
    threads than cores to run them makes every parallel region wait for a descheduled thread."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    limit = cgroup_cpu_limit(cpu_max)
    return max(1, min(cpus, limit) if limit else cpus)


def others_running(loadavg: Path = LOADAVG) -> int | None:
    """Threads of the whole machine running or ready to run right now, not counting the caller:
    the fourth field of /proc/loadavg ("3/812": 3 runnable of 812) less one. None where unreadable."""
    try:
        running = loadavg.read_text().split()[3].split("/")[0]
    except (OSError, IndexError):
        return None
    return max(0, int(running) - 1) if running.isdigit() else None


def threads_now(most: int, loadavg: Path = LOADAVG, cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """How many threads the next parallel step should use: the cores nobody else is using now,
    between 1 and `most`.

    A parallel region ends when its slowest thread does. A thread that shares its core with
    another process's runs a fraction of the time, and every other thread of the region waits
    for it: beside a busy 2-thread neighbour on 2 cores, a 2-thread forward pass of 48 texts took
    14x its time alone, a 1-thread one about its fair share. Runnable threads beyond the cores
    outside this process's set are taken to sit on its cores (on a machine with more cores than
    the process may use, they may run elsewhere). Read once per batch: about 20 microseconds.
    """
    others = others_running(loadavg)
    if others is None:
        return most
    mine = available_cpus(cpu_max)
    elsewhere = max(0, (os.cpu_count() or mine) - mine)
    return max(1, min(most, mine - max(0, others - elsewhere)))


def cpu_flags(cpuinfo: Path = CPUINFO) -> frozenset[str]:
    """The feature flags of the first CPU listed in `cpuinfo`; empty where the file is missing (not Linux)."""
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def native_bf16(cpuinfo: Path = CPUINFO) -> bool:
    """True when the CPU computes bf16 natively (the `avx512_bf16` or `amx_bf16` flag)."""
    return bool(cpu_flags(cpuinfo) & BF16_FLAGS)


def training_autocast(requested: bool, cpuinfo: Path = CPUINFO) -> "torch.autocast":
    """bf16 autocast when `requested` (`train.bf16`) and the CPU has native bf16, else disabled.

    Weights stay float32 (so saved adapters and the optimizer are unaffected); inside the
    context, matmuls run in bf16 and reductions such as the loss stay float32.
    """
    import torch

    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=requested and native_bf16(cpuinfo))


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB: /proc's VmHWM, the high-water mark of this
    program's own memory. Not `getrusage`/`wait4`'s ru_maxrss: Linux carries the parent's memory at
    the fork across exec into it, so every `finegrain compare` cell after the first read the
    comparison's own peak (950 MB after it had timed a decoder's predictions) instead of the run's."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)  # kB
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # no /proc: KiB, bytes on macOS
    return round(peak / (2**20 if sys.platform == "darwin" else 1024), 1)
