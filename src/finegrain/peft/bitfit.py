"""BitFit (Ben Zaken et al. 2022) for LLaMA: train the norm weights and added biases, nothing else.

BitFit trains a model's biases. LLaMA has none, and its norms are RMSNorms with a weight only, so
here the trainable vectors are:

- the weights of the targeted RMSNorms (`input_layernorm`, `post_attention_layernorm`, and the
  final `norm`), as PEFT's LayerNorm tuning (`LN_TUNING`) trains them: each targeted norm gets a
  trainable copy of its weight (`BitfitNorm`), used in its place;
- a bias on each targeted linear layer, added to its output and starting at zero (`BitfitLinear`),
  so the model starts unchanged.

Both are layers of `finegrain.peft.base` with named adapters, one active (PEFT's `set_adapter`),
and keep the base `weight` (and `bias`) under its own name. The active adapter's tensor is
`...input_layernorm.ln_tuning_layers.weight` (the name PEFT's LN_TUNING files use) or
`...q_proj.bitfit_bias`.

Files. With norms only, the adapter directory is a PEFT `LN_TUNING` adapter, which
`PeftModel.from_pretrained` loads and which finegrain loads from PEFT (`target_modules` lists the
norms; with `layers` they are the full module paths, as LNTuningConfig has no
`layers_to_transform`). With biases it is finegrain's own format in the same shape:
`adapter_config.json` with `"peft_type": "FINEGRAIN_BITFIT"`, `target_modules` the full paths of
the adapted modules, and `adapter_model.safetensors` with the norm weights as above and each
bias as `base_model.model.model.layers.{i}.self_attn.q_proj.bitfit_bias` (out_features,), plus the
whole modules of `modules_to_save` and the sha256 of all tensors in the metadata, which every
read checks. `finegrain.load`, `--resume` and `finegrain serve` read both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from finegrain.errors import FinegrainError
from finegrain.model import ops
from finegrain.model.linear import Linear, linear
from finegrain.model.llama import RMSNorm

NORM_KEY = "ln_tuning_layers.weight"
BIAS_KEY = "bitfit_bias"
OWN_PEFT_TYPE = "FINEGRAIN_BITFIT"  # the file type with biases; norms alone are PEFT's LN_TUNING
TARGETS = (
    "input_layernorm", "post_attention_layernorm", "norm",
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
)


def _adapter_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 over a half-precision base, as LoRA's adapters: small updates vanish in bfloat16."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class BitfitLayer(nn.Module):
    """What `finegrain.peft.base` wraps for BitFit: an RMSNorm (`BitfitNorm`) or a linear layer
    (`BitfitLinear`); `from_linear` picks the one that fits the module."""

    adapter_keys: ClassVar[tuple[str, ...]] = (NORM_KEY, BIAS_KEY)  # a layer holds one of them
    wraps: ClassVar[tuple[type, ...]] = (nn.Linear, RMSNorm)  # the modules `inject` may target

    adapters: dict[str, Any]
    active_adapter: str | None
    merged: bool

    @classmethod
    def from_linear(cls, module: nn.Module, adapter_name: str = "default", **options: Any) -> BitfitLayer:
        """Wrap `module` (an RMSNorm or a linear layer), sharing and freezing its tensors, with
        adapter `adapter_name` active."""
        layer = BitfitNorm.wrap(module) if isinstance(module, RMSNorm) else BitfitLinear.wrap(module)
        layer.add_adapter(adapter_name, **options)
        layer.set_adapter(adapter_name)
        return layer

    def _check_switch(self, name: str | None) -> None:
        if self.merged:
            raise FinegrainError("bitfit: the active adapter is merged into the base layer; unmerge it before switching")
        if name is not None and name not in self.adapters:
            raise FinegrainError(f"bitfit: no adapter named '{name}' on this layer; it has {', '.join(self.adapters) or 'none'}")

    def _check_new(self, name: str) -> None:
        if name in self.adapters:
            raise FinegrainError(f"bitfit: this layer already has an adapter named '{name}'; give the new one another name")


class BitfitNorm(BitfitLayer):
    """An RMSNorm whose weight is replaced by the active adapter's trainable copy of it.

    The frozen base weight stays `weight`; the active copy is the child `ln_tuning_layers`
    (an `RMSNorm`, as PEFT's LN tuning deep-copies the norm), so its state-dict name is PEFT's.
    """

    wraps: ClassVar[tuple[type, ...]] = (RMSNorm,)

    def __init__(self, dim: int, eps: float, dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device), requires_grad=False)
        self.adapters: dict[str, RMSNorm] = {}
        self.active_adapter: str | None = None
        self.register_module("ln_tuning_layers", None)
        self.merged = False
        self._unmerged_weight: torch.Tensor | None = None

    @classmethod
    def wrap(cls, norm: RMSNorm) -> BitfitNorm:
        layer = cls(norm.weight.shape[0], norm.eps, dtype=norm.weight.dtype, device=norm.weight.device)
        layer.weight = norm.weight
        layer.weight.requires_grad_(False)
        return layer

    def add_adapter(self, name: str) -> None:
        """Add adapter `name`: a copy of the base weight (so it starts as a no-op)."""
        self._check_new(name)
        copy = RMSNorm(self.weight.shape[0], self.eps).to(device=self.weight.device, dtype=_adapter_dtype(self.weight.dtype))
        with torch.no_grad():
            copy.weight.copy_(self.weight)
        self.adapters[name] = copy

    def set_adapter(self, name: str | None) -> None:
        """Make adapter `name` the one forward applies (and state_dict holds); None: the bare base."""
        if name == self.active_adapter:
            return
        self._check_switch(name)
        self._modules["ln_tuning_layers"] = None if name is None else self.adapters[name]
        self.__dict__["active_adapter"] = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (..., H) -> (..., H)
        norm = self._modules["ln_tuning_layers"]
        if norm is None or self.merged:
            return ops.rms_norm(x, self.weight, self.eps)
        return ops.rms_norm(x, norm.weight.to(self.weight.dtype), self.eps)  # a float32 copy on a bf16 base: as the base

    @torch.no_grad()
    def merge(self) -> None:
        """Copy the active adapter's weight into the base weight (the base's is kept for `unmerge`)."""
        norm = self._modules["ln_tuning_layers"]
        if not self.merged and norm is not None:
            self._unmerged_weight = self.weight.detach().clone()
            self.weight.copy_(norm.weight.to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Put the base weight back; a no-op when not merged."""
        if self.merged:
            self.weight.copy_(self._unmerged_weight)
            self._unmerged_weight, self.merged = None, False

    def base_layer(self) -> RMSNorm:
        """A plain `RMSNorm` holding this layer's `weight` (with whatever is merged into it)."""
        plain = RMSNorm(self.weight.shape[0], self.eps)
        plain.weight = self.weight
        return plain

    def extra_repr(self) -> str:
        return f"dim={self.weight.shape[0]}, adapters={list(self.adapters)}, active={self.active_adapter}, merged={self.merged}"


