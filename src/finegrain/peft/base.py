"""The method-neutral adapter layer: inject any method of `METHODS`, switch named adapters, and
read and write adapters in PEFT's file format.

A method is one file (`lora.py`) whose config class is its entry in `METHODS`: the config holds
the method's options and reads and writes its keys of `adapter_config.json`; its `layer` wraps a
targeted `nn.Linear` and holds named adapters, one of them active (PEFT's `set_adapter`); the
layer's `adapter_keys` are the state-dict names of the active adapter's tensors, which are also
the parameters that train. Everything else here (which modules a config targets, freezing,
`modules_to_save`, the files) is the same for every method.

An input-side method (prompt and prefix tuning) wraps no module: its config's `attach(model, name)`
adds its layer to the decoder (`model.prompt_encoder`, `model.prefix_encoder`), which
`finegrain.model.backbone.hidden_states` reads, with the same named adapters and `adapter_keys`.
Its file is PEFT's prompt-learning form: no target keys, the method's own tensor names
(`config.peft_tensors(model)`, read back by `config.model_tensors`) and a head under `base_model.`.

An adapter directory holds `adapter_config.json` and `adapter_model.safetensors`, exactly as
`peft.PeftModel.save_pretrained` writes them, so `PeftModel.from_pretrained` loads what we save
and `load_adapter` loads what PEFT saved. Tensor names are the module paths of the Hugging Face
model behind a `base_model.model.` prefix: `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`;
a module in `modules_to_save` (a classification head `score`) is saved whole as `base_model.model.score.weight`.

The weights file also carries a sha256 of its tensors in its metadata (`finegrain_sha256`, which
PEFT ignores); every read checks it, and refuses NaN, infinities and tensors that do not fit the config.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import re
import struct
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar, Protocol

import safetensors.torch
import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from finegrain.atomic import atomic_path, atomic_write_text, fault_point
from finegrain.config import RunConfig, from_dict
from finegrain.errors import FinegrainError
from finegrain.peft.adapter import BottleneckConfig
from finegrain.peft.bitfit import BitfitConfig
from finegrain.peft.full import FullConfig
from finegrain.peft.head import HeadOnlyConfig
from finegrain.peft.adalora import AdaLoraConfig
from finegrain.peft.dora import DoraConfig
from finegrain.peft.ia3 import Ia3Config
from finegrain.peft.lora import LoraConfig
from finegrain.peft.prefix import PrefixConfig
from finegrain.peft.prompt import PROMPT_LEARNING_PREFIX, PromptConfig

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."
TASK_TYPES = ("CAUSAL_LM", "SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION", "SEQ_2_SEQ_LM")
_LAYER_INDEX = re.compile(r"(?:^|.*?\.)layers\.(\d+)\.")
DIGEST_KEY = "finegrain_sha256"  # safetensors metadata: `tensors_digest` of the file's tensors
DEFAULT_ADAPTER = "default"  # the adapter a training run injects and saves, as in PEFT


# ---------------------------------------------------------------------------------------------- the methods


class AdapterLayer(Protocol):
    """What this module asks of a method's layer (`LoraLinear`)."""

    adapter_keys: ClassVar[tuple[str, ...]]  # state-dict names of the active adapter's tensors in the layer
    adapters: dict[str, Any]  # by name
    active_adapter: str | None
    merged: bool

    def add_adapter(self, name: str, **options: Any) -> None: ...
    def set_adapter(self, name: str | None) -> None: ...
    def merge(self) -> None: ...
    def unmerge(self) -> None: ...
    def base_layer(self) -> nn.Linear: ...

    # Optional: `wraps`, the module types `inject` may hand to `from_linear` (nn.Linear when absent;
    # bitfit's layer also wraps RMSNorm); `lr_scales()`, learning-rate factors of the active adapter's
    # tensors by their names in the layer (LoRA+: {"lora_B.weight": lr_ratio}; see `lr_scales`).


