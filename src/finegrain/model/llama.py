"""The LLaMA decoder: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU.

Module names follow Hugging Face's `LlamaForCausalLM` (`model.layers.N.self_attn.q_proj`, ...),
so Hugging Face checkpoints load with no key map and LoRA targets mean what they mean in PEFT.
The operations that have C kernels (RMSNorm, rotary attention, SwiGLU) are calls into `ops`,
which runs the kernel where it applies and the PyTorch reference otherwise.
Shapes: B batch, T query length, S key length, H hidden, nh/nkv heads, hd head dim, V vocab.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from finegrain.model import ops
from finegrain.model.config import LlamaConfig
from finegrain.model.kv_cache import KVCache
from finegrain.model.linear import Linear


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)


def rope_inverse_frequencies(config: LlamaConfig) -> torch.Tensor:
    """Inverse frequencies (hd/2,) of the rotary embedding, with linear or llama3 scaling applied."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type")
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        # Long wavelengths are slowed down by `factor`, short ones kept, the band between interpolated.
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_context = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
        inv_freq = torch.where(is_medium, smoothed, scaled)
    return inv_freq


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_proj = Linear(config.hidden_size, config.num_heads * config.head_dim, bias=config.attention_bias)
        self.k_proj = Linear(config.hidden_size, config.num_kv_heads * config.head_dim, bias=config.attention_bias)
        self.v_proj = Linear(config.hidden_size, config.num_kv_heads * config.head_dim, bias=config.attention_bias)
        self.o_proj = Linear(config.num_heads * config.head_dim, config.hidden_size, bias=config.attention_out_bias)
        self.qkv_proj: nn.Module | None = None  # q, k, v in one matmul, once `fuse_projections` ran
        self.kv_cache: KVCache | None = None

    def fuse_projections(self) -> None:
        """Replace q_proj, k_proj, v_proj by one `qkv_proj` (for inference: see `Llama.fuse_projections`)."""
        self.qkv_proj = fuse_linears(self.q_proj, self.k_proj, self.v_proj)
        del self.q_proj, self.k_proj, self.v_proj

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        is_causal: bool,
        input_pos: torch.Tensor | None = None,
        rows: torch.Tensor | None = None,
        prefix: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Attention output (B, T, H); with `rows` (B,), only the queries at those positions: (B, 1, H).

        `prefix`: prefix tuning's keys and values (1, nkv, P, hd), before every token's (`ops.with_prefix`).
        """
        if rows is not None:
            return self._attend_rows(x, cos, sin, mask, is_causal, rows, prefix)
        q, k, v = self._project(x)
        cache = self.kv_cache if input_pos is not None else None
        y = ops.rope_attention(
            q, k, v, cos, sin, self.num_heads, self.num_kv_heads, mask, is_causal, cache, input_pos, prefix
        )
        return self.o_proj(y)

    def _attend_rows(self, x, cos, sin, mask, is_causal, rows, prefix=None) -> torch.Tensor:
        """One query per sequence, at `rows` (B,), over the keys and values of every position."""
        B, T, _ = x.shape
        q, k, v = self._project(x, rows)
        q = q.view(B, 1, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, 1, hd)
        k = k.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = v.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        batch = torch.arange(B, device=x.device)
        q = ops.apply_rope(q, cos[batch, :, rows][:, :, None], sin[batch, :, rows][:, :, None])  # (B, 1, 1, hd) angles
        k = ops.apply_rope(k, cos, sin)
        if mask is not None:
            mask = mask[batch, :, rows][:, :, None] if mask.shape[2] == T else mask  # (B, 1, 1, S)
        elif is_causal:
            mask = (torch.arange(T, device=x.device)[None, :] <= rows[:, None])[:, None, None]  # (B, 1, 1, T)
        if prefix is not None:
            k, v, mask, _ = ops.with_prefix(k, v, mask, False, prefix)
        y = ops.attention(q, k, v, attn_mask=mask, enable_gqa=self.num_kv_heads != self.num_heads)
        return self.o_proj(y.transpose(1, 2).reshape(B, 1, self.num_heads * self.head_dim))

    def keys_values(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotated keys and the values (B, nkv, T, hd) this attention computes from x (B, T, H),
        as a later query sees them (`LlamaModel.prefix_keys_values`)."""
        B, T, _ = x.shape
        if self.qkv_proj is None:
            k, v = self.k_proj(x), self.v_proj(x)  # (B, T, nkv*hd)
        else:
            _, k, v = self._project(x)
        k = k.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = v.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return ops.apply_rope(k, cos, sin), v

    def _project(self, x: torch.Tensor, rows: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """q (B, T, nh*hd), or (B, 1, nh*hd) at `rows`, and k, v (B, T, nkv*hd).

        Separate projections compute only the kept queries; fused ones (inference) compute every
        query in the one matmul and keep those at `rows`.
        """
        if self.qkv_proj is None:
            q = self.q_proj(x if rows is None else at_rows(x, rows))
            return q, self.k_proj(x), self.v_proj(x)
        kv_size = self.num_kv_heads * self.head_dim
        q, k, v = self.qkv_proj(x).split([self.num_heads * self.head_dim, kv_size, kv_size], dim=-1)
        return (q if rows is None else at_rows(q, rows)), k, v


class MLP(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.gate_proj = Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.gate_up_proj: nn.Module | None = None  # gate and up in one matmul, once `fuse_projections` ran

    def fuse_projections(self) -> None:
        """Replace gate_proj and up_proj by one `gate_up_proj` (see `Llama.fuse_projections`)."""
        self.gate_up_proj = fuse_linears(self.gate_proj, self.up_proj)
        del self.gate_proj, self.up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is None:
            gate, up = self.gate_proj(x), self.up_proj(x)
        else:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(ops.swiglu(gate, up))


def at_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """x (B, T, ...) at one position per sequence, `rows` (B,): (B, 1, ...)."""
    return x[torch.arange(len(rows), device=x.device), rows][:, None]


def fuse_linears(*linears: nn.Module) -> Linear:
    """One `Linear` whose output is the outputs of `linears` (same input) concatenated."""
    others = [type(linear).__name__ for linear in linears if not isinstance(linear, nn.Linear)]
    if others:
        raise TypeError(f"cannot fuse a {others[0]}; merge adapters into the weights first")
    weight = torch.cat([linear.weight.detach() for linear in linears])
    has_bias = linears[0].bias is not None
    fused = Linear(weight.shape[1], weight.shape[0], bias=has_bias, device="meta")
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if has_bias:
        fused.bias = nn.Parameter(torch.cat([linear.bias.detach() for linear in linears]), requires_grad=False)
    return fused


class DecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask, is_causal, input_pos=None, rows=None, prefix=None) -> torch.Tensor:
        """Hidden states (B, T, H); with `rows` (B,), only those at one position per sequence: (B, 1, H).
        `prefix`: prefix tuning's keys and values for this layer (see `Attention.forward`)."""
        attended = self.self_attn(self.input_layernorm(x), cos, sin, mask, is_causal, input_pos, rows, prefix)
        x = (x if rows is None else at_rows(x, rows)) + attended
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    """Embeddings, decoder layers and the final norm: returns hidden states (B, T, H)."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.register_buffer("inv_freq", rope_inverse_frequencies(config), persistent=False)
        self.gradient_checkpointing = False

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        input_pos: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Args:
            input_ids: (B, T) token ids.
            attention_mask: (B, T) 1 for real tokens, 0 for padding (with a KV cache: (B, S) over
                all cached positions); or a ready boolean mask (B, 1, T, S), True where attention is allowed.
            position_ids: (B, T) rotary positions; by default counted over real tokens only.
            input_pos: (T,) cache slots to write, once `setup_cache` was called.

        An active input-side adapter (see `finegrain.model.backbone`) applies here too, for
        generation: prompt tuning's P virtual tokens go before the tokens of cache slot 0 and take
        the first P slots (`setup_cache` adds them), prefix tuning's keys and values are seen by
        every query; either way the tokens sit at positions P.., as in training.
        """
        x = self.embed_tokens(input_ids)  # (B, T, H)
        prompt_encoder, prefix_encoder = self._modules.get("prompt_encoder"), self._modules.get("prefix_encoder")
        prompts = None if prompt_encoder is None else prompt_encoder()  # (P, H) or None
        prefix = None if prefix_encoder is None else prefix_encoder()  # {layer: (k, v)} or None
        if prompts is None and prefix is None:
            return self.norm(self.run_layers(x, attention_mask, position_ids, input_pos))
        return self.norm(self._run_adapted(x, attention_mask, position_ids, input_pos, prompts, prefix))

    def _run_adapted(self, x, attention_mask, position_ids, input_pos, prompts, prefix) -> torch.Tensor:
        """`run_layers` behind P virtual tokens (`prompts` (P, H)) or with a `prefix`: (B, T, H).
        `attention_mask`: None or (B, S) over the tokens' cache slots."""
        B, T, _ = x.shape
        if prompts is None:  # the prefix's keys and values stay outside the cache; the tokens move P on
            P = next(iter(prefix.values()))[0].shape[2]
            if position_ids is None:
                position_ids = default_position_ids(B, T, attention_mask, input_pos, x.device)
            return self.run_layers(x, attention_mask, position_ids + P, input_pos, prefix=prefix)
        P = prompts.shape[0]
        if attention_mask is not None:  # slots 0..P-1 hold the virtual tokens
            attention_mask = torch.cat((attention_mask.new_ones(B, P), attention_mask), dim=1)  # (B, P+S)
        if position_ids is None:
            position_ids = default_position_ids(B, T, attention_mask, None if input_pos is None else input_pos + P, x.device)
            if attention_mask is None and input_pos is None:
                position_ids = position_ids + P
        else:
            position_ids = position_ids + P
        virtual = input_pos is None or int(input_pos[0]) == 0  # the virtual tokens run once, before the first tokens
        if input_pos is not None:
            input_pos = input_pos + P
        if virtual:
            x = torch.cat((prompts.to(x.dtype).expand(B, -1, -1), x), dim=1)  # (B, P+T, H)
            position_ids = torch.cat((torch.arange(P, device=x.device).expand(B, -1), position_ids), dim=1)
            if input_pos is not None:
                input_pos = torch.cat((torch.arange(P, device=x.device), input_pos))
        x = self.run_layers(x, attention_mask, position_ids, input_pos)
        return x[:, P:] if virtual else x

    def prefix_keys_values(self, x: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Every layer's rotated keys and values (1, nkv, P, hd) of P tokens x (1, P, H) that come
        first in every row, at positions 0..P-1.

        In a causal decoder such tokens see nothing after them, so their states are the same in
        every row: prompt tuning's virtual tokens run through the layers once, here, and the rows'
        own tokens see them as a prefix (`run_layers(prefix=...)`), as they see prefix tuning's.
        The top layer's output is never read, so only its keys and values are computed.
        """
        cos, sin = self._rope(torch.arange(x.shape[1], device=x.device)[None], x.dtype)  # (1, 1, P, hd)
        prefix = {}
        for i, layer in enumerate(self.layers):
            prefix[i] = layer.self_attn.keys_values(layer.input_layernorm(x), cos, sin)
            if i < len(self.layers) - 1:
                x = layer(x, cos, sin, None, True)
        return prefix

    def run_layers(
        self,
        x: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        input_pos: torch.Tensor | None = None,
        start: int = 0,
        end: int | None = None,
        rows: torch.Tensor | None = None,
        prefix: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        """Run decoder layers `start` to `end` on hidden states x (B, T, H); no final norm.

        Lets a trainer run the frozen lower layers once and only the adapted upper layers per epoch.
        `rows` (B,): the one position per sequence whose output the caller reads (a classifier's
        last token); the last layer then computes only that position (its keys and values still
        come from every position) and the result is (B, 1, H). `prefix`: prefix tuning's keys and
        values (1, nkv, P, hd) by layer index, for the layers it adapts.
        """
        B, T, _ = x.shape
        if position_ids is None:
            position_ids = default_position_ids(B, T, attention_mask, input_pos, x.device)
        cos, sin = self._rope(position_ids, x.dtype)
        mask, is_causal = self._mask(B, T, attention_mask, input_pos, x.device)
        layers = self.layers[start:end]
        for i, layer in enumerate(layers):
            args = (x, cos, sin, mask, is_causal, input_pos, rows if i == len(layers) - 1 else None)
            if prefix is not None:
                args += (prefix.get(start + i),)
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, *args, use_reentrant=False)
            else:
                x = layer(*args)
        if rows is not None and not layers:  # no layer ran to read the rows' positions: read them here
            x = x[torch.arange(B, device=x.device), rows.to(x.device)][:, None]  # (B, 1, H)
        return x

    def _rope(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin (B, 1, T, hd) at `position_ids` (see `ops.apply_rope`)."""
        freqs = position_ids[..., None].float() * self.inv_freq.float()  # (B, T, hd/2)
        cos, sin = freqs.cos(), freqs.sin()
        cos, signed_sin = torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)  # (B, T, hd)
        return cos[:, None].to(dtype), signed_sin[:, None].to(dtype)

    def _mask(self, B, T, attention_mask, input_pos, device) -> tuple[torch.Tensor | None, bool]:
        """The boolean attention mask (B, 1, T, S), or None with `is_causal` when SDPA can build it."""
        causal = self.config.causal
        if attention_mask is not None and attention_mask.dim() == 4:
            return attention_mask, False
        cached = input_pos is not None and self.layers[0].self_attn.kv_cache is not None
        if cached and T == 1 and attention_mask is None:
            return None, False  # one new token, after every cached one: it may see them all
        if not cached:
            if attention_mask is None:
                return None, causal
            key_ok = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T)
            if not causal:
                return key_ok, False
            query_pos = torch.arange(T, device=device)
            allowed = query_pos[None, :] <= query_pos[:, None]  # (T, S)
            # A padding query attends to itself so its row is never empty (which gives NaN).
            return (allowed & key_ok) | torch.eye(T, dtype=torch.bool, device=device), False
        S = int(input_pos[-1]) + 1
        key_pos = torch.arange(S, device=device)
        allowed = key_pos[None, :] <= input_pos[:, None] if causal else torch.ones(T, S, dtype=torch.bool, device=device)
        allowed = allowed[None, None].expand(B, 1, T, S)
        if attention_mask is not None:
            key_ok = attention_mask[:, :S].bool()[:, None, None, :]
            allowed = allowed & key_ok | (key_pos[None, :] == input_pos[:, None])
        return allowed, False


