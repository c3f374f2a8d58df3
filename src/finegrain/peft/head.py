"""The task head alone, the backbone frozen: the linear-probe baseline, as a method (`peft.method: head`).

Nothing is injected: `finegrain.peft.base.inject` freezes every parameter but the task's head
modules (`modules_to_save`: a classifier's `score`, relation's `score` and marker embeddings),
which train and are saved. With nothing trainable inside the decoder, the frozen-prefix cache
(`train.prefix_cache`) computes the whole backbone once per example, and each training step
runs the final norm and the head only.

The file format is finegrain's own, in PEFT's shape: `adapter_config.json` with
`"peft_type": "FINEGRAIN_HEAD"`, `"target_modules": []` and the head's names in
`modules_to_save`; `adapter_model.safetensors` with the head's tensors under their module paths
(`base_model.model.score.weight`) and the sha256 of them in the metadata (`finegrain_sha256`),
which every read checks. `finegrain.load`, `--resume` and `finegrain serve` read it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from finegrain.errors import FinegrainError


class NoLayer(nn.Module):
    """The head method's layer: it wraps no module type, so `inject` never builds one; code that
    reads a method's `layer.adapter_keys` (the server's split of an adapter file) finds none."""

    adapter_keys: ClassVar[tuple[str, ...]] = ()
    wraps: ClassVar[tuple[type, ...]] = ()


@dataclass
class HeadOptions:
    """peft.method: head: no options of its own (no decoder layer is adapted: the recipe leaves
    `peft.layers` unset, and a LoRA config's `layers` is dropped with a note on switching)."""


@dataclass
class HeadOnlyConfig:
    """The head alone: the `head` entry of `finegrain.peft.METHODS`.

    Args:
        modules_to_save: the task's head modules, the only ones that train and are saved.
    """

    name: ClassVar[str] = "head"
    options: ClassVar[type] = HeadOptions
    peft_type: ClassVar[str] = "FINEGRAIN_HEAD"  # finegrain's own format (module docstring)
    layer: ClassVar[type[NoLayer]] = NoLayer

    modules_to_save: list[str] | None = None
    targets: tuple[str, ...] = ()  # nothing to wrap
    layers: list[int] | None = None

    def __post_init__(self) -> None:
        if not self.modules_to_save:
            raise FinegrainError(
                "peft.method: head trains the task's head alone, and this task has none (instruct trains the "
                "language model); use another peft.method, such as lora"
            )
        self.modules_to_save = list(self.modules_to_save)
        self.targets, self.layers = (), None

    def adapter_options(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_section(cls, section: HeadOptions, layers: list[int] | None, modules_to_save: list[str]) -> HeadOnlyConfig:
        """The config of a run: the task's head modules; `layers` does not apply."""
        return cls(modules_to_save=modules_to_save)

    def to_peft(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_peft(
        cls, raw: dict[str, Any], path: Path, targets: Any, layers: list[int] | None, modules_to_save: list[str] | None
    ) -> HeadOnlyConfig:
        """The config of a FINEGRAIN_HEAD `adapter_config.json` (`raw`).

        Raises:
            FinegrainError: it names target modules (a head file adapts none) or no head module.
        """
        if targets:
            raise FinegrainError(f"{path}: a FINEGRAIN_HEAD adapter has no target_modules, this one has {targets!r}; "
                                 "save the adapter again")
        try:
            return cls(modules_to_save=modules_to_save)
        except FinegrainError:
            raise FinegrainError(f"{path}: modules_to_save is empty, so the file holds no head; save the adapter again") from None

    def check_tensors(self, tensors: dict[str, torch.Tensor], path: Path, config_name: str, fix: str) -> None:
        """Every tensor belongs to a head module of `modules_to_save`."""
        heads = tuple(self.modules_to_save or ())
        for key in tensors:
            if not any(key.startswith(f"{m}.") or f".{m}." in key for m in heads):
                raise FinegrainError(f"{path}: '{key}' is not in a head module ({', '.join(heads)}) of {config_name}; {fix}")
