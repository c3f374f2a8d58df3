"""Read a GGUF file (llama.cpp's format) into float32 tensors with Hugging Face names.

A GGUF holds key/value metadata (architecture sizes, the tokenizer, the chat template) and
tensors, most of them quantized in blocks. We dequantize every tensor to float32 with
`gguf.quants`, rename it (`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`)
and undo the row permutation llama.cpp applies to the query and key projections of LLaMA
models, so the weights work with Hugging Face-style rotary embeddings (`rotate_half`).

With `quantize` (`model.quantize`), the decoder's linear weights are kept quantised instead, one
tensor at a time (`finegrain.model.qlinear`): `q4` keeps Q4_0/Q4_1/Q4_K blocks as stored.
"""

from __future__ import annotations

import re
import sys
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGUFValueType, quants
from tqdm import tqdm

from finegrain.errors import FinegrainError
from finegrain.model.config import LlamaConfig
from finegrain.model.qlinear import GGUF_KEPT, QuantizedWeight, quantize_weight, quantizes

__all__ = ["GGUFCheckpoint", "SUPPORTED_TYPES", "load_gguf", "permute_rope", "read_gguf_metadata", "unpermute_rope"]

SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K")

# llama.cpp's per-layer tensor names -> the module path inside `model.layers.N`.
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_PATTERN = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
# llama.cpp precomputes llama3 rope frequency factors into this tensor; the config carries rope scaling instead.
_IGNORED = {"rope_freqs.weight"}
# llama.cpp's converter permutes q/k rows for these architectures only; Qwen2 is stored as in Hugging Face.
_PERMUTED_ARCHITECTURES = ("llama", "mistral")
_REQUIRED_KEYS = ("embedding_length", "block_count", "feed_forward_length", "attention.head_count")


@dataclass
class GGUFCheckpoint:
    """What `load_gguf` reads out of a GGUF file.

    Attributes:
        config: the model configuration; `tie_word_embeddings` is set when the file has no `output.weight`.
        state_dict: float32 tensors under Hugging Face names (`model.layers.0.self_attn.q_proj.weight`, ...);
            with tied embeddings `lm_head.weight` is the same tensor as `model.embed_tokens.weight`.
        metadata: every key/value field as plain Python values (arrays as lists, tokenizer vocabulary included).
        tensor_types: how many tensors the file stores in each type, e.g. `{"Q4_1": 210, "F32": 61, "Q8_0": 1}`.
    """

    config: LlamaConfig
    state_dict: dict[str, torch.Tensor]
    metadata: dict[str, Any]
    tensor_types: dict[str, int]


def load_gguf(path: str | Path, progress: bool = True, quantize: str | None = None) -> GGUFCheckpoint:
    """Read and dequantize a LLaMA-family GGUF file.

    Args:
        path: the `.gguf` file.
        progress: show a progress bar (on stderr) while dequantizing.
        quantize: `model.quantize` (int8 or q4): the decoder's linear weights come as
            `QuantizedWeight`s, each quantised as it is read (q4 keeps the file's Q4 blocks).

    Returns:
        A `GGUFCheckpoint` with the config, float32 state dict, metadata and tensor type counts.

    Raises:
        FinegrainError: the file is missing, not a GGUF, truncated, of an unsupported architecture,
            or holds a tensor in a type finegrain cannot dequantize.
    """
    path = Path(path)
    reader = _open_reader(path)
    metadata = _read_metadata(reader, path)
    config = _config_from_metadata(metadata, reader, path)
    permute = config.model_type in _PERMUTED_ARCHITECTURES
    for tensor in reader.tensors:  # fail before spending minutes on the tensors that do load
        _check_tensor(tensor, path)

    state_dict: dict[str, torch.Tensor] = {}
    tensor_types: Counter[str] = Counter()
    bar = tqdm(reader.tensors, desc=f"dequantizing {path.name}", unit="tensor", disable=not progress, file=sys.stderr)
    for tensor in bar:
        type_name = tensor.tensor_type.name
        tensor_types[type_name] += 1
        if tensor.name in _IGNORED:
            warnings.warn(f"{path}: ignoring {tensor.name}; rope scaling comes from the config only", stacklevel=2)
            continue
        name = _hf_name(tensor.name, path)
        kept = GGUF_KEPT.get(type_name) if quantize == "q4" and quantizes(name) else None
        weight = torch.from_numpy(tensor.data.copy() if kept else _dequantize(tensor, reader, path))  # blocks: (out, bytes)
        if permute and name.endswith(("q_proj.weight", "q_proj.bias")):
            weight = unpermute_rope(weight, config.num_heads)
        elif permute and name.endswith(("k_proj.weight", "k_proj.bias")):
            weight = unpermute_rope(weight, config.num_kv_heads)
        if kept:
            weight = QuantizedWeight(kept, weight, None, int(tensor.shape[0]))
        elif quantize and quantizes(name):
            weight = quantize_weight(weight, quantize, name)
        state_dict[name] = weight
    del reader  # closes the memory map; every tensor above is a copy

    if config.tie_word_embeddings and "model.embed_tokens.weight" in state_dict:
        state_dict["lm_head.weight"] = state_dict["model.embed_tokens.weight"]
    return GGUFCheckpoint(config, state_dict, metadata, dict(tensor_types))