def default_position_ids(
    B: int, T: int, attention_mask: torch.Tensor | None, input_pos: torch.Tensor | None, device: torch.device
) -> torch.Tensor:
    """Positions (B, T) counted over real tokens, so left-padded rows start at 0 like unpadded ones."""
    if attention_mask is not None and attention_mask.dim() == 2:
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, S)
        if input_pos is not None:
            return positions[:, input_pos]
        return positions[:, -T:]
    start = input_pos if input_pos is not None else torch.arange(T, device=device)
    return start[None, :].expand(B, T)


class Llama(nn.Module):
    """A LLaMA-family causal language model: `model(input_ids)` returns logits (B, T, V)."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.int8_decoder = None  # set by `quantize_int8`: one-token cached steps run in C

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        input_pos: torch.Tensor | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Logits (B, T, V), or (B, 1, V) for the last position only with `last_only`."""
        if self.int8_decoder is not None and input_ids.shape[1] == 1 and input_pos is not None and position_ids is None:
            logits = self.int8_decoder(input_ids, attention_mask, input_pos)
            if logits is not None:
                return logits
        hidden = self.model(input_ids, attention_mask, position_ids, input_pos)
        if last_only:
            hidden = hidden[:, -1:]
        return self.lm_head(hidden)

    def setup_cache(self, batch_size: int, max_len: int, dtype: torch.dtype | None = None) -> None:
        """Preallocate a KV cache in every layer for `batch_size` sequences of up to `max_len` tokens."""
        dtype = dtype or self.model.embed_tokens.weight.dtype
        device = self.model.embed_tokens.weight.device
        prompt_encoder = self.model._modules.get("prompt_encoder")
        prompts = None if prompt_encoder is None else prompt_encoder()
        max_len += 0 if prompts is None else prompts.shape[0]  # prompt tuning's virtual tokens take the first slots
        for layer in self.model.layers:
            attn = layer.self_attn
            attn.kv_cache = KVCache(batch_size, max_len, attn.num_kv_heads, attn.head_dim, dtype).to(device)

    def fuse_projections(self) -> None:
        """Compute q, k, v in one matmul and gate, up in another, in every layer, for inference.

        Fewer, larger matmuls decode faster (each call has a fixed cost). The separate modules are
        removed, so the state dict no longer loads into a `Llama`: fuse a model only to generate,
        after merging any adapters.
        """
        for layer in self.model.layers:
            layer.self_attn.fuse_projections()
            layer.mlp.fuse_projections()

    def clear_cache(self) -> None:
        for layer in self.model.layers:
            layer.self_attn.kv_cache = None

    def num_parameters(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())

