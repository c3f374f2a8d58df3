"""DoRA (Liu et al. 2024): weight-decomposed LoRA, as PEFT implements it (`use_dora: true`).

The adapted weight is split into a direction and a magnitude per output feature:
W' = m * (W + s B A) / ||W + s B A||, the norm taken over each row (output feature) and, as in the
paper (section 4.3) and PEFT, treated as a constant in the backward pass. So
y = x W'^T + b = (m / ||W + s B A||) * (x W^T + s x A^T B^T) + b: LoRA's output without its
bias, rescaled per feature. m starts at ||W + s B A|| (with B = 0, ||W||), so the model starts
unchanged; A, B and m train.

`DoraLinear` is LoRA's layer plus the magnitudes: it composes a `LoraLinear`, whose forward (its
fused C paths and autocast handling included), named adapters, initialisation and update it
reuses unchanged, and shares that layer's parameter and module tables, so that the state-dict
names are exactly PEFT's: `...q_proj.weight`, `...q_proj.lora_A.weight`, `...q_proj.lora_B.weight`
and `...q_proj.lora_magnitude_vector`. `DoraConfig` is `LoraConfig` (the same options, the same
`lora:`/`peft:` keys) written with `use_dora: true`.

One difference from PEFT, in training with `dropout` > 0 only: finegrain drops the adapter's input
only, as its LoRA does, y = (m / norm) * (x W^T + s dropout(x) A^T B^T) + b; PEFT also feeds the
dropped input through the base weight for the magnitude's share of the output, which costs a second
full matmul per layer. Without dropout, and at inference, the two are the same function.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from finegrain.config import LoraSection
from finegrain.errors import FinegrainError
from finegrain.model.linear import Linear, linear
from finegrain.peft.lora import LoraAdapter, LoraConfig, LoraLinear


class DoraLinear(nn.Module):
    """A `LoraLinear` whose output features are rescaled by a learned magnitude per named adapter.

    The wrapped `LoraLinear` (`self.lora`) is not a child module: this layer and it share one table
    of parameters and one of modules, so `weight`, `bias`, the active adapter's `lora_A`/`lora_B`
    and its `lora_magnitude_vector` are this layer's own entries, under PEFT's names, and whatever
    puts a tensor in this layer's place (`torch.func.functional_call` with bf16 copies) reaches
    the LoRA forward too.
    """

    adapter_keys: ClassVar[tuple[str, ...]] = ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector")

    def __init__(self, lora: LoraLinear):
        super().__init__()
        self.__dict__["lora"] = lora
        self.__dict__["_parameters"] = lora._parameters
        self.__dict__["_modules"] = lora._modules
        self.__dict__["_buffers"] = lora._buffers
        self._parameters.setdefault("lora_magnitude_vector", None)
        self.in_features, self.out_features = lora.in_features, lora.out_features
        self.magnitudes: dict[str, nn.Parameter] = {}
        self.merged = False
        self._merged_scale: torch.Tensor | None = None  # m / norm of the merged adapter, to unmerge with
        self._norm_cache: tuple[tuple, torch.Tensor] | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, adapter_name: str = "default", **options: Any) -> DoraLinear:
        """Wrap `linear` (shared, frozen) with one active adapter `adapter_name`; `options` are LoRA's."""
        layer = cls(LoraLinear.from_linear(linear, adapter_name, **options))
        layer.magnitudes[adapter_name] = layer._initial_magnitude(layer.lora.adapters[adapter_name])
        layer.lora.set_adapter(None)
        layer.set_adapter(adapter_name)
        return layer

    @property
    def adapters(self) -> dict[str, LoraAdapter]:
        """The named adapters (LoRA's records; their magnitudes are in `magnitudes`)."""
        return self.lora.adapters

    @property
    def active_adapter(self) -> str | None:
        return self.lora.active_adapter

    def add_adapter(self, name: str, **options: Any) -> None:
        """Add a fresh adapter `name` (`options`: LoRA's, see `LoraLinear.add_adapter`) with its
        magnitude ||W + s B A|| per output feature; `set_adapter` makes it active."""
        self.lora.add_adapter(name, **options)
        self.magnitudes[name] = self._initial_magnitude(self.lora.adapters[name])

    def _initial_magnitude(self, adapter: LoraAdapter) -> nn.Parameter:
        return nn.Parameter(self._norm(adapter).to(adapter.lora_A.weight.dtype))

    @torch.no_grad()
    def _norm(self, adapter: LoraAdapter) -> torch.Tensor:
        """||W + s B A|| per output feature (out,), float32.

        On a quantised base (`model.quantize`, no float W) without building W: the squared norm
        of a row is ||W_i||^2 + 2 s B_i (A W^T)_i + s^2 B_i (A A^T) B_i^T, where ||W_i||^2 is
        read once, tile by tile, and A W^T is one (r, in) product with the quantised weight."""
        A, B, s = adapter.lora_A.weight.float(), adapter.lora_B.weight.float(), adapter.scaling
        quantized = self.lora.quantized
        if quantized is None:
            return torch.linalg.vector_norm(torch.addmm(self.lora.weight.float(), B, A, alpha=s), dim=1)
        projected = quantized.matmul(A)  # A W^T + b: (r, out)
        if quantized.bias is not None:
            projected = projected - quantized.bias
        cross = (B * projected.t()).sum(1)  # B_i (A W^T)_i: (out,)
        update = ((B @ (A @ A.t())) * B).sum(1)  # ||(B A)_i||^2
        return (self._row_squares(quantized) + 2 * s * cross + s * s * update).clamp_min(0).sqrt()

    def _row_squares(self, quantized: nn.Module) -> torch.Tensor:
        """||W_i||^2 of a quantised weight, dequantised 256 rows at a time, once per layer."""
        cached = self.__dict__.get("_squares")
        if cached is None or cached[0] is not quantized:
            rows = range(0, quantized.out_features, 256)
            squares = torch.cat([quantized.dequantize(rows=slice(i, i + 256)).square().sum(1) for i in rows])
            self.__dict__["_squares"] = cached = (quantized, squares)
        return cached[1]

    def train(self, mode: bool = True) -> DoraLinear:
        """Train or eval mode for this layer and the LoRA layer it composes (LoRA's dropout reads it)."""
        super().train(mode)
        self.lora.train(mode)
        return self

    def set_adapter(self, name: str | None) -> None:
        """Make adapter `name` the one forward applies (and state_dict holds); None: the bare base."""
        if name == self.active_adapter:
            return
        if self.merged:
            raise FinegrainError("dora: the active adapter is merged into the base weight; unmerge it before switching")
        self.lora.set_adapter(name)
        self._parameters["lora_magnitude_vector"] = None if name is None else self.magnitudes[name]

    def weight_norm(self) -> torch.Tensor:
        """||W + s B A|| per output feature (out,) of the active adapter, in float32, without gradient.

        Kept until the weight, A or B change (their version counters), so that inference, where
        they never do, computes the (out, in) update once per adapter instead of once per batch.
        """
        adapter = self.lora.active
        base = self.lora.quantized if self.lora.quantized is not None else self.lora.weight
        A, B = adapter.lora_A.weight, adapter.lora_B.weight
        key = (id(adapter), id(base), getattr(base, "_version", 0), A._version, B._version, adapter.scaling)
        if self._norm_cache is not None and self._norm_cache[0] == key:
            return self._norm_cache[1]
        norm = self._norm(adapter)
        self.__dict__["_norm_cache"] = (key, norm)
        return norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (..., in) -> (..., out)
        magnitude = self._parameters["lora_magnitude_vector"]
        if self.merged:
            return linear(x, self.lora.weight, self.lora.bias)
        if magnitude is None:
            return self.lora(x)  # the bare base: LoRA's layer with no adapter active, quantised or not
        scale = magnitude / self.weight_norm().to(magnitude.dtype)  # (out,)
        y = self.lora(x)  # x W^T + b + s x A^T B^T, through LoRA's own paths
        bias = self.lora.bias if self.lora.quantized is None else self.lora.quantized.bias
        if bias is None:
            return (y * scale.to(y.dtype)).to(y.dtype)
        # (z + b) * scale + b * (1 - scale) = z * scale + b: the bias is not rescaled, as in PEFT
        return (y * scale.to(y.dtype) + bias.to(y.dtype) * (1 - scale).to(y.dtype)).to(y.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the active adapter into `weight`: W <- m / ||W + s B A|| * (W + s B A); a no-op
        when already merged or when no adapter is active."""
        magnitude = self._parameters["lora_magnitude_vector"]
        if self.merged or magnitude is None:
            return
        if self.lora.quantized is not None:
            self.lora.merge()  # refused with LoRA's model.quantize error: int8/4-bit weights take no update
        weight = self.lora.weight
        scale = (magnitude.float() / self.weight_norm()).unsqueeze(1)  # (out, 1)
        weight.copy_((scale * (weight.float() + self.lora.delta_weight())).to(weight.dtype))
        self.__dict__["_merged_scale"] = scale
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the adapter back out of `weight` (W / scale - s B A); a no-op when not merged."""
        if not self.merged:
            return
        weight = self.lora.weight
        weight.copy_((weight.float() / self._merged_scale - self.lora.delta_weight()).to(weight.dtype))
        self.__dict__["_merged_scale"] = None
        self.merged = False

    def lr_scales(self) -> dict[str, float]:
        """LoRA+'s learning-rate factors of the active adapter's tensors (`LoraLinear.lr_scales`)."""
        return self.lora.lr_scales()

    def base_layer(self) -> Linear:
        """A plain `Linear` holding this layer's `weight` and `bias` (with whatever is merged into it)."""
        return self.lora.base_layer()

    def extra_repr(self) -> str:
        return f"{self.lora.extra_repr()}, dora=True"


@dataclass
class DoraConfig:
    """DoRA's entry in `finegrain.peft.METHODS`: LoRA's config (`lora`), written as PEFT's `LORA`
    with `use_dora: true`. Its options are LoRA's (`LoraSection`), under `peft:` or carried over
    from a config's `lora:` section."""

    name: ClassVar[str] = "dora"
    options: ClassVar[type] = LoraSection
    peft_type: ClassVar[str] = "LORA"
    peft_flag: ClassVar[str] = "use_dora"  # a LORA file with this key true is read as this method
    layer: ClassVar[type[DoraLinear]] = DoraLinear

    lora: LoraConfig

    def __post_init__(self) -> None:
        if self.lora.init == "pissa":
            raise FinegrainError("dora: init 'pissa' does not apply (the magnitude is taken from the whole weight); use default or gaussian")

    @property
    def targets(self) -> tuple[str, ...] | str:
        return self.lora.targets

    @property
    def layers(self) -> list[int] | None:
        return self.lora.layers

    @property
    def modules_to_save(self) -> list[str] | None:
        return self.lora.modules_to_save

    def adapter_options(self) -> dict[str, Any]:
        """The keyword arguments of `DoraLinear.add_adapter`: LoRA's."""
        return self.lora.adapter_options()

    @classmethod
    def from_section(cls, section: LoraSection, layers: list[int] | None, modules_to_save: list[str]) -> DoraConfig:
        """The config of a run's DoRA options (LoRA's keys), `layers` resolved against the kept layers."""
        return cls(LoraConfig.from_section(section, layers, modules_to_save))

    def to_peft(self) -> dict[str, Any]:
        """LoRA's keys of `adapter_config.json` with `use_dora: true`."""
        return {**self.lora.to_peft(), "use_dora": True}

    @classmethod
    def from_peft(
        cls, raw: dict[str, Any], path: Path, targets: Any, layers: list[int] | None, modules_to_save: list[str] | None
    ) -> DoraConfig:
        """The config of a PEFT LoRA file with `use_dora: true`, read by `LoraConfig.from_peft`."""
        return cls(LoraConfig.from_peft({**raw, "use_dora": False}, path, targets, layers, modules_to_save))

    def check_tensors(self, tensors: dict[str, torch.Tensor], path: Path, config_name: str, fix: str) -> None:
        """LoRA's checks, and each magnitude is a vector."""
        self.lora.check_tensors(tensors, path, config_name, fix)
        for key, tensor in tensors.items():
            if key.endswith(".lora_magnitude_vector") and tensor.dim() != 1:
                raise FinegrainError(f"{path}: '{key}' has shape {tuple(tensor.shape)}, not a vector of one magnitude per output feature; {fix}")
