"""(IA)^3 (Liu et al. 2022): a frozen linear layer whose features are rescaled by a learned vector.

On an attention projection (`k_proj`, `v_proj`) the vector scales the layer's output,
y = (x W^T + b) * l, l of shape (out, 1); on a feed-forward layer (`down_proj`, PEFT's
`feedforward_modules`) it scales the input, y = (x * l) W^T + b, l of shape (1, in). The vectors
start at ones, so the adapted model starts out equal to the base; they are the only trained tensors
(a few thousand per layer).

The method's entry in `finegrain.peft.METHODS` is `Ia3Config`; `Ia3Linear` keeps the base
`weight` (and `bias`) as its own parameters, as `LoraLinear` does, and its active adapter's vector
is `...k_proj.ia3_l`, the name in PEFT's `IA3` files, whatever the adapter is called.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from finegrain.errors import FinegrainError
from finegrain.model.linear import linear
from finegrain.model.qlinear import QuantLinear
from finegrain.peft.frozen import init_frozen, plain_linear, share_frozen

INITS = ("ones", "random")  # PEFT's init_ia3_weights true / false
FEEDFORWARD = "down_proj"  # the default feed-forward target, as PEFT's for LLaMA


class Ia3Linear(nn.Module):
    """A linear layer with a frozen `weight`/`bias` and named scaling vectors, one of them active.

    Named adapters work as in `LoraLinear`: only the active adapter's vector is the parameter
    `ia3_l` (what `state_dict()`, `parameters()` and checkpoints hold); the others wait in
    `adapters`. Whether the vector scales the input (`feedforward`) or the output is a property of
    the layer, as in PEFT, fixed when it is wrapped.

    Args:
        in_features, out_features, bias, dtype, device: as in `nn.Linear`.
        feedforward: scale the input (PEFT's `feedforward_modules`) instead of the output.
    """

    adapter_keys: ClassVar[tuple[str, ...]] = ("ia3_l",)  # state-dict names of the active vector (`finegrain.peft.base`)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        feedforward: bool = False,
    ):
        super().__init__()
        init_frozen(self, in_features, out_features, bias, dtype, device)
        self.feedforward = feedforward
        self.adapters: dict[str, nn.Parameter] = {}
        self.active_adapter: str | None = None
        self.register_parameter("ia3_l", None)
        self.register_module("quantized", None)  # the base instead of `weight` and `bias` under model.quantize
        self.merged = False

    @classmethod
    def from_linear(cls, linear: nn.Linear, adapter_name: str = "default", **options: Any) -> Ia3Linear:
        """Wrap `linear`, sharing its weight and bias (no copy) and freezing them, with one active
        adapter `adapter_name` made of `options` (`feedforward`, `init`: see `add_adapter`). A
        `QuantLinear` (model.quantize) is kept whole as `quantized`: IA3 only scales what goes in or
        comes out, so it needs no float weight."""
        if isinstance(linear, QuantLinear):
            layer = cls(linear.in_features, linear.out_features, device="meta", feedforward=options.get("feedforward", False))
            layer.weight, layer.quantized = None, linear
            layer.add_adapter(adapter_name, **options)
            layer.set_adapter(adapter_name)
            return layer
        layer = cls(
            linear.in_features, linear.out_features, bias=linear.bias is not None, dtype=linear.weight.dtype,
            device=linear.weight.device, feedforward=options.get("feedforward", False),
        )
        share_frozen(layer, linear)
        layer.add_adapter(adapter_name, **options)
        layer.set_adapter(adapter_name)
        return layer

    def add_adapter(self, name: str, feedforward: bool = False, init: str = "ones") -> None:
        """Add a vector `name`: ones (the layer starts as the base) or, with init "random", N(0, 1)
        as PEFT's `init_ia3_weights=False`; `set_adapter` makes it active.

        Raises:
            FinegrainError: the name is taken, or the adapter treats the layer as feed-forward where
                the layer's other adapters do not (or the reverse).
        """
        if name in self.adapters:
            raise FinegrainError(f"ia3: this layer already has an adapter named '{name}'; give the new one another name")
        if feedforward != self.feedforward:
            raise FinegrainError(
                f"ia3: adapter '{name}' scales this layer's {'input' if feedforward else 'output'}, its other adapters "
                f"the {'output' if feedforward else 'input'}; one layer takes one of the two (ia3 feedforward)"
            )
        base = self.weight if self.quantized is None else self.quantized  # a QuantLinear computes in float32
        dtype = torch.float32 if base.dtype in (torch.float16, torch.bfloat16) else base.dtype
        shape = (1, self.in_features) if feedforward else (self.out_features, 1)
        vector = torch.ones(shape, dtype=dtype, device=base.device)
        if init == "random":
            vector.normal_()
        self.adapters[name] = nn.Parameter(vector)

    def set_adapter(self, name: str | None) -> None:
        """Make adapter `name` the one forward applies (and state_dict holds); None: the bare base."""
        if name == self.active_adapter:
            return
        if self.merged:
            raise FinegrainError("ia3: the active adapter is merged into the base weight; unmerge it before switching")
        if name is not None and name not in self.adapters:
            raise FinegrainError(f"ia3: no adapter named '{name}' on this layer; it has {', '.join(self.adapters) or 'none'}")
        # Straight into the module's dicts, as LoraLinear does: a server switches every layer per batch.
        self._parameters["ia3_l"] = None if name is None else self.adapters[name]
        self.__dict__["active_adapter"] = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (..., in) -> (..., out)
        vector = self._parameters["ia3_l"]
        if self.merged or vector is None:
            return self._base(x)
        if self.feedforward:
            return self._base((x * vector.view(-1)).to(x.dtype))
        y = self._base(x)
        return (y * vector.view(-1)).to(y.dtype)

    def _base(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias) if self.quantized is None else self.quantized(x)

    @torch.no_grad()
    def merge(self) -> None:
        """Scale `weight` (and, on the output side, `bias`) by the active vector, so forward costs one
        matmul; a no-op when already merged or when no adapter is active."""
        vector = self._parameters["ia3_l"]
        if self.merged or vector is None:
            return
        if self.quantized is not None:
            raise FinegrainError(
                "model.quantize: an IA3 vector cannot be merged into int8/4-bit base weights; use the adapter unmerged "
                "(it loads onto a float base too), or train with model.quantize: null (choices: null, int8, q4)"
            )
        self.weight.copy_((self.weight.float() * vector.float()).to(self.weight.dtype))
        if self.bias is not None and not self.feedforward:
            self.bias.copy_((self.bias.float() * vector.float().view(-1)).to(self.bias.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Divide the vector back out of `weight` (and `bias`); a no-op when not merged.

        Raises:
            FinegrainError: an entry of the vector is 0, whose feature cannot be recovered.
        """
        if not self.merged:
            return
        vector = self._parameters["ia3_l"].float()
        if bool((vector == 0).any()):
            raise FinegrainError("ia3: cannot unmerge: the active vector has a 0, which erased its feature from the weight")
        self.weight.copy_((self.weight.float() / vector).to(self.weight.dtype))
        if self.bias is not None and not self.feedforward:
            self.bias.copy_((self.bias.float() / vector.view(-1)).to(self.bias.dtype))
        self.merged = False

    def base_layer(self) -> nn.Linear:
        """A plain `Linear` holding this layer's `weight` and `bias` (with whatever is merged into it),
        or the `QuantLinear` it wraps."""
        return plain_linear(self)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"feedforward={self.feedforward}, adapters={list(self.adapters)}, active={self.active_adapter}, merged={self.merged}"
        )