class BitfitLinear(BitfitLayer):
    """A frozen linear layer plus the active adapter's trainable bias `bitfit_bias` (out_features,),
    zero at the start. On a base layer with a bias of its own the two add up, as training that bias would."""

    wraps: ClassVar[tuple[type, ...]] = (nn.Linear,)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype, device=device), requires_grad=False)
        self.bias = (
            nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None
        )
        self.adapters: dict[str, nn.Parameter] = {}
        self.active_adapter: str | None = None
        self.register_parameter(BIAS_KEY, None)
        self.merged = False

    @classmethod
    def wrap(cls, module: nn.Linear) -> BitfitLinear:
        layer = cls(module.in_features, module.out_features, bias=module.bias is not None,
                    dtype=module.weight.dtype, device=module.weight.device)
        layer.weight = module.weight
        layer.weight.requires_grad_(False)
        if module.bias is not None:
            layer.bias = module.bias
            layer.bias.requires_grad_(False)
        return layer

    def add_adapter(self, name: str) -> None:
        """Add adapter `name`: a zero bias (so it starts as a no-op)."""
        self._check_new(name)
        self.adapters[name] = nn.Parameter(
            torch.zeros(self.out_features, dtype=_adapter_dtype(self.weight.dtype), device=self.weight.device)
        )

    def set_adapter(self, name: str | None) -> None:
        """Make adapter `name` the one forward applies (and state_dict holds); None: the bare base."""
        if name == self.active_adapter:
            return
        self._check_switch(name)
        self._parameters[BIAS_KEY] = None if name is None else self.adapters[name]
        self.__dict__["active_adapter"] = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (..., in) -> (..., out)
        y = linear(x, self.weight, self.bias)
        added = self._parameters[BIAS_KEY]
        return y if added is None else y + added.to(y.dtype)

    def merge(self) -> None:
        """Mark the bias merged: `base_layer` then returns a linear layer that carries it (forward
        adds it either way; a bias costs one addition merged or not)."""
        if self._parameters[BIAS_KEY] is not None:
            self.merged = True

    def unmerge(self) -> None:
        """Undo `merge`."""
        self.merged = False

    def base_layer(self) -> Linear:
        """A plain `Linear` holding this layer's `weight` and `bias`; merged, its bias includes the adapter's."""
        added = self._parameters[BIAS_KEY] if self.merged else None
        plain = Linear(self.in_features, self.out_features, bias=self.bias is not None or added is not None, device="meta")
        plain.weight = self.weight
        if added is None:
            plain.bias = self.bias
        else:
            merged = added.detach().to(self.weight.dtype) + (0 if self.bias is None else self.bias.detach())
            plain.bias = nn.Parameter(merged, requires_grad=False)
        return plain

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"adapters={list(self.adapters)}, active={self.active_adapter}, merged={self.merged}"
        )