class AdapterConfig(Protocol):
    """What this module asks of a method's config class, the method's entry in `METHODS`."""

    name: ClassVar[str]  # its key in METHODS, the prefix of its errors
    options: ClassVar[type]  # a dataclass of its run-config keys under `peft:`, each with a default
    peft_type: ClassVar[str]  # its name in PEFT's adapter_config.json
    layer: ClassVar[type[AdapterLayer]]
    targets: tuple[str, ...] | str
    layers: list[int] | None
    modules_to_save: list[str] | None

    def adapter_options(self) -> dict[str, Any]: ...  # the keyword arguments of `layer.add_adapter`
    @classmethod
    def from_section(cls, section: Any, layers: list[int] | None, modules_to_save: list[str]) -> AdapterConfig: ...
    def to_peft(self) -> dict[str, Any]: ...
    @classmethod
    def from_peft(
        cls, raw: dict[str, Any], path: Path, targets: Any, layers: list[int] | None, modules_to_save: list[str] | None
    ) -> AdapterConfig: ...
    def check_tensors(self, tensors: dict[str, torch.Tensor], path: Path, config_name: str, fix: str) -> None: ...

    # Optional, for a file that is not LoRA's shape: `file_config(peft_config, adapted_layers)` returns the
    # adapter_config.json to write (bitfit: LN_TUNING or its own type, no layers_to_transform), and
    # `peft_types` lists every peft_type the method reads (`peft_type` alone when absent). Empty
    # `targets` (head) wrap nothing: only `modules_to_save` train and are saved. `module_options(path)`
    # adds per-layer keyword arguments to `adapter_options()` (IA3: whether the layer is feed-forward).
    # `peft_flag`: the method reads files of another method's `peft_type` that set this key true
    # (DoRA: LORA with use_dora).


class MethodLayers(nn.Module):
    """The layers of several methods at one module path of a shared base: a server holding a LoRA
    run and an IA3 run that both adapt `v_proj` keeps one layer per method there, all on the same
    weight. Adapter names are per run, so at most one member has an active adapter.

    It shows one member's tables as its own (`front`: the member holding the active adapter, or the
    one last added to), so the active adapter's tensors keep their names (`v_proj.lora_A.weight`,
    `v_proj.ia3_l`) for `load_tensors` and `adapter_state_dict`, and forward runs that member. Only
    `inject` makes one, when a second method targets a layer; training never does.
    """

    def __init__(self, members: list[AdapterLayer]):
        super().__init__()
        self.__dict__["members"] = list(members)
        self.show(self.members[-1])

    def show(self, member: AdapterLayer) -> None:
        """Make `member` the one whose parameters and modules this layer shows and whose forward it runs."""
        self.__dict__["front"] = member
        for table in ("_parameters", "_modules", "_buffers"):
            self.__dict__[table] = member.__dict__[table]

    def member(self, kind: type) -> AdapterLayer | None:
        return next((m for m in self.members if type(m) is kind), None)

    @property
    def adapter_keys(self) -> tuple[str, ...]:
        return self.front.adapter_keys

    @property
    def adapters(self) -> dict[str, Any]:
        return {name: adapter for m in self.members for name, adapter in m.adapters.items()}

    @property
    def active_adapter(self) -> str | None:
        return self.front.active_adapter

    @property
    def merged(self) -> bool:
        return self.front.merged

    def set_adapter(self, name: str | None) -> None:
        for m in self.members:
            m.set_adapter(name if name in m.adapters else None)
        holder = next((m for m in self.members if name is not None and name in m.adapters), None)
        if holder is not None:
            self.show(holder)

    def train(self, mode: bool = True) -> MethodLayers:
        super().train(mode)
        for m in self.members:
            m.train(mode)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.front(x)

    def merge(self) -> None:
        self.front.merge()

    def unmerge(self) -> None:
        self.front.unmerge()

    def base_layer(self) -> nn.Linear:
        return self.front.base_layer()


# Adapter methods by name (a run config's `peft.method`). A new method is one file plus one line here.
METHODS: dict[str, type[AdapterConfig]] = {
    "lora": LoraConfig,
    "dora": DoraConfig,
    "ia3": Ia3Config,
    "adalora": AdaLoraConfig,
    "prompt": PromptConfig,
    "prefix": PrefixConfig,
    "full": FullConfig,
    "adapter": BottleneckConfig,
    "bitfit": BitfitConfig,
    "head": HeadOnlyConfig,
}
# A method without a layer (full) wraps nothing: it marks the weights that train in place (`select`).
ADAPTER_LAYERS = tuple(method.layer for method in METHODS.values() if method.layer is not None)
ADAPTER_LAYERS += (MethodLayers,)  # the layers of several methods at one path of a served base


def method_options(config: RunConfig, note: bool = True) -> tuple[type[AdapterConfig], Any]:
    """A run's adapter method (`peft.method`) and its options, checked before anything is built.

    The options are the method's `options` class read from the keys under `peft:`; LoRA's sit in
    the `lora:` section (where `finegrain.config.load_config` puts LoRA's `peft:` keys). An error
    names the config line or `--set` that gave the key. `note`: warn about the `lora:` options a
    switch of method drops (a run's early check passes False, so the note comes once, from `build`).

    Raises:
        FinegrainError: the method is unknown, or an option is unknown or of the wrong type.
    """
    sources = getattr(config, "sources", {})
    method = METHODS.get(config.peft.method)
    if method is None:
        raise FinegrainError(
            f"{sources.get('peft.method', 'config')}: peft.method: '{config.peft.method}' is unknown; "
            f"use one of {', '.join(METHODS)}"
        )
    options = getattr(config, method.name, None)  # a section of its own (LoRA's, from before `peft:`)
    if not isinstance(options, method.options):  # none, or a run-config section of that name (`head:`)
        values = {**_carried_lora_options(config, method, note), **config.peft.options}
        if values.get("layers") == "auto":  # chosen by the layer probe when `train` plans the run (finegrain.train.recipe)
            values.pop("layers")
        options = from_dict(method.options, values, "config", "peft.", sources)
    return method, options


