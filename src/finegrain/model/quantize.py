"""Int8 weight quantization for fast CPU decoding (an opt-in approximation).

At batch 1 decoding reads every weight once per token, so its speed is set by memory
bandwidth; int8 weights are a quarter of float32's bytes. Each linear layer becomes an
`Int8Linear`: int8 weights with one scale per output channel, float32 activations and sums,
multiplied by finegrain's C kernel (`int8_decode.c`, built on first use; long prompts use a
float32 GEMM on the dequantized weights). A decoding step of a quantized model runs whole in
that C code (`Int8Decoder`): at batch 1 PyTorch's dispatch of ~25 small operations per layer
costs as much as the matmuls. Outputs differ from float32 by the weights' rounding only, so
this is for generation and serving, never for the parity tests or training.
"""

from __future__ import annotations

import ctypes
import weakref

import torch
from torch import nn

from finegrain.model import native
from finegrain.model.linear import matmul_t
from finegrain.model.llama import Llama, default_position_ids
from finegrain.model.qlinear import int8_rows


class Int8Linear(nn.Module):
    """A frozen `nn.Linear` with symmetric int8 weights, one scale per output channel."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight, scale = int8_rows(linear.weight.detach().float())  # the rounding of `model.quantize: int8` too
        self.register_buffer("weight", weight)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())
        self._native: native.Linear | None = None

    def native(self) -> native.Linear:
        """The C view of this layer (rebuilt if its buffers moved)."""
        if self._native is None or self._native.weight != self.weight.data_ptr():
            bias = self.bias.data_ptr() if self.bias is not None else None
            self._native = native.Linear(
                self.weight.data_ptr(), self.scale.data_ptr(), bias, self.out_features, self.in_features
            )
        return self._native

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).float().contiguous()
        lib = native.library()
        if lib is None or rows.shape[0] >= 32:
            # The same sums with the weights dequantized per call: the fallback without a compiler,
            # and faster for long prompts, where the float32 GEMM reuses each weight across many rows.
            y = matmul_t(rows, self.weight.float()) * self.scale
            if self.bias is not None:
                y += self.bias
        else:
            y = torch.empty(rows.shape[0], self.out_features)
            lib.fg_int8_linear(ctypes.byref(self.native()), rows.data_ptr(), y.data_ptr(), rows.shape[0])
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class Int8Decoder:
    """Runs a decoding step of an int8 `Llama` (one new token per sequence) in C.

    Computes what `Llama.forward` computes for that step with the same `Int8Linear` kernels,
    to float32 rounding. `Llama.forward` calls it for one-token steps with a KV cache.
    """

    def __init__(self, model: Llama, lib: ctypes.CDLL):
        self.lib, self.model = lib, model
        self.caches: list[weakref.ref] = []  # the KV caches the C view points at
        self.view: native.Model | None = None
        self.layers, self.inv_freq, self.batch_size = None, None, 0  # the C view's arrays, set by `_bind`

    def _bind(self) -> bool:
        """Point the C view at the model's weights and current KV caches (again whenever the caches
        change, so each `generate` sees where the tensors are now); False if a cache is missing or
        not float32."""
        model, config = self.model, self.model.config
        caches = [layer.self_attn.kv_cache for layer in model.model.layers]
        if [ref() for ref in self.caches] == caches:
            return True
        if any(c is None or c.k_cache.dtype != torch.float32 or not c.k_cache.is_contiguous() for c in caches):
            return False
        self.layers = (native.Layer * len(caches))()
        for layer, cache, view in zip(model.model.layers, caches, self.layers):
            attn, mlp = layer.self_attn, layer.mlp
            view.input_norm = layer.input_layernorm.weight.data_ptr()
            view.post_norm = layer.post_attention_layernorm.weight.data_ptr()
            view.qkv, view.o = attn.qkv_proj.native(), attn.o_proj.native()
            view.gate_up, view.down = mlp.gate_up_proj.native(), mlp.down_proj.native()
            view.k_cache, view.v_cache = cache.k_cache.data_ptr(), cache.v_cache.data_ptr()
        self.inv_freq = model.model.inv_freq.float().contiguous()
        self.view = native.Model(
            config.num_layers, config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim,
            config.intermediate_size, caches[0].max_len, config.rms_norm_eps, self.inv_freq.data_ptr(),
            model.model.norm.weight.data_ptr(), model.lm_head.native(), self.layers,
        )
        self.caches = [weakref.ref(cache) for cache in caches]
        self.batch_size = caches[0].k_cache.shape[0]
        return True

    def __call__(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, input_pos: torch.Tensor
    ) -> torch.Tensor | None:
        """Logits (B, 1, V) for input_ids (B, 1) written at cache slot input_pos (1,); None if the
        step is not one this decoder runs (no float32 cache, a 4-D mask): the caller runs PyTorch."""
        if (attention_mask is not None and attention_mask.dim() != 2) or not self._bind():
            return None
        B, slot = input_ids.shape[0], int(input_pos[0])
        if B != self.batch_size or not 0 <= slot < self.view.max_len:
            raise IndexError(
                f"a step of {B} sequences at slot {slot} does not fit the KV cache "
                f"({self.batch_size} sequences, {self.view.max_len} positions)"
            )
        x = self.model.model.embed_tokens(input_ids[:, 0]).float().contiguous()  # (B, H), overwritten
        positions = default_position_ids(B, 1, attention_mask, input_pos, x.device)[:, 0].contiguous()
        mask = attention_mask.to(torch.uint8).contiguous() if attention_mask is not None else None
        logits = torch.empty(B, self.model.config.vocab_size)
        work = torch.empty(self.lib.fg_decode_workspace(ctypes.byref(self.view), B))
        self.lib.fg_decode_step(
            ctypes.byref(self.view), x.data_ptr(), B, positions.data_ptr(), slot,
            None if mask is None else mask.data_ptr(), 0 if mask is None else mask.shape[1],
            logits.data_ptr(), work.data_ptr(),
        )
        return logits[:, None]


def quantize_int8(model: Llama) -> Llama:
    """Fuse the projections, then replace every `nn.Linear` (the output head included) by an `Int8Linear`, in place.

    Where the C kernels build, decoding steps then run in C (`Int8Decoder`).
    """
    model.fuse_projections()
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, Int8Linear(child))
    lib = native.library()
    if lib is not None and model.model.embed_tokens.weight.dtype == torch.float32:
        model.int8_decoder = Int8Decoder(model, lib)
    return model
