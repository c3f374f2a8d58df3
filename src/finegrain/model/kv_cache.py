"""A preallocated key/value cache: static shapes, written in place at the given positions."""

from __future__ import annotations

import torch
from torch import nn


class KVCache(nn.Module):
    """Keys and values of one attention layer for `max_len` positions of `batch_size` sequences."""

    def __init__(self, batch_size: int, max_len: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype):
        super().__init__()
        shape = (batch_size, num_kv_heads, max_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype), persistent=False)

    @property
    def max_len(self) -> int:
        return self.k_cache.shape[2]

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, nkv, T, hd) at cache positions `input_pos` (T,).

        Returns the cached keys and values up to the last written position, (B, nkv, S, hd):
        attention never reads the empty tail of the cache.
        """
        self.k_cache.index_copy_(2, input_pos, k)
        self.v_cache.index_copy_(2, input_pos, v)
        end = int(input_pos[-1]) + 1
        return self.k_cache[:, :, :end], self.v_cache[:, :, :end]