def read_gguf_metadata(path: str | Path) -> dict[str, Any]:
    """The key/value metadata of a GGUF file as plain Python values, without reading any tensor.

    Args:
        path: the `.gguf` file.

    Returns:
        `{"general.architecture": "llama", "tokenizer.ggml.tokens": [...], ...}`.
    """
    path = Path(path)
    return _read_metadata(_open_reader(path), path)


def unpermute_rope(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's rotary permutation of q or k rows (weights (out, in) or biases (out,)).

    llama.cpp rotates interleaved pairs (x0, x1), (x2, x3), ... of each head, Hugging Face rotates
    the halves (x0, x_{d/2}), ...; its converter reorders each head's rows from halves to pairs
    (`permute_rope`). This is the inverse.

    Args:
        weight: (num_heads * head_dim, ...) rows as stored in the GGUF.
        num_heads: the number of heads these rows hold (`num_kv_heads` for k).
    """
    head_dim = weight.shape[0] // num_heads
    rest = weight.shape[1:]
    # (nh, hd/2, 2, *rest) -> (nh, 2, hd/2, *rest): interleaved pairs back to halves
    return weight.reshape(num_heads, head_dim // 2, 2, *rest).transpose(1, 2).reshape(weight.shape)


def permute_rope(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """llama.cpp's rotary permutation of q or k rows, as its `convert_hf_to_gguf.py` applies it.

    Args:
        weight: (num_heads * head_dim, ...) rows in Hugging Face order.
        num_heads: the number of heads these rows hold (`num_kv_heads` for k).
    """
    head_dim = weight.shape[0] // num_heads
    rest = weight.shape[1:]
    # (nh, 2, hd/2, *rest) -> (nh, hd/2, 2, *rest): halves to interleaved pairs
    return weight.reshape(num_heads, 2, head_dim // 2, *rest).transpose(1, 2).reshape(weight.shape)


class _FastReader(gguf.GGUFReader):
    """`GGUFReader`, about 3x faster on large vocabularies.

    The reader slices its `np.memmap` once per value (~250k times for a 50k vocabulary), and every
    memmap slice pays for subclass bookkeeping. Slicing a plain ndarray view of the same map gives
    the same arrays without it. `_open_reader` falls back to the plain reader if this ever breaks.
    """

    def _get(self, offset, dtype, count=1, override_order=None):
        buffer = self.__dict__.get("_buffer")
        if buffer is None:
            buffer = self._buffer = self.data.view(np.ndarray)
        dtype = np.dtype(dtype)
        count = int(count)
        array = buffer[offset : offset + dtype.itemsize * count].view(dtype)[:count]
        return array.view(array.dtype.newbyteorder(self.byte_order if override_order is None else override_order))


def _open_reader(path: Path) -> gguf.GGUFReader:
    if not path.exists():
        raise FinegrainError(f"{path}: no such file; check the path to the .gguf model file")
    if path.is_dir():
        raise FinegrainError(f"{path}: is a directory; pass the .gguf file itself")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise FinegrainError(
            f"{path}: not a GGUF file (it starts with {magic!r}, not b'GGUF'); pass a llama.cpp .gguf model file"
        )
    try:
        return _FastReader(path)
    except Exception:
        pass
    try:  # the plain reader gives the clearest account of what is wrong with the file
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader signals a short or garbled file with ValueError, IndexError, KeyError, ...
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise FinegrainError(
            f"{path}: truncated or corrupt GGUF file ({detail}); download or convert it again"
        ) from None


def _read_metadata(reader, path: Path) -> dict[str, Any]:
    metadata = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):  # the header (version, counts), not key/value data
            continue
        try:
            metadata[key] = _field_value(field)
        except Exception as e:
            raise FinegrainError(f"{path}: corrupt metadata field {key} ({e}); download or convert it again") from None
    return metadata


def _field_value(field) -> Any:
    types = field.types
    if not types:
        return None
    if types[0] == GGUFValueType.ARRAY:
        if len(types) > 2:  # an array of arrays: rare, let the reader flatten it
            return field.contents()
        if types[-1] == GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data]
        if not field.data:
            return []
        return np.concatenate([field.parts[i] for i in field.data]).tolist()
    if types[0] == GGUFValueType.STRING:
        return bytes(field.parts[-1]).decode("utf-8", errors="replace")
    return field.parts[-1].tolist()[0]


def _config_from_metadata(metadata: dict[str, Any], reader, path: Path) -> LlamaConfig:
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    arch = metadata.get("general.architecture")
    meta = dict(metadata)
    embed = tensors.get("token_embd.weight")
    if embed is not None:  # the embedding's rows are the truth (some files pad the vocabulary)
        meta[f"{arch}.vocab_size"] = int(embed.shape[-1])  # GGUF lists dimensions innermost first: (hidden, vocab)
    try:
        config = LlamaConfig.from_gguf(meta)
    except FinegrainError as e:
        raise FinegrainError(f"{path}: {e}") from None
    except (KeyError, TypeError, ValueError) as e:
        missing = [f"{arch}.{key}" for key in _REQUIRED_KEYS if meta.get(f"{arch}.{key}") is None]
        problem = f"lacks {', '.join(missing)}" if missing else f"has a bad value ({type(e).__name__}: {e})"
        raise FinegrainError(f"{path}: GGUF metadata {problem}; convert the model again with llama.cpp") from None
    return config.replace(
        tie_word_embeddings="output.weight" not in tensors,
        attention_bias="blk.0.attn_q.bias" in tensors,
        attention_out_bias="blk.0.attn_output.bias" in tensors,
    )


def _hf_name(name: str, path: Path) -> str:
    stem, _, kind = name.rpartition(".")
    if stem in _TOP_NAMES and kind in ("weight", "bias"):
        return f"{_TOP_NAMES[stem]}.{kind}"
    match = _LAYER_PATTERN.fullmatch(name)
    if match and match.group(2) in _LAYER_NAMES:
        layer, part, kind = match.groups()
        return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{kind}"
    raise FinegrainError(
        f"{path}: tensor {name} has no place in a LLaMA-family model; "
        "finegrain reads dense llama, mistral and qwen2 GGUFs (no mixture-of-experts or multimodal parts)"
    )


def _check_tensor(tensor, path: Path) -> None:
    if tensor.name in _IGNORED:
        return
    _hf_name(tensor.name, path)
    type_name = tensor.tensor_type.name
    if type_name not in SUPPORTED_TYPES:
        raise FinegrainError(
            f"{path}: tensor {tensor.name} is stored as {type_name}, which finegrain cannot dequantize; "
            f"supported types are {', '.join(SUPPORTED_TYPES)} (re-quantize the model, e.g. to Q8_0 or Q4_K_M)"
        )


def _dequantize(tensor, reader, path: Path) -> np.ndarray:
    shape = tuple(reversed([int(d) for d in tensor.shape]))  # GGUF lists dimensions innermost first
    try:
        array = quants.dequantize(tensor.data, tensor.tensor_type)
        # F32 comes back as a view of the memory map, which dies with the reader: copy it out.
        array = np.asarray(array, dtype=np.float32)
        if np.may_share_memory(array, reader.data):
            array = array.copy()
        return array.reshape(shape)
    except ValueError as e:
        raise FinegrainError(
            f"{path}: tensor {tensor.name} is corrupt ({e}); download or convert the file again"
        ) from None
