"""AdaLoRA (Zhang et al. 2023): LoRA in SVD form whose rank budget moves, during training, to the
matrices where it matters.

Each targeted linear layer gets y = x W^T + b + (x (A * E)^T B^T) * alpha / r: A (r, in) and B
(out, r) play the singular vectors, E (r, 1) the singular values, r is `init_r`. After each
optimizer step the `RankAllocator` scores every singular triplet (E_i, row i of A, column i of B)
by its importance, the sensitivity |p * grad| smoothed by an EMA (`beta1`) times its uncertainty
(`beta2`), and zeroes the E_i of the least important ones until the whole model keeps a budget
that falls on a cubic schedule from `init_r` per matrix to `target_r` per matrix on average,
between `tinit` steps and `tfinal` steps before the end, every `deltaT` steps; the last `tfinal`
steps train the final allocation. A regulariser, `orth_reg_weight` times the mean of
||A A^T - I||_F and ||B^T B - I||_F, keeps A and B near orthogonal so that E stays a spectrum.
All of it as PEFT 0.21.2 does it (peft/tuners/adalora: `RankAllocator`, `update_and_allocate`,
`AdaLoraModel.forward`), so the runs compare.

The method's entry in `finegrain.peft.METHODS` is `AdaLoraConfig`. It declares what it adds to the
one training loop, which knows no method by name: `loss_terms()` (the regulariser) and
`step_hooks(total_steps)` (the allocator, whose state goes into every checkpoint).

Files are PEFT's `ADALORA` adapters: tensors `...q_proj.lora_A`, `.lora_E`, `.lora_B`, cut to the
ranks each matrix kept, and `rank_pattern` in adapter_config.json saying which of the `init_r`
ranks those are. In memory every layer keeps all `init_r` ranks, the pruned ones with E = 0 (as
PEFT trains them), so one optimizer and one checkpoint shape serve the whole run.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from finegrain.errors import FinegrainError
from finegrain.model.linear import Linear, linear
from finegrain.peft.frozen import init_frozen, plain_linear, share_frozen
from finegrain.peft.lora import LoraConfig, LoraMatmul, keep_mask

KEYS = ("lora_A", "lora_E", "lora_B")  # the tensors of a layer's active adapter, as PEFT names them
RANKNUM_EPS = 1e-5  # PEFT divides by ranknum + 1e-5; the same number keeps the logits equal


@dataclass
class AdaLoraAdapter:
    """One named adapter of an `AdaLoraLinear`: A (r, in), E (r, 1), B (out, r), alpha, and the rank
    it was created with (PEFT's `ranknum`, which divides alpha whatever the allocation keeps)."""

    lora_A: nn.Parameter
    lora_E: nn.Parameter
    lora_B: nn.Parameter
    alpha: float
    ranknum: float
    dropout: float  # probability, applied in training only

    @property
    def scaling(self) -> float:
        return self.alpha / (self.ranknum + RANKNUM_EPS)


class AdaLoraLinear(nn.Module):
    """A linear layer with a frozen `weight`/`bias` and named SVD-form updates, one of them active.

    Named adapters work as in `LoraLinear`: only the active adapter's A, E and B are parameters of
    the layer (`q_proj.lora_A`, `q_proj.lora_E`, `q_proj.lora_B`, the names of PEFT's files), the
    others wait in `adapters`.
    """

    adapter_keys: ClassVar[tuple[str, ...]] = KEYS

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        super().__init__()
        init_frozen(self, in_features, out_features, bias, dtype, device)
        self.adapters: dict[str, AdaLoraAdapter] = {}
        self.active_adapter: str | None = None
        self.active: AdaLoraAdapter | None = None
        for key in KEYS:
            self.register_parameter(key, None)
        self.merged = False

    @classmethod
    def from_linear(cls, linear: nn.Linear, adapter_name: str = "default", **options: Any) -> AdaLoraLinear:
        """Wrap `linear`, sharing its frozen weight and bias, with one active adapter of `options`."""
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                    dtype=linear.weight.dtype, device=linear.weight.device)
        share_frozen(layer, linear)
        layer.add_adapter(adapter_name, **options)
        layer.set_adapter(adapter_name)
        return layer

    def add_adapter(self, name: str, r: int = 12, alpha: float = 16, dropout: float = 0.0) -> None:
        """Add adapter `name` initialised as PEFT does: E = 0 (a no-op at first), A and B ~ N(0, 0.02)."""
        if name in self.adapters:
            raise FinegrainError(f"adalora: this layer already has an adapter named '{name}'; give the new one another name")
        dtype = torch.float32 if self.weight.dtype in (torch.float16, torch.bfloat16) else self.weight.dtype
        device = self.weight.device
        self.adapters[name] = AdaLoraAdapter(
            lora_A=nn.Parameter(torch.randn(r, self.in_features, dtype=dtype, device=device) * 0.02),
            lora_E=nn.Parameter(torch.zeros(r, 1, dtype=dtype, device=device)),
            lora_B=nn.Parameter(torch.randn(self.out_features, r, dtype=dtype, device=device) * 0.02),
            alpha=alpha, ranknum=float(r), dropout=dropout,
        )

    def set_adapter(self, name: str | None) -> None:
        """Make adapter `name` the one forward applies (and state_dict holds); None: the bare base."""
        if name == self.active_adapter:
            return
        if self.merged:
            raise FinegrainError("adalora: the active adapter is merged into the base weight; unmerge it before switching")
        if name is not None and name not in self.adapters:
            have = ", ".join(self.adapters) or "none"
            raise FinegrainError(f"adalora: no adapter named '{name}' on this layer; it has {have}")
        active = None if name is None else self.adapters[name]
        for key in KEYS:
            self._parameters[key] = None if active is None else getattr(active, key)
        self.__dict__["active"] = active
        self.__dict__["active_adapter"] = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (..., in) -> (..., out)
        if self.merged or self.active is None:
            return linear(x, self.weight, self.bias)
        adapter = self.active
        A = adapter.lora_A * adapter.lora_E  # (r, in): the update is LoRA's with A scaled by E
        B = adapter.lora_B
        autocast = torch.is_autocast_enabled(x.device.type)
        p = adapter.dropout if self.training else 0.0
        if (autocast or x.dtype == self.weight.dtype == A.dtype) and not self.weight.requires_grad:
            keep = keep_mask(x.shape, p, x.device) if p > 0 else None
            scaling = adapter.scaling / (1 - p)
            if not autocast:
                return LoraMatmul.apply(x, self.weight, self.bias, A, B, scaling, keep)
            dtype = torch.get_autocast_dtype(x.device.type)
            bias = None if self.bias is None else self.bias.to(dtype)
            with torch.autocast(x.device.type, enabled=False):
                return LoraMatmul.apply(x.to(dtype), self.weight.to(dtype), bias, A.to(dtype), B.to(dtype), scaling, keep)
        y = F.linear(x, self.weight, self.bias)
        dropped = F.dropout(x, p) if p > 0 else x
        update = F.linear(F.linear(dropped.to(A.dtype), A), B)
        return y + (update * adapter.scaling).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """The active adapter's update B @ (A * E) * alpha / (r + 1e-5) (out, in), in float32."""
        if self.active is None:
            raise FinegrainError("adalora: no adapter is active on this layer; set_adapter first")
        a = self.active
        return (a.lora_B.float() @ (a.lora_A.float() * a.lora_E.float())) * a.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Add the active update into `weight`; a no-op when merged already or nothing is active."""
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
        """A plain `Linear` holding this layer's `weight` and `bias` (with whatever is merged into it)."""
        return plain_linear(self)

    def extra_repr(self) -> str:
        rank = None if self.active is None else int((self.active.lora_E != 0).sum())
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"adapters={list(self.adapters)}, active={self.active_adapter}, nonzero_ranks={rank}, merged={self.merged}"
        )


