"""Which device a run computes on (`train.device`, `--device`), and moving its batches there.

finegrain is built for the CPU, and the CPU path stays as it was: on the CPU nothing here copies
or synchronises anything (`to_device` hands the batch back as it is, `place` adds no hook). On
CUDA or MPS the model's parameters move to the device once, every collated batch follows it
there, and what leaves the model for a task to decode (`predict_outputs`) comes back to the
CPU. The C kernels and oneDNN matmuls take CPU tensors only (`finegrain.model.fused.kernels`,
`finegrain.model.linear`): on another device the PyTorch reference runs, SDPA included.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from finegrain.errors import FinegrainError

DEVICES = ("auto", "cpu", "cuda", "mps")


def resolve_device(name: str, key: str = "train.device") -> torch.device:
    """The `torch.device` for a `train.device` value: `auto` is CUDA where torch sees one, else the CPU.

    `cuda` or `mps` without such a device is the one-line error naming `key` (the config key or
    the `--device` flag it came from).
    """
    if name not in DEVICES:
        raise FinegrainError(f"{key}: '{name}' is not a device; use auto, cpu, cuda or mps")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise FinegrainError(f"{key}: cuda, but torch sees no CUDA device; use cpu or auto")
    if name == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise FinegrainError(f"{key}: mps, but torch sees no Apple GPU (MPS); use cpu or auto")
    return torch.device(name)


def model_device(model: nn.Module) -> torch.device:
    """Where the model's parameters are (the CPU for a model without any)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def to_device(value: Any, device: torch.device) -> Any:
    """`value` (a collated batch: a dict of tensors, lists and numbers) with its tensors on `device`.

    On the CPU it is `value` itself: no copy, no new dict.
    """
    if device.type == "cpu":
        return value
    if torch.is_tensor(value):
        return value.to(device, non_blocking=True)
    if isinstance(value, dict):
        return {key: to_device(item, device) for key, item in value.items()}
    if isinstance(value, (list, tuple)) and any(torch.is_tensor(item) for item in value):
        return type(value)(to_device(item, device) for item in value)
    return value


def _batch_to_device(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    device = model_device(module)
    return tuple(to_device(a, device) for a in args), {k: to_device(v, device) for k, v in kwargs.items()}


def place(model: nn.Module, device: torch.device) -> nn.Module:
    """Move a task model to `device`; off the CPU, every call of it also moves its batch there first
    (a forward pre-hook), so that each task's `predict` runs unchanged. On the CPU: nothing at all."""
    if device.type == "cpu":
        return model
    model.to(device)
    model.register_forward_pre_hook(_batch_to_device, with_kwargs=True)
    return model


def reset_peak_memory(device: torch.device) -> None:
    """Start counting a CUDA device's peak allocated memory afresh (nothing elsewhere)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float | None:
    """The peak memory PyTorch allocated on a CUDA device since `reset_peak_memory`, in MiB
    (`torch.cuda.max_memory_allocated`); None on another device, where the process's RSS tells."""
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
