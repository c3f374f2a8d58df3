"""Test texts for tokenizer parity, and tiny vocabularies trained on the spot for GGUF metadata."""

from __future__ import annotations

import json
import random

from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import models, pre_tokenizers, trainers

HAND_WRITTEN = [
    "",
    " ",
    "Hello world",
    "Hello, world! How are you today?",
    "The capital of France is Paris.",
    "I'm sure they'll say it's fine, don't you think? We've seen it. SHE'S HERE",
    "Café naïve résumé façade Ångström Zürich São Paulo",
    "e\u0301 combining accent, and a precomposed é",
    "你好，世界！这是一个测试。",
    "日本語のテキストとカタカナ ー",
    "한국어 텍스트입니다",
    "Россия и Україна",
    "مرحبا بالعالم",
    "Emoji: 😀👍🏽🇺🇸 and ❤️ and 👨‍👩‍👧‍👦",
    "Numbers 12345 and 3.14159 and 1,000,000 and -42 and 0x1F",
    "x² + y³ = z½, ① ② ③, Ⅻ, ٣٤٥",
    "  1 leading spaces then a digit",
    "line\n  42 indented number",
    "\t7 after a tab",
    "Punctuation!!! ??? ... --- (parens) [brackets] {braces}",
    "def foo(x):\n    return x ** 2  # square\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "<div class=\"x\">&amp; &lt;tag&gt;</div>",
    "multiple   internal    spaces",
    "   leading and trailing   ",
    "tabs\tand\nnewlines\r\nmixed\n\n\n",
    "\n",
    "\n\n",
    "    ",
    "a\u00a0non-breaking\u2009thin\u200bzero-width",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>",
    "text with <|im_start|> inside and <|im_end|>at the end<|endoftext|>",
    "<|im_start|><|im_start|>",
    "not special: <|im_start, im_end|>, <|nope|>",
    "<think>reasoning</think> answer",
    "URL: https://example.com/path?query=1&b=2#frag",
    "email@example.org, @handle, #hashtag",
    "$100.00 €50 £20 ¥1000",
    "snake_case camelCase PascalCase kebab-case SCREAMING_CASE",
    "The quick brown fox jumps over the lazy dog. " * 3,
]

_PIECES = [
    "hello", "World", "the", " and", "Paris", "résumé", "naïve", "中文", "测试", "日本", "😀", "🇫🇷",
    "❤️",
    "123", "4567", "3.14", "0", "½", "²", "٣", "it's", "they'll", "WE'VE", "<|im_start|>", "<|im_end|>",
    "<|endoftext|>", "def", "return", "x=1;", "{", "}", "()", "->", "==", "**", "...", "!", "?", "'", "\"",
    "`code`", "@", "#", "$5", "%", "&", "|", "\\", "/", "~", "^", "_", "Ωμέγα", "Ñandú", "straße",
]
_SEPARATORS = ["", " ", "  ", "   ", "\n", "\n\n", "\t", " \n", "\r\n", "\u3000", "    ", "\n    "]


def tokenizer_texts(count: int = 300, seed: int = 0) -> list[str]:
    """The hand-written texts plus random mixes of words, scripts, numbers, specials and whitespace."""
    rng = random.Random(seed)
    texts = list(HAND_WRITTEN)
    while len(texts) < count:
        n = rng.randint(1, 7)
        parts = []
        for _ in range(n):
            parts.append(rng.choice(_SEPARATORS))
            parts.append(rng.choice(_PIECES))
        if rng.random() < 0.3:
            parts.append(rng.choice(_SEPARATORS))
        texts.append("".join(parts))
    return texts


_CORPUS = [text for text in HAND_WRITTEN if text] * 3 + [
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the sun.",
    "In 2024 there were 365 days, 52 weeks and 12 months; 1,000 people came.",
    "def tokenize(text):\n    return [t for t in text.split() if t]\n",
    "Les élèves étudient à l'école. Die Straße ist lang. 北京是中国的首都。",
]


def _train(pre_tokenizer, special: list[str], vocab_size: int, alphabet: list[str]) -> tuple[dict, list[tuple]]:
    backend = BackendTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special, initial_alphabet=alphabet, show_progress=False
    )
    backend.train_from_iterator(_CORPUS, trainer)
    model = json.loads(backend.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return model["vocab"], merges


CHATML = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def byte_level_metadata(pre: str = "gpt2", vocab_size: int = 420) -> dict:
    """GGUF tokenizer metadata of a small byte-level BPE (specials at ids 0-2, `<think>` user-defined last)."""
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    splitter = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if pre == "smollm":  # SmolLM's merges were learned with every digit cut out on its own
        splitter = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), splitter])
    vocab, merges = _train(splitter, special, vocab_size, pre_tokenizers.ByteLevel.alphabet())
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda kv: kv[1])] + ["<think>"]
    types = [3 if token in special else 1 for token in tokens[:-1]] + [4]
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": [f"{a} {b}" for a, b in merges],
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.padding_token_id": 2,
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.chat_template": CHATML,
    }


def sentencepiece_metadata(vocab_size: int = 420) -> dict:
    """GGUF tokenizer metadata of a small LLaMA-style SentencePiece BPE: <unk> <s> </s>, 256 byte
    tokens, then pieces scored by merge order, and no merges list (as llama.cpp writes them)."""
    vocab, _ = _train(
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False), [], vocab_size, []
    )
    pieces = [token for token, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))]
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.chat_template": (
            "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}{% endfor %}"
        ),
    }