def adalora_layers(model: nn.Module) -> dict[str, AdaLoraLinear]:
    """The `AdaLoraLinear` modules of `model` with an active adapter, by path, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, AdaLoraLinear) and m.active is not None}


# ---------------------------------------------------------------------------------------------- training


@dataclass
class Orthogonality:
    """The regulariser as a loss term on the model (`finegrain.train.objectives.ModelTerm`): the mean
    over the active adapters' A and B of ||A A^T - I||_F and ||B^T B - I||_F, as PEFT adds it to
    the loss (the norm, not its square)."""

    weight: float
    name: str = "orthogonality"

    def loss(self, model: nn.Module) -> torch.Tensor:
        terms = []
        for layer in adalora_layers(model).values():
            for cov in (layer.lora_A @ layer.lora_A.T, layer.lora_B.T @ layer.lora_B):  # (r, r) each
                terms.append(torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)))
        if not terms:
            raise FinegrainError("adalora: the model has no active AdaLoRA adapter to regularise")
        return torch.stack(terms).mean()


class RankAllocator:
    """Moves the rank budget by importance after each optimizer step (PEFT's `RankAllocator` and
    `AdaLoraModel.update_and_allocate`); a step hook of the trainer (`train.objectives.StepHook`).

    `step` counts optimizer steps done, 1 to `total_steps`: the first `tinit` keep every rank, the
    budget then falls on a cubic to `target_r` per matrix at step `total_steps - tfinal` (a final
    allocation, after which the smoothed scores are dropped), and the last `tfinal` steps keep
    re-applying that allocation, since the optimizer moves a zeroed E_i again. Its state (the
    smoothed scores and the allocation) is what a checkpoint needs to continue exactly.
    """

    def __init__(self, config: AdaLoraConfig, total_steps: int):
        self.config, self.total_steps = config, total_steps
        self.exp_avg_ipt: dict[str, torch.Tensor] = {}  # by "<layer path>.lora_A" etc.
        self.exp_avg_unc: dict[str, torch.Tensor] = {}
        self.rank_pattern: dict[str, list[bool]] | None = None  # by layer path: the ranks kept

    def after_step(self, model: nn.Module, step: int, total_steps: int) -> None:
        """Update the scores with this step's gradients (still in `.grad`), then mask to the budget."""
        layers = adalora_layers(model)
        final = total_steps - self.config.tfinal
        if step < final:
            self._update_scores(layers)
            budget, mask = self.budget(step, layers, total_steps)
            if mask:
                self.rank_pattern = self._mask_to_budget(layers, budget)
        elif step == final:
            if not self.exp_avg_ipt:  # a schedule of one step: PEFT would have no score at all
                self._update_scores(layers)
            self.rank_pattern = self._mask_to_budget(layers, self.config.target_r * len(layers))
            self.exp_avg_ipt, self.exp_avg_unc = {}, {}
        elif self.rank_pattern is not None:
            with torch.no_grad():
                for path, layer in layers.items():
                    kept = torch.tensor(self.rank_pattern[path], device=layer.lora_E.device)
                    layer.lora_E.masked_fill_(~kept.unsqueeze(-1), 0.0)

    def budget(self, step: int, layers: dict[str, AdaLoraLinear], total_steps: int) -> tuple[int, bool]:
        """The ranks the model may keep after `step`, and whether this step masks (PEFT's `budget_schedule`)."""
        c = self.config
        initial = sum(layer.lora_E.shape[0] for layer in layers.values())
        target = c.target_r * len(layers)
        if step <= c.tinit:
            return initial, False
        if step > total_steps - c.tfinal:
            return target, True
        left = 1 - (step - c.tinit) / (total_steps - c.tfinal - c.tinit)
        return int((initial - target) * left**3 + target), step % c.deltaT == 0

    @torch.no_grad()
    def _update_scores(self, layers: dict[str, AdaLoraLinear]) -> None:
        """Sensitivity |p * grad| smoothed by beta1, its uncertainty |ipt - smoothed| by beta2."""
        beta1, beta2 = self.config.beta1, self.config.beta2
        for path, layer in layers.items():
            for key in KEYS:
                p = getattr(layer, key)
                name = f"{path}.{key}"
                if name not in self.exp_avg_ipt:
                    self.exp_avg_ipt[name], self.exp_avg_unc[name] = torch.zeros_like(p), torch.zeros_like(p)
                ipt = (p * p.grad).abs() if p.grad is not None else torch.zeros_like(p)
                self.exp_avg_ipt[name] = beta1 * self.exp_avg_ipt[name] + (1 - beta1) * ipt
                self.exp_avg_unc[name] = beta2 * self.exp_avg_unc[name] + (1 - beta2) * (ipt - self.exp_avg_ipt[name]).abs()

    @torch.no_grad()
    def _mask_to_budget(self, layers: dict[str, AdaLoraLinear], budget: int) -> dict[str, list[bool]]:
        """Zero the E_i of every triplet scoring at or below the budget's threshold, over the whole model."""
        scores = {}
        for path, layer in layers.items():
            score = {key: self._score(f"{path}.{key}", getattr(layer, key)) for key in KEYS}
            triplet = score["lora_E"].view(-1) + (score["lora_A"].mean(dim=1) + score["lora_B"].mean(dim=0))
            scores[path] = triplet  # (r,)
        initial = sum(s.numel() for s in scores.values())
        if initial - budget <= 0:
            return {path: [True] * s.numel() for path, s in scores.items()}
        threshold = torch.kthvalue(torch.cat(list(scores.values())), k=initial - budget)[0].item()
        pattern = {}
        for path, layer in layers.items():
            pruned = scores[path] <= threshold
            layer.lora_E.masked_fill_(pruned.unsqueeze(-1), 0.0)
            pattern[path] = (~pruned).tolist()
        return pattern

    def _score(self, name: str, p: torch.Tensor) -> torch.Tensor:
        if name not in self.exp_avg_ipt:
            return torch.zeros_like(p)
        return self.exp_avg_ipt[name] * self.exp_avg_unc[name]

    def state_dict(self) -> dict[str, Any]:
        return {"exp_avg_ipt": dict(self.exp_avg_ipt), "exp_avg_unc": dict(self.exp_avg_unc),
                "rank_pattern": self.rank_pattern}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.exp_avg_ipt = dict(state["exp_avg_ipt"])
        self.exp_avg_unc = dict(state["exp_avg_unc"])
        self.rank_pattern = state["rank_pattern"]


