"""Shared fixtures: a tiny random LLaMA (2 layers, hidden 64, 4 heads, 2 kv heads) in float32."""

import pytest
import torch

from finegrain.model.config import LlamaConfig
from finegrain.model.llama import Llama


@pytest.fixture
def tiny_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
        rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=256, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2,
    )


@pytest.fixture
def tiny_model(tiny_config) -> Llama:
    torch.manual_seed(0)
    model = Llama(tiny_config).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                module.weight.normal_(0, 0.2)
    return model