# ---------------------------------------------------------------------------------------------- the method


@dataclass
class BitfitOptions:
    """peft.method: bitfit: BitFit's keys under `peft:`."""

    # RMSNorms whose weights train and linear layers that get a bias, by module name (as lora.targets)
    targets: list[str] | str = field(default_factory=lambda: list(TARGETS))
    layers: list[int] | None = None  # adapt only these decoder layers (the final norm then trains only if named by path)


@dataclass
class BitfitConfig:
    """BitFit: the `bitfit` entry of `finegrain.peft.METHODS`.

    Args:
        targets: module names matched as LoRA's (a name, a full path, or a regular expression over
            the whole path): RMSNorms get a trainable weight, linear layers a trainable bias;
            "all-linear" (LoRA's value, kept when a LoRA config switches method) takes every norm
            and linear layer inside the decoder layers.
        layers: decoder layer indices to adapt; None for all. As in PEFT, a module outside the
            decoder layers (the final `norm`) is then left out unless named by its path (`model.norm`).
        modules_to_save: modules trained in full and saved with the adapter (a task head).
    """

    name: ClassVar[str] = "bitfit"
    options: ClassVar[type] = BitfitOptions
    peft_type: ClassVar[str] = "LN_TUNING"  # with norms only; `file_config` writes OWN_PEFT_TYPE with biases
    peft_types: ClassVar[tuple[str, ...]] = ("LN_TUNING", OWN_PEFT_TYPE)  # the file types it reads
    layer: ClassVar[type[BitfitLayer]] = BitfitLayer

    targets: tuple[str, ...] | list[str] | str = TARGETS
    layers: list[int] | None = None
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.targets, str) and self.targets != "all-linear":
            self.targets = self.targets if not self.targets.isidentifier() else (self.targets,)
        elif not isinstance(self.targets, str):
            self.targets = tuple(self.targets)
            if not self.targets:
                raise FinegrainError("peft.targets: empty; name norms and linear layers such as input_layernorm, q_proj")
        if self.modules_to_save is not None:
            self.modules_to_save = list(self.modules_to_save)

    def adapter_options(self) -> dict[str, Any]:
        """BitFit's layers take no options."""
        return {}

    @classmethod
    def from_section(cls, section: BitfitOptions, layers: list[int] | None, modules_to_save: list[str]) -> BitfitConfig:
        """The config of a run's `peft:` keys (`BitfitOptions`), with `layers` resolved from the top."""
        return cls(targets=section.targets, layers=layers, modules_to_save=modules_to_save)

    def to_peft(self) -> dict[str, Any]:
        """LN_TUNING's own key; `file_config` settles the rest once the adapted modules are known."""
        return {"exclude_modules": None}

    def file_config(self, peft_config: dict[str, Any], layers: dict[str, nn.Module]) -> dict[str, Any]:
        """The `adapter_config.json` of the adapted `layers` (by path): PEFT's LN_TUNING when they
        are all norms, else OWN_PEFT_TYPE. Neither has `layers_to_transform`: with `layers`, the
        targets are the full paths."""
        peft_config = dict(peft_config)
        layers_to_transform = peft_config.pop("layers_to_transform", None)
        peft_config.pop("layers_pattern", None)
        if layers_to_transform is not None:
            peft_config["target_modules"] = sorted(layers)
        if any(isinstance(layer, BitfitLinear) for layer in layers.values()):
            peft_config["peft_type"] = OWN_PEFT_TYPE
        return peft_config

    @classmethod
    def from_peft(
        cls, raw: dict[str, Any], path: Path, targets: Any, layers: list[int] | None, modules_to_save: list[str] | None
    ) -> BitfitConfig:
        """The config of an LN_TUNING or FINEGRAIN_BITFIT `adapter_config.json` (`raw`).

        Raises:
            FinegrainError: the file excludes modules (`exclude_modules`), which finegrain does not read.
        """
        if raw.get("exclude_modules") not in (None, [], ""):
            raise FinegrainError(f"{path}: exclude_modules={raw['exclude_modules']!r} is not supported by finegrain; "
                                 "list the target_modules instead")
        try:
            return cls(targets=targets, layers=layers, modules_to_save=modules_to_save)
        except FinegrainError as exc:
            raise FinegrainError(f"{path}: {exc}") from None

    def check_tensors(self, tensors: dict[str, torch.Tensor], path: Path, config_name: str, fix: str) -> None:
        """Each norm weight and bias is a vector."""
        for key, tensor in tensors.items():
            if key.endswith((f".{NORM_KEY}", f".{BIAS_KEY}")) and tensor.dim() != 1:
                raise FinegrainError(f"{path}: '{key}' has shape {tuple(tensor.shape)}, a vector is expected; {fix}")
