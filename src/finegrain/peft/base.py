"""Inject adapters into a built model, merge them, and read and write them in PEFT's file format.

An adapter directory holds `adapter_config.json` and `adapter_model.safetensors`, exactly as
`peft.PeftModel.save_pretrained` writes them, so `PeftModel.from_pretrained` loads what we save
and `load_adapter` loads what PEFT saved. Tensor names are the module paths of the Hugging Face
model behind a `base_model.model.` prefix: `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`;
a module in `modules_to_save` (a classification head `score`) is saved whole as `base_model.model.score.weight`.

The weights file also carries a sha256 of its tensors in its metadata (`finegrain_sha256`, which
PEFT ignores); every read checks it, and refuses NaN, infinities and ranks that do not fit the config.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import struct
from pathlib import Path
from typing import Any, Callable

import safetensors.torch
import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from finegrain.atomic import atomic_path, atomic_write_text, fault_point
from finegrain.errors import FinegrainError
from finegrain.model.linear import Linear
from finegrain.peft.lora import LoraConfig, LoraLinear

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."
TASK_TYPES = ("CAUSAL_LM", "SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION", "SEQ_2_SEQ_LM")
_LAYER_INDEX = re.compile(r"(?:^|.*?\.)layers\.(\d+)\.")
DIGEST_KEY = "finegrain_sha256"  # safetensors metadata: `tensors_digest` of the file's tensors


# ---------------------------------------------------------------------------------------------- inject


def apply_lora(model: nn.Module, config: LoraConfig) -> nn.Module:
    """Replace the targeted `nn.Linear` children of `model` by `LoraLinear`, in place.

    Every parameter except the adapters (and the modules in `config.modules_to_save`) is frozen.

    Args:
        model: a built model with Hugging Face module names, such as `finegrain.model.llama.Llama`.
        config: what to adapt.

    Returns:
        The same model, for chaining.

    Raises:
        FinegrainError: a target or a layer index matches no linear layer; the model already has adapters.
    """
    if any(isinstance(m, LoraLinear) for m in model.modules()):
        raise FinegrainError("lora: the model already has LoRA adapters; apply_lora or load_adapter only once")
    names = _target_names(model, config)
    for name in names:
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, child_name)
        wrapped = LoraLinear.from_linear(
            linear,
            r=config.r,
            alpha=config.alpha,
            dropout=config.dropout,
            use_rslora=config.use_rslora,
            init=config.init,
        )
        setattr(parent, child_name, wrapped)
    for param_name, param in model.named_parameters():
        param.requires_grad_(".lora_A." in f".{param_name}" or ".lora_B." in f".{param_name}")
    for name in _modules_to_save_names(model, config.modules_to_save):
        for param in model.get_submodule(name).parameters():
            param.requires_grad_(True)
    return model


def _target_names(model: nn.Module, config: LoraConfig) -> list[str]:
    """Paths of the linear layers `config` selects, in module order; FinegrainError when a target has none."""
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    layer_of = {name: _layer_index(name) for name in linears}
    if config.layers is not None:
        present = sorted({i for i in layer_of.values() if i is not None})
        missing = [i for i in config.layers if i not in present]
        if missing:
            span = f"0-{present[-1]}" if present else "none"
            raise FinegrainError(f"lora.layers: {missing} not in the model (its layers are {span})")
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
            raise FinegrainError("lora.targets: 'all-linear' found no linear layer inside the decoder layers")
        return chosen
    if isinstance(config.targets, str):
        chosen = [n for n in linears if re.fullmatch(config.targets, n) and selectable(n)]
        if not chosen:
            raise FinegrainError(
                f"lora.targets: pattern '{config.targets}' matches no linear layer; "
                f"valid module names are {valid_names()}"
            )
        return chosen
    chosen = []
    for target in config.targets:
        matches = [n for n in linears if n == target or n.endswith("." + target)]
        if not matches:
            raise FinegrainError(
                f"lora.targets: unknown target '{target}'; valid module names are {valid_names()} (or 'all-linear')"
            )
        # An exact path is taken as is, like PEFT does; a name is subject to `layers`.
        chosen += [n for n in matches if n == target or selectable(n)]
    if not chosen:
        raise FinegrainError(f"lora.targets: {list(config.targets)} match no linear layer in layers {config.layers}")
    return [n for n in linears if n in set(chosen)]


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


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    """The `LoraLinear` modules of `model` by path."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


