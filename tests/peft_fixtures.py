"""The tiny random transformers LLaMA that the PEFT-parity tests of every method share, and the
same weights in finegrain's `Llama`. Import the fixtures into a test module to use them."""

from __future__ import annotations

import pytest
import torch
import transformers

from finegrain.model.config import LlamaConfig
from finegrain.model.llama import Llama


@pytest.fixture(scope="module")
def hf_model() -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def ours_of(hf_model: transformers.LlamaForCausalLM) -> Llama:
    model = Llama(LlamaConfig.from_hf(hf_model.config.to_dict()))
    model.load_state_dict(hf_model.state_dict())
    return model.eval()


@pytest.fixture(scope="module")
def input_ids() -> torch.Tensor:
    return torch.randint(1, 128, (2, 7), generator=torch.Generator().manual_seed(1))
