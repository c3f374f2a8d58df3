"""A full fine-tune's model directory (peft.method: full, `finegrain.peft.full`): written at the end
of training, read by `finegrain.load`, the server and `finegrain export`.

`config.json` and `model.safetensors` hold the trained decoder under `LlamaForCausalLM`'s names,
cut to `model.num_layers` (with `lm_head.weight` when the task model holds an untied one), next to
the tokenizer files; `head/head.safetensors` holds the task's head modules (`score.weight`, ...)
with their checksum. The head sits in a folder of its own because a reader of the directory
takes every `*.safetensors` file beside `config.json` for the model's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from finegrain.atomic import atomic_dir
from finegrain.errors import FinegrainError
from finegrain.peft.base import load_weights, save_weights

HEAD_WEIGHTS = "head/head.safetensors"


def decoder_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The task model's decoder (and untied `lm_head`) under `LlamaForCausalLM`'s names, copied."""
    state = {}
    for key, tensor in model.state_dict().items():
        if "rotary_emb" in key:
            continue
        if key.startswith("model.") or key.startswith("lm_head."):
            state[key] = tensor.detach().to("cpu").contiguous().clone()
    decoder_config = model.get_submodule("model").config
    if decoder_config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


def head_state_dict(model: nn.Module, head_modules: tuple[str, ...] | list[str]) -> dict[str, torch.Tensor]:
    """The task's head modules' tensors (`score.weight`, ...), copied."""
    state = {}
    for name in head_modules:
        for key, tensor in model.get_submodule(name).state_dict().items():
            state[f"{name}.{key}"] = tensor.detach().to("cpu").contiguous().clone()
    return state


def save_model_dir(model: nn.Module, tokenizer: Any, head_modules: tuple[str, ...] | list[str],
                   directory: str | Path) -> Path:
    """Write a full run's weights as a Hugging Face model directory, atomically (see the module docstring).

    Args:
        model: the task model, its decoder at `model.model`.
        tokenizer: the run's `finegrain.tokenizer.Tokenizer` (written beside the weights).
        head_modules: the task's head modules, written to `head/head.safetensors`.
        directory: the model directory (replaced whole).
    """
    config = model.get_submodule("model").config
    state = decoder_state_dict(model)
    hf_config = config.to_hf()
    hf_config["num_hidden_layers"] = len(model.get_submodule("model").layers)
    hf_config["torch_dtype"] = str(next(iter(state.values())).dtype).removeprefix("torch.")
    with atomic_dir(directory) as tmp:
        tmp = Path(tmp)
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n", encoding="utf-8")
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        head = head_state_dict(model, head_modules)
        if head:
            (tmp / HEAD_WEIGHTS).parent.mkdir()
            save_weights(head, tmp / HEAD_WEIGHTS)
        if tokenizer is not None:
            tokenizer.save(tmp)
    return Path(directory)


def load_head(model: nn.Module, head_modules: tuple[str, ...] | list[str], directory: str | Path, fix: str) -> None:
    """Load `head/head.safetensors` of a full run's model directory into the task model's head modules.

    Raises:
        FinegrainError: the file is missing or damaged, or does not fit the task's head.
    """
    if not head_modules:
        return
    path = Path(directory) / HEAD_WEIGHTS
    if not path.is_file():
        raise FinegrainError(f"{path}: not found; a full run keeps its task head there: {fix}")
    tensors = load_weights(path, fix)
    for name in head_modules:
        module = model.get_submodule(name)
        state = {}
        for key, target in module.state_dict().items():
            tensor = tensors.get(f"{name}.{key}")
            if tensor is None or tensor.shape != target.shape:
                found = "missing" if tensor is None else f"of shape {tuple(tensor.shape)}"
                raise FinegrainError(f"{path}: '{name}.{key}' is {found}, the task needs {tuple(target.shape)}; {fix}")
            state[key] = tensor
        module.load_state_dict(state)
