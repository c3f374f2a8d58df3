"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020): a small residual MLP on a sublayer's output.

    h = y + up(act(down(y))),   y = the sublayer's output (..., hidden)

`down` projects the hidden states to `hidden // reduction_factor` features, `act` is the
non-linearity and `up` projects back; `up` starts at zero, so the model starts unchanged. In this
LLaMA a sublayer's output is the output of one linear layer, `self_attn.o_proj` (attention) or
`mlp.down_proj` (the FFN), so `BottleneckLinear` wraps that layer and adds the adapter to what it
returns, before the decoder layer's residual sum, where Houlsby puts it. Placements:
`houlsby` (after attention and after the FFN) and `pfeiffer` (after the FFN only).

Like `LoraLinear`, the layer keeps the base `weight` (and `bias`) as its own frozen parameters, so
base checkpoints load with no key map, and holds named adapters, one of them active (PEFT's
`set_adapter`); only the active adapter's `adapter_down` and `adapter_up` are children. The
non-linearity sits between the two projections, so an adapter cannot be folded into the base
weight: `merge` refuses in one line.

The file format. PEFT has no bottleneck adapter, so the directory is finegrain's own, in PEFT's
shape: `adapter_config.json` holds `"peft_type": "FINEGRAIN_ADAPTER"`, the keys every finegrain
adapter shares (`target_modules`, `layers_to_transform`, `modules_to_save`, `task_type`,
`base_model_name_or_path`) and the method's own: `placement`, `reduction_factor`,
`non_linearity`. `adapter_model.safetensors` holds, for each wrapped layer,

    base_model.model.model.layers.{i}.self_attn.o_proj.adapter_down.weight   (bottleneck, hidden)
    base_model.model.model.layers.{i}.self_attn.o_proj.adapter_down.bias     (bottleneck,)
    base_model.model.model.layers.{i}.self_attn.o_proj.adapter_up.weight     (hidden, bottleneck)
    base_model.model.model.layers.{i}.self_attn.o_proj.adapter_up.bias       (hidden,)

(`mlp.down_proj` likewise), float32, plus the whole modules of `modules_to_save` (a task head
`score`), with the sha256 of all tensors in the safetensors metadata (`finegrain_sha256`), which
every read checks, as for PEFT-format adapters. `bottleneck = max(1, hidden // reduction_factor)`.
`PeftModel` does not load it (an unknown `peft_type`); `finegrain.load`, `--resume` and
`finegrain serve` do.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from finegrain.errors import FinegrainError
from finegrain.model.linear import Linear, linear
from finegrain.peft.frozen import init_frozen, plain_linear, share_frozen

PLACEMENTS = {"houlsby": ("down_proj", "o_proj"), "pfeiffer": ("down_proj",)}  # the wrapped sublayer outputs
NON_LINEARITIES = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}
INIT_STD = 1e-2  # of `down`'s weight; `up` starts at zero (Houlsby's near-identity initialisation)


