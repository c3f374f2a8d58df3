"""LoRA: a frozen linear layer plus a trainable low-rank update, y = x W^T + b + (x A^T B^T) * scaling.

The method's entry in `finegrain.peft.METHODS` is `LoraConfig`: its options, how it reads and
writes its part of PEFT's `adapter_config.json`, and `LoraLinear`, the layer that wraps an
`nn.Linear`. `LoraLinear` keeps the base `weight` (and `bias`) as its own parameters, so the
state_dict key of a wrapped `q_proj` is still `...q_proj.weight` and base checkpoints load with no
key map; its active adapter adds `...q_proj.lora_A.weight` (r, in) and `...q_proj.lora_B.weight`
(out, r), the names PEFT's files use.
"""

from __future__ import annotations

import math
import re
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from finegrain.config import LoraSection
from finegrain.errors import FinegrainError
from finegrain.model import fused
from finegrain.model.linear import Linear, linear, matmul_grad, matmul_t
from finegrain.peft.frozen import init_frozen, plain_linear, share_frozen
from finegrain.model.qlinear import QuantLinear

INITS = ("default", "gaussian", "pissa")


@dataclass
class LoraAdapter:
    """One named adapter of a `LoraLinear`: A (r, in), B (out, r), its scaling and input dropout.

    A plain record, not a module: only the active adapter's `lora_A` and `lora_B` are children of
    the layer (see `LoraLinear`).
    """

    lora_A: nn.Linear
    lora_B: nn.Linear
    scaling: float
    dropout: float  # probability, applied in training only
    lr_ratio: float | None = None  # LoRA+: lora_B's learning rate is the run's times this