def _carried_lora_options(config: RunConfig, method: type[AdapterConfig], note: bool = True) -> dict[str, Any]:
    """The keys a config set in its `lora:` section that `method` also takes (`layers`, `targets`):
    switching `peft.method` on a LoRA config keeps them; the others are dropped with a note."""
    taken = {f.name for f in dataclasses.fields(method.options)}
    set_keys = [key.split(".", 1)[1] for key in sorted(getattr(config, "explicit", ())) if key.startswith("lora.")]
    dropped = [key for key in set_keys if key not in taken]
    if dropped and note:
        warnings.warn(f"peft.method: {method.name} does not take lora.{', lora.'.join(dropped)}; "
                      f"{'it is' if len(dropped) == 1 else 'they are'} left out", stacklevel=3)
    return {key: getattr(config.lora, key) for key in set_keys if key in taken}


def method_config(config: RunConfig, num_layers: int, modules_to_save: list[str]) -> AdapterConfig:
    """The adapter config of a run: its `peft.method` with that method's options (`method_options`).

    Args:
        num_layers: the kept decoder layers; the options' `layers` may count from the top (-1).
        modules_to_save: the task's head modules, trained in full and saved with the adapter.

    Raises:
        FinegrainError: as `method_options`, or a layer index is outside the model.
    """
    method, options = method_options(config)
    layers = adapted_layers(getattr(options, "layers", None), num_layers, "lora" if method.name == "lora" else "peft")
    return method.from_section(options, layers=layers, modules_to_save=modules_to_save)


def adapted_layers(layers: list[int] | None, num_layers: int, section: str = "lora") -> list[int] | None:
    """Layer indices with negatives counted from the top (-1 is the last kept layer); `section` names
    the run-config section they come from in the error."""
    if layers is None:
        return None
    resolved = sorted({i + num_layers if i < 0 else i for i in layers})
    if resolved and not (0 <= resolved[0] and resolved[-1] < num_layers):
        raise FinegrainError(f"{section}.layers: {layers} is outside the model's {num_layers} layers; give indices from 0 "
                             f"to {num_layers - 1}, or from -{num_layers} to -1 counted from the top")
    return resolved


# ---------------------------------------------------------------------------------------------- inject


def inject(model: nn.Module, config: AdapterConfig, adapter_name: str = DEFAULT_ADAPTER) -> nn.Module:
    """Give the linear layers `config` targets an adapter `adapter_name`, the only active one, in place.

    A targeted `nn.Linear` is replaced by the method's layer; one that already holds adapters of the
    method (another run's, on a server's shared base) gets one more. Every parameter except the new
    adapter's (and the modules in `config.modules_to_save`) is frozen.

    Args:
        model: a built model with Hugging Face module names, such as `finegrain.model.llama.Llama`.
        config: what to adapt, and how (any method of METHODS).
        adapter_name: the adapter's name; "default" for training.

    Returns:
        The same model, for chaining.

    Raises:
        FinegrainError: a target or a layer index matches no linear layer; the model already has
            an adapter of that name.
    """
    if config.layer is None:  # full: no adapter to add; the method picks the weights that train
        return config.select(model)
    layers = adapter_layers(model)
    if any(adapter_name in layer.adapters for layer in layers.values()):
        raise FinegrainError(
            f"{config.name}: the model already has an adapter named '{adapter_name}'; inject or load_adapter once per name"
        )
    set_adapter(layers.values(), None)
    attach = getattr(config, "attach", None)  # an input-side method (prompt, prefix) adds a module to the decoder
    if attach is not None:
        attach(model, adapter_name)
    for name in [] if attach is not None else _target_names(model, config):
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        module = getattr(parent, child_name)
        options = module_options(config, name)
        if isinstance(module, config.layer):
            module.add_adapter(adapter_name, **options)
            module.set_adapter(adapter_name)
        elif isinstance(module, MethodLayers) and module.member(config.layer) is not None:
            member = module.member(config.layer)
            member.add_adapter(adapter_name, **options)
            member.set_adapter(adapter_name)
            module.show(member)
        elif isinstance(module, ADAPTER_LAYERS):  # another method's layer (a served base): both, on one weight
            if module.merged:
                raise FinegrainError(f"{config.name}: '{name}' has an adapter merged into its weight; unmerge it before adding another method's")
            members = module.members if isinstance(module, MethodLayers) else [module]
            added = config.layer.from_linear(module.base_layer(), adapter_name, **options)
            setattr(parent, child_name, MethodLayers([*members, added]))
        else:
            setattr(parent, child_name, config.layer.from_linear(module, adapter_name, **options))
    trained = set(adapter_state_dict(model))
    for param_name, param in model.named_parameters():
        param.requires_grad_(param_name in trained)
    for name in _modules_to_save_names(model, config.modules_to_save):
        for param in model.get_submodule(name).parameters():
            param.requires_grad_(True)
    return model