def merge_lora(model: nn.Module) -> nn.Module:
    """Add every adapter into its base weight (faster inference); `unmerge_lora` undoes it."""
    for layer in lora_layers(model).values():
        layer.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Subtract every merged adapter from its base weight again."""
    for layer in lora_layers(model).values():
        layer.unmerge()
    return model


def unload_lora(model: nn.Module, merge: bool = True) -> nn.Module:
    """Replace every `LoraLinear` by a plain `Linear`, with the adapter merged in (or dropped if not `merge`)."""
    for name, layer in lora_layers(model).items():
        if merge:
            layer.merge()
        else:
            layer.unmerge()
        linear = Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        linear.weight = layer.weight
        linear.bias = layer.bias
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child_name, linear)
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter weights (`...lora_A.weight`, `...lora_B.weight`), under the model's own keys."""
    return {
        name: tensor
        for name, tensor in model.state_dict().items()
        if ".lora_A." in f".{name}" or ".lora_B." in f".{name}"
    }


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that require grad, each once (tied weights appear once), ready for an optimizer."""
    seen: dict[int, nn.Parameter] = {}
    for param in model.parameters():
        if param.requires_grad:
            seen.setdefault(id(param), param)
    return list(seen.values())


# Adapter methods by name: the config class and the function that injects it. DoRA, IA3 go here.
METHODS: dict[str, tuple[type, Callable[[nn.Module, Any], nn.Module]]] = {"lora": (LoraConfig, apply_lora)}


# ---------------------------------------------------------------------------------------------- PEFT files


def save_adapter(
    model: nn.Module,
    config: LoraConfig,
    directory: str | os.PathLike,
    base_model_name_or_path: str,
    extra_tensors: dict[str, torch.Tensor] | None = None,
    modules_to_save: list[str] | None = None,
    task_type: str | None = None,
) -> Path:
    """Write the adapter of `model` as a PEFT adapter directory.

    Args:
        model: a model that went through `apply_lora(model, config)`.
        config: the config it was applied with.
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
    adapted = lora_layers(model)
    if not adapted:
        raise FinegrainError("save_adapter: the model has no LoRA adapters; call apply_lora first")
    if any(layer.merged for layer in adapted.values()):
        raise FinegrainError("save_adapter: adapters are merged into the base weights; call unmerge_lora first")
    saved_modules = list(dict.fromkeys([*(config.modules_to_save or []), *(modules_to_save or [])]))

    tensors = {PEFT_PREFIX + k: v for k, v in lora_state_dict(model).items()}
    state = model.state_dict()
    for name in _modules_to_save_names(model, config.modules_to_save):
        tensors.update({PEFT_PREFIX + k: v for k, v in state.items() if k.startswith(name + ".")})
    for key, tensor in (extra_tensors or {}).items():
        tensors[PEFT_PREFIX + key] = tensor
    # safetensors refuses views of shared storage; an adapter is small, so copy.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}

    target_modules, layers_to_transform = _targets_for_file(model, config, list(adapted))
    peft_config = {
        # The keys PEFT's LoraConfig has had since 0.10; newer versions fill in the rest with defaults,
        # while older ones fail on keys they do not know, so fewer keys load in more places.
        "alpha_pattern": {},
        "auto_mapping": None,
        "base_model_name_or_path": base_model_name_or_path,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True if config.init == "default" else config.init,
        "layer_replication": None,
        "layers_pattern": None,
        "layers_to_transform": layers_to_transform,
        "loftq_config": {},
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "modules_to_save": saved_modules or None,
        "peft_type": "LORA",
        "r": config.r,
        "rank_pattern": {},
        "revision": None,
        "target_modules": target_modules,
        "task_type": task_type,
        "use_dora": False,
        "use_rslora": config.use_rslora,
    }
    # File by file rather than the whole directory, which may hold other files (a tokenizer, a
    # training state); weights first, so a config on disk never describes weights not yet there.
    directory = Path(directory)
    with atomic_path(directory / WEIGHTS_NAME) as tmp:
        save_weights(tensors, tmp)
        fault_point("adapter_write")
    atomic_write_text(directory / CONFIG_NAME, json.dumps(peft_config, indent=2, sort_keys=True) + "\n")
    return directory


def _targets_for_file(model: nn.Module, config: LoraConfig, adapted: list[str]) -> tuple[list[str], list[int] | None]:
    """`target_modules` and `layers_to_transform` that make PEFT wrap exactly the `adapted` modules.

    Short names (`q_proj`) plus layer indices when they pick out exactly that set, as a person
    would write them; otherwise the full module paths, which is also what PEFT writes for "all-linear".
    """
    short = sorted({n.rsplit(".", 1)[-1] for n in adapted})
    layers = config.layers
    candidates = [
        name
        for name, m in model.named_modules()
        if isinstance(m, (nn.Linear, LoraLinear))
        and name.rsplit(".", 1)[-1] in short
        and (layers is None or _layer_index(name) in layers)
    ]
    if sorted(candidates) == sorted(adapted):
        return short, layers
    return sorted(adapted), None


