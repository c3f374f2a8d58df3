"""CPU feature detection: bf16 autocast only where the flags say the CPU computes bf16 natively."""

import pytest
import torch

from finegrain.cpu import cpu_flags, native_bf16, training_autocast

ZEN1 = "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr sse sse2 ht syscall nx mmxext fxsr_opt pdpe1gb avx avx2 fma bmi1 bmi2 sha_ni"
SAPPHIRE_RAPIDS = "fpu sse sse2 avx avx2 fma avx512f avx512bw avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8"
COOPER_LAKE = "fpu sse sse2 avx avx2 fma avx512f avx512bw avx512_bf16"


def cpuinfo(tmp_path, flags: str):
    path = tmp_path / "cpuinfo"
    processor = f"processor\t: {{}}\nvendor_id\t: X\nmodel name\t: A CPU\nflags\t\t: {flags}\n\n"
    path.write_text(processor.format(0) + processor.format(1))
    return path


@pytest.mark.parametrize(("flags", "native"), [(ZEN1, False), (SAPPHIRE_RAPIDS, True), (COOPER_LAKE, True)],
                         ids=["zen1", "amx", "avx512-bf16"])
def test_native_bf16_follows_the_flags(tmp_path, flags, native):
    assert native_bf16(cpuinfo(tmp_path, flags)) is native


def test_flags_are_whole_words(tmp_path):
    """`avx512_bf16_extra` or `no_amx_bf16` are other flags, not the ones we look for."""
    path = cpuinfo(tmp_path, "avx2 avx512_bf16_extra no_amx_bf16")
    assert "avx2" in cpu_flags(path)
    assert not native_bf16(path)


def test_no_cpuinfo_means_no_bf16(tmp_path):
    assert cpu_flags(tmp_path / "missing") == frozenset()
    assert not native_bf16(tmp_path / "missing")


def test_training_autocast_runs_matmuls_in_bf16_only_when_native(tmp_path):
    a, b = torch.randn(4, 8), torch.randn(8, 2)
    with training_autocast(True, cpuinfo(tmp_path, SAPPHIRE_RAPIDS)):
        assert (a @ b).dtype == torch.bfloat16
    with training_autocast(False, cpuinfo(tmp_path, SAPPHIRE_RAPIDS)):
        assert (a @ b).dtype == torch.float32
    with training_autocast(True, cpuinfo(tmp_path, ZEN1)):
        assert (a @ b).dtype == torch.float32


# ----- threads and OpenMP ------------------------------------------------------------------


def test_configure_openmp_keeps_what_the_user_set():
    from finegrain.cpu import available_cpus, configure_openmp

    environ: dict[str, str] = {}
    assert configure_openmp(environ=environ) == {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": str(available_cpus())}
    assert environ["OMP_WAIT_POLICY"] == "PASSIVE"
    for own in ({"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "10000"}):
        environ = {**own, "OMP_NUM_THREADS": "3"}
        assert configure_openmp(environ=environ) == {} and environ == {**own, "OMP_NUM_THREADS": "3"}
    environ = {"OMP_NUM_THREADS": "3"}
    configure_openmp(1, environ)  # an explicit --threads wins over the variable
    assert environ["OMP_NUM_THREADS"] == "1"


def test_the_cli_sets_openmp_before_torch_loads():
    """libgomp reads OMP_WAIT_POLICY once, when torch loads it: `finegrain` must set it first."""
    import os
    import subprocess
    import sys

    script = (
        "import sys\nfrom finegrain.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "import os\nprint('torch' in sys.modules, os.environ.get('OMP_WAIT_POLICY'), os.environ.get('OMP_NUM_THREADS'))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.stdout.split()[-3:] == ["False", "PASSIVE", str(len(os.sched_getaffinity(0)))], result.stderr[-2000:]


def test_available_cpus_follows_a_cgroup_quota(tmp_path):
    from finegrain.cpu import available_cpus, cgroup_cpu_limit

    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("150000 100000\n")
    assert cgroup_cpu_limit(cpu_max) == 2
    cpu_max.write_text("50000 100000\n")
    assert cgroup_cpu_limit(cpu_max) == 1 and available_cpus(cpu_max) == 1
    cpu_max.write_text("max 100000\n")
    assert cgroup_cpu_limit(cpu_max) is None and cgroup_cpu_limit(tmp_path / "missing") is None


@pytest.mark.parametrize(("running", "expected"), [(1, 2), (2, 1), (3, 1), (9, 1)])
def test_threads_now_leaves_busy_cores_alone(tmp_path, monkeypatch, running, expected):
    """On 2 cores of its own, the caller (1 runnable thread) takes both when nothing else runs,
    one as soon as another thread is runnable."""
    import os

    from finegrain.cpu import threads_now

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    loadavg = tmp_path / "loadavg"
    loadavg.write_text(f"0.50 0.40 0.30 {running}/120 4321\n")
    assert threads_now(2, loadavg, tmp_path / "no-cgroup") == expected
    assert threads_now(1, loadavg, tmp_path / "no-cgroup") == 1
    assert threads_now(2, tmp_path / "missing", tmp_path / "no-cgroup") == 2


def test_threads_now_on_a_slice_of_a_larger_machine(tmp_path, monkeypatch):
    """4 of 16 cores: 11 other runnable threads may sit on the 12 cores outside; the 13th is on ours."""
    import os

    from finegrain.cpu import threads_now

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    loadavg = tmp_path / "loadavg"
    for running, expected in ((12, 4), (14, 3), (30, 1)):
        loadavg.write_text(f"1.0 1.0 1.0 {running}/300 1\n")
        assert threads_now(4, loadavg, tmp_path / "no-cgroup") == expected


def test_the_server_picks_threads_per_batch_unless_told_not_to(monkeypatch):
    from finegrain.serve import engine as engine_module

    calls: list[int] = []
    monkeypatch.setattr(engine_module, "threads_now", lambda most: 1)  # another process is busy
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    adaptive = engine_module.Engine(registry=None, metrics=None)
    adaptive.pick_threads()
    adaptive.pick_threads()
    assert calls == [1]  # set once, on the worker thread, when the choice changes
    monkeypatch.setenv("FINEGRAIN_ADAPT_THREADS", "0")
    fixed = engine_module.Engine(registry=None, metrics=None)
    fixed.pick_threads()
    assert calls == [1] and fixed.threads == 2