apply_lora = inject  # the name finegrain's callers knew before methods were pluggable; any method works


def module_options(config: AdapterConfig, path: str) -> dict[str, Any]:
    """The keyword arguments of the method's `add_adapter` for the layer at `path`: the config's
    `adapter_options()`, plus what a method decides per layer (`module_options(path)`, optional:
    IA3 scales a feed-forward layer's input and the others' output)."""
    per_layer = getattr(config, "module_options", None)
    return {**config.adapter_options(), **(per_layer(path) if per_layer is not None else {})}


def _target_names(model: nn.Module, config: AdapterConfig) -> list[str]:
    """Paths of the linear layers `config` selects, in module order; FinegrainError when a target has none."""
    if not config.targets:  # a method that wraps nothing (head): only its modules_to_save train
        return []
    wraps = getattr(config.layer, "wraps", (nn.Linear,))  # the module types the method's layer wraps
    linears = [name for name, m in model.named_modules() if _wraps_one_of(m, wraps)]
    layer_of = {name: _layer_index(name) for name in linears}
    key = config.name
    if config.layers is not None:
        present = sorted({i for i in layer_of.values() if i is not None})
        missing = [i for i in config.layers if i not in present]
        if missing:
            span = f"0-{present[-1]}" if present else "none"
            raise FinegrainError(f"{key}.layers: {missing} not in the model (its layers are {span})")
    saved = _modules_to_save_names(model, config.modules_to_save)

    def selectable(name: str) -> bool:
        if any(name == s or name.startswith(s + ".") for s in saved):
            return False  # a module trained in full never also gets an adapter, as in PEFT
        return config.layers is None or layer_of[name] in config.layers

    def valid_names() -> str:
        return ", ".join(sorted({n.rsplit(".", 1)[-1] for n in linears}))

    if config.targets == "all-linear":
        chosen = [n for n in linears if layer_of[n] is not None and selectable(n)]
        if not chosen:
            raise FinegrainError(f"{key}.targets: 'all-linear' found no linear layer inside the decoder layers")
        return chosen
    if isinstance(config.targets, str):
        chosen = [n for n in linears if re.fullmatch(config.targets, n) and selectable(n)]
        if not chosen:
            raise FinegrainError(
                f"{key}.targets: pattern '{config.targets}' matches no linear layer; valid module names are {valid_names()}"
            )
        return chosen
    chosen = []
    for target in config.targets:
        matches = [n for n in linears if n == target or n.endswith("." + target)]
        if not matches:
            raise FinegrainError(
                f"{key}.targets: unknown target '{target}'; valid module names are {valid_names()} (or 'all-linear')"
            )
        # An exact path is taken as is, like PEFT does; a name is subject to `layers`.
        chosen += [n for n in matches if n == target or selectable(n)]
    if not chosen:
        raise FinegrainError(f"{key}.targets: {list(config.targets)} match no linear layer in layers {config.layers}")
    return [n for n in linears if n in set(chosen)]


def _wraps_one_of(module: nn.Module, wraps: tuple[type, ...]) -> bool:
    """Whether `module` is of a type in `wraps` or an adapter layer (of any method) around one; a
    layer says what it wraps in its `wraps` (bitfit's norms: RMSNorm), nn.Linear when it does not."""
    if isinstance(module, ADAPTER_LAYERS):
        return any(issubclass(kind, wraps) for kind in getattr(type(module), "wraps", (nn.Linear,)))
    return isinstance(module, wraps)


def _layer_index(name: str) -> int | None:
    match = _LAYER_INDEX.match(name)
    return int(match.group(1)) if match else None


def _modules_to_save_names(model: nn.Module, modules_to_save: list[str] | None) -> list[str]:
    """Paths of the modules named (or ending in) `modules_to_save`; names the model lacks are skipped, as in PEFT."""
    if not modules_to_save:
        return []
    return [
        name
        for name, _ in model.named_modules()
        if name and any(name == m or name.endswith("." + m) for m in modules_to_save)
    ]


def adapter_layers(model: nn.Module) -> dict[str, AdapterLayer]:
    """The adapter-holding layers of `model`, of every method, by path."""
    return {name: m for name, m in model.named_modules() if isinstance(m, ADAPTER_LAYERS)}


