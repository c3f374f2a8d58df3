"""The LLaMA decoder: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU.

Module names follow Hugging Face's `LlamaForCausalLM` (`model.layers.N.self_attn.q_proj`, ...),
so Hugging Face checkpoints load with no key map and LoRA targets mean what they mean in PEFT.
Shapes: B batch, T query length, S key length, H hidden, nh/nkv heads, hd head dim, V vocab.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from finegrain.model import fused
from finegrain.model.config import LlamaConfig
from finegrain.model.kv_cache import KVCache
from finegrain.model.linear import Linear


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
                return RMSNormFunction.apply(x, self.weight, self.eps)
            # Few rows (float32 decoding runs 61 norms per token): one PyTorch op beats a ctypes call.
            normed = fused.rms_norm(x, self.weight, self.eps) if x.numel() >= 16 * x.shape[-1] else None
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps) if normed is None else normed[0]
        # Normalise in float32, then scale in the input dtype, as Hugging Face's LlamaRMSNorm does.
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype) * self.weight


class RMSNormFunction(torch.autograd.Function):
    """RMSNorm whose backward keeps its output and 1/rms only.

    Autograd on `F.rms_norm` keeps the input and the normalised input, two (..., H) tensors
    per norm, and its backward takes about 1.7x as long as this one. The output is kept
    instead of the input because a LoRA layer reading it (q_proj, v_proj) keeps it anyway:
    one tensor serves both. The normalised input is recovered as output / weight (to a
    rounding), or, if the weight has a zero, the input is kept.
    """

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        y, rstd = fused.rms_norm(x, weight, eps) or torch.ops.aten._fused_rms_norm(x, [x.shape[-1]], weight, eps)
        ctx.from_output = bool(weight.all())
        ctx.save_for_backward(y if ctx.from_output else x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, grad):
        kept, weight, rstd = ctx.saved_tensors
        if not ctx.needs_input_grad[1]:
            grad_x = fused.rms_norm_backward(grad, kept, weight, rstd, ctx.from_output)
            if grad_x is not None:
                return grad_x, None, None
        normed = kept / weight if ctx.from_output else kept * rstd
        grad_normed = grad * weight
        # d/dx of x * rstd: rstd * (g - normed * mean(g * normed)), over the last dimension.
        mean = torch.linalg.vecdot(grad_normed, normed).unsqueeze(-1).div_(kept.shape[-1])
        grad_x = (grad_normed - normed * mean).mul_(rstd)
        grad_weight = (grad * normed).reshape(-1, kept.shape[-1]).sum(0) if ctx.needs_input_grad[1] else None
        return grad_x, grad_weight, None


class SwiGLUFunction(torch.autograd.Function):
    """silu(gate) * up, whose backward keeps gate and up only (autograd also keeps silu(gate))."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        y = fused.swiglu(gate, up)
        return F.silu(gate) * up if y is None else y

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        grads = fused.swiglu_backward(grad, gate, up)
        if grads is not None:
            return grads
        return torch.ops.aten.silu_backward(grad * up, gate), grad * F.silu(gate)


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


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Hugging Face's `x * cos + rotate_half(x) * sin`, with rotate_half's negation folded into the sine.

    x: (B, nh, T, hd); cos, signed_sin: (B, 1, T, hd), signed_sin = cat(-sin1, sin2). `roll` swaps
    the halves in one op where rotate_half takes a chunk, a negation and a cat, in every layer.
    """
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


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
    ) -> torch.Tensor:
        """Attention output (B, T, H); with `rows` (B,), only the queries at those positions: (B, 1, H)."""
        B, T, _ = x.shape
        if rows is not None:
            return self._attend_rows(x, cos, sin, mask, is_causal, rows)
        if self.qkv_proj is None:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        else:
            kv_size = self.num_kv_heads * self.head_dim
            q, k, v = self.qkv_proj(x).split([self.num_heads * self.head_dim, kv_size, kv_size], dim=-1)
        cached = self.kv_cache is not None and input_pos is not None
        if mask is None and is_causal and not cached:  # training and scoring: rotary + attention in C
            y = fused.rope_attention(q, k, v, cos, sin, self.num_heads, self.num_kv_heads)
            if y is not None:
                return self.o_proj(y)
        q = q.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = v.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cached:
            k, v = self.kv_cache.update(input_pos, k, v)  # (B, nkv, S, hd)
        y = attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=self.num_kv_heads != self.num_heads)
        # (B, nh, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))

    def _attend_rows(self, x, cos, sin, mask, is_causal, rows) -> torch.Tensor:
        """One query per sequence, at `rows` (B,), over the keys and values of every position."""
        B, T, _ = x.shape
        if self.qkv_proj is None:
            q, k, v = self.q_proj(at_rows(x, rows)), self.k_proj(x), self.v_proj(x)
        else:  # fused for inference: every query is computed, one kept
            kv_size = self.num_kv_heads * self.head_dim
            q, k, v = self.qkv_proj(x).split([self.num_heads * self.head_dim, kv_size, kv_size], dim=-1)
            q = at_rows(q, rows)
        q = q.view(B, 1, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, 1, hd)
        k = k.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = v.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        batch = torch.arange(B, device=x.device)
        q = apply_rope(q, cos[batch, :, rows][:, :, None], sin[batch, :, rows][:, :, None])  # (B, 1, 1, hd) angles
        k = apply_rope(k, cos, sin)
        if mask is not None:
            mask = mask[batch, :, rows][:, :, None] if mask.shape[2] == T else mask  # (B, 1, 1, S)
        elif is_causal:
            mask = (torch.arange(T, device=x.device)[None, :] <= rows[:, None])[:, None, None]  # (B, 1, 1, T)
        y = attention(q, k, v, attn_mask=mask, enable_gqa=self.num_kv_heads != self.num_heads)
        return self.o_proj(y.transpose(1, 2).reshape(B, 1, self.num_heads * self.head_dim))


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
        if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
            return self.down_proj(SwiGLUFunction.apply(gate, up))
        hidden = fused.swiglu(gate, up)
        return self.down_proj(F.silu(gate) * up if hidden is None else hidden)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs) -> torch.Tensor:
    """`F.scaled_dot_product_attention`, in float32 under autocast.

    PyTorch's bf16 attention backward on the CPU takes ~4x as long as float32's, and attention
    holds a small share of a step's FLOPs, so bf16 training (`train.bf16`) keeps it float32.
    """
    if torch.is_autocast_enabled(q.device.type):
        with torch.autocast(q.device.type, enabled=False):
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **kwargs)
    return F.scaled_dot_product_attention(q, k, v, **kwargs)


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

    def forward(self, x, cos, sin, mask, is_causal, input_pos=None, rows=None) -> torch.Tensor:
        """Hidden states (B, T, H); with `rows` (B,), only those at one position per sequence: (B, 1, H)."""
        attended = self.self_attn(self.input_layernorm(x), cos, sin, mask, is_causal, input_pos, rows)
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
        """
        x = self.embed_tokens(input_ids)  # (B, T, H)
        return self.norm(self.run_layers(x, attention_mask, position_ids, input_pos))

    def run_layers(
        self,
        x: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        input_pos: torch.Tensor | None = None,
        start: int = 0,
        end: int | None = None,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run decoder layers `start` to `end` on hidden states x (B, T, H); no final norm.

        Lets a trainer run the frozen lower layers once and only the adapted upper layers per epoch.
        `rows` (B,): the one position per sequence whose output the caller reads (a classifier's
        last token); the last layer then computes only that position (its keys and values still
        come from every position) and the result is (B, 1, H).
        """
        B, T, _ = x.shape
        if position_ids is None:
            position_ids = default_position_ids(B, T, attention_mask, input_pos, x.device)
        cos, sin = self._rope(position_ids, x.dtype)
        mask, is_causal = self._mask(B, T, attention_mask, input_pos, x.device)
        layers = self.layers[start:end]
        for i, layer in enumerate(layers):
            args = (x, cos, sin, mask, is_causal, input_pos, rows if i == len(layers) - 1 else None)
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, *args, use_reentrant=False)
            else:
                x = layer(*args)
        return x

    def _rope(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin (B, 1, T, hd) at `position_ids` (see `apply_rope`)."""
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

    def generate(self, tokenizer, prompts, **kwargs):
        """See `finegrain.generation.generate`."""
        from finegrain.generation import generate

        return generate(self, tokenizer, prompts, **kwargs)
