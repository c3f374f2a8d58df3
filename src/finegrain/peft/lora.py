"""LoRA: a frozen linear layer plus a trainable low-rank update, y = x W^T + b + (x A^T B^T) * scaling.

`LoraLinear` keeps the base `weight` (and `bias`) as its own parameters, so the state_dict key of a
wrapped `q_proj` is still `...q_proj.weight` and base checkpoints load with no key map; the adapter
adds `...q_proj.lora_A.weight` (r, in) and `...q_proj.lora_B.weight` (out, r), the names PEFT uses.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from finegrain.errors import FinegrainError
from finegrain.model import fused
from finegrain.model.linear import linear, matmul_t

INITS = ("default", "gaussian")


@dataclass
class LoraConfig:
    """What to adapt and how.

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
        init: "default" (A Kaiming-uniform as in `nn.Linear`, B zeros, so the model starts unchanged)
            or "gaussian" (A normal with std 1/r, B zeros).
        modules_to_save: modules trained in full next to the adapter and saved with it, such as a
            classification head `"score"` (PEFT's `modules_to_save`).
    """

    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    targets: tuple[str, ...] | list[str] | str = ("q_proj", "v_proj")
    use_rslora: bool = False
    layers: list[int] | None = None
    init: str = "default"
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or self.r <= 0:
            raise FinegrainError(f"lora.r: must be a positive integer, got {self.r!r}")
        if self.alpha <= 0:
            raise FinegrainError(f"lora.alpha: must be positive, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise FinegrainError(f"lora.dropout: must be in [0, 1), got {self.dropout!r}")
        if self.init not in INITS:
            raise FinegrainError(f"lora.init: '{self.init}' is unknown; use one of {', '.join(INITS)}")
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


class LoraLinear(nn.Module):
    """A linear layer with a frozen `weight`/`bias` and a trainable low-rank update.

    Args:
        in_features, out_features, bias: as in `nn.Linear`.
        r, alpha, dropout, use_rslora, init: see `LoraConfig`.
        dtype, device: of the base weight. The adapter is kept in float32 when the base is half
            precision, as PEFT does, because tiny updates to A and B vanish in bfloat16.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        r: int = 8,
        alpha: float = 16,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str = "default",
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.r = r
        self.alpha = alpha
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.init = init
        weight = torch.empty(out_features, in_features, dtype=dtype, device=device)
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = (
            nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None
        )
        adapter_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        self.lora_A = nn.Linear(in_features, r, bias=False, dtype=adapter_dtype, device=device)
        self.lora_B = nn.Linear(r, out_features, bias=False, dtype=adapter_dtype, device=device)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.reset_lora_parameters()

    @classmethod
    def from_linear(cls, linear: nn.Linear, **lora_kwargs) -> "LoraLinear":
        """Wrap `linear`, sharing its weight and bias tensors (no copy) and freezing them."""
        layer = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            dtype=linear.weight.dtype,
            device=linear.weight.device,
            **lora_kwargs,
        )
        layer.weight = linear.weight
        layer.weight.requires_grad_(False)
        if linear.bias is not None:
            layer.bias = linear.bias
            layer.bias.requires_grad_(False)
        return layer

    def reset_lora_parameters(self) -> None:
        # B = 0 makes the wrapped layer start out exactly equal to the base layer.
        if self.init == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1 / self.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (..., in) -> (..., out)
        if self.merged:
            return linear(x, self.weight, self.bias)
        A, B = self.lora_A.weight, self.lora_B.weight
        autocast = torch.is_autocast_enabled(x.device.type)
        if (autocast or x.dtype == self.weight.dtype == A.dtype) and not self.weight.requires_grad:
            p = self.dropout.p if self.training and isinstance(self.dropout, nn.Dropout) else 0.0
            keep = keep_mask(x.shape, p, x.device) if p > 0 else None
            if not autocast:
                return LoraMatmul.apply(x, self.weight, self.bias, A, B, self.scaling / (1 - p), keep)
            # Every matmul in autocast's dtype, as autocast would run F.linear; A and B stay float32
            # parameters (their gradients come back through the casts).
            dtype = torch.get_autocast_dtype(x.device.type)
            bias = None if self.bias is None else self.bias.to(dtype)
            with torch.autocast(x.device.type, enabled=False):
                return LoraMatmul.apply(
                    x.to(dtype), self.weight.to(dtype), bias, A.to(dtype), B.to(dtype), self.scaling / (1 - p), keep
                )
        # A half-precision base with a float32 adapter: plain autograd.
        # Two thin matmuls, (..., in) -> (..., r) -> (..., out); the (out, in) update is never built.
        y = F.linear(x, self.weight, self.bias)
        update = self.lora_B(self.lora_A(self.dropout(x).to(A.dtype)))
        return y + (update * self.scaling).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """The update B @ A * scaling (out, in), in float32."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Add the update into `weight`, so forward costs one matmul; a no-op when already merged."""
        if not self.merged:
            self.weight.copy_((self.weight.float() + self.delta_weight()).to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the update back out of `weight`; a no-op when not merged."""
        if self.merged:
            self.weight.copy_((self.weight.float() - self.delta_weight()).to(self.weight.dtype))
            self.merged = False

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"r={self.r}, scaling={self.scaling:g}, merged={self.merged}"
        )


class LoraMatmul(torch.autograd.Function):
    """y = x W^T + b + ((x * keep) A^T) B^T * scaling for a frozen W, with a lean backward.

    Autograd on the plain expression keeps a float dropout mask and the dropped input for
    every adapted layer; this keeps x (one tensor for q_proj and v_proj, which read the same
    normed input), a bool mask and the (..., r) product x A^T, and adds the update into the
    base output in place. `scaling` includes dropout's 1 / (1 - p); `keep` is None without
    dropout. Gradients: A, B and x only (W and b are frozen).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling: float, keep):
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        a = None if keep is None else fused.lora_down(x2, keep, lora_A)
        if a is None:
            a = (x2 if keep is None else x2 * as_bytes(keep, x2)) @ lora_A.t()  # (N, r)
        y = matmul_t(x2, weight, bias)  # (N, out)
        y.addmm_(a, lora_B.t(), alpha=scaling)
        ctx.save_for_backward(x2, keep, a, weight, lora_A, lora_B)
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
            grad_x = matmul_t(g, weight.t())  # (N, in)
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
