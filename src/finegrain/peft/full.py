"""Full fine-tuning: every weight of the kept layers trains (AdamW), nothing is wrapped.

The method's entry in `finegrain.peft.METHODS` is `FullConfig`. It has no adapter layer
(`layer = None`): `finegrain.peft.base.inject` hands the model to `FullConfig.select`, which
freezes the weights that do not train and leaves the others trainable in place. With `layers`
only those decoder layers train (with the final norm and the head), so the frozen layers below
keep their prefix cache (`finegrain.train.prefix_cache`); without it the embeddings train too.

A finished run keeps its weights as a Hugging Face model directory (`finegrain.rundir.MODEL`):
`config.json`, `model.safetensors` (the trained decoder under `LlamaForCausalLM`'s names, cut to
`model.num_layers`, with `lm_head.weight` when the task model holds an untied one), the tokenizer
files and `head/head.safetensors` with the task's head modules (`score.weight`, ...). `transformers`
loads the directory as it is; `finegrain.load(run)` builds the run's task model on it and loads
the head (`load_head`); `finegrain.peft.full_files` reads and writes the directory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from finegrain.errors import FinegrainError
from finegrain.model.qlinear import QuantLinear

_DECODER_PREFIX = "model."


@dataclass
class FullOptions:
    """peft.method: full: its keys under `peft:`."""

    layers: list[int] | None = None  # train only these decoder layers (negative counts from the top); None: every weight


@dataclass
class FullConfig:
    """Every weight of the kept layers trains: `full`'s entry in `finegrain.peft.METHODS`.

    Args:
        layers: decoder layer indices that train (resolved, >= 0); None: the whole model,
            embeddings included.
        modules_to_save: the task's head modules, which always train.
    """

    name: ClassVar[str] = "full"
    options: ClassVar[type] = FullOptions
    peft_type: ClassVar[str] = "FULL"  # not a PEFT type: a full run is saved as a model directory
    layer: ClassVar[None] = None  # nothing is wrapped: `select` marks the trained weights in place
    mergeable: ClassVar[bool] = True  # the weights are the model: nothing to merge

    layers: list[int] | None = None
    modules_to_save: list[str] | None = None
    targets: str = "all"

    def adapter_options(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_section(cls, section: Any, layers: list[int] | None, modules_to_save: list[str]) -> FullConfig:
        """The config of a run's `peft:` keys (`FullOptions`), `layers` resolved against the kept layers."""
        return cls(layers=layers, modules_to_save=list(modules_to_save))

    def to_peft(self) -> dict[str, Any]:
        raise FinegrainError("full: a full fine-tune is a whole model, not a PEFT adapter; it is saved as a model directory")

    @classmethod
    def from_peft(cls, raw: dict[str, Any], path: Path, targets: Any, layers: list[int] | None,
                  modules_to_save: list[str] | None) -> FullConfig:
        raise FinegrainError(f"{path}: peft_type FULL is no PEFT adapter; a full run's weights are its model directory")

    def check_tensors(self, tensors: dict[str, torch.Tensor], path: Path, config_name: str, fix: str) -> None:
        """Nothing to check: a full run has no adapter tensors."""

    def select(self, model: nn.Module) -> nn.Module:
        """Make exactly the weights this config trains require grad, in place; returns `model`.

        Without `layers`: every parameter. With `layers`: those decoder layers, the final norm, an
        untied output head and the task's head modules; the embeddings and the layers below stay
        frozen, so the prefix cache still runs them once.
        """
        decoder = model.get_submodule("model")
        quantized = next((name for name, m in decoder.named_modules() if isinstance(m, QuantLinear)), None)
        if quantized is not None:  # its weight is a frozen int8/4-bit buffer, no parameter to train
            raise FinegrainError(
                f"peft.method: full trains every weight, and model.quantize keeps model.{quantized}'s frozen; "
                "drop model.quantize or choose an adapter method (lora, dora, ...)"
            )
        if self.layers is not None:
            present = len(decoder.layers)
            missing = [i for i in self.layers if not 0 <= i < present]
            if missing:
                raise FinegrainError(f"peft.layers: {missing} not in the model (its layers are 0-{present - 1})")
        embedding_ids = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
        for name, param in model.named_parameters():
            param.requires_grad_(self._trains(name, id(param) in embedding_ids))
        for name in self.modules_to_save or ():
            if name in dict(model.named_modules()):
                model.get_submodule(name).requires_grad_(True)
        return model

    def _trains(self, name: str, is_embedding: bool) -> bool:
        if self.layers is None:
            return True
        if is_embedding:  # an output head tied to the embeddings would change the cached layers' input
            return False
        if name.startswith(f"{_DECODER_PREFIX}layers."):
            return int(name.split(".")[2]) in self.layers
        return True  # the final norm, an untied lm_head, the task's head