class LoraLinear(nn.Module):
    """A linear layer with a frozen `weight`/`bias` and named low-rank updates, one of them active.

    As with PEFT's `set_adapter`, a layer holds any number of adapters by name and applies the
    active one (or none: the bare base layer). Training gives each layer one adapter, "default";
    a server loads one per run onto a shared base and switches per batch. Only the active adapter's
    `lora_A` and `lora_B` are children of the layer, so `state_dict()`, `parameters()` and
    checkpoints hold exactly the adapter in use under the names of PEFT's files
    (`q_proj.lora_A.weight`, whatever the adapter is called); the others are plain attributes in
    `adapters` until they are made active, which is why adapters are added after the model is on
    its device and dtype.

    Args:
        in_features, out_features, bias: as in `nn.Linear`.
        dtype, device: of the base weight. An adapter is kept in float32 when the base is half
            precision, as PEFT does, because tiny updates to A and B vanish in bfloat16.
    """

    # The state-dict names of the active adapter's tensors inside the layer (`finegrain.peft.base`).
    adapter_keys: ClassVar[tuple[str, ...]] = ("lora_A.weight", "lora_B.weight")

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
        self.adapters: dict[str, LoraAdapter] = {}
        self.active_adapter: str | None = None
        self.active: LoraAdapter | None = None
        self.register_module("lora_A", None)
        self.register_module("lora_B", None)
        self.register_module("quantized", None)  # the base instead of `weight` and `bias` under model.quantize
        self.merged = False

    @classmethod
    def from_linear(cls, linear: nn.Linear, adapter_name: str = "default", **options: Any) -> "LoraLinear":
        """Wrap `linear`, sharing its weight and bias tensors (no copy) and freezing them, with one
        adapter `adapter_name` made of `options` (see `add_adapter`), active. A `QuantLinear`
        (model.quantize) is kept whole as `quantized`, its weights int8/4-bit; the adapter is float32."""
        if isinstance(linear, QuantLinear):
            layer = cls(linear.in_features, linear.out_features, device="meta")
            layer.weight, layer.quantized = None, linear
        else:
            layer = cls(
                linear.in_features,
                linear.out_features,
                bias=linear.bias is not None,
                dtype=linear.weight.dtype,
                device=linear.weight.device,
            )
            share_frozen(layer, linear)
        layer.add_adapter(adapter_name, **options)
        layer.set_adapter(adapter_name)
        return layer

    def add_adapter(
        self,
        name: str,
        r: int = 8,
        alpha: float = 16,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str = "default",
        lr_ratio: float | None = None,
        pissa_start: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Add a fresh adapter `name` (B = 0: it starts as a no-op; with init "pissa", the base
        weight gives up what the adapter starts with); `set_adapter` makes it active.

        Args:
            r, alpha, dropout, use_rslora, init, lr_ratio: see `LoraConfig`.
            pissa_start: with init "pissa", where the initial A and B are put ("lora_A", "lora_B"):
                the config that saves the adapter needs them (`LoraConfig.file_tensors`).
        """
        if name in self.adapters:
            raise FinegrainError(f"lora: this layer already has an adapter named '{name}'; give the new one another name")
        if init == "pissa" and self.quantized is not None:
            raise FinegrainError(
                "lora.init: 'pissa' replaces the base weight by its residual, which int8/4-bit weights cannot hold; "
                "use init default or gaussian, or model.quantize: null"
            )
        if init == "pissa" and self.adapters:
            raise FinegrainError(f"lora: init 'pissa' changes the base weight, which this layer's adapters {', '.join(self.adapters)} share; load it on a base of its own")
        base = self.weight if self.quantized is None else self.quantized  # a QuantLinear computes in float32
        dtype, device = base.dtype, base.device
        adapter_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        lora_A = nn.Linear(self.in_features, r, bias=False, dtype=adapter_dtype, device=device)
        lora_B = nn.Linear(r, self.out_features, bias=False, dtype=adapter_dtype, device=device)
        # B = 0 makes the wrapped layer start out exactly equal to the base layer.
        if init == "gaussian":
            nn.init.normal_(lora_A.weight, std=1 / r)
        else:
            nn.init.kaiming_uniform_(lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(lora_B.weight)
        scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        adapter = LoraAdapter(lora_A, lora_B, scaling, dropout, lr_ratio)
        if init == "pissa":
            self.pissa_init(adapter)
            if pissa_start is not None:
                pissa_start.update(lora_A=lora_A.weight.detach().clone(), lora_B=lora_B.weight.detach().clone())
        self.adapters[name] = adapter

    @torch.no_grad()
    def pissa_init(self, adapter: LoraAdapter) -> None:
        """PiSSA (Meng et al. 2024), as PEFT's `init_lora_weights="pissa"`: A and B from the top-r
        singular triplets of W = U S V^T (B A * scaling = U_r S_r V_r^T), and W replaced by the
        residual W - B A * scaling, so the layer starts out computing what the base did."""
        r = adapter.lora_A.weight.shape[0]
        U, S, Vh = torch.linalg.svd(self.weight.float(), full_matrices=False)  # (out, k), (k,), (k, in)
        root = torch.sqrt(S[:r] / adapter.scaling)
        adapter.lora_A.weight.copy_(root[:, None] * Vh[:r])  # (r, in)
        adapter.lora_B.weight.copy_(U[:, :r] * root[None, :])  # (out, r)
        residual = self.weight.float() - adapter.scaling * adapter.lora_B.weight.float() @ adapter.lora_A.weight.float()
        self.weight.copy_(residual.to(self.weight.dtype))

    def set_adapter(self, name: str | None) -> None:
        """Make adapter `name` the one forward applies (and state_dict holds); None: the bare base."""
        if name == self.active_adapter:
            return
        if self.merged:
            raise FinegrainError("lora: the active adapter is merged into the base weight; unmerge it before switching")
        if name is not None and name not in self.adapters:
            raise FinegrainError(f"lora: no adapter named '{name}' on this layer; it has {', '.join(self.adapters) or 'none'}")
        active = None if name is None else self.adapters[name]
        # Straight into the module's dicts: nn.Module.__setattr__ costs microseconds a call, and a
        # server switches every adapted layer of a base (210 on the default model) per batch.
        self._modules["lora_A"] = None if active is None else active.lora_A
        self._modules["lora_B"] = None if active is None else active.lora_B
        self.__dict__["active"] = active
        self.__dict__["active_adapter"] = name

    @property
    def scaling(self) -> float:
        """The active adapter's alpha / r (alpha / sqrt(r) with rsLoRA)."""
        return self.active.scaling if self.active is not None else 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (..., in) -> (..., out)
        if self.quantized is not None:
            return self._forward_quantized(x)
        if self.merged or self.active is None:
            return linear(x, self.weight, self.bias)
        A, B = self.active.lora_A.weight, self.active.lora_B.weight
        autocast = torch.is_autocast_enabled(x.device.type)
        p = self.active.dropout if self.training else 0.0
        if (autocast or x.dtype == self.weight.dtype == A.dtype) and not self.weight.requires_grad:
            keep = keep_mask(x.shape, p, x.device) if p > 0 else None
            scaling = self.active.scaling / (1 - p)
            if not autocast:
                return LoraMatmul.apply(x, self.weight, self.bias, A, B, scaling, keep)
            # Every matmul in autocast's dtype, as autocast would run F.linear; A and B stay float32
            # parameters (their gradients come back through the casts).
            dtype = torch.get_autocast_dtype(x.device.type)
            bias = None if self.bias is None else self.bias.to(dtype)
            with torch.autocast(x.device.type, enabled=False):
                return LoraMatmul.apply(x.to(dtype), self.weight.to(dtype), bias, A.to(dtype), B.to(dtype), scaling, keep)
        # A half-precision base with a float32 adapter: plain autograd.
        # Two thin matmuls, (..., in) -> (..., r) -> (..., out); the (out, in) update is never built.
        y = F.linear(x, self.weight, self.bias)
        dropped = F.dropout(x, p) if p > 0 else x
        update = F.linear(F.linear(dropped.to(A.dtype), A), B)
        return y + (update * self.active.scaling).to(y.dtype)

    def lr_scales(self) -> dict[str, float]:
        """LoRA+: the learning-rate factor of the active adapter's `lora_B.weight` (its `lr_ratio`),
        by state-dict name inside the layer; empty when the adapter trains at the run's rate."""
        ratio = self.active.lr_ratio if self.active is not None else None
        return {"lora_B.weight": ratio} if ratio is not None else {}

    def _forward_quantized(self, x: torch.Tensor) -> torch.Tensor:
        """`forward` over a `QuantLinear` base (model.quantize): the fused path of `LoraMatmul`, in
        float32 under autocast too, since the base computes in float32 from its int8/4-bit weights."""
        if self.active is None:
            return self.quantized(x)
        p = self.active.dropout if self.training else 0.0
        keep = keep_mask(x.shape, p, x.device) if p > 0 else None
        A, B = self.active.lora_A.weight, self.active.lora_B.weight
        with torch.autocast(x.device.type, enabled=False):
            return LoraMatmul.apply(x.float(), self.quantized, None, A, B, self.active.scaling / (1 - p), keep)

    def delta_weight(self) -> torch.Tensor:
        """The active adapter's update B @ A * scaling (out, in), in float32."""
        if self.active is None:
            raise FinegrainError("lora: no adapter is active on this layer; set_adapter first")
        return (self.active.lora_B.weight.float() @ self.active.lora_A.weight.float()) * self.active.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Add the active update into `weight`, so forward costs one matmul; a no-op when already
        merged or when no adapter is active."""
        if self.quantized is not None and self.active is not None:
            raise FinegrainError(
                "model.quantize: a LoRA update cannot be merged into int8/4-bit base weights; use the adapter unmerged "
                "(it loads onto a float base too), or train with model.quantize: null (choices: null, int8, q4)"
            )
        if not self.merged and self.active is not None:
            self.weight.copy_((self.weight.float() + self.delta_weight()).to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the update back out of `weight`; a no-op when not merged."""
        if self.merged:
            self.weight.copy_((self.weight.float() - self.delta_weight()).to(self.weight.dtype))
            self.merged = False

    def base_layer(self) -> Linear:
        """A plain `Linear` holding this layer's `weight` and `bias` (with whatever is merged into it);
        the `QuantLinear` itself under model.quantize."""
        return plain_linear(self)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"adapters={list(self.adapters)}, active={self.active_adapter}, scaling={self.scaling:g}, merged={self.merged}"
        )


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    """The `LoraLinear` modules of `model` by path (`finegrain.peft.adapter_layers` finds every method's)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


class LoraMatmul(torch.autograd.Function):
    """y = x W^T + b + ((x * keep) A^T) B^T * scaling for a frozen W, with a lean backward.

    Autograd on the plain expression keeps a float dropout mask and the dropped input for
    every adapted layer; this keeps x (one tensor for q_proj and v_proj, which read the same
    normed input), a bool mask and the (..., r) product x A^T, and adds the update into the
    base output in place. `scaling` includes dropout's 1 / (1 - p); `keep` is None without
    dropout. Gradients: A, B and x only (W and b are frozen). `weight` may be a `QuantLinear`
    (model.quantize, with `bias` None): its kernels give x W^T + b and the input's gradient.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling: float, keep):
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        a = None if keep is None else fused.lora_down(x2, keep, lora_A)
        if a is None:
            a = (x2 if keep is None else x2 * as_bytes(keep, x2)) @ lora_A.t()  # (N, r)
        quantized = weight if isinstance(weight, QuantLinear) else None
        y = matmul_t(x2, weight, bias) if quantized is None else quantized.matmul(x2)  # (N, out)
        y.addmm_(a, lora_B.t(), alpha=scaling)
        ctx.save_for_backward(x2, keep, a, None if quantized else weight, lora_A, lora_B)
        ctx.quantized = quantized
        ctx.scaling = scaling
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        x2, keep, a, weight, lora_A, lora_B = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])  # (N, out)
        grad_a = (g @ lora_B).mul_(ctx.scaling)  # (N, r)
        grad_B = (g.t() @ a).mul_(ctx.scaling)  # (out, r)
        grad_A = None if keep is None else fused.lora_grad_A(grad_a, x2, keep)
        if grad_A is None:
            grad_A = grad_a.t() @ (x2 if keep is None else x2 * as_bytes(keep, x2))  # (r, in)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = matmul_grad(g, weight) if ctx.quantized is None else ctx.quantized.matmul_grad(g)  # (N, in)
            if keep is None:
                grad_x.addmm_(grad_a, lora_A)
            elif not fused.lora_add_grad_x(grad_x, grad_a, lora_A, keep):
                grad_x.add_((grad_a @ lora_A).mul_(as_bytes(keep, x2)))
            grad_x = grad_x.view(*grad.shape[:-1], x2.shape[-1])
        return grad_x, None, None, grad_A, grad_B, None, None


