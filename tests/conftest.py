"""Shared fixtures: a tiny random LLaMA (2 layers, hidden 64, 4 heads, 2 kv heads) in float32."""

import os
import tempfile

import pytest
import torch

from finegrain.model.config import LlamaConfig
from finegrain.model.llama import Llama

# Tiny matrices gain nothing from a second thread, and two threads fighting over two busy
# cores make each small matmul orders of magnitude slower.
torch.set_num_threads(1)

# The int8 C kernels are built into a cache directory: the tests' own, not the user's.
os.environ.setdefault("FINEGRAIN_CACHE", os.path.join(tempfile.gettempdir(), "finegrain-test-cache"))


@pytest.fixture
def tiny_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
        rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=256, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2,
    )


@pytest.fixture
def tiny_model(tiny_config) -> Llama:
    return random_llama(tiny_config)


def random_llama(config: LlamaConfig) -> Llama:
    """A Llama in eval mode whose matrices and biases are N(0, 0.2) (seed 0): far from an identity."""
    torch.manual_seed(0)
    model = Llama(config).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                module.weight.normal_(0, 0.2)
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.normal_(0, 0.2)
    return model


CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tiny_tokenizer():
    """A byte-level BPE trained on a few sentences, with ChatML special tokens."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from finegrain.tokenizer import Tokenizer

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    corpus = [
        "The capital of France is Paris. A gripping, funny film with a great cast.",
        "Two hours I will never get back: dull, slow and badly acted.",
        "the movie was good and the story was bad and the actors were fine",
    ] * 20
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    backend.train_from_iterator(corpus, trainer)
    return Tokenizer(
        backend, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>", unk_token="<|endoftext|>",
        add_bos=False, chat_template=CHATML,
    )


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random LLaMA with its tokenizer saved in Hugging Face layout, as `--model` takes it."""
    from finegrain.checkpoint.save import save_pretrained

    tokenizer = tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
        num_kv_heads=2, rms_norm_eps=1e-5, max_position_embeddings=256, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = Llama(config).eval()
    directory = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    save_pretrained(model, tokenizer, directory)
    return directory