def set_adapter(layers: Iterable[AdapterLayer], name: str | None) -> None:
    """Make adapter `name` the active one of each layer that holds it; the others run bare, as in
    PEFT, where a layer without the active adapter skips it. None: every layer runs bare.

    Takes the layers, not the model, so that a server switching per batch walks its list once
    instead of every module of the model."""
    for layer in layers:
        layer.set_adapter(name if name in layer.adapters else None)


def merge_adapters(model: nn.Module) -> nn.Module:
    """Add every active adapter into its base weight (faster inference); `unmerge_adapters` undoes it."""
    for layer in adapter_layers(model).values():
        layer.merge()
    return model


def unmerge_adapters(model: nn.Module) -> nn.Module:
    """Subtract every merged adapter from its base weight again."""
    for layer in adapter_layers(model).values():
        layer.unmerge()
    return model


def unload_adapters(model: nn.Module, merge: bool = True) -> nn.Module:
    """Replace every adapter layer by a plain `Linear`, with its active adapter merged in (or dropped if not `merge`)."""
    for name, layer in adapter_layers(model).items():
        if merge:
            layer.merge()
        else:
            layer.unmerge()
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child_name, layer.base_layer())
    return model


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the active adapters' tensors (`...lora_A.weight`, `...lora_B.weight`), under the model's own keys."""
    state = model.state_dict()
    keys = [f"{path}.{key}" for path, layer in adapter_layers(model).items() for key in layer.adapter_keys]
    return {key: state[key] for key in keys if key in state}


def lr_scales(model: nn.Module) -> dict[str, float]:
    """Learning-rate factors of adapter tensors that train at another rate than the run's, by
    parameter name (LoRA+: `lora_B.weight` at lr x `lr_ratio`); a layer states them in `lr_scales()`
    (optional), the others train at the run's rate."""
    return {
        f"{path}.{key}": factor
        for path, layer in adapter_layers(model).items()
        for key, factor in (layer.lr_scales() if hasattr(layer, "lr_scales") else {}).items()
    }


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that require grad, each once (tied weights appear once), ready for an optimizer."""
    seen: dict[int, nn.Parameter] = {}
    for param in model.parameters():
        if param.requires_grad:
            seen.setdefault(id(param), param)
    return list(seen.values())


# ---------------------------------------------------------------------------------------------- PEFT files


def save_adapter(
    model: nn.Module,
    config: AdapterConfig,
    directory: str | os.PathLike,
    base_model_name_or_path: str,
    extra_tensors: dict[str, torch.Tensor] | None = None,
    modules_to_save: list[str] | None = None,
    task_type: str | None = None,
) -> Path:
    """Write the active adapter of `model` as a PEFT adapter directory.

    Args:
        model: a model that went through `inject(model, config)`.
        config: the config it was injected with.
        directory: created if missing; existing adapter files are replaced atomically.
        base_model_name_or_path: the Hugging Face id or path of the base model, for `PeftModel`.
        extra_tensors: tensors of modules that live outside `model` but belong in the adapter,
            under their Hugging Face names, e.g. `{"score.weight": head_weight}` for a
            `LlamaForSequenceClassification` head.
        modules_to_save: module names to record in `modules_to_save`, e.g. `["score"]`, so that PEFT
            loads `extra_tensors` into that module; added to `config.modules_to_save`, whose
            modules inside `model` are saved whole too.
        task_type: PEFT's task type ("CAUSAL_LM", "SEQ_CLS", "TOKEN_CLS", ...), or None.

    Returns:
        The directory.
    """
    if task_type is not None and task_type not in TASK_TYPES:
        raise FinegrainError(f"save_adapter: task_type '{task_type}' is unknown; use one of {', '.join(TASK_TYPES)}")
    adapted = [name for name, layer in adapter_layers(model).items() if layer.active_adapter is not None]
    if not adapted and config.targets:  # a method that wraps nothing (head) saves its modules_to_save
        raise FinegrainError("save_adapter: the model has no active adapter; inject one first (apply_lora)")
    if any(layer.merged for layer in adapter_layers(model).values()):
        raise FinegrainError("save_adapter: adapters are merged into the base weights; call unmerge_adapters first")
    saved_modules = list(dict.fromkeys([*(config.modules_to_save or []), *(modules_to_save or [])]))

    config, adapter_tensors = _file_form(config, adapter_state_dict(model))
    tensors = {PEFT_PREFIX + k: v for k, v in adapter_tensors.items()}
    state = model.state_dict()
    for name in _modules_to_save_names(model, config.modules_to_save):
        tensors.update({PEFT_PREFIX + k: v for k, v in state.items() if k.startswith(name + ".")})
    for key, tensor in (extra_tensors or {}).items():
        tensors[PEFT_PREFIX + key] = tensor
    if hasattr(config, "attach"):  # prompt learning: the method names its tensors; `base_model.` before a head, as PEFT saves
        own = {PEFT_PREFIX + k for k in adapter_state_dict(model)}
        whole = {PROMPT_LEARNING_PREFIX + k.removeprefix(PEFT_PREFIX): v for k, v in tensors.items() if k not in own}
        tensors = {**config.peft_tensors(model), **whole}
    # safetensors refuses views of shared storage; an adapter is small, so copy.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}

    target_modules, layers_to_transform = _targets_for_file(model, config, adapted)
    peft_config = {
        # The keys PEFT's PeftConfig and its target selection share; the method adds its own.
        "auto_mapping": None,
        "base_model_name_or_path": base_model_name_or_path,
        "inference_mode": True,
        "layers_pattern": None,
        "layers_to_transform": layers_to_transform,
        "modules_to_save": saved_modules or None,
        "peft_type": config.peft_type,
        "revision": None,
        "target_modules": target_modules,
        "task_type": task_type,
        **config.to_peft(),
    }
    if hasattr(config, "attach"):  # prompt learning selects no modules: PEFT's config has no target keys
        peft_config = {k: v for k, v in peft_config.items() if k not in ("layers_pattern", "layers_to_transform", "target_modules")}
        peft_config.update(config.to_peft())
    if hasattr(config, "file_config"):  # a method whose file is not LoRA's shape (bitfit: LN_TUNING or its own)
        peft_config = config.file_config(peft_config, {n: m for n, m in adapter_layers(model).items() if n in adapted})
    # File by file rather than the whole directory, which may hold other files (a tokenizer, a
    # training state); weights first, so a config on disk never describes weights not yet there.
    directory = Path(directory)
    with atomic_path(directory / WEIGHTS_NAME) as tmp:
        save_weights(tensors, tmp)
        fault_point("adapter_write")
    atomic_write_text(directory / CONFIG_NAME, json.dumps(peft_config, indent=2, sort_keys=True) + "\n")
    return directory


def _targets_for_file(model: nn.Module, config: AdapterConfig, adapted: list[str]) -> tuple[list[str], list[int] | None]:
    """`target_modules` and `layers_to_transform` that make PEFT wrap exactly the `adapted` modules.

    Short names (`q_proj`) plus layer indices when they pick out exactly that set, as a person
    would write them; otherwise the full module paths, which is also what PEFT writes for "all-linear".
    """
    short = sorted({n.rsplit(".", 1)[-1] for n in adapted})
    layers = config.layers
    candidates = [
        name
        for name, m in model.named_modules()
        if isinstance(m, (nn.Linear, *ADAPTER_LAYERS))
        and name.rsplit(".", 1)[-1] in short
        and (layers is None or _layer_index(name) in layers)
    ]
    if sorted(candidates) == sorted(adapted):
        return short, layers
    return sorted(adapted), None


def read_adapter(directory: str | os.PathLike) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
    """Read a PEFT adapter directory of any method in METHODS without touching a model.

    Returns:
        The config, and the tensors under the model's keys with PEFT's `base_model.model.` prefix
        removed: `model.layers.0.self_attn.q_proj.lora_A.weight`, `score.weight`, ...

    Raises:
        FinegrainError: a file is missing, unreadable or damaged (see `verify_adapter`), or the
            adapter uses a PEFT feature finegrain lacks.
    """
    directory = Path(directory)
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise FinegrainError(f"{config_path}: not found; an adapter directory needs {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        raw = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FinegrainError(f"{config_path}: not valid JSON ({exc}); save the adapter again") from None
    if not isinstance(raw, dict):
        raise FinegrainError(f"{config_path}: expected a JSON object; save the adapter again")
    config = _config_from_peft(raw, config_path)

    weights_path, digest, fix = directory / WEIGHTS_NAME, None, _adapter_fix(directory)
    try:
        if weights_path.is_file():
            tensors, digest = _read_safetensors(weights_path)
        elif (directory / LEGACY_WEIGHTS_NAME).is_file():
            weights_path = directory / LEGACY_WEIGHTS_NAME
            tensors = torch.load(weights_path, map_location="cpu", weights_only=True)
        else:
            raise FinegrainError(f"{weights_path}: not found; save the adapter again or copy the whole directory")
    except (SafetensorError, OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as exc:
        raise FinegrainError(f"{weights_path}: cannot be read ({exc}); it is corrupt: {fix}") from None
    check_weights(weights_path, tensors, digest, fix)
    tensors = {k.removeprefix(PEFT_PREFIX): v for k, v in tensors.items()}
    config.check_tensors(tensors, weights_path, CONFIG_NAME, fix)
    if hasattr(config, "attach"):  # prompt learning: `base_model.` before a head, the method's own tensor names
        tensors = config.model_tensors({k.removeprefix(PROMPT_LEARNING_PREFIX): v for k, v in tensors.items()})
    layer_tensors = getattr(config, "layer_tensors", None)  # the file's shapes back to the layers' (see `_file_form`)
    return config, (layer_tensors(tensors) if layer_tensors is not None else tensors)


def _file_form(config: AdapterConfig, tensors: dict[str, torch.Tensor]) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
    """The adapter's tensors as its PEFT file holds them, with the config that describes them.

    For most methods the layers' tensors as they are. A method whose file holds other shapes than
    its layers declares `file_tensors(tensors) -> (config, tensors)` and `layer_tensors(tensors)`,
    its inverse, which `read_adapter` applies (AdaLoRA trains every rank and saves the kept ones).
    """
    file_tensors = getattr(config, "file_tensors", None)
    return file_tensors(tensors) if file_tensors is not None else (config, tensors)


def inference_form(config: AdapterConfig, tensors: dict[str, torch.Tensor]) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
    """An adapter as `read_adapter` gives it, in the form a server loads onto a shared base: the
    same adapter as another method's layers hold it, where its method declares one
    (`inference_form(tensors)`: AdaLoRA serves as a LoRA), so that it shares those layers with the
    other runs' adapters; else as it is."""
    form = getattr(config, "inference_form", None)
    return form(tensors) if form is not None else (config, tensors)


