"""The BERT encoder (BERT, MiniLM): learned absolute positions, token types, post-norm LayerNorm,
GELU, bidirectional attention.

The second backbone behind `finegrain.model.backbone.hidden_states`, with the decoder's interface:
`embed_tokens` (the word embeddings), `run_layers`, `norm` (an identity: a post-norm layer ends
normalised), `config.causal` (always False). The position and token-type embeddings and the
embedding LayerNorm are added in `run_layers` when it starts at layer 0, so whatever gives the
word embeddings (the relation task's markers, prompt tuning's virtual tokens) is treated as
Hugging Face's `inputs_embeds` is, and a cached layer's output (the frozen-prefix cache) goes on
from there. Every token is of segment 0 (a single text).

Module names inside a layer are Hugging Face's `BertLayer`'s (`attention.self.query`, `.key`,
`.value`, `attention.output.dense`, `intermediate.dense`, `output.dense`), so LoRA targets mean
what they mean in PEFT; the layer list is `layers`, as the decoder's (Hugging Face's
`encoder.layer`: `hf_state_dict`/`state_dict_from_hf` rename that one prefix).
Shapes: B batch, T query length, S key length, H hidden, nh heads, hd head dim.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from finegrain.errors import FinegrainError
from finegrain.model import ops
from finegrain.model.linear import Linear

# config.json's `hidden_act` -> the function; Hugging Face's "gelu" is the exact (erf) GELU.
ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}
ENCODER_TYPES = ("bert",)  # config.json `model_type`s built by this module


@dataclass
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    hidden_dropout: float = 0.1  # after each sublayer's output projection and on the embeddings, in training
    attention_dropout: float = 0.1  # on the attention probabilities, in training
    pad_token_id: int | None = 0
    causal: bool = False  # an encoder attends both ways: always False (see __post_init__)
    tie_word_embeddings: bool = False  # no language-model head: nothing is tied
    model_type: str = "bert"
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        # `run.build` and the server set `causal` from `model.bidirectional` for a decoder; a BERT
        # layer was trained bidirectional and a causal mask would only make it a worse model.
        self.causal = False
        if self.hidden_size % self.num_heads:
            raise FinegrainError(f"config: hidden_size={self.hidden_size} is not a multiple of num_heads={self.num_heads}")
        if self.hidden_act not in ACTIVATIONS:
            raise FinegrainError(
                f"config.json: hidden_act '{self.hidden_act}' is not supported; use one of {', '.join(ACTIVATIONS)}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> BertConfig:
        """Build from the dict of a Hugging Face `config.json` (`model_type: bert`)."""
        kind = hf.get("position_embedding_type", "absolute")
        if kind != "absolute":
            raise FinegrainError(
                f"config.json: position_embedding_type '{kind}' is not supported; finegrain's BERT has absolute positions"
            )
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"],
            max_position_embeddings=hf.get("max_position_embeddings", 512),
            type_vocab_size=hf.get("type_vocab_size", 2),
            layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
            hidden_act=hf.get("hidden_act", "gelu"),
            hidden_dropout=hf.get("hidden_dropout_prob", 0.1),
            attention_dropout=hf.get("attention_probs_dropout_prob", 0.1),
            pad_token_id=hf.get("pad_token_id", 0),
            model_type=hf.get("model_type", "bert"),
        )

    def to_hf(self) -> dict[str, Any]:
        """The Hugging Face `config.json` dict that `transformers` loads as `BertModel`."""
        return {
            "architectures": ["BertModel"],
            "model_type": "bert",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "max_position_embeddings": self.max_position_embeddings,
            "type_vocab_size": self.type_vocab_size,
            "layer_norm_eps": self.layer_norm_eps,
            "hidden_act": self.hidden_act,
            "hidden_dropout_prob": self.hidden_dropout,
            "attention_probs_dropout_prob": self.attention_dropout,
            "pad_token_id": self.pad_token_id,
            "position_embedding_type": "absolute",
            "torch_dtype": "float32",
        }

    def replace(self, **changes: Any) -> BertConfig:
        return dataclasses.replace(self, **changes)


class Embeddings(nn.Module):
    """Word, position and token-type embeddings, summed and normalised (`embeddings.*`)."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, words: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The layers' input (B, T, H) from word embeddings (B, T, H); positions default to 0..T-1."""
        T = words.shape[1]
        if position_ids is None:
            positions = self.position_embeddings.weight[:T]  # (T, H), broadcast over B
        else:
            positions = self.position_embeddings(position_ids)  # (B, T, H)
        x = words + positions + self.token_type_embeddings.weight[0]  # segment 0 for every token
        return self.dropout(self.LayerNorm(x))


