"""Hugging Face checkpoint directories: config.json plus single or sharded safetensors."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from finegrain.errors import FinegrainError
from finegrain.model.config import LlamaConfig

INDEX_FILE = "model.safetensors.index.json"


@dataclass
class HFCheckpoint:
    config: LlamaConfig
    state_dict: dict[str, torch.Tensor]
    tensor_types: dict[str, int]  # dtype name -> number of tensors, as stored


def read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise FinegrainError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); restore the file from its source") from e
    except UnicodeDecodeError as e:
        raise FinegrainError(f"{path}: not UTF-8 text ({e.reason}); restore the file from its source") from e


def safetensors_files(directory: Path) -> list[Path]:
    """The weight files of a checkpoint directory, sharded (with its index) or single."""
    index = directory / INDEX_FILE
    if index.exists():
        shards = sorted(set(read_json(index).get("weight_map", {}).values()))
        missing = [s for s in shards if not (directory / s).exists()]
        if missing:
            raise FinegrainError(f"{index}: shard {missing[0]} is missing; download all shards the index lists")
        return [directory / s for s in shards]
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        hint = " (only PyTorch .bin weights found: convert them to safetensors)" if any(directory.glob("*.bin")) else ""
        raise FinegrainError(f"{directory}: no *.safetensors weights{hint}; pass a directory with model.safetensors")
    return files


def load_hf_dir(directory: str | Path, progress: bool = True, dtype: torch.dtype = torch.float32) -> HFCheckpoint:
    """Read config.json and all safetensors weights of a checkpoint directory.

    The tokenizer files and generation_config.json (extra end-of-turn ids) are the tokenizer's.
    """
    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.exists():
        raise FinegrainError(f"{config_path}: not found; a Hugging Face model directory needs config.json")
    hf_config = read_json(config_path)
    config = LlamaConfig.from_hf(hf_config)

    state_dict: dict[str, torch.Tensor] = {}
    tensor_types: dict[str, int] = {}
    files = safetensors_files(directory)
    for path in tqdm(files, desc="loading weights", unit="file", disable=not progress or len(files) < 2):
        try:
            with safe_open(path, framework="pt") as f:
                for key in f.keys():
                    tensor = f.get_tensor(key)
                    name = str(tensor.dtype).removeprefix("torch.")
                    tensor_types[name] = tensor_types.get(name, 0) + 1
                    state_dict[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
        except (SafetensorError, OSError, RuntimeError) as e:
            raise FinegrainError(
                f"{path}: corrupt or truncated safetensors file ({str(e).splitlines()[0]}); download it again"
            ) from e
    if "lm_head.weight" not in state_dict:
        config.tie_word_embeddings = True
    return HFCheckpoint(config, state_dict, tensor_types)
