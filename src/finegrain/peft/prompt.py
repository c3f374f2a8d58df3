"""Prompt tuning (Lester et al. 2021): P trainable embeddings, "virtual tokens", before every input.

The base model stays frozen; only the (P, H) embeddings train (and the task's head). The method's
entry in `finegrain.peft.METHODS` is `PromptConfig`; its module, `PromptEncoder`, is a child of the
decoder (`model.prompt_encoder`, holding named adapters like every adapter layer) that
`finegrain.model.backbone.hidden_states` asks for the active adapter's embeddings. In a causal
decoder they see only each other, so it runs them through the layers once per batch (batch 1) and
gives every row their keys and values as a prefix, as prefix tuning's (the same logits and
gradients as P more tokens in every row, to float32 rounding, without their cost); elsewhere it
puts them before each row, shifts the mask, positions and `rows`, and drops their states before
the head. As in PEFT, the row's own tokens sit at positions P..P+T-1. Generation (task instruct, a
served generative run) reads them in `LlamaModel.forward`, where they fill the KV cache's first P slots.

Saved as PEFT's `PROMPT_TUNING`: `adapter_config.json` with `num_virtual_tokens`, `token_dim`, ...
and one tensor `prompt_embeddings` (P, H); a head the task saves whole is `base_model.score.weight`
(PEFT keeps the model itself, not a tuner wrapper, under `base_model` for prompt learning), so that
`peft.PeftModel.from_pretrained` gives the same outputs, and PEFT's files load here.

Virtual tokens change layer 0's input, so every layer's states change: the frozen-prefix cache
cannot apply (`entry_layer` is 0), and nothing can be merged into the base weights (`mergeable`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from finegrain.errors import FinegrainError

DECODER = "model"  # where every finegrain task model (and `Llama`) keeps its decoder, as Hugging Face does
PROMPT_LEARNING_PREFIX = "base_model."  # PEFT's prefix of a prompt-learning file's whole modules
INITS = ("SAMPLE_VOCAB", "TEXT", "RANDOM")  # PEFT's `prompt_tuning_init` values


def find_decoder(model: nn.Module, method: str) -> nn.Module:
    """The decoder (`LlamaModel`) of a task model or a `Llama`: its child `model`, or the model itself.
    `hidden_states` (training, task heads) and `LlamaModel.forward` (generation) read its adapter."""
    for candidate in (getattr(model, DECODER, None), model):
        if isinstance(candidate, nn.Module) and hasattr(candidate, "embed_tokens") and hasattr(candidate, "run_layers"):
            return candidate
    raise FinegrainError(f"{method}: the model has no decoder with embed_tokens (a finegrain task model or Llama)")


class PromptEncoder(nn.Module):
    """Named sets of virtual token embeddings, one active (PEFT's `set_adapter`), for the decoder.

    As in `LoraLinear`, only the active adapter's `embedding` is a child of the module, so
    `state_dict()` and the trainer's checkpoints hold the adapter in use under one name
    (`model.prompt_encoder.embedding.weight`); the others wait in `adapters`. Called, it returns the
    active embeddings (P, H), or None when no adapter is active (the decoder then runs bare).
    """

    adapter_keys: ClassVar[tuple[str, ...]] = ("embedding.weight",)
    entry_layer: ClassVar[int] = 0  # the lowest decoder layer whose input it changes (`train.prefix_cache`)

    def __init__(self, embed_tokens: nn.Embedding):
        super().__init__()
        self.__dict__["embed_tokens"] = embed_tokens  # the decoder's, for initialisation; not a child
        self.adapters: dict[str, nn.Embedding] = {}
        self.active_adapter: str | None = None
        self.register_module("embedding", None)
        self.merged = False

    def add_adapter(self, name: str, num_virtual_tokens: int = 20, init_ids: list[int] | None = None) -> None:
        """Add adapter `name` of `num_virtual_tokens` embeddings: copies of the embeddings of
        `init_ids` (a text's tokens, repeated and cut to length), or of random vocabulary tokens."""
        if name in self.adapters:
            raise FinegrainError(f"prompt: the model already has virtual tokens named '{name}'; give the new ones another name")
        weight = self.embed_tokens.weight
        if init_ids:
            ids = (init_ids * math.ceil(num_virtual_tokens / len(init_ids)))[:num_virtual_tokens]
        else:
            ids = torch.randint(0, weight.shape[0], (num_virtual_tokens,)).tolist()
        # float32 like a LoRA adapter over a half-precision base: small updates vanish in bfloat16.
        embedding = nn.Embedding(num_virtual_tokens, weight.shape[1], dtype=torch.float32, device=weight.device)
        with torch.no_grad():
            embedding.weight.copy_(weight[torch.tensor(ids, device=weight.device)].float())
        self.adapters[name] = embedding

    def set_adapter(self, name: str | None) -> None:
        """Make adapter `name` the one the decoder reads (None: no virtual tokens)."""
        if name is not None and name not in self.adapters:
            raise FinegrainError(f"prompt: no virtual tokens named '{name}'; the model has {', '.join(self.adapters) or 'none'}")
        self._modules["embedding"] = None if name is None else self.adapters[name]
        self.__dict__["active_adapter"] = name

    def forward(self) -> torch.Tensor | None:
        """The active adapter's virtual token embeddings (P, H), or None."""
        embedding = self._modules["embedding"]
        return None if embedding is None else embedding.weight

    def merge(self) -> None:
        raise FinegrainError("prompt: virtual tokens cannot be merged into the base weights; use the adapter as it is")

    def unmerge(self) -> None:
        """Nothing is ever merged."""

    def base_layer(self) -> nn.Module:
        raise FinegrainError("prompt: virtual tokens cannot be merged into the base weights; use the adapter as it is")

    def extra_repr(self) -> str:
        return f"adapters={list(self.adapters)}, active={self.active_adapter}"


@dataclass
class PromptOptions:
    """peft.method: prompt: prompt tuning's keys under `peft:`."""

    num_virtual_tokens: int = 20
    init_text: str | None = None  # start the virtual tokens as this text's tokens; unset: random vocabulary tokens
    # No `layers`: virtual tokens change the input of every layer (the recipe leaves it unset).


@dataclass
class PromptConfig:
    """Prompt tuning's entry in `finegrain.peft.METHODS`.

    Args:
        num_virtual_tokens: P, the trainable embeddings before every input.
        init_text: their start: this text's token embeddings (tokenised with the run's tokenizer,
            special tokens included as PEFT's `prompt_tuning_init: TEXT` does, repeated or cut to
            P); None: the embeddings of P random vocabulary tokens (PEFT's `SAMPLE_VOCAB`).
        init_ids: `init_text`'s token ids, set by `tokenize`.
        modules_to_save: the task's head, trained in full and saved with the adapter.
        token_dim: the hidden size, written to `adapter_config.json` (PEFT's `token_dim`).
    """

    name: ClassVar[str] = "prompt"
    options: ClassVar[type] = PromptOptions
    peft_type: ClassVar[str] = "PROMPT_TUNING"
    layer: ClassVar[type[PromptEncoder]] = PromptEncoder
    mergeable: ClassVar[bool] = False  # `finegrain export` must refuse to merge it
    peft_prefix: ClassVar[str] = PROMPT_LEARNING_PREFIX
    targets: ClassVar[tuple[str, ...]] = ()  # it wraps no module: it adds its own (`attach`)

    num_virtual_tokens: int = 20
    init_text: str | None = None
    layers: list[int] | None = None
    modules_to_save: list[str] | None = None
    init_ids: list[int] | None = field(default=None, repr=False)
    token_dim: int | None = None
    tokenizer_name_or_path: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.num_virtual_tokens, int) or self.num_virtual_tokens < 1:
            raise FinegrainError(f"peft.num_virtual_tokens: must be a positive integer, got {self.num_virtual_tokens!r}")
        if self.init_text is not None and (not isinstance(self.init_text, str) or not self.init_text.strip()):
            raise FinegrainError(f"peft.init_text: must be a non-empty text, got {self.init_text!r}; remove the key for a random start")

    @classmethod
    def from_section(cls, section: PromptOptions, layers: list[int] | None, modules_to_save: list[str]) -> PromptConfig:
        return cls(section.num_virtual_tokens, section.init_text, None, modules_to_save)

    def tokenize(self, tokenizer: Any, name_or_path: str | None = None) -> None:
        """Tokenise `init_text` with the run's tokenizer (`name_or_path` is written for PEFT)."""
        self.tokenizer_name_or_path = name_or_path
        if self.init_text is not None:
            self.init_ids = tokenizer.encode(self.init_text)
            if not self.init_ids:
                raise FinegrainError(f"peft.init_text: {self.init_text!r} has no tokens; write a text or remove the key")

    def adapter_options(self) -> dict[str, Any]:
        """The keyword arguments of `PromptEncoder.add_adapter`."""
        if self.init_text is not None and self.init_ids is None:
            raise FinegrainError("peft.init_text: needs the run's tokenizer; call PromptConfig.tokenize(tokenizer) before inject")
        return {"num_virtual_tokens": self.num_virtual_tokens, "init_ids": self.init_ids}

    def attach(self, model: nn.Module, adapter_name: str) -> None:
        """Give the decoder of `model` a `prompt_encoder` (or one more adapter in it), active."""
        decoder = find_decoder(model, self.name)
        encoder = getattr(decoder, "prompt_encoder", None)
        if encoder is None:
            encoder = decoder.prompt_encoder = PromptEncoder(decoder.embed_tokens)
        encoder.add_adapter(adapter_name, **self.adapter_options())
        encoder.set_adapter(adapter_name)
        self.token_dim = decoder.embed_tokens.weight.shape[1]

    def peft_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The active adapter's tensors as PEFT's file names them: `prompt_embeddings` (P, H)."""
        prompts = find_decoder(model, self.name).prompt_encoder()
        return {"prompt_embeddings": prompts.detach()}

    def model_tensors(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A file's tensors (prefix removed) under the model's state-dict keys."""
        out = {k: v for k, v in tensors.items() if k != "prompt_embeddings"}
        out[f"{DECODER}.prompt_encoder.embedding.weight"] = tensors["prompt_embeddings"]
        return out

    def to_peft(self) -> dict[str, Any]:
        """PROMPT_TUNING's keys of `adapter_config.json` (finegrain.peft.base adds the shared ones)."""
        text_init = self.init_text is not None and self.tokenizer_name_or_path is not None
        return {
            "num_attention_heads": None,
            "num_layers": None,
            "num_transformer_submodules": 1,
            "num_virtual_tokens": self.num_virtual_tokens,
            "prompt_tuning_init": "TEXT" if text_init else "SAMPLE_VOCAB",
            "prompt_tuning_init_text": self.init_text,
            "token_dim": self.token_dim,
            "tokenizer_kwargs": None,
            "tokenizer_name_or_path": self.tokenizer_name_or_path if text_init else None,
        }

    @classmethod
    def from_peft(
        cls, raw: dict[str, Any], path: Path, targets: Any, layers: list[int] | None, modules_to_save: list[str] | None
    ) -> PromptConfig:
        """The config of a PEFT PROMPT_TUNING `adapter_config.json` (`raw`)."""
        if raw.get("num_transformer_submodules", 1) not in (1, None):
            raise FinegrainError(f"{path}: num_transformer_submodules={raw['num_transformer_submodules']} is for encoder-decoder models; finegrain's are decoders")
        if "num_virtual_tokens" not in raw:
            raise FinegrainError(f"{path}: key 'num_virtual_tokens' is missing; save the adapter again")
        try:
            return cls(
                num_virtual_tokens=raw["num_virtual_tokens"], init_text=raw.get("prompt_tuning_init_text") or None,
                modules_to_save=[m for m in dict.fromkeys(modules_to_save or [])], token_dim=raw.get("token_dim"),
                tokenizer_name_or_path=raw.get("tokenizer_name_or_path"),
            )
        except FinegrainError as exc:
            raise FinegrainError(f"{path}: {exc}") from None

    def check_tensors(self, tensors: dict[str, torch.Tensor], path: Path, config_name: str, fix: str) -> None:
        """`prompt_embeddings` is there and is (num_virtual_tokens, token_dim)."""
        prompts = tensors.get("prompt_embeddings")
        if prompts is None:
            raise FinegrainError(f"{path}: tensor 'prompt_embeddings' is missing; {fix}")
        width = self.token_dim or prompts.shape[-1]
        if tuple(prompts.shape) != (self.num_virtual_tokens, width):
            raise FinegrainError(
                f"{path}: 'prompt_embeddings' has shape {tuple(prompts.shape)}, which does not fit "
                f"num_virtual_tokens={self.num_virtual_tokens} of {config_name}; {fix}"
            )
