"""finegrain's C kernels (int8_decode.c, train_kernels.c, qlinear.c): built with the system's C compiler on
first use, loaded with ctypes.

The library is compiled for this CPU (`-march=native`) into finegrain's cache directory
(`$FINEGRAIN_CACHE`, else `$XDG_CACHE_HOME/finegrain` or `~/.cache/finegrain`), under a name
that hashes the source, the compiler command and the CPU, so a changed source or another
machine sharing the directory gets its own build. Without a working compiler `library()`
returns None after one warning, and callers fall back to PyTorch.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import subprocess
import warnings
from pathlib import Path

from finegrain.atomic import atomic_path

SOURCES = [Path(__file__).with_name(name) for name in ("int8_decode.c", "train_kernels.c", "qlinear.c")]
# -fno-trapping-math: the kernels never read floating-point exception flags. Without it GCC
# vectorises a loop holding a conditional that might trap (the clamp in `exp_approx`) only
# with AVX-512's masked instructions: on AVX2 CPUs SwiGLU's two loops and the causal softmax's
# exponentials ran one float at a time (SwiGLU's backward 5x as slow at the default model's
# 320 x 1536 on Zen 2). Rounding is unchanged: the flag allows no reassociation.
FLAGS = ["-O3", "-march=native", "-fno-trapping-math", "-fopenmp", "-shared", "-fPIC"]


class Linear(ctypes.Structure):
    _fields_ = [("weight", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("bias", ctypes.c_void_p),
                ("out_features", ctypes.c_int64), ("in_features", ctypes.c_int64)]


class Layer(ctypes.Structure):
    _fields_ = [("input_norm", ctypes.c_void_p), ("post_norm", ctypes.c_void_p),
                ("qkv", Linear), ("o", Linear), ("gate_up", Linear), ("down", Linear),
                ("k_cache", ctypes.c_void_p), ("v_cache", ctypes.c_void_p)]


class Model(ctypes.Structure):
    _fields_ = [("num_layers", ctypes.c_int64), ("hidden", ctypes.c_int64), ("num_heads", ctypes.c_int64),
                ("num_kv_heads", ctypes.c_int64), ("head_dim", ctypes.c_int64), ("intermediate", ctypes.c_int64),
                ("max_len", ctypes.c_int64), ("eps", ctypes.c_float), ("inv_freq", ctypes.c_void_p),
                ("final_norm", ctypes.c_void_p), ("lm_head", Linear), ("layers", ctypes.POINTER(Layer))]


def cache_dir() -> Path:
    if os.environ.get("FINEGRAIN_CACHE"):
        return Path(os.environ["FINEGRAIN_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "finegrain"


def _compiler() -> list[str]:
    return shlex.split(os.environ.get("CC") or "cc")  # not sysconfig's CC: that names the compiler of Python's own build


def _cpu_identity() -> str:
    """The CPU's model and feature flags (what -march=native compiles for)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    return "\n".join(sorted({line for line in lines if line.startswith(("model name", "flags", "Features"))}))


def _build() -> Path:
    command = _compiler() + FLAGS
    parts = [source.read_bytes() for source in SOURCES] + [" ".join(command).encode(), _cpu_identity().encode()]
    key = hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]
    target = cache_dir() / "native" / f"kernels-{key}.so"
    if not target.exists():
        with atomic_path(target) as tmp:
            sources = [str(source) for source in SOURCES]
            result = subprocess.run(command + sources + ["-o", str(tmp)], capture_output=True, text=True, timeout=300)
            if result.returncode != 0:
                first_error = next((line for line in result.stderr.splitlines() if "error" in line), result.stderr.strip())
                raise OSError(f"`{' '.join(command)}` failed: {first_error[:300]}")
    return target


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None (with one warning) where they cannot be built or are turned off.

    `FINEGRAIN_NATIVE=0` turns them off.
    """
    if os.environ.get("FINEGRAIN_NATIVE", "1") == "0":
        return None
    try:
        lib = ctypes.CDLL(str(_build()))
    except (OSError, subprocess.SubprocessError) as error:
        warnings.warn(
            f"finegrain could not build its C kernels ({error}); int8 decoding and float32 training use slower "
            "PyTorch code. "
            "Install a C compiler with OpenMP (gcc), or point CC at one.",
            RuntimeWarning, stacklevel=2,
        )
        return None
    pointer, int64 = ctypes.c_void_p, ctypes.c_int64  # tensors pass their data_ptr()
    lib.fg_int8_linear.argtypes = [ctypes.POINTER(Linear), pointer, pointer, int64]
    lib.fg_int8_linear.restype = None
    lib.fg_decode_workspace.argtypes = [ctypes.POINTER(Model), int64]
    lib.fg_decode_workspace.restype = int64
    lib.fg_decode_step.argtypes = [ctypes.POINTER(Model), pointer, int64, pointer, int64, pointer, int64, pointer, pointer]
    lib.fg_decode_step.restype = None
    floats, u64, i32 = ctypes.c_float, ctypes.c_uint64, ctypes.c_int32
    signatures = {
        "fg_attention_forward": [pointer] * 5 + [int64] * 5 + [floats] + [pointer] * 4,
        "fg_attention_backward": [pointer] * 7 + [int64] * 5 + [floats] + [pointer] * 3,
        "fg_swiglu_forward": [pointer] * 3 + [int64],
        "fg_swiglu_backward": [pointer] * 5 + [int64],
        "fg_rms_norm_forward": [pointer, pointer, floats, int64, int64, pointer, pointer],
        "fg_rms_norm_backward": [pointer] * 4 + [int64] * 3 + [pointer],
        "fg_keep_mask": [pointer, int64, u64, i32],
        "fg_lora_down": [pointer] * 4 + [int64] * 3,
        "fg_lora_grad_A": [pointer] * 4 + [int64] * 3,
        "fg_lora_grad_x": [pointer] * 4 + [int64] * 3,
        "fg_q_dequantize": [int64, pointer, int64, pointer, int64, int64, int64, pointer],
        "fg_q_linear": [int64, pointer, int64] + [pointer] * 4 + [int64] * 3,
    }
    for name, argtypes in signatures.items():
        function = getattr(lib, name)
        function.argtypes, function.restype = argtypes, None
    return lib