def bottleneck_size(hidden: int, reduction_factor: int) -> int:
    """The adapter's inner width for a `hidden`-wide output."""
    return max(1, hidden // reduction_factor)


@dataclass
class Bottleneck:
    """One named adapter of a `BottleneckLinear`: `down` (hidden -> bottleneck), `up` (bottleneck -> hidden)."""

    adapter_down: nn.Linear
    adapter_up: nn.Linear
    non_linearity: str


class BottleneckLinear(nn.Module):
    """A frozen linear layer whose output passes through a named residual bottleneck adapter.

    Args:
        in_features, out_features, bias: as in `nn.Linear`.
        dtype, device: of the base weight; an adapter is float32 over a half-precision base, as LoRA's.
    """

    # The state-dict names of the active adapter's tensors inside the layer (`finegrain.peft.base`).
    adapter_keys: ClassVar[tuple[str, ...]] = (
        "adapter_down.weight", "adapter_down.bias", "adapter_up.weight", "adapter_up.bias",
    )

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        init_frozen(self, in_features, out_features, bias, dtype, device)
        self.adapters: dict[str, Bottleneck] = {}
        self.active_adapter: str | None = None
        self.active: Bottleneck | None = None
        self.register_module("adapter_down", None)
        self.register_module("adapter_up", None)
        self.merged = False  # always: a bottleneck adapter cannot be merged

    @classmethod
    def from_linear(cls, module: nn.Linear, adapter_name: str = "default", **options: Any) -> BottleneckLinear:
        """Wrap `module`, sharing (and freezing) its weight and bias, with adapter `adapter_name` active."""
        layer = cls(module.in_features, module.out_features, bias=module.bias is not None,
                    dtype=module.weight.dtype, device=module.weight.device)
        share_frozen(layer, module)
        layer.add_adapter(adapter_name, **options)
        layer.set_adapter(adapter_name)
        return layer

    def add_adapter(self, name: str, reduction_factor: int = 16, non_linearity: str = "relu") -> None:
        """Add a fresh adapter `name` (`up` = 0: it starts as a no-op); `set_adapter` makes it active."""
        if name in self.adapters:
            raise FinegrainError(f"adapter: this layer already has an adapter named '{name}'; give the new one another name")
        dtype = torch.float32 if self.weight.dtype in (torch.float16, torch.bfloat16) else self.weight.dtype
        size = bottleneck_size(self.out_features, reduction_factor)
        down = nn.Linear(self.out_features, size, dtype=dtype, device=self.weight.device)
        up = nn.Linear(size, self.out_features, dtype=dtype, device=self.weight.device)
        nn.init.normal_(down.weight, std=INIT_STD)
        nn.init.zeros_(down.bias)
        nn.init.zeros_(up.weight)
        nn.init.zeros_(up.bias)
        self.adapters[name] = Bottleneck(down, up, non_linearity)

    def set_adapter(self, name: str | None) -> None:
        """Make adapter `name` the one forward applies (and state_dict holds); None: the bare base."""
        if name == self.active_adapter:
            return
        if name is not None and name not in self.adapters:
            raise FinegrainError(f"adapter: no adapter named '{name}' on this layer; it has {', '.join(self.adapters) or 'none'}")
        active = None if name is None else self.adapters[name]
        # Straight into the module's dicts, as LoraLinear does: a server switches every layer per batch.
        self._modules["adapter_down"] = None if active is None else active.adapter_down
        self._modules["adapter_up"] = None if active is None else active.adapter_up
        self.__dict__["active"] = active
        self.__dict__["active_adapter"] = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (..., in) -> y: (..., out) -> bottleneck (..., out // factor) -> (..., out)
        y = linear(x, self.weight, self.bias)
        if self.active is None:
            return y
        down, up = self.active.adapter_down, self.active.adapter_up
        inner = NON_LINEARITIES[self.active.non_linearity](F.linear(y.to(down.weight.dtype), down.weight, down.bias))
        return y + F.linear(inner, up.weight, up.bias).to(y.dtype)

    def merge(self) -> None:
        """Refused: the non-linearity between `down` and `up` has no equivalent base weight."""
        if self.active is not None:
            raise FinegrainError(
                "adapter: a bottleneck adapter cannot be merged into the base weights (a non-linearity sits "
                "between its projections); use the model with the adapter, or train with peft.method=lora to merge"
            )

    def unmerge(self) -> None:
        """Nothing to do: a bottleneck adapter is never merged."""

    def base_layer(self) -> Linear:
        """A plain `Linear` holding this layer's `weight` and `bias` (the adapter left out)."""
        return plain_linear(self)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"adapters={list(self.adapters)}, active={self.active_adapter}"
        )


# ---------------------------------------------------------------------------------------------- the method


@dataclass
class BottleneckOptions:
    """peft.method: adapter: the bottleneck adapter's keys under `peft:`."""

    placement: str = "houlsby"  # houlsby: after attention and after the FFN; pfeiffer: after the FFN only
    reduction_factor: int = 16  # the bottleneck is hidden_size // reduction_factor wide
    non_linearity: str = "relu"  # relu | gelu | silu | tanh
    layers: list[int] | None = None  # adapt only these decoder layers; negative counts from the top

    def __post_init__(self) -> None:
        check_options(self)  # when the run config is read, before a run directory is made


def check_options(options: BottleneckOptions | BottleneckConfig) -> None:
    """Refuse a placement, reduction factor or non-linearity the method does not have."""
    if options.placement not in PLACEMENTS:
        raise FinegrainError(f"peft.placement: '{options.placement}' is unknown; use one of {', '.join(PLACEMENTS)}")
    factor = options.reduction_factor
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise FinegrainError(f"peft.reduction_factor: must be a positive integer, got {factor!r}")
    if options.non_linearity not in NON_LINEARITIES:
        raise FinegrainError(
            f"peft.non_linearity: '{options.non_linearity}' is unknown; use one of {', '.join(NON_LINEARITIES)}"
        )


@dataclass
class BottleneckConfig:
    """Bottleneck adapters: the `adapter` entry of `finegrain.peft.METHODS`.

    Args:
        placement: "houlsby" (wrap `o_proj` and `down_proj`) or "pfeiffer" (`down_proj` only).
        reduction_factor: the bottleneck is `hidden // reduction_factor` wide (at least 1).
        non_linearity: between the two projections: relu, gelu, silu or tanh.
        targets: the wrapped output layers; the placement's, or those an adapter file names.
        layers: decoder layer indices to adapt; None for all.
        modules_to_save: modules trained in full and saved with the adapter (a task head).
    """

    name: ClassVar[str] = "adapter"
    options: ClassVar[type] = BottleneckOptions
    peft_type: ClassVar[str] = "FINEGRAIN_ADAPTER"  # finegrain's own format (module docstring)
    layer: ClassVar[type[BottleneckLinear]] = BottleneckLinear
    mergeable: ClassVar[bool] = False  # `finegrain export` refuses to merge it (the non-linearity)

    placement: str = "houlsby"
    reduction_factor: int = 16
    non_linearity: str = "relu"
    targets: tuple[str, ...] | list[str] | str = ()
    layers: list[int] | None = None
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        check_options(self)
        if not self.targets:
            self.targets = PLACEMENTS[self.placement]
        elif not isinstance(self.targets, str):
            self.targets = tuple(self.targets)
        if self.modules_to_save is not None:
            self.modules_to_save = list(self.modules_to_save)

    def adapter_options(self) -> dict[str, Any]:
        """The keyword arguments of `BottleneckLinear.add_adapter`."""
        return {"reduction_factor": self.reduction_factor, "non_linearity": self.non_linearity}

    @classmethod
    def from_section(cls, section: BottleneckOptions, layers: list[int] | None, modules_to_save: list[str]) -> BottleneckConfig:
        """The config of a run's `peft:` keys (`BottleneckOptions`), with `layers` resolved from the top."""
        return cls(placement=section.placement, reduction_factor=section.reduction_factor,
                   non_linearity=section.non_linearity, layers=layers, modules_to_save=modules_to_save)

    def to_peft(self) -> dict[str, Any]:
        """The method's own keys of `adapter_config.json`."""
        return {"placement": self.placement, "reduction_factor": self.reduction_factor, "non_linearity": self.non_linearity}

    @classmethod
    def from_peft(
        cls, raw: dict[str, Any], path: Path, targets: Any, layers: list[int] | None, modules_to_save: list[str] | None
    ) -> BottleneckConfig:
        """The config of a FINEGRAIN_ADAPTER `adapter_config.json` (`raw`).

        Raises:
            FinegrainError: a key of the method is missing or invalid.
        """
        missing = [key for key in ("placement", "reduction_factor", "non_linearity") if key not in raw]
        if missing:
            raise FinegrainError(f"{path}: key '{missing[0]}' is missing; save the adapter again")
        try:
            return cls(placement=raw["placement"], reduction_factor=raw["reduction_factor"],
                       non_linearity=raw["non_linearity"], targets=targets, layers=layers, modules_to_save=modules_to_save)
        except FinegrainError as exc:
            raise FinegrainError(f"{path}: {exc}") from None

    def check_tensors(self, tensors: dict[str, torch.Tensor], path: Path, config_name: str, fix: str) -> None:
        """Each `down` is (bottleneck, hidden) and each `up` (hidden, bottleneck), as `reduction_factor` says."""
        for key, tensor in tensors.items():
            if key.endswith((".adapter_down.weight", ".adapter_up.weight")):
                down = key.endswith(".adapter_down.weight")
                fits = tensor.dim() == 2 and tensor.shape[0 if down else 1] == bottleneck_size(
                    tensor.shape[1 if down else 0], self.reduction_factor
                )
                if not fits:
                    raise FinegrainError(
                        f"{path}: '{key}' has shape {tuple(tensor.shape)}, which does not fit "
                        f"reduction_factor={self.reduction_factor} of {config_name}; {fix}"
                    )
