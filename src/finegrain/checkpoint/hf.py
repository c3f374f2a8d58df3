"""Hugging Face checkpoint directories: config.json plus single or sharded safetensors (or PyTorch
`.bin` files, read without running pickled code).

`config.json`'s `model_type` picks the model: a LLaMA-family decoder (`finegrain.model.config`) or
a BERT-family encoder (`finegrain.model.bert`)."""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from finegrain.errors import FinegrainError
from finegrain.model.bert import ENCODER_TYPES, BertConfig
from finegrain.model.config import SUPPORTED_ARCHITECTURES, LlamaConfig
from finegrain.model.qlinear import quantize_weight, quantizes

INDEX_FILE = "model.safetensors.index.json"
BIN_INDEX_FILE = "pytorch_model.bin.index.json"


@dataclass
class HFCheckpoint:
    config: LlamaConfig | BertConfig
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


def indexed_shards(index: Path) -> list[Path]:
    """The weight files a sharded checkpoint's `index` lists (beside it), each checked to be there."""
    shards = sorted(set(read_json(index).get("weight_map", {}).values()))
    missing = [s for s in shards if not (index.parent / s).exists()]
    if missing:
        raise FinegrainError(f"{index}: shard {missing[0]} is missing; download all shards the index lists")
    return [index.parent / s for s in shards]


def safetensors_files(directory: Path) -> list[Path]:
    """The weight files of a checkpoint directory, sharded (with its index) or single."""
    index = directory / INDEX_FILE
    if index.exists():
        return indexed_shards(index)
    files = sorted(directory.glob("*.safetensors")) or bin_files(directory)
    if not files:
        raise FinegrainError(f"{directory}: no *.safetensors weights; pass a directory with model.safetensors")
    return files


def bin_files(directory: Path) -> list[Path]:
    """The PyTorch weight files of a directory without safetensors: `pytorch_model.bin`, or the shards its index lists."""
    index = directory / BIN_INDEX_FILE
    if index.exists():
        return indexed_shards(index)
    single = directory / "pytorch_model.bin"
    return [single] if single.exists() else []


def model_config(hf_config: dict[str, Any], config_path: Path) -> LlamaConfig | BertConfig:
    """The model config of a `config.json` dict, by its `model_type`: a decoder's or an encoder's."""
    model_type = hf_config.get("model_type", "llama")
    if model_type in ENCODER_TYPES:
        return BertConfig.from_hf(hf_config)
    if model_type in SUPPORTED_ARCHITECTURES:
        return LlamaConfig.from_hf(hf_config)
    raise FinegrainError(
        f"{config_path}: model_type '{model_type}' is not supported; finegrain runs LLaMA-family decoders "
        f"({', '.join(SUPPORTED_ARCHITECTURES)}) and BERT-family encoders ({', '.join(ENCODER_TYPES)})"
    )


class _TensorFile:
    """A PyTorch `.bin` weights file behind safetensors' `safe_open` interface (`keys`, `get_tensor`).

    Read by `torch.load` with `weights_only=True`, which unpickles tensors and plain containers
    only and refuses every other object: a file that would run code when unpickled is an error.
    """

    def __init__(self, path: Path):
        try:
            self.tensors = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
            raise FinegrainError(
                f"{path}: not a plain PyTorch weights file ({str(e).splitlines()[0][:160]}); finegrain reads "
                "tensors only, never pickled code: download it again or convert it to safetensors"
            ) from None
        if not isinstance(self.tensors, dict) or not all(torch.is_tensor(t) for t in self.tensors.values()):
            raise FinegrainError(f"{path}: does not hold a state dict of tensors; pass a model's pytorch_model.bin")

    def __enter__(self) -> _TensorFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.tensors = {}

    def keys(self) -> list[str]:
        return list(self.tensors)

    def get_tensor(self, key: str) -> torch.Tensor:
        return self.tensors[key]


def open_weights(path: Path):
    """A weights file opened for `keys()` and `get_tensor(key)`: safetensors, or a PyTorch `.bin`."""
    return _TensorFile(path) if path.suffix == ".bin" else safe_open(path, framework="pt")


def load_hf_dir(
    directory: str | Path, progress: bool = True, dtype: torch.dtype = torch.float32, quantize: str | None = None
) -> HFCheckpoint:
    """Read config.json and all safetensors weights of a checkpoint directory.

    `quantize` (`model.quantize`: int8 or q4): the decoder's linear weights come as
    `finegrain.model.qlinear.QuantizedWeight`s, each quantised as it is read.

    The tokenizer files and generation_config.json (extra end-of-turn ids) are the tokenizer's.
    """
    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.exists():
        if (directory / "config.yaml").exists():  # a finegrain run directory (finegrain.rundir.CONFIG)
            raise FinegrainError(f"{directory}: a finegrain run, not a model; predict, evaluate and serve take the run as "
                                 f"it is, a config's init_from starts from it, and "
                                 f"`finegrain export {directory} --format hf --output DIR` writes it as a model")
        if (directory / "ensemble.json").exists():  # finegrain.rundir.ENSEMBLE
            raise FinegrainError(f"{directory}: an ensemble of finegrain runs, not a model; predict, evaluate and serve "
                                 "take it as it is, and distill.teacher learns from it")
        raise FinegrainError(f"{config_path}: not found; a Hugging Face model directory needs config.json")
    hf_config = read_json(config_path)
    config = model_config(hf_config, config_path)

    state_dict: dict[str, torch.Tensor] = {}
    tensor_types: dict[str, int] = {}
    files = safetensors_files(directory)
    for path in tqdm(files, desc="loading weights", unit="file", disable=not progress or len(files) < 2):
        try:
            with open_weights(path) as f:
                for key in f.keys():
                    tensor = f.get_tensor(key)
                    name = str(tensor.dtype).removeprefix("torch.")
                    tensor_types[name] = tensor_types.get(name, 0) + 1
                    if quantize and quantizes(key):
                        state_dict[key] = quantize_weight(tensor, quantize, key)
                    else:
                        state_dict[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
        except (SafetensorError, OSError, RuntimeError) as e:
            raise FinegrainError(
                f"{path}: corrupt or truncated safetensors file ({str(e).splitlines()[0]}); download it again"
            ) from e
    if isinstance(config, LlamaConfig) and "lm_head.weight" not in state_dict:
        config.tie_word_embeddings = True
    return HFCheckpoint(config, state_dict, tensor_types)