def verify_adapter(directory: str | os.PathLike) -> None:
    """Refuse a corrupt adapter directory before anything uses it.

    `read_adapter` (and so `load_adapter` and the server) runs the same checks on every load:
    the file reads; its tensors match the checksum written with them (adapters saved before
    finegrain wrote one are not checked against it); no tensor holds NaN or an infinity; each
    tensor fits `adapter_config.json` (a LoRA matrix has its rank).

    Raises:
        FinegrainError: one line naming the file and how to get a good one back.
    """
    read_adapter(directory)


def _adapter_fix(directory: str | os.PathLike) -> str:
    """How to get a good adapter back: from the run's checkpoint when it sits in a run directory."""
    run_dir = Path(directory).parent
    if (run_dir / "config.yaml").is_file():
        return f"rebuild it with `finegrain train --resume {run_dir}` or train the run again"
    return "save or copy the adapter again"


def _config_from_peft(raw: dict[str, Any], path: Path) -> AdapterConfig:
    """The config of a PEFT `adapter_config.json` (`raw`): the method by `peft_type`, the keys every
    method shares (target selection) read here, the method's own by its `from_peft`."""
    # A method may read more than one file type (`peft_types`: bitfit reads LN_TUNING and its own).
    methods = {
        kind: method
        for method in METHODS.values()
        if not hasattr(method, "peft_flag")  # a variant of another method's type (DoRA): below
        for kind in getattr(method, "peft_types", (method.peft_type,))
    }
    kind = raw.get("peft_type")
    if kind not in methods:
        raise FinegrainError(f"{path}: peft_type {kind!r} is not supported; finegrain loads {', '.join(methods)} adapters")
    if hasattr(methods[kind], "attach"):  # prompt learning selects no modules: no target keys
        layers = raw.get("layers_to_transform")
        return methods[kind].from_peft(raw, path, targets=None, layers=layers, modules_to_save=raw.get("modules_to_save"))
    pattern = raw.get("layers_pattern")
    if pattern not in (None, "", [], "layers", ["layers"]):
        raise FinegrainError(f"{path}: layers_pattern={pattern!r} is not supported; finegrain's layers are 'layers'")
    if "target_modules" not in raw:
        raise FinegrainError(f"{path}: key 'target_modules' is missing; save the adapter again")
    layers = raw.get("layers_to_transform")
    method = methods[kind]
    for variant in METHODS.values():  # a file of the type with a variant's flag set: LORA + use_dora is DoRA
        if variant.peft_type == kind and raw.get(getattr(variant, "peft_flag", "")) is True:
            method = variant
    return method.from_peft(
        raw,
        path,
        targets=raw["target_modules"],
        # PEFT applies layers_to_transform only to a list of target names, not to a regex.
        layers=None if isinstance(raw["target_modules"], str) or layers in (None, []) else layers,
        modules_to_save=raw.get("modules_to_save"),
    )