# ---------------------------------------------------------------------------------------------- the method


@dataclass
class AdaLoraOptions:
    """peft.method: adalora: AdaLoRA's keys under `peft:` (PEFT's AdaLoraConfig names and defaults,
    but `alpha` and `dropout` as finegrain's LoRA)."""

    init_r: int = 12  # the rank every adapted matrix starts with
    target_r: int = 8  # the average rank the matrices keep in the end
    alpha: float = 16.0  # the update is scaled by alpha / init_r
    dropout: float = 0.05
    targets: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])
    layers: list[int] | None = None  # the adapted decoder layers; negative counts from the top
    tinit: int = 0  # optimizer steps before any rank is pruned
    tfinal: int = 0  # optimizer steps at the end that train the final allocation
    deltaT: int = 1  # steps between two allocations while the budget falls
    beta1: float = 0.85  # EMA of the sensitivity
    beta2: float = 0.85  # EMA of its uncertainty
    orth_reg_weight: float = 0.5  # weight of the orthogonality regulariser


@dataclass
class AdaLoraConfig:
    """What to adapt and how: AdaLoRA's entry in `finegrain.peft.METHODS` (see the module docstring).

    Args:
        init_r, target_r, alpha, dropout, tinit, tfinal, deltaT, beta1, beta2, orth_reg_weight: as
            in `AdaLoraOptions` (PEFT's `lora_alpha` is `alpha`).
        targets, layers, modules_to_save: as in `finegrain.peft.LoraConfig`.
        total_step: the run's optimizer steps, set when training starts (`step_hooks`); PEFT's file needs it.
        rank_pattern: the ranks each matrix kept, by `<module path>.lora_E`, as in PEFT's file;
            None when all of them are.
    """

    name: ClassVar[str] = "adalora"
    options: ClassVar[type] = AdaLoraOptions
    peft_type: ClassVar[str] = "ADALORA"
    layer: ClassVar[type[AdaLoraLinear]] = AdaLoraLinear

    init_r: int = 12
    target_r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] | list[str] | str = ("q_proj", "v_proj")
    layers: list[int] | None = None
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    modules_to_save: list[str] | None = None
    total_step: int | None = None
    rank_pattern: dict[str, list[bool]] | None = None

    def __post_init__(self) -> None:
        def check(ok: bool, key: str, want: str) -> None:
            if not ok:
                raise FinegrainError(f"peft.{key}: must be {want}, got {getattr(self, key)!r}")

        for key in ("init_r", "target_r", "deltaT"):
            check(isinstance(getattr(self, key), int) and getattr(self, key) > 0, key, "a positive integer")
        for key in ("tinit", "tfinal"):
            check(isinstance(getattr(self, key), int) and getattr(self, key) >= 0, key, "an integer >= 0")
        check(self.target_r <= self.init_r, "target_r", f"at most peft.init_r ({self.init_r})")
        check(self.alpha > 0, "alpha", "positive")
        check(0.0 <= self.dropout < 1.0, "dropout", "in [0, 1)")
        check(0.0 < self.beta1 < 1.0, "beta1", "in (0, 1)")
        check(0.0 < self.beta2 < 1.0, "beta2", "in (0, 1)")
        check(self.orth_reg_weight >= 0, "orth_reg_weight", ">= 0")
        # targets, layers and modules_to_save mean what they mean for LoRA; its checks, under our keys.
        try:
            shared = LoraConfig(targets=self.targets, layers=self.layers, modules_to_save=self.modules_to_save)
        except FinegrainError as exc:
            raise FinegrainError(str(exc).replace("lora.", "peft.", 1)) from None
        self.targets, self.layers, self.modules_to_save = shared.targets, shared.layers, shared.modules_to_save

    def adapter_options(self) -> dict[str, Any]:
        """The keyword arguments of `AdaLoraLinear.add_adapter`."""
        return {"r": self.init_r, "alpha": self.alpha, "dropout": self.dropout}

    @classmethod
    def from_section(cls, section: AdaLoraOptions, layers: list[int] | None, modules_to_save: list[str]) -> AdaLoraConfig:
        """The config of a run's `peft:` keys, with `layers` resolved against the kept layers."""
        values = {f.name: getattr(section, f.name) for f in dataclasses.fields(section)}
        return cls(**{**values, "layers": layers, "modules_to_save": modules_to_save})

    # -- what the method adds to training (finegrain.train.objectives) ---------------------

    def loss_terms(self) -> list[Orthogonality]:
        """The orthogonality regulariser, added once per optimizer step (none at weight 0)."""
        return [Orthogonality(self.orth_reg_weight)] if self.orth_reg_weight > 0 else []

    def step_hooks(self, total_steps: int) -> list[RankAllocator]:
        """The rank allocator for a run of `total_steps` optimizer steps, which it records for the file.

        Raises:
            FinegrainError: `tinit` and `tfinal` leave no step for the budget to fall in.
        """
        if self.tinit >= total_steps - self.tfinal:
            raise FinegrainError(
                f"peft.tinit ({self.tinit}) + peft.tfinal ({self.tfinal}) leave none of the run's {total_steps} "
                "optimizer steps to allocate ranks in; lower them or train longer"
            )
        self.total_step = total_steps
        return [RankAllocator(self, total_steps)]

    # -- PEFT's files ------------------------------------------------------------------------

    def to_peft(self) -> dict[str, Any]:
        """AdaLoRA's keys of `adapter_config.json` (PEFT's LoraConfig keys plus its own)."""
        return {
            "alpha_pattern": {},
            "beta1": self.beta1,
            "beta2": self.beta2,
            "bias": "none",
            "deltaT": self.deltaT,
            "fan_in_fan_out": False,
            "init_lora_weights": True,
            "init_r": self.init_r,
            "layer_replication": None,
            "loftq_config": {},
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "megatron_config": None,
            "megatron_core": "megatron.core",
            "orth_reg_weight": self.orth_reg_weight,
            "r": 8,  # unused by AdaLoRA; PEFT warns on any other value
            "rank_pattern": self.rank_pattern,
            "target_r": self.target_r,
            "tfinal": self.tfinal,
            "tinit": self.tinit,
            # PEFT refuses a config without a schedule that has a step to allocate in
            "total_step": self.total_step or self.tinit + self.tfinal + 1,
            "use_dora": False,
            "use_rslora": False,
        }

    @classmethod
    def from_peft(cls, raw: dict[str, Any], path: Path, targets: Any, layers: list[int] | None,
                  modules_to_save: list[str] | None) -> AdaLoraConfig:
        """The config of a PEFT AdaLoRA `adapter_config.json` (`raw`).

        Raises:
            FinegrainError: the file uses a feature finegrain lacks, or a value out of range.
        """
        unsupported = {"bias": "none", "fan_in_fan_out": False, "alpha_pattern": {}, "use_rslora": False,
                       "exclude_modules": None, "layer_replication": None, "target_parameters": None,
                       "trainable_token_indices": None, "use_dora": False}
        for key, default in unsupported.items():
            value = raw.get(key, default)
            if value not in (default, None) and value != {}:
                raise FinegrainError(f"{path}: {key}={value!r} is not supported by finegrain; train with {key}={default!r}")
        pattern = raw.get("rank_pattern")
        if pattern is not None and (
            not isinstance(pattern, dict) or not all(isinstance(v, list) and all(isinstance(b, bool) for b in v)
                                                     for v in pattern.values())
        ):
            raise FinegrainError(f"{path}: rank_pattern must map each '<module>.lora_E' to a list of true/false; save it again")
        try:
            return cls(
                init_r=raw.get("init_r", 12), target_r=raw.get("target_r", 8), alpha=raw.get("lora_alpha", 8),
                dropout=raw.get("lora_dropout", 0.0), targets=targets, layers=layers, tinit=raw.get("tinit", 0),
                tfinal=raw.get("tfinal", 0), deltaT=raw.get("deltaT", 1), beta1=raw.get("beta1", 0.85),
                beta2=raw.get("beta2", 0.85), orth_reg_weight=raw.get("orth_reg_weight", 0.5),
                modules_to_save=modules_to_save, total_step=raw.get("total_step"),
                rank_pattern={_strip_adapter_name(k): v for k, v in pattern.items()} if pattern else None,
            )
        except FinegrainError as exc:
            raise FinegrainError(f"{path}: {exc}") from None

    def check_tensors(self, tensors: dict[str, torch.Tensor], path: Path, config_name: str, fix: str) -> None:
        """Each A is (k, in), E (k, 1) and B (out, k), k the ranks `rank_pattern` kept of `init_r`."""
        for key, tensor in tensors.items():
            module, _, name = key.rpartition(".")
            if name not in KEYS:
                continue
            pattern = (self.rank_pattern or {}).get(f"{module}.lora_E")
            if pattern is not None and len(pattern) != self.init_r:
                raise FinegrainError(
                    f"{path}: rank_pattern of '{module}' has {len(pattern)} entries, init_r is {self.init_r}; {fix}"
                )
            rank = self.init_r if pattern is None else sum(pattern)
            axis = 1 if name == "lora_B" else 0
            if tensor.dim() != 2 or tensor.shape[axis] != rank or (name == "lora_E" and tensor.shape[1] != 1):
                raise FinegrainError(
                    f"{path}: '{key}' has shape {tuple(tensor.shape)}, which does not fit rank {rank} of {config_name}; {fix}"
                )

    def file_tensors(self, tensors: dict[str, torch.Tensor]) -> tuple[AdaLoraConfig, dict[str, torch.Tensor]]:
        """The layers' tensors (every rank, pruned ones with E = 0) as PEFT saves them: only the ranks
        each matrix kept, and the config whose `rank_pattern` says which.

        The pattern is read off E, so the file holds exactly the weights in hand (the best step's,
        which may predate the final allocation); E of a rank that was never pruned is never exactly 0.
        """
        pattern = {f"{key[: -len('.lora_E')]}.lora_E": (t.view(-1) != 0).tolist()
                   for key, t in tensors.items() if key.endswith(".lora_E")}
        if all(all(kept) for kept in pattern.values()):
            return dataclasses.replace(self, rank_pattern=None), tensors
        out = dict(tensors)
        for name, kept in pattern.items():
            module, index = name[: -len(".lora_E")], torch.tensor(kept)
            out[f"{module}.lora_A"] = tensors[f"{module}.lora_A"][index]
            out[f"{module}.lora_E"] = tensors[f"{module}.lora_E"][index]
            out[f"{module}.lora_B"] = tensors[f"{module}.lora_B"][:, index]
        return dataclasses.replace(self, rank_pattern=pattern), out

    def layer_tensors(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A file's tensors (`file_tensors`) back at `init_r` ranks each, the pruned ones zero."""
        if not self.rank_pattern:
            return tensors
        out = dict(tensors)
        for name, kept in self.rank_pattern.items():
            module, index = name[: -len(".lora_E")], torch.tensor(kept)
            if f"{module}.lora_E" not in tensors:
                continue  # a module the file does not adapt: the load reports what is missing
            for key in KEYS:
                small = tensors[f"{module}.{key}"]
                shape = (small.shape[0], self.init_r) if key == "lora_B" else (self.init_r, small.shape[1])
                full = small.new_zeros(shape)
                if key == "lora_B":
                    full[:, index] = small
                else:
                    full[index] = small
                out[f"{module}.{key}"] = full
        return out

    def inference_form(self, tensors: dict[str, torch.Tensor]) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
        """The same adapter as a LoRA (A' = A * E, the scaling folded into alpha), for inference on a
        base whose layers hold other runs' LoRA adapters: a server's. `tensors` as `layer_tensors` gives them."""
        lora = LoraConfig(r=self.init_r, alpha=self.alpha * self.init_r / (self.init_r + RANKNUM_EPS), targets=self.targets,
                          layers=self.layers, modules_to_save=self.modules_to_save)
        out = {}
        for key, tensor in tensors.items():
            module, _, name = key.rpartition(".")
            if name == "lora_A":
                out[f"{module}.lora_A.weight"] = tensor * tensors[f"{module}.lora_E"]
            elif name == "lora_B":
                out[f"{module}.lora_B.weight"] = tensor
            elif name != "lora_E":
                out[key] = tensor
        return lora, out


def _strip_adapter_name(key: str) -> str:
    """`model.layers.0.self_attn.q_proj.lora_E.default` (as PEFT keeps it in memory) -> `...q_proj.lora_E`."""
    return re.sub(r"(\.lora_E)\.[^.]+$", r"\1", key)


def adalora_rank(model: nn.Module) -> dict[str, int]:
    """The ranks each adapted matrix holds now (E_i != 0), by path: what the allocation left."""
    return {path: int((layer.lora_E != 0).sum()) for path, layer in adalora_layers(model).items()}