# ---------------------------------------------------------------------------------------------- the method


@dataclass
class Ia3Options:
    """peft.method: ia3: IA3's keys under `peft:`.

    `targets` and `layers` mean what they mean for LoRA; `feedforward` names the targets whose
    input is scaled (PEFT's `feedforward_modules`: a module whose path ends with one of the names,
    or a regular expression for the whole path; unset: down_proj where it is targeted); `init` is
    "ones" or "random".
    """

    targets: list[str] | str = field(default_factory=lambda: ["k_proj", "v_proj", "down_proj"])
    feedforward: list[str] | str | None = None
    layers: list[int] | None = None  # adapt only these decoder layers; negative counts from the top
    init: str = "ones"


@dataclass
class Ia3Config:
    """What to adapt and how: IA3's entry in `finegrain.peft.METHODS`.

    Args:
        targets: module names to wrap, matched as LoRA's (`LoraConfig.targets`).
        feedforward: which of them are scaled on the input side: a list of names, matched as PEFT
            matches `feedforward_modules` (the module path ends with the name), or a regular
            expression that must match the whole path. With a list of `targets`, each name must be
            one of them, as PEFT requires. None: the targets that are down_proj (PEFT's default for LLaMA).
        layers: decoder layer indices to adapt; None for all.
        init: "ones" (the model starts unchanged) or "random" (N(0, 1), for tests).
        modules_to_save: modules trained in full and saved with the adapter (a head `"score"`).
    """

    name: ClassVar[str] = "ia3"
    options: ClassVar[type] = Ia3Options
    peft_type: ClassVar[str] = "IA3"
    layer: ClassVar[type[Ia3Linear]] = Ia3Linear

    targets: tuple[str, ...] | list[str] | str = ("k_proj", "v_proj", "down_proj")
    feedforward: tuple[str, ...] | list[str] | str | None = None
    layers: list[int] | None = None
    init: str = "ones"
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        self.targets = _names_or_pattern(self.targets, "peft.targets", allow_all_linear=True)
        if self.feedforward is None:
            targeted = self.targets if isinstance(self.targets, tuple) else (FEEDFORWARD,)
            self.feedforward = tuple(t for t in targeted if t.endswith(FEEDFORWARD))
        self.feedforward = _names_or_pattern(self.feedforward, "peft.feedforward", allow_empty=True)
        if self.init not in INITS:
            raise FinegrainError(f"peft.init: '{self.init}' is unknown; use one of {', '.join(INITS)}")
        if isinstance(self.targets, tuple) and isinstance(self.feedforward, tuple):
            stray = [name for name in self.feedforward if name not in self.targets]
            if stray:
                raise FinegrainError(f"peft.feedforward: '{stray[0]}' is not one of peft.targets {list(self.targets)}; add it there or drop it")
        if self.layers is not None:
            if isinstance(self.layers, int):
                self.layers = [self.layers]
            if not all(isinstance(i, int) and i >= 0 for i in self.layers):
                raise FinegrainError(f"peft.layers: must be a list of layer indices >= 0, got {self.layers!r}")
            self.layers = sorted(set(self.layers))
        if self.modules_to_save is not None:
            self.modules_to_save = list(self.modules_to_save)

    def is_feedforward(self, path: str) -> bool:
        """Whether the module at `path` is scaled on its input side, decided as PEFT decides it."""
        if isinstance(self.feedforward, str):
            return re.fullmatch(self.feedforward, path) is not None
        return any(path.endswith(name) for name in self.feedforward)

    def adapter_options(self) -> dict[str, Any]:
        """The keyword arguments of `Ia3Linear.add_adapter` every targeted layer shares."""
        return {"init": self.init}

    def module_options(self, path: str) -> dict[str, Any]:
        """What differs between the targeted layers: whether the one at `path` is feed-forward."""
        return {"feedforward": self.is_feedforward(path)}

    @classmethod
    def from_section(cls, section: Ia3Options, layers: list[int] | None, modules_to_save: list[str]) -> Ia3Config:
        """The config of a run's `peft:` options (`Ia3Options`), `layers` resolved against the kept layers."""
        return cls(targets=section.targets, feedforward=section.feedforward, layers=layers, init=section.init,
                   modules_to_save=modules_to_save)

    def to_peft(self) -> dict[str, Any]:
        """IA3's keys of `adapter_config.json`; `finegrain.peft.base` adds those every method shares,
        and `file_config` fits the target and feed-forward modules to the layers adapted."""
        return {
            "fan_in_fan_out": False,
            "feedforward_modules": self.feedforward if isinstance(self.feedforward, str) else list(self.feedforward),
            "init_ia3_weights": self.init == "ones",
        }

    def file_config(self, keys: dict[str, Any], layers: dict[str, Ia3Linear]) -> dict[str, Any]:
        """`adapter_config.json` as PEFT's IA3Config reads it, for the adapted `layers` (by path).

        That config has no `layers_to_transform` (PEFT would warn that it ignores it, and adapt every
        layer): where `finegrain.peft.base` chose short names plus layers, the targets become the
        adapted modules' paths. `feedforward_modules` is then the targets whose layers scale their
        input, which is also the subset of `target_modules` PEFT requires.
        """
        targets = sorted(layers) if keys.get("layers_to_transform") is not None else keys["target_modules"]
        keys = {key: value for key, value in keys.items() if key not in ("layers_to_transform", "layers_pattern")}
        keys["target_modules"] = targets
        keys["feedforward_modules"] = [t for t in targets if any(
            layer.feedforward and (path == t or path.endswith("." + t)) for path, layer in layers.items()
        )]
        return keys

    @classmethod
    def from_peft(
        cls, raw: dict[str, Any], path: Path, targets: Any, layers: list[int] | None, modules_to_save: list[str] | None
    ) -> Ia3Config:
        """The config of a PEFT IA3 `adapter_config.json` (`raw`), whose shared keys `finegrain.peft.base` read.

        Raises:
            FinegrainError: the file uses an IA3 feature finegrain lacks.
        """
        for key, default in {"fan_in_fan_out": False, "exclude_modules": None}.items():
            value = raw.get(key, default)
            if value not in (default, None, [], {}):
                raise FinegrainError(f"{path}: {key}={value!r} is not supported by finegrain; train with {key}={default!r}")
        feedforward = raw.get("feedforward_modules")
        try:
            return cls(
                targets=targets if targets is not None else ("k_proj", "v_proj", "down_proj"),
                feedforward=feedforward,  # None: down_proj where targeted, PEFT's default for LLaMA
                layers=layers,
                init="ones" if raw.get("init_ia3_weights", True) else "random",
                modules_to_save=modules_to_save,
            )
        except FinegrainError as exc:
            raise FinegrainError(f"{path}: {exc}") from None

    def check_tensors(self, tensors: dict[str, torch.Tensor], path: Path, config_name: str, fix: str) -> None:
        """Each ia3_l is a vector shaped (out, 1) or (1, in), as PEFT saves it."""
        for key, tensor in tensors.items():
            if key.endswith(".ia3_l") and (tensor.dim() != 2 or 1 not in tensor.shape):
                raise FinegrainError(f"{path}: '{key}' has shape {tuple(tensor.shape)}, not an IA3 vector (out, 1) or (1, in); {fix}")


def _names_or_pattern(value: Any, key: str, allow_all_linear: bool = False, allow_empty: bool = False) -> tuple[str, ...] | str:
    """Targets as PEFT reads them: a list of module names (a tuple here), or one string, which is a
    single name when it is a plain word, "all-linear" where allowed, or a regular expression."""
    if isinstance(value, str):
        if re.fullmatch(r"\w+", value) and not (allow_all_linear and value == "all-linear"):
            return (value,)
        if allow_all_linear and value == "all-linear":
            return value
        try:
            re.compile(value)
        except re.error as exc:
            raise FinegrainError(f"{key}: '{value}' is not a valid regular expression ({exc})") from None
        return value
    names = tuple(value)
    if not names and not allow_empty:
        raise FinegrainError(f"{key}: empty; name modules such as k_proj, v_proj, down_proj")
    if not all(isinstance(name, str) for name in names):
        raise FinegrainError(f"{key}: expected module names, got {list(names)!r}")
    return names