def load_adapter(
    model: nn.Module, directory: str | os.PathLike, strict: bool = True, adapter_name: str = DEFAULT_ADAPTER
) -> AdapterConfig:
    """Inject the adapter in a PEFT directory into `model` as `adapter_name` and load its weights.

    Args:
        model: the base model; it may hold other adapters already (a server's shared base).
        directory: written by `save_adapter` or by `peft`'s `save_pretrained`.
        strict: when True, a tensor the model has no place for is an error; when False it is
            skipped (a head outside `model`: take it from `read_adapter`).
        adapter_name: the name to load it under; it becomes the active adapter.

    Returns:
        The adapter's config.
    """
    config, tensors = read_adapter(directory)
    load_tensors(model, config, tensors, Path(directory), strict, adapter_name)
    return config


def load_tensors(
    model: nn.Module,
    config: AdapterConfig,
    tensors: dict[str, torch.Tensor],
    directory: Path,
    strict: bool = True,
    adapter_name: str = DEFAULT_ADAPTER,
) -> None:
    """`load_adapter` once the directory is read (`read_adapter`): inject `config` as `adapter_name`
    and copy `tensors` (the model's keys) into it and into the modules it saves whole."""
    weights = directory / WEIGHTS_NAME
    try:
        inject(model, config, adapter_name)
    except FinegrainError as exc:
        raise FinegrainError(f"{directory / CONFIG_NAME}: does not fit this model: {exc}") from None
    own = model.state_dict()
    unexpected = [k for k in tensors if k not in own]
    if unexpected and strict:
        raise FinegrainError(
            f"{weights}: {len(unexpected)} tensors have no place in the model, e.g. '{unexpected[0]}'; "
            "is this the adapter of another model?"
        )
    loadable = {k: v for k, v in tensors.items() if k in own}
    missing = [k for k in adapter_state_dict(model) if k not in loadable]
    if missing:
        raise FinegrainError(f"{weights}: tensor '{missing[0]}' is missing ({len(missing)} in all); save it again")
    for key, tensor in loadable.items():
        if tensor.shape != own[key].shape:
            raise FinegrainError(
                f"{weights}: '{key}' has shape {tuple(tensor.shape)}, the model needs {tuple(own[key].shape)}; "
                "is this the adapter of another model?"
            )
    model.load_state_dict(loadable, strict=False)