def read_adapter(directory: str | os.PathLike) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """Read a PEFT LoRA adapter directory without touching a model.

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
    _check_ranks(weights_path, tensors, config.r, fix)
    return config, tensors


def verify_adapter(directory: str | os.PathLike) -> None:
    """Refuse a corrupt adapter directory before anything uses it.

    `read_adapter` (and so `load_adapter` and the server) runs the same checks on every load:
    the file reads; its tensors match the checksum written with them (adapters saved before
    finegrain wrote one are not checked against it); no tensor holds NaN or an infinity; each
    LoRA matrix has the rank `adapter_config.json` gives.

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


def _check_ranks(path: Path, tensors: dict[str, torch.Tensor], r: int, fix: str) -> None:
    """Each lora_A is (r, in) and each lora_B (out, r), as the config says."""
    for key, tensor in tensors.items():
        axis = 0 if key.endswith(".lora_A.weight") else 1 if key.endswith(".lora_B.weight") else None
        if axis is not None and (tensor.dim() != 2 or tensor.shape[axis] != r):
            raise FinegrainError(
                f"{path}: '{key}' has shape {tuple(tensor.shape)}, which does not fit r={r} of {CONFIG_NAME}; {fix}"
            )


def _config_from_peft(raw: dict[str, Any], path: Path) -> LoraConfig:
    """Our LoraConfig from the dict of a PEFT `adapter_config.json`."""
    if raw.get("peft_type") != "LORA":
        kind = raw.get("peft_type")
        raise FinegrainError(f"{path}: peft_type {kind!r} is not supported; finegrain loads LORA adapters")
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
    pattern = raw.get("layers_pattern")
    if pattern not in (None, "", [], "layers", ["layers"]):
        raise FinegrainError(f"{path}: layers_pattern={pattern!r} is not supported; finegrain's layers are 'layers'")
    if "r" not in raw or "target_modules" not in raw:
        missing = "r" if "r" not in raw else "target_modules"
        raise FinegrainError(f"{path}: key '{missing}' is missing; save the adapter again")
    layers = raw.get("layers_to_transform")
    init = raw.get("init_lora_weights", True)
    try:
        return LoraConfig(
            r=raw["r"],
            alpha=raw.get("lora_alpha", 8),
            dropout=raw.get("lora_dropout", 0.0),
            targets=raw["target_modules"],
            use_rslora=raw.get("use_rslora", False),
            # PEFT applies layers_to_transform only to a list of target names, not to a regex.
            layers=None if isinstance(raw["target_modules"], str) or layers in (None, []) else layers,
            init="gaussian" if init == "gaussian" else "default",
            modules_to_save=raw.get("modules_to_save"),
        )
    except FinegrainError as exc:
        raise FinegrainError(f"{path}: {exc}") from None


def load_adapter(model: nn.Module, directory: str | os.PathLike, strict: bool = True) -> LoraConfig:
    """Apply the adapter in a PEFT directory to `model` and load its weights.

    Args:
        model: the base model, without adapters.
        directory: written by `save_adapter` or by `peft`'s `save_pretrained`.
        strict: when True, a tensor the model has no place for is an error; when False it is
            skipped (a head outside `model`: take it from `read_adapter`).

    Returns:
        The adapter's config.
    """
    config, tensors = read_adapter(directory)
    weights = Path(directory) / WEIGHTS_NAME
    try:
        apply_lora(model, config)
    except FinegrainError as exc:
        raise FinegrainError(f"{Path(directory) / CONFIG_NAME}: does not fit this model: {exc}") from None
    own = model.state_dict()
    unexpected = [k for k in tensors if k not in own]
    if unexpected and strict:
        raise FinegrainError(
            f"{weights}: {len(unexpected)} tensors have no place in the model, e.g. '{unexpected[0]}'; "
            "is this the adapter of another model?"
        )
    loadable = {k: v for k, v in tensors.items() if k in own}
    missing = [k for k in lora_state_dict(model) if k not in loadable]
    if missing:
        raise FinegrainError(f"{weights}: tensor '{missing[0]}' is missing ({len(missing)} in all); save it again")
    for key, tensor in loadable.items():
        if tensor.shape != own[key].shape:
            raise FinegrainError(
                f"{weights}: '{key}' has shape {tuple(tensor.shape)}, the model needs {tuple(own[key].shape)}; "
                "is this the adapter of another model?"
            )
    model.load_state_dict(loadable, strict=False)
    return config


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
    data = safetensors_bytes(tensors, metadata={"format": "pt", DIGEST_KEY: tensors_digest(tensors)})
    with open(path, "wb") as f:
        f.write(data)


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """A safetensors file as bytes, the same bytes for the same tensors in every process.

    safetensors writes the metadata from a Rust hash map, whose order changes from process to
    process: with two keys a resumed run's adapter would differ from an uninterrupted run's in
    its header alone. The header is rewritten with the metadata keys sorted (same length).
    """
    data = safetensors.torch.save(tensors, metadata=metadata)
    length = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + length])
    header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    if len(text) > length:  # never seen; the original order is still a valid file
        return data
    return data[:8] + text.ljust(length, b" ") + data[8 + length :]


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
