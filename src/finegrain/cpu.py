"""What this CPU does natively, read from /proc/cpuinfo: decides whether bf16 autocast pays.

On a CPU without bf16 instructions (AVX-512 BF16 or AMX), bf16 matmuls are emulated in
float32 with extra conversions: slower than plain float32 and less exact, so finegrain keeps
float32 there.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

CPUINFO = Path("/proc/cpuinfo")
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


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


def training_autocast(requested: bool, cpuinfo: Path = CPUINFO) -> torch.autocast:
    """bf16 autocast when `requested` (`train.bf16`) and the CPU has native bf16, else disabled.

    Weights stay float32 (so saved adapters and the optimizer are unaffected); inside the
    context, matmuls run in bf16 and reductions such as the loss stay float32.
    """
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=requested and native_bf16(cpuinfo))


class FrozenWeightsInBF16:
    """Holds a model's frozen matrices (its linear layers' weights) in bf16 while `hold()`.

    Under bf16 autocast every linear layer casts its float32 weight to bf16 in every forward,
    ~18% of a bf16 LoRA step on the default model; weights held in bf16 give the same matmuls
    without those copies. Embedding tables stay float32 (a lookup is no matmul, and a tied
    output head shares the table), and so do the modules in `skip`. `release()` puts the
    float32 originals back, bit for bit. With `enabled=False` it holds nothing.
    """

    def __init__(self, model: torch.nn.Module, enabled: bool = True, skip: Iterable[torch.nn.Module] = ()):
        kept = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
        kept |= {id(p) for module in skip for p in module.parameters()}
        unique = {id(p): p for p in model.parameters()}.values()
        self.params = [p for p in unique if enabled and p.dim() == 2 and not p.requires_grad
                       and p.dtype == torch.float32 and id(p) not in kept]
        self.originals: list[torch.Tensor] | None = None

    def hold(self) -> None:
        if self.originals is None:
            self.originals = [p.data for p in self.params]
            for p in self.params:
                p.data = p.data.to(torch.bfloat16)

    def release(self) -> None:
        if self.originals is not None:
            for p, original in zip(self.params, self.originals):
                p.data = original
            self.originals = None

    @contextlib.contextmanager
    def released(self) -> Iterator[None]:
        """The float32 weights inside the block (validation predicts in float32), held again after it."""
        held = self.originals is not None
        self.release()
        try:
            yield
        finally:
            if held:
                self.hold()