# ---------------------------------------------------------------------------------------------- checked weights


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order.

    It is stored in the safetensors header of the file it describes, so the check travels with
    the file and is written in the same atomic rename (a checksum file beside it could be left
    stale by a kill between the two writes). It covers the data, which is where a damaged
    file goes unnoticed: a damaged header already fails to parse.
    """
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def save_weights(tensors: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Write `tensors` as a safetensors file with their digest in the metadata (see `load_weights`)."""
    data = safetensors.torch.save(tensors, metadata={"format": "pt", DIGEST_KEY: tensors_digest(tensors)})
    header = _sorted_header(data)
    with open(path, "wb") as f:  # in pieces: a full fine-tune's weights are not held twice
        f.write(data[:8])
        f.write(header)
        f.write(memoryview(data)[8 + len(header) :])


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """A safetensors file as bytes, the same bytes for the same tensors in every process.

    safetensors writes the metadata from a Rust hash map, whose order changes from process to
    process: with two keys a resumed run's adapter would differ from an uninterrupted run's in
    its header alone. The header is rewritten with the metadata keys sorted (same length).
    """
    data = safetensors.torch.save(tensors, metadata=metadata)
    header = _sorted_header(data)
    return data[:8] + header + data[8 + len(header) :]


def _sorted_header(data: bytes) -> bytes:
    """The JSON header of safetensors file `data` with its metadata keys sorted, padded to its length."""
    length = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + length])
    header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    if len(text) > length:  # never seen; the original order is still a valid file
        return data[8 : 8 + length]
    return text.ljust(length, b" ")


def load_weights(path: str | os.PathLike, fix: str) -> dict[str, torch.Tensor]:
    """Read a safetensors file written by `save_weights`, refusing it if it is damaged.

    Args:
        path: the file.
        fix: what the user should do about a damaged file, ending the error message.

    Raises:
        FinegrainError: the file cannot be read, its tensors differ from their digest, or a
            tensor holds NaN or an infinity.
    """
    path = Path(path)
    try:
        tensors, digest = _read_safetensors(path)
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise FinegrainError(f"{path}: cannot be read ({str(exc).splitlines()[0]}); it is corrupt: {fix}") from None
    check_weights(path, tensors, digest, fix)
    return tensors


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], str | None]:
    """The tensors of a safetensors file and the digest its metadata holds (None if it has none)."""
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        return {name: f.get_tensor(name) for name in f.keys()}, metadata.get(DIGEST_KEY)


def check_weights(path: Path, tensors: dict[str, torch.Tensor], digest: str | None, fix: str) -> None:
    """Refuse tensors that differ from `digest` (when there is one) or hold NaN or an infinity."""
    if digest is not None and tensors_digest(tensors) != digest:
        raise FinegrainError(f"{path}: the weights do not match the checksum written with them (the file is damaged); {fix}")
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise FinegrainError(f"{path}: tensor '{name}' holds NaN or infinite values; {fix}")