class SelfAttention(nn.Module):
    """Multi-head scaled dot-product attention over every position (`attention.self`)."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.dropout = config.attention_dropout
        self.query = Linear(config.hidden_size, config.hidden_size)
        self.key = Linear(config.hidden_size, config.hidden_size)
        self.value = Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The heads' outputs joined, (B, T, H); with `rows` (B,), only the query at those positions: (B, 1, H)."""
        B, T, _ = x.shape
        queries = x if rows is None else at_rows(x, rows)
        q = self.query(queries).view(B, -1, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, T or 1, hd)
        k = self.key(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, S, hd)
        v = self.value(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        if mask is not None and rows is not None and mask.shape[2] == T:
            mask = mask[torch.arange(B, device=x.device), :, rows][:, :, None]  # (B, 1, 1, S)
        dropout = self.dropout if self.training else 0.0
        y = ops.attention(q, k, v, attn_mask=mask, dropout_p=dropout)  # (B, nh, T, hd)
        return y.transpose(1, 2).reshape(B, -1, self.num_heads * self.head_dim)  # (B, T, H)


class ResidualNorm(nn.Module):
    """A projection, dropout, the residual added and LayerNorm: the post-norm end of a sublayer
    (`attention.output` and `output`)."""

    def __init__(self, in_features: int, config: BertConfig):
        super().__init__()
        self.dense = Linear(in_features, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(h)) + residual)


class Attention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.self = SelfAttention(config)  # Hugging Face's name: `attention.self.query`
        self.output = ResidualNorm(config.hidden_size, config)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, rows: torch.Tensor | None = None) -> torch.Tensor:
        residual = x if rows is None else at_rows(x, rows)
        return self.output(self.self(x, mask, rows), residual)


class Intermediate(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = Linear(config.hidden_size, config.intermediate_size)
        self.activation = ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.dense(x))


