"""Prefix tuning (Li & Liang 2021): P trainable keys and values before every row's in each adapted layer.

The base model stays frozen. In each adapted decoder layer, attention sees P extra keys and values
that every query may attend to (`ops.with_prefix`), as PEFT's `past_key_values` do: not rotated,
before the row's tokens, which then sit at positions P..P+T-1. The method's entry in
`finegrain.peft.METHODS` is `PrefixConfig`; its module, `PrefixEncoder`, is a child of the decoder
(`model.prefix_encoder`, holding named adapters) that `finegrain.model.backbone.hidden_states` asks
for the active adapter's keys and values by layer (and `LlamaModel.forward`, for generation: they
stay outside the KV cache, beside it in every step).

A prefix is a table (P, n * 2 * nkv * hd) for n adapted layers, PEFT's layout: per layer its keys
then its values, per kv head. It trains either directly or, with `prefix_projection`, as the output
of a two-layer MLP (tanh, `encoder_hidden_size` wide) over P embeddings, the reparameterisation Li &
Liang found steadier; only the table is saved, as PEFT saves it.

Saved as PEFT's `PREFIX_TUNING`: `adapter_config.json` (`num_virtual_tokens`, `num_layers`,
`token_dim` = nkv * hd, `num_attention_heads` = nkv, `prefix_projection`, `encoder_hidden_size`)
and one tensor `prompt_embeddings`, the table; `PeftModel.from_pretrained` gives the same outputs.
PEFT puts a prefix in every layer: a prefix of some layers only (`layers`, which lets the
frozen-prefix cache run the layers below once) is written with finegrain's `layers_to_transform`,
which PEFT does not read (it then refuses the table's width). Nothing merges (`mergeable`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from finegrain.errors import FinegrainError
from finegrain.peft.prompt import DECODER, PROMPT_LEARNING_PREFIX, find_decoder


@dataclass
class PrefixAdapter:
    """One named prefix: its table (P, n*2*nkv*hd), or embeddings (P, nkv*hd) and an MLP that makes
    the table, and the n layers it enters. A record, not a module (see `PrefixEncoder`)."""

    embedding: nn.Embedding
    transform: nn.Sequential | None
    layers: list[int]


class PrefixEncoder(nn.Module):
    """Named prefixes, one active (PEFT's `set_adapter`), for the decoder's attention layers.

    As in `LoraLinear`, only the active adapter's `embedding` (and `transform`) are children, so the
    state dict and the trainer's checkpoints hold the adapter in use under fixed names. Called, it
    returns {layer: (keys, values)}, each (1, nkv, P, hd), or None when no adapter is active.
    """

    adapter_keys: ClassVar[tuple[str, ...]] = (
        "embedding.weight", "transform.0.weight", "transform.0.bias", "transform.2.weight", "transform.2.bias",
    )

    def __init__(self, num_kv_heads: int, head_dim: int):
        super().__init__()
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        self.adapters: dict[str, PrefixAdapter] = {}
        self.active_adapter: str | None = None
        self.active: PrefixAdapter | None = None
        self.register_module("embedding", None)
        self.register_module("transform", None)
        self.merged = False

    @property
    def entry_layer(self) -> int | None:
        """The lowest layer the active prefix enters: the ones below run as in the base (`train.prefix_cache`)."""
        return None if self.active is None else self.active.layers[0]

    def add_adapter(
        self, name: str, layers: list[int], num_virtual_tokens: int = 20, projection: bool = False,
        encoder_hidden_size: int | None = None, table: torch.Tensor | None = None,
    ) -> None:
        """Add prefix `name` for decoder `layers`: a table of P rows (`table`: its start, else
        random), or with `projection` P embeddings and the MLP that makes the table from them."""
        if name in self.adapters:
            raise FinegrainError(f"prefix: the model already has a prefix named '{name}'; give the new one another name")
        token_dim = self.num_kv_heads * self.head_dim
        width = len(layers) * 2 * token_dim
        device = table.device if table is not None else None
        if projection:
            hidden = encoder_hidden_size or token_dim
            embedding = nn.Embedding(num_virtual_tokens, token_dim, device=device)
            transform = nn.Sequential(nn.Linear(token_dim, hidden), nn.Tanh(), nn.Linear(hidden, width)).to(device)
        else:
            embedding, transform = nn.Embedding(num_virtual_tokens, width, device=device), None
            if table is not None:
                with torch.no_grad():
                    embedding.weight.copy_(table)
        self.adapters[name] = PrefixAdapter(embedding, transform, sorted(layers))

    def set_adapter(self, name: str | None) -> None:
        """Make prefix `name` the one attention reads (None: no prefix)."""
        if name is not None and name not in self.adapters:
            raise FinegrainError(f"prefix: no prefix named '{name}'; the model has {', '.join(self.adapters) or 'none'}")
        active = None if name is None else self.adapters[name]
        self._modules["embedding"] = None if active is None else active.embedding
        self._modules["transform"] = None if active is None else active.transform
        self.__dict__["active"] = active
        self.__dict__["active_adapter"] = name

    def table(self) -> torch.Tensor | None:
        """The active prefix as PEFT saves it: (P, n*2*nkv*hd), through the MLP when there is one."""
        if self.active is None:
            return None
        weight = self.active.embedding.weight
        return weight if self.active.transform is None else self.active.transform(weight)

    def forward(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]] | None:
        """The active prefix's keys and values, each (1, nkv, P, hd), by layer index; None when inactive."""
        table = self.table()
        if table is None:
            return None
        P, layers = table.shape[0], self.active.layers
        kv = table.view(P, 2 * len(layers), self.num_kv_heads, self.head_dim).permute(1, 2, 0, 3)  # (2n, nkv, P, hd)
        return {layer: (kv[2 * i][None], kv[2 * i + 1][None]) for i, layer in enumerate(layers)}

    def merge(self) -> None:
        raise FinegrainError("prefix: a prefix cannot be merged into the base weights; use the adapter as it is")

    def unmerge(self) -> None:
        """Nothing is ever merged."""

    def base_layer(self) -> nn.Module:
        raise FinegrainError("prefix: a prefix cannot be merged into the base weights; use the adapter as it is")

    def extra_repr(self) -> str:
        return f"adapters={list(self.adapters)}, active={self.active_adapter}"


@torch.no_grad()
def word_key_values(decoder: nn.Module, layers: list[int], num_virtual_tokens: int) -> torch.Tensor:
    """A start for a prefix table (P, n*2*nkv*hd): the keys and values (before rotation) that each
    adapted layer computes for P random vocabulary tokens, Li & Liang's start from real words'
    activations, so that the prefix begins in the range of the model's own keys and values."""
    ids = torch.randint(0, decoder.embed_tokens.weight.shape[0], (1, num_virtual_tokens), device=decoder.embed_tokens.weight.device)
    captured: dict[tuple[int, str], torch.Tensor] = {}
    hooks = []
    for layer in layers:
        attention = decoder.layers[layer].self_attn
        for kind in ("k_proj", "v_proj"):
            def keep(module, args, output, key=(layer, kind)):
                captured[key] = output[0].float()  # (P, nkv*hd)
            hooks.append(getattr(attention, kind).register_forward_hook(keep))
    try:
        decoder.run_layers(decoder.embed_tokens(ids), end=layers[-1] + 1)
    finally:
        for hook in hooks:
            hook.remove()
    return torch.cat([captured[(layer, kind)] for layer in layers for kind in ("k_proj", "v_proj")], dim=1)


@dataclass
class PrefixOptions:
    """peft.method: prefix: prefix tuning's keys under `peft:`."""

    num_virtual_tokens: int = 20
    prefix_projection: bool = False  # train the prefix through a two-layer MLP (Li & Liang's reparameterisation)
    encoder_hidden_size: int | None = None  # that MLP's width; unset: nkv * head_dim
    layers: list[int] | None = None  # the decoder layers that get a prefix; unset: all; negative counts from the top


@dataclass
class PrefixConfig:
    """Prefix tuning's entry in `finegrain.peft.METHODS`.

    Args:
        num_virtual_tokens: P, the keys and values each adapted layer gets.
        prefix_projection, encoder_hidden_size: train through an MLP of that width (see `PrefixOptions`).
        layers: the adapted layers; None: all (the only choice PEFT reads).
        modules_to_save: the task's head, trained in full and saved with the adapter.
        from_file: the prefix was read from a file, which holds the table alone (no MLP to train).
        num_layers, token_dim, num_kv_heads: the model's, filled in by `attach` (and read from a file).
    """

    name: ClassVar[str] = "prefix"
    options: ClassVar[type] = PrefixOptions
    peft_type: ClassVar[str] = "PREFIX_TUNING"
    layer: ClassVar[type[PrefixEncoder]] = PrefixEncoder
    mergeable: ClassVar[bool] = False  # `finegrain export` must refuse to merge it
    peft_prefix: ClassVar[str] = PROMPT_LEARNING_PREFIX
    targets: ClassVar[tuple[str, ...]] = ()  # it wraps no module: it adds its own (`attach`)

    num_virtual_tokens: int = 20
    prefix_projection: bool = False
    encoder_hidden_size: int | None = None
    layers: list[int] | None = None
    modules_to_save: list[str] | None = None
    from_file: bool = False
    num_layers: int | None = None
    token_dim: int | None = None
    num_kv_heads: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.num_virtual_tokens, int) or self.num_virtual_tokens < 1:
            raise FinegrainError(f"peft.num_virtual_tokens: must be a positive integer, got {self.num_virtual_tokens!r}")
        if self.encoder_hidden_size is not None and (not isinstance(self.encoder_hidden_size, int) or self.encoder_hidden_size < 1):
            raise FinegrainError(f"peft.encoder_hidden_size: must be a positive integer, got {self.encoder_hidden_size!r}")
        if self.layers is not None:
            if not self.layers or not all(isinstance(i, int) and i >= 0 for i in self.layers):
                raise FinegrainError(f"peft.layers: must be a non-empty list of layer indices, got {self.layers!r}")
            self.layers = sorted(set(self.layers))

    @classmethod
    def from_section(cls, section: PrefixOptions, layers: list[int] | None, modules_to_save: list[str]) -> PrefixConfig:
        """`layers`: `section.layers` with negative indices resolved against the kept layers."""
        return cls(section.num_virtual_tokens, section.prefix_projection, section.encoder_hidden_size, layers, modules_to_save)

    def adapter_options(self) -> dict[str, Any]:
        """The keyword arguments of `PrefixEncoder.add_adapter` but `layers` and `table` (`attach` adds them)."""
        projection = self.prefix_projection and not self.from_file
        return {"num_virtual_tokens": self.num_virtual_tokens, "projection": projection, "encoder_hidden_size": self.encoder_hidden_size}

    def attach(self, model: nn.Module, adapter_name: str) -> None:
        """Give the decoder of `model` a `prefix_encoder` (or one more prefix in it), active."""
        decoder = find_decoder(model, self.name)
        attention = decoder.layers[0].self_attn
        total = len(decoder.layers)
        layers = list(range(total)) if self.layers is None else self.layers
        if self.from_file and self.layers is None and self.num_layers not in (None, total):
            raise FinegrainError(f"prefix: the adapter has prefixes for {self.num_layers} layers; the model has {total}")
        if layers[-1] >= total:
            raise FinegrainError(f"peft.layers: {self.layers} not in the model (its layers are 0-{total - 1})")
        encoder = getattr(decoder, "prefix_encoder", None)
        if encoder is None:
            encoder = decoder.prefix_encoder = PrefixEncoder(attention.num_kv_heads, attention.head_dim)
        options = self.adapter_options()
        table = None if options["projection"] or self.from_file else word_key_values(decoder, layers, self.num_virtual_tokens)
        encoder.add_adapter(adapter_name, layers, table=table, **options)
        encoder.set_adapter(adapter_name)
        self.num_layers, self.num_kv_heads = total, attention.num_kv_heads
        self.token_dim = attention.num_kv_heads * attention.head_dim

    def peft_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The active prefix as PEFT's file holds it: `prompt_embeddings`, the table (MLP applied)."""
        with torch.no_grad():
            return {"prompt_embeddings": find_decoder(model, self.name).prefix_encoder.table().float()}

    def model_tensors(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A file's tensors (prefix removed) under the model's state-dict keys: the table is the embedding."""
        out = {k: v for k, v in tensors.items() if k != "prompt_embeddings"}
        out[f"{DECODER}.prefix_encoder.embedding.weight"] = tensors["prompt_embeddings"]
        return out

    def to_peft(self) -> dict[str, Any]:
        """PREFIX_TUNING's keys of `adapter_config.json` (finegrain.peft.base adds the shared ones)."""
        keys = {
            "encoder_hidden_size": self.encoder_hidden_size or self.token_dim,
            "init_weights": None,
            "num_attention_heads": self.num_kv_heads,
            "num_layers": self.num_layers,
            "num_transformer_submodules": 1,
            "num_virtual_tokens": self.num_virtual_tokens,
            "prefix_projection": self.prefix_projection,
            "token_dim": self.token_dim,
        }
        if self.layers is not None and self.layers != list(range(self.num_layers or 0)):
            keys["layers_to_transform"] = self.layers  # finegrain's: PEFT has a prefix in every layer
        return keys

    @classmethod
    def from_peft(
        cls, raw: dict[str, Any], path: Path, targets: Any, layers: list[int] | None, modules_to_save: list[str] | None
    ) -> PrefixConfig:
        """The config of a PEFT PREFIX_TUNING `adapter_config.json` (`raw`); the table loads as it is."""
        if raw.get("num_transformer_submodules", 1) not in (1, None):
            raise FinegrainError(f"{path}: num_transformer_submodules={raw['num_transformer_submodules']} is for encoder-decoder models; finegrain's are decoders")
        for key in ("num_virtual_tokens", "num_layers", "token_dim"):
            if not isinstance(raw.get(key), int):
                raise FinegrainError(f"{path}: key '{key}' is missing or not a number; save the adapter again")
        try:
            return cls(
                num_virtual_tokens=raw["num_virtual_tokens"], prefix_projection=bool(raw.get("prefix_projection")),
                encoder_hidden_size=raw.get("encoder_hidden_size"), layers=layers or None,
                modules_to_save=list(dict.fromkeys(modules_to_save or [])), from_file=True, num_layers=raw["num_layers"],
                token_dim=raw["token_dim"], num_kv_heads=raw.get("num_attention_heads"),
            )
        except FinegrainError as exc:
            raise FinegrainError(f"{path}: {exc}") from None

    def check_tensors(self, tensors: dict[str, torch.Tensor], path: Path, config_name: str, fix: str) -> None:
        """`prompt_embeddings` is there and is (num_virtual_tokens, layers * 2 * token_dim)."""
        table = tensors.get("prompt_embeddings")
        if table is None:
            raise FinegrainError(f"{path}: tensor 'prompt_embeddings' is missing; {fix}")
        layers = len(self.layers) if self.layers is not None else self.num_layers
        if tuple(table.shape) != (self.num_virtual_tokens, layers * 2 * self.token_dim):
            raise FinegrainError(
                f"{path}: 'prompt_embeddings' has shape {tuple(table.shape)}, which does not fit num_virtual_tokens="
                f"{self.num_virtual_tokens}, {layers} layers and token_dim={self.token_dim} of {config_name}; {fix}"
            )
