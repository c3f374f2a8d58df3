"""Model configuration: one dataclass, built from a Hugging Face `config.json` or GGUF metadata."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from finegrain.errors import FinegrainError

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "mistral")


@dataclass
class LlamaConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v (LLaMA's `attention_bias`, Qwen2)
    attention_out_bias: bool = False  # bias on o_proj (LLaMA's `attention_bias`, not Qwen2)
    causal: bool = True
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    model_type: str = "llama"
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_heads
        if self.num_heads % self.num_kv_heads:
            raise FinegrainError(
                f"config: num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "LlamaConfig":
        """Build from the dict of a Hugging Face `config.json`."""
        model_type = hf.get("model_type", "llama")
        if model_type not in SUPPORTED_ARCHITECTURES:
            raise FinegrainError(
                f"config.json: model_type '{model_type}' is not supported; "
                f"finegrain runs LLaMA-family models ({', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"],
            num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            head_dim=hf.get("head_dim"),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=hf.get("rope_theta", (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)),
            rope_scaling=_rope_scaling_from_hf(hf),
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            # Qwen2 always has q/k/v bias; LLaMA says so with `attention_bias`.
            attention_bias=hf.get("attention_bias", False) or model_type == "qwen2",
            attention_out_bias=hf.get("attention_bias", False) and model_type != "qwen2",
            causal=hf.get("finegrain_causal", True),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            pad_token_id=hf.get("pad_token_id"),
            model_type=model_type,
        )

    def to_hf(self) -> dict[str, Any]:
        """The Hugging Face `config.json` dict that `transformers` loads as LlamaForCausalLM."""
        # q/k/v bias without o_proj bias is the Qwen2 layout; LLaMA's `attention_bias` covers all four.
        qwen_style = self.attention_bias and not self.attention_out_bias
        hf: dict[str, Any] = {
            "architectures": ["Qwen2ForCausalLM" if qwen_style else "LlamaForCausalLM"],
            "model_type": "qwen2" if qwen_style else "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "mlp_bias": False,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": "float32",
        }
        if not self.causal:
            hf["finegrain_causal"] = False
        return hf

    @classmethod
    def from_gguf(cls, meta: dict[str, Any]) -> "LlamaConfig":
        """Build from GGUF key/value metadata (`general.architecture`, `llama.*`)."""
        arch = meta.get("general.architecture", "?")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise FinegrainError(
                f"GGUF architecture '{arch}' is not supported; finegrain runs LLaMA-family models "
                f"({', '.join(SUPPORTED_ARCHITECTURES)})"
            )

        def get(key: str, default: Any = None) -> Any:
            return meta.get(f"{arch}.{key}", default)

        hidden = int(get("embedding_length"))
        num_heads = int(get("attention.head_count"))
        rope_scaling = None
        if get("rope.scaling.type") == "linear":
            rope_scaling = {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
        vocab = meta.get("tokenizer.ggml.tokens")
        return cls(
            vocab_size=int(get("vocab_size") or len(vocab)),
            hidden_size=hidden,
            intermediate_size=int(get("feed_forward_length")),
            num_layers=int(get("block_count")),
            num_heads=num_heads,
            num_kv_heads=int(get("attention.head_count_kv", num_heads)),
            head_dim=int(get("attention.key_length", hidden // num_heads)),
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            rope_scaling=rope_scaling,
            max_position_embeddings=int(get("context_length", 2048)),
            tie_word_embeddings=False,  # decided by the loader: no `output.weight` tensor means tied
            attention_bias=arch == "qwen2",
            bos_token_id=_int_or_none(meta.get("tokenizer.ggml.bos_token_id")),
            eos_token_id=_int_or_none(meta.get("tokenizer.ggml.eos_token_id")),
            pad_token_id=_int_or_none(meta.get("tokenizer.ggml.padding_token_id")),
            model_type=arch,
        )

    def replace(self, **changes: Any) -> "LlamaConfig":
        return dataclasses.replace(self, **changes)


def _int_or_none(value: Any) -> int | None:
    return None if value is None else int(value)


def _rope_scaling_from_hf(hf: dict[str, Any]) -> dict[str, Any] | None:
    scaling = hf.get("rope_scaling") or hf.get("rope_parameters")
    if not scaling:
        return None
    scaling = {k: v for k, v in scaling.items() if k != "rope_theta"}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return None
    if kind not in ("linear", "llama3"):
        raise FinegrainError(
            f"config.json: rope_scaling type '{kind}' is not supported; use default, linear or llama3"
        )
    scaling["rope_type"] = kind
    scaling.pop("type", None)
    return scaling