class EncoderLayer(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.attention = Attention(config)
        self.intermediate = Intermediate(config)
        self.output = ResidualNorm(config.intermediate_size, config)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states (B, T, H); with `rows` (B,), only those at one position per sequence: (B, 1, H)."""
        x = self.attention(x, mask, rows)
        return self.output(self.intermediate(x), x)


def at_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """x (B, T, ...) at one position per sequence, `rows` (B,): (B, 1, ...)."""
    return x[torch.arange(len(rows), device=x.device), rows][:, None]


class BertModel(nn.Module):
    """Embeddings and encoder layers: returns hidden states (B, T, H). No pooler (a head pools)."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.num_layers))
        self.norm = nn.Identity()  # post-norm: each layer's output is already normalised
        self.gradient_checkpointing = False

    @property
    def embed_tokens(self) -> nn.Embedding:
        """The word embeddings: what the backbone contract looks token ids up in."""
        return self.embeddings.word_embeddings

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Args:
            input_ids: (B, T) token ids.
            attention_mask: (B, T) 1 for real tokens, 0 for padding; or a ready boolean mask
                (B, 1, T, S), True where attention is allowed.
            position_ids: (B, T) positions; by default 0..T-1 in every row (right padding).
        """
        return self.run_layers(self.embed_tokens(input_ids), attention_mask, position_ids)

    def run_layers(
        self,
        x: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        input_pos: torch.Tensor | None = None,
        start: int = 0,
        end: int | None = None,
        rows: torch.Tensor | None = None,
        prefix: dict | None = None,
    ) -> torch.Tensor:
        """Run encoder layers `start` to `end` on x (B, T, H): word embeddings when `start` is 0
        (positions, token types and the embedding norm are added first), else the output of
        layer `start - 1`.

        `rows` (B,): the one position per sequence the caller reads (a classifier's [CLS]); the
        last layer then computes only that position and the result is (B, 1, H). `input_pos`
        (a KV cache) and `prefix` (prefix tuning) are the decoder's: an encoder has neither.
        """
        if input_pos is not None or prefix is not None:
            what = "a KV cache (generation)" if input_pos is not None else "prefix tuning"
            raise FinegrainError(f"the BERT encoder has no {what}; use a LLaMA-family model for it")
        if start == 0:
            x = self.embeddings(x, position_ids)
        mask = key_mask(attention_mask)
        layers = self.layers[start:end]
        for i, layer in enumerate(layers):
            args = (x, mask, rows if i == len(layers) - 1 else None)
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, *args, use_reentrant=False)
            else:
                x = layer(*args)
        return x


def key_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """The boolean mask SDPA takes: (B, T) 1/0 over keys becomes (B, 1, 1, T); a ready (B, 1, T, S) stays."""
    if attention_mask is None or attention_mask.dim() == 4:
        return attention_mask
    return attention_mask.bool()[:, None, None, :]


class Bert(nn.Module):
    """A BERT-family encoder as `finegrain.checkpoint.load.load_model` returns it: the backbone at
    `.model`, as a `Llama` holds its decoder, so the tasks build their heads on either."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.model = BertModel(config)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states (B, T, H) (an encoder has no language-model head)."""
        return self.model(input_ids, attention_mask)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


# ------------------------------------------------------------------------------------------ checkpoint names

_HF_LAYERS, _OUR_LAYERS = "encoder.layer.", "layers."
# Tensors of Hugging Face checkpoints that finegrain's encoder does not hold: buffers, and the
# pooler and pretraining heads (a task's head reads hidden states and pools them itself).
_DROPPED = ("embeddings.position_ids", "embeddings.token_type_ids", "pooler.", "cls.")


def state_dict_from_hf(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Hugging Face BERT state dict (`BertModel`'s names, `bert.`-prefixed ones of `BertFor*`, or
    finegrain's own `model.`-prefixed ones of a full fine-tune) under `BertModel`'s names here.
    A `BertFor*` checkpoint's task head (`classifier.`, `qa_outputs.`, outside `bert.`) is left out."""
    if any(key.startswith("bert.") for key in state_dict):
        state_dict = {key[len("bert."):]: tensor for key, tensor in state_dict.items() if key.startswith("bert.")}
    renamed = {}
    for key, tensor in state_dict.items():
        key = key.removeprefix("model.")
        if key.startswith(_DROPPED):
            continue
        if key.startswith(_HF_LAYERS):
            key = _OUR_LAYERS + key[len(_HF_LAYERS):]
        renamed[key] = tensor
    return renamed


def hf_state_dict(model: BertModel) -> dict[str, torch.Tensor]:
    """The encoder's tensors under Hugging Face `BertModel`'s names (`encoder.layer.N...`)."""
    return {
        (_HF_LAYERS + key[len(_OUR_LAYERS):] if key.startswith(_OUR_LAYERS) else key): tensor
        for key, tensor in model.state_dict().items()
    }


def build_bert(config: BertConfig, state_dict: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> Bert:
    """A `Bert` holding a checkpoint's tensors (any naming `state_dict_from_hf` reads), without a
    throwaway random initialisation.

    Raises:
        FinegrainError: a tensor of the encoder is missing, or the checkpoint holds one it has not.
    """
    with torch.device("meta"):
        model = Bert(config)
    state = {f"model.{key}": tensor for key, tensor in state_dict_from_hf(state_dict).items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        problem = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise FinegrainError(f"checkpoint does not match a BERT encoder ({problem}); is it a BERT-family model?")
    return model.to(dtype).eval()


__all__ = [
    "ACTIVATIONS", "ENCODER_TYPES", "Bert", "BertConfig", "BertModel", "build_bert", "hf_state_dict", "state_dict_from_hf",
]