def keep_mask(shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
    """A bool dropout mask, True with probability 1 - p, drawn 16 bits at a time.

    `bernoulli_` calls the generator once per element, which costs 7% of a LoRA training
    step; here one 64-bit draw, uniform over all 2**64 values, gives four elements of 16
    random bits each. Each element is dropped with probability p rounded to a multiple of 2**-16
    (at most 1 - 2**-16). On the CPU the C kernel hashes a counter instead (`fused.keep_mask`),
    in one pass over the mask.
    """
    least_kept = min(round(p * 65536), 65535) - 32768  # lanes are uniform on [-2**15, 2**15)
    keep = fused.keep_mask(shape, least_kept) if device.type == "cpu" else None
    if keep is not None:
        return keep
    n = math.prod(shape)
    bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-(2**63), None)
    return (bits.view(torch.int16)[:n] >= least_kept).view(shape)


def as_bytes(keep: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The bool mask `keep` as 0/1 bytes shaped like `like`: a float tensor times bytes is one
    vectorised pass, where times bools (or `torch.where`) runs 3-5x slower on the CPU."""
    return keep.view(torch.uint8).view_as(like)


# ---------------------------------------------------------------------------------------------- the method


@dataclass
class LoraConfig:
    """What to adapt and how: LoRA's entry in `finegrain.peft.METHODS`.

    Args:
        r: rank of the update.
        alpha: the update is scaled by alpha / r (alpha / sqrt(r) with `use_rslora`).
        dropout: dropout on the adapter's input only; the base path never sees it.
        targets: module names to wrap, matched like PEFT's `target_modules`: a name matches a
            module whose path is that name or ends with `.name` (`"q_proj"`, or a full path
            `"model.layers.0.self_attn.q_proj"`); `"all-linear"` means every linear layer inside
            the decoder layers (never `lm_head`); any other single string is a regular expression
            that must match the whole module path, as in PEFT.
        use_rslora: rank-stabilised scaling alpha / sqrt(r), which keeps high ranks trainable.
        layers: decoder layer indices to adapt (PEFT's `layers_to_transform`); None for all.
        init: "default" (A Kaiming-uniform as in `nn.Linear`, B zeros, so the model starts unchanged),
            "gaussian" (A normal with std 1/r, B zeros) or "pissa" (A and B from the top-r singular
            vectors of the base weight, which keeps the rest; see `LoraLinear.pissa_init`). A PiSSA
            adapter is saved as PEFT's `path_initial_model_for_weight_conversion` saves it: the
            change from its start as a plain LoRA of rank 2r (alpha doubled, the scaling unchanged)
            that loads on the unchanged base, in PEFT and in finegrain.
        lr_ratio: LoRA+ (Hayou et al. 2024): lora_B trains at the run's learning rate times this
            (the paper suggests 16); None trains A and B alike. A training option, not saved.
        modules_to_save: modules trained in full next to the adapter and saved with it, such as a
            classification head `"score"` (PEFT's `modules_to_save`).
    """

    name: ClassVar[str] = "lora"  # the method's key in METHODS and its errors' prefix
    options: ClassVar[type] = LoraSection  # its run-config keys: the `lora:` section, or under `peft:`
    peft_type: ClassVar[str] = "LORA"  # its name in PEFT's adapter_config.json
    layer: ClassVar[type[LoraLinear]] = LoraLinear  # the module that wraps a targeted nn.Linear

    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    targets: tuple[str, ...] | list[str] | str = ("q_proj", "v_proj")
    use_rslora: bool = False
    layers: list[int] | None = None
    init: str = "default"
    modules_to_save: list[str] | None = None
    lr_ratio: float | None = None
    # PiSSA's initial A and B of each layer it adapted, by path (filled by `inject`, read by `file_tensors`)
    pissa_start: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or self.r <= 0:
            raise FinegrainError(f"lora.r: must be a positive integer, got {self.r!r}")
        if self.alpha <= 0:
            raise FinegrainError(f"lora.alpha: must be positive, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise FinegrainError(f"lora.dropout: must be in [0, 1), got {self.dropout!r}")
        if self.init not in INITS:
            raise FinegrainError(f"lora.init: '{self.init}' is unknown; use one of {', '.join(INITS)}")
        if self.lr_ratio is not None and not (isinstance(self.lr_ratio, (int, float)) and self.lr_ratio > 0):
            raise FinegrainError(f"lora.lr_ratio: must be a positive number (LoRA+ suggests 16) or null, got {self.lr_ratio!r}")
        if isinstance(self.targets, str):
            # A bare module name is one target, not a regular expression that would have to match a whole path.
            if self.targets != "all-linear" and re.fullmatch(r"\w+", self.targets):
                self.targets = (self.targets,)
            elif self.targets != "all-linear":
                try:
                    re.compile(self.targets)
                except re.error as exc:
                    raise FinegrainError(f"lora.targets: '{self.targets}' is not a valid regular expression ({exc})")
        else:
            self.targets = tuple(self.targets)
            if not self.targets:
                raise FinegrainError("lora.targets: empty; name modules such as q_proj, v_proj, or use 'all-linear'")
        if self.layers is not None:
            if isinstance(self.layers, int):
                self.layers = [self.layers]
            if not all(isinstance(i, int) and i >= 0 for i in self.layers):
                raise FinegrainError(f"lora.layers: must be a list of layer indices >= 0, got {self.layers!r}")
            self.layers = sorted(set(self.layers))
        if self.modules_to_save is not None:
            self.modules_to_save = list(self.modules_to_save)

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r

    def adapter_options(self) -> dict[str, Any]:
        """The keyword arguments of `LoraLinear.add_adapter` (and `from_linear`) for this config."""
        return {
            "r": self.r, "alpha": self.alpha, "dropout": self.dropout, "use_rslora": self.use_rslora, "init": self.init,
            "lr_ratio": self.lr_ratio,
        }

    def module_options(self, path: str) -> dict[str, Any]:
        """Per layer, PiSSA only: where the layer at `path` puts its initial A and B."""
        return {"pissa_start": self.pissa_start.setdefault(path, {})} if self.init == "pissa" else {}

    @classmethod
    def from_section(cls, section: Any, layers: list[int] | None, modules_to_save: list[str]) -> LoraConfig:
        """The config of a run's `lora:` section (`finegrain.config.LoraSection`).

        Args:
            layers: `section.layers` with negative indices resolved against the kept layers.
            modules_to_save: the task's head modules, trained in full and saved with the adapter.
        """
        return cls(
            r=section.r, alpha=section.alpha, dropout=section.dropout, targets=section.targets,
            use_rslora=section.rslora, layers=layers, modules_to_save=modules_to_save,
            init=section.init, lr_ratio=section.lr_ratio,
        )

    def to_peft(self) -> dict[str, Any]:
        """LoRA's own keys of `adapter_config.json`; `finegrain.peft.base` adds those every method shares.

        The keys PEFT's LoraConfig has had since 0.10: newer versions fill in the rest with defaults,
        while older ones fail on keys they do not know, so fewer keys load in more places.
        """
        return {
            "alpha_pattern": {},
            "bias": "none",
            "fan_in_fan_out": False,
            "init_lora_weights": True if self.init == "default" else self.init,
            "layer_replication": None,
            "loftq_config": {},
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "megatron_config": None,
            "megatron_core": "megatron.core",
            "r": self.r,
            "rank_pattern": {},
            "use_dora": False,
            "use_rslora": self.use_rslora,
        }

    @classmethod
    def from_peft(
        cls, raw: dict[str, Any], path: Path, targets: Any, layers: list[int] | None, modules_to_save: list[str] | None
    ) -> LoraConfig:
        """The config of a PEFT LoRA `adapter_config.json` (`raw`), whose shared keys `finegrain.peft.base` read.

        Raises:
            FinegrainError: the file uses a LoRA feature finegrain lacks, or lacks `r`.
        """
        unsupported = {
            "use_dora": False,
            "bias": "none",
            "fan_in_fan_out": False,
            "rank_pattern": {},
            "alpha_pattern": {},
            "exclude_modules": None,
            "layer_replication": None,
            "lora_bias": False,
            "target_parameters": None,
            "trainable_token_indices": None,
        }
        for key, default in unsupported.items():
            value = raw.get(key, default)
            if value not in (default, None) and value != {}:
                raise FinegrainError(f"{path}: {key}={value!r} is not supported by finegrain; train with {key}={default!r}")
        if "r" not in raw:
            raise FinegrainError(f"{path}: key 'r' is missing; save the adapter again")
        init = raw.get("init_lora_weights", True)
        if isinstance(init, str) and init.lower().startswith("pissa"):
            raise FinegrainError(
                f"{path}: init_lora_weights={init!r}: this PiSSA adapter needs the residual base it was trained on; "
                "save it with PEFT's path_initial_model_for_weight_conversion (finegrain saves PiSSA that way)"
            )
        try:
            return cls(
                r=raw["r"],
                alpha=raw.get("lora_alpha", 8),
                dropout=raw.get("lora_dropout", 0.0),
                targets=targets,
                use_rslora=raw.get("use_rslora", False),
                layers=layers,
                init="gaussian" if init == "gaussian" else "default",
                modules_to_save=modules_to_save,
            )
        except FinegrainError as exc:
            raise FinegrainError(f"{path}: {exc}") from None

    def file_tensors(self, tensors: dict[str, torch.Tensor]) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
        """The adapter as its file holds it (`finegrain.peft.base.save_adapter`): as it is, except PiSSA's.

        A PiSSA adapter is saved as PEFT's `save_pretrained(path_initial_model_for_weight_conversion=...)`
        saves it: the trained update minus the initial one, B A - B0 A0 = [B | -B0] [A ; A0], a plain
        LoRA of rank 2r whose alpha doubles (times sqrt(2) with rsLoRA) to keep the scaling. It loads
        on the unchanged base, in PEFT and in finegrain, and gives what the run computed on its
        residual base.
        """
        if self.init != "pissa":
            return self, tensors
        converted = dict(tensors)
        for path, start in self.pissa_start.items():
            if f"{path}.lora_A.weight" in tensors:
                converted[f"{path}.lora_A.weight"] = torch.cat([tensors[f"{path}.lora_A.weight"], start["lora_A"]], dim=0)
                converted[f"{path}.lora_B.weight"] = torch.cat([tensors[f"{path}.lora_B.weight"], -start["lora_B"]], dim=1)
        alpha = self.alpha * (math.sqrt(2) if self.use_rslora else 2)
        return dataclasses.replace(self, r=2 * self.r, alpha=alpha, init="default", pissa_start={}), converted

    def check_tensors(self, tensors: dict[str, torch.Tensor], path: Path, config_name: str, fix: str) -> None:
        """Each lora_A is (r, in) and each lora_B (out, r), as the config says."""
        for key, tensor in tensors.items():
            axis = 0 if key.endswith(".lora_A.weight") else 1 if key.endswith(".lora_B.weight") else None
            if axis is not None and (tensor.dim() != 2 or tensor.shape[axis] != self.r):
                raise FinegrainError(
                    f"{path}: '{key}' has shape {tuple(tensor.shape)}, which does not fit r={self.r} of {config_name}; {fix}"
                )
