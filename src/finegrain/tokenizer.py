"""The tokenizer: a `tokenizers.Tokenizer` plus special tokens and the chat template.

Two sources: a Hugging Face directory (`tokenizer.json` and its config files), or the metadata of
a GGUF file, from which we rebuild the same tokenizer `transformers` builds for it: a byte-level
BPE (`tokenizer.ggml.model == "gpt2"`, GPT-2, SmolLM, LLaMA 3, Qwen2) or a SentencePiece-style BPE
with byte fallback (`"llama"`, LLaMA 1/2, Mistral). `save` writes the Hugging Face files, which
`transformers.AutoTokenizer.from_pretrained` loads with identical ids.
"""

from __future__ import annotations

import json
import re
import secrets
import threading
import warnings
from collections.abc import Iterable, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, pre_tokenizers, processors
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers.models import BPE

from finegrain.atomic import atomic_write_json, atomic_write_text
from finegrain.errors import FinegrainError

__all__ = ["PRE_TOKENIZER_SPLITS", "ChatPrompt", "Tokenizer"]

# Texts at least this long are tokenized through `encode_batch`, which lets go of Python's GIL
# while it works (`encode` holds it: 1 MiB took seconds in which no other thread of the process,
# such as the server's event loop, could run). The ids are the same.
_RELEASE_GIL_CHARS = 4096

# GGUF token types (llama.cpp's `llama_token_type`).
_CONTROL, _USER_DEFINED = 3, 4

# How byte-level vocabularies split text before BPE, by `tokenizer.ggml.pre`. These regexes are
# the ones in each model's own `tokenizer.json` (and in llama.cpp, and in transformers' GGUF loader).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# "gpt2" is GPT-2's own regex, built into `ByteLevel(use_regex=True)`; "digits" is that regex after
# cutting out every digit on its own (StarCoder, SmolLM: their tokenizer.json has Digits + ByteLevel).
PRE_TOKENIZER_SPLITS = {
    "gpt2": "gpt2",
    "default": "gpt2",
    "mpt": "gpt2",
    "olmo": "gpt2",
    "smollm": "digits",
    "starcoder": "digits",
    "refact": "digits",
    "codeshell": "digits",
    "llama-bpe": _LLAMA3_SPLIT,
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "falcon3": _LLAMA3_SPLIT,
    "dbrx": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
    "megrez": _QWEN2_SPLIT,
    "gpt-4o": _GPT4O_SPLIT,
    "llama4": _GPT4O_SPLIT,
}


class ChatPrompt(str):
    """A rendered chat prompt that carries its token ids: `Tokenizer.encode` returns these ids
    instead of tokenizing the text again.

    The text alone cannot say which `<|im_end|>` the template wrote (a special token) and which a
    user typed in a message (text): tokenized again, a message could forge a system turn. Built
    by `Tokenizer.chat_prompt`; any string operation on it gives a plain `str` without the ids.
    """

    ids: tuple[int, ...]

    def __new__(cls, text: str, ids: Sequence[int]) -> "ChatPrompt":
        prompt = super().__new__(cls, text)
        prompt.ids = tuple(int(i) for i in ids)
        return prompt


class Tokenizer:
    """Text to token ids and back, with the model's special tokens and chat template.

    Build one with `Tokenizer.from_dir` or `Tokenizer.from_gguf`; `encode`, `encode_batch` and
    `decode` give the same ids and text as `transformers`' tokenizer for the same files.
    """

    def __init__(
        self,
        backend: BackendTokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        unk_token: str | None = None,
        add_bos: bool | None = None,
        add_eos: bool | None = None,
        chat_template: str | None = None,
        model_max_length: int | None = None,
        extra_eos_token_ids: Iterable[int] = (),
    ):
        """Args:
        backend: the `tokenizers.Tokenizer` (model, pre-tokenizer, decoder, added tokens).
        bos_token, eos_token, pad_token, unk_token: the special tokens' text; each is added to
            `backend` as a special token.
        add_bos, add_eos: prepend BOS / append EOS in `encode`; None keeps what the backend's
            post-processor does (as read from a `tokenizer.json`).
        chat_template: a Jinja chat template.
        model_max_length: the context length, written to `tokenizer_config.json`.
        extra_eos_token_ids: more ids that end generation (e.g. from `generation_config.json`).
        """
        self.backend = backend
        self.backend.no_padding()
        self.backend.no_truncation()
        self.bos_token, self.eos_token, self.pad_token, self.unk_token = bos_token, eos_token, pad_token, unk_token
        specials = [t for t in (bos_token, eos_token, pad_token, unk_token) if t is not None]
        self.backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
        self.chat_template = chat_template
        self.model_max_length = model_max_length
        self._literal: tuple[tuple[int, int], BackendTokenizer] | None = None  # see `_literal_backend`
        self._literal_lock = threading.Lock()
        self._extra_eos_token_ids = {int(i) for i in extra_eos_token_ids}
        if add_bos is None and add_eos is None:
            probe = self.backend.encode("", add_special_tokens=True).ids
            self._add_bos = self.bos_token_id is not None and probe[:1] == [self.bos_token_id]
            self._add_eos = self.eos_token_id is not None and probe[int(self._add_bos) :][-1:] == [self.eos_token_id]
        else:
            self._add_bos, self._add_eos = bool(add_bos), bool(add_eos)
            self._update_post_processor()

    # ----- construction -------------------------------------------------------------------

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        """Load a Hugging Face tokenizer directory.

        Reads `tokenizer.json`, and where present `tokenizer_config.json` (special tokens,
        `add_bos_token`, chat template), `chat_template.jinja`, `special_tokens_map.json` and
        `generation_config.json` (more end-of-sequence ids).

        Args:
            path: the directory.

        Raises:
            FinegrainError: no `tokenizer.json`, or a file that does not parse.
        """
        path = Path(path)
        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FinegrainError(
                f"{tokenizer_file}: not found; finegrain needs the fast-tokenizer file, which "
                "`transformers.AutoTokenizer.from_pretrained(dir).save_pretrained(dir)` writes"
            )
        try:
            backend = BackendTokenizer.from_file(str(tokenizer_file))
        except Exception as e:
            raise FinegrainError(f"{tokenizer_file}: cannot be read ({e}); download it again") from None
        config = _read_json(path / "tokenizer_config.json")
        special_map = _read_json(path / "special_tokens_map.json")
        generation = _read_json(path / "generation_config.json")

        def special(name: str) -> str | None:
            value = config.get(name, special_map.get(name))
            return value.get("content") if isinstance(value, dict) else value

        chat_template = config.get("chat_template")
        if isinstance(chat_template, list):  # named templates: [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in chat_template if isinstance(t, dict)}
            chat_template = named.get("default") or next(iter(named.values()), None)
        jinja_file = path / "chat_template.jinja"
        if jinja_file.is_file():
            chat_template = jinja_file.read_text(encoding="utf-8")

        explicit = "add_bos_token" in config or "add_eos_token" in config or backend.post_processor is None
        eos_ids = generation.get("eos_token_id")
        eos_ids = [eos_ids] if isinstance(eos_ids, int) else list(eos_ids or [])
        eos_ids += config.get("finegrain_eos_token_ids", [])
        max_length = config.get("model_max_length")
        # A BERT (WordPiece) tokenizer names no BOS/EOS: its [CLS] and [SEP] frame a text the same way.
        return cls(
            backend,
            bos_token=special("bos_token") or special("cls_token"),
            eos_token=special("eos_token") or special("sep_token"),
            pad_token=special("pad_token"),
            unk_token=special("unk_token"),
            add_bos=config.get("add_bos_token", False) if explicit else None,
            add_eos=config.get("add_eos_token", False) if explicit else None,
            chat_template=chat_template,
            model_max_length=max_length if isinstance(max_length, int) and max_length < 10**12 else None,
            extra_eos_token_ids=eos_ids,
        )

    @classmethod
    def from_gguf(cls, metadata: dict[str, Any]) -> "Tokenizer":
        """Rebuild the tokenizer described by GGUF metadata (as `load_gguf` returns it).

        Args:
            metadata: the GGUF key/value fields, `tokenizer.ggml.*` and `tokenizer.chat_template`.

        Raises:
            FinegrainError: the metadata has no vocabulary, or one of a kind finegrain cannot rebuild.
        """
        kind = metadata.get("tokenizer.ggml.model")
        tokens = metadata.get("tokenizer.ggml.tokens")
        if not tokens:
            raise FinegrainError("GGUF metadata has no tokenizer.ggml.tokens; the file carries no tokenizer")
        if kind == "gpt2":
            backend = _byte_level_bpe(metadata)
        elif kind == "llama":
            backend = _sentencepiece_bpe(metadata)
        else:
            raise FinegrainError(
                f"GGUF tokenizer.ggml.model '{kind}' is not supported; finegrain rebuilds 'gpt2' (byte-level BPE) "
                "and 'llama' (SentencePiece BPE) vocabularies; use the model's Hugging Face directory instead"
            )
        _add_gguf_tokens(backend, metadata, byte_level=kind == "gpt2")

        def token(key: str) -> str | None:
            index = metadata.get(f"tokenizer.ggml.{key}")
            return tokens[index] if index is not None and 0 <= index < len(tokens) else None

        arch = metadata.get("general.architecture")
        end_of_turn = ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
        extra_eos = [metadata[key] for key in end_of_turn if key in metadata]
        return cls(
            backend,
            bos_token=token("bos_token_id"),
            eos_token=token("eos_token_id"),
            pad_token=token("padding_token_id"),
            unk_token=token("unknown_token_id"),
            # llama.cpp adds BOS to a SentencePiece vocabulary that does not say otherwise.
            add_bos=metadata.get("tokenizer.ggml.add_bos_token", kind == "llama"),
            add_eos=metadata.get("tokenizer.ggml.add_eos_token", False),
            chat_template=metadata.get("tokenizer.chat_template"),
            model_max_length=metadata.get(f"{arch}.context_length"),
            extra_eos_token_ids=extra_eos,
        )

    # ----- encoding -----------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; with `add_special_tokens`, BOS/EOS where the model adds them.

        Special tokens written in the text (like `<|im_start|>`) are always matched whole, except
        in a `ChatPrompt`, whose own ids (messages' text never special) are returned.
        """
        if isinstance(text, ChatPrompt):
            return self._add_specials(list(text.ids)) if add_special_tokens else list(text.ids)
        return _encode(self.backend, text, add_special_tokens)

    def encode_literal(self, text: str) -> list[int]:
        """Token ids of `text` read as plain text: a special token's spelling in it ("<|im_end|>")
        is tokenized as characters, never as the special token. No BOS/EOS."""
        return _encode(self._literal_backend(), text, False)

    def _literal_backend(self) -> BackendTokenizer:
        # A copy with `encode_special_tokens` on: the flag is state of a backend, and flipping it
        # on the shared one would race with other threads' `encode` calls (the server's worker).
        # Rebuilt when tokens were added since (`add_special_tokens`) or the backend was replaced.
        key = (id(self.backend), self.backend.get_vocab_size(with_added_tokens=True))
        with self._literal_lock:
            if self._literal is None or self._literal[0] != key:
                literal = BackendTokenizer.from_str(self.backend.to_str())
                literal.encode_special_tokens = True
                self._literal = (key, literal)
            return self._literal[1]

    @property
    def max_token_chars(self) -> int:
        """The most characters of text one token can stand for (its longest vocabulary entry):
        a text of N characters has at least N / max_token_chars tokens, known without tokenizing it."""
        size = self.backend.get_vocab_size(with_added_tokens=True)  # cheap; the vocabulary itself is not
        if getattr(self, "_max_token_chars", (None, 0))[0] != size:
            vocab = self.backend.get_vocab(with_added_tokens=True)
            self._max_token_chars = (size, max((len(token) for token in vocab), default=1))
        return self._max_token_chars[1]

    def _add_specials(self, ids: list[int]) -> list[int]:
        """`ids` with the BOS/EOS that `encode(..., add_special_tokens=True)` puts around a text."""
        bos = [self.bos_token_id] if self._add_bos and self.bos_token_id is not None else []
        eos = [self.eos_token_id] if self._add_eos and self.eos_token_id is not None and self.eos_token_id != self.bos_token_id else []
        return bos + ids + eos

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        """`encode` for many texts at once (in parallel, inside `tokenizers`)."""
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def encode_with_offsets(self, texts: Sequence[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
        """Token ids of each text (no special tokens) and each token's (start, end) characters in it.

        `end` is exclusive. Byte-level tokens keep the space before a word (" Paris" is (3, 9));
        tokens that hold only part of a character's bytes all span the whole character.
        """
        encodings = self.backend.encode_batch(list(texts), add_special_tokens=False)
        return [(e.ids, [tuple(o) for o in e.offsets]) for e in encodings]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """The text of `ids`; `skip_special_tokens` drops BOS, EOS, `<|im_start|>` and the like."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        """The id of one token (spelled as in the vocabulary), or None."""
        return self.backend.token_to_id(token)

    def id_to_token(self, index: int) -> str | None:
        """The vocabulary spelling of one id, or None."""
        return self.backend.id_to_token(int(index))

    def add_special_tokens(self, tokens: Sequence[str]) -> list[int]:
        """Add tokens that are always matched whole and never split, e.g. entity markers `<e1>`.

        Tokens already in the vocabulary keep their id; new ones get ids from `vocab_size` up
        (grow the model's embeddings to match).

        Returns:
            The id of each token, in order.
        """
        self.backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tokens])
        return [self.backend.token_to_id(t) for t in tokens]

    # ----- special tokens -----------------------------------------------------------------

    @property
    def bos_token_id(self) -> int | None:
        return None if self.bos_token is None else self.backend.token_to_id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return None if self.eos_token is None else self.backend.token_to_id(self.eos_token)

    @property
    def eos_token_ids(self) -> set[int]:
        """Every id that ends generation: EOS and the end-of-turn ids of the generation config."""
        eos = self.eos_token_id
        return self._extra_eos_token_ids | ({eos} if eos is not None else set())

    @property
    def pad_token_id(self) -> int:
        """The padding id: the pad token's, else EOS's (padding is masked, so any id works), else 0."""
        pad = None if self.pad_token is None else self.backend.token_to_id(self.pad_token)
        if pad is not None:
            return pad
        eos = self.eos_token_id
        return eos if eos is not None else 0

    @property
    def unk_token_id(self) -> int | None:
        return None if self.unk_token is None else self.backend.token_to_id(self.unk_token)

    @property
    def vocab_size(self) -> int:
        """The number of ids, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def add_bos(self) -> bool:
        """Whether `encode` prepends BOS (with `add_special_tokens=True`)."""
        return self._add_bos

    @add_bos.setter
    def add_bos(self, value: bool) -> None:
        self._add_bos = bool(value)
        self._update_post_processor()

    @property
    def add_eos(self) -> bool:
        """Whether `encode` appends EOS (with `add_special_tokens=True`)."""
        return self._add_eos

    @add_eos.setter
    def add_eos(self, value: bool) -> None:
        self._add_eos = bool(value)
        self._update_post_processor()

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r}, eos={self.eos_token!r}, "
            f"pad={self.pad_token!r}, add_bos={self.add_bos}, chat_template={self.chat_template is not None})"
        )

    def _update_post_processor(self) -> None:
        # The same template transformers' `update_post_processor` builds, so saved files agree.
        bos, eos = self.bos_token, self.eos_token
        add_bos = self._add_bos and bos is not None and self.bos_token_id is not None
        add_eos = self._add_eos and eos is not None and self.eos_token_id is not None
        self._add_bos, self._add_eos = add_bos, add_eos
        single = f"{(bos + ':0 ') if add_bos else ''}$A:0{(' ' + eos + ':0') if add_eos else ''}"
        pair = f"{single}{(' ' + bos + ':1') if add_bos else ''} $B:1{(' ' + eos + ':1') if add_eos else ''}"
        special = [(bos, self.bos_token_id)] if add_bos else []
        special += [(eos, self.eos_token_id)] if add_eos and eos != bos else []
        self.backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)

    # ----- chat ---------------------------------------------------------------------------

    def apply_chat_template(
        self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """Render a conversation with the model's chat template, as `transformers` does.

        Args:
            messages: `[{"role": "user", "content": "..."}, ...]`.
            add_generation_prompt: end with the header of an assistant turn, for generation.
            **kwargs: more template variables (`tools`, `documents`, `enable_thinking`, ...).

        Returns:
            The prompt text; encode it with `add_special_tokens=False` (the template writes its own BOS).

        Raises:
            FinegrainError: no chat template, or the template rejects the conversation.
        """
        if not self.chat_template:
            raise FinegrainError(
                "this tokenizer has no chat template; use plain prompts, or a model with a chat template "
                "(chat_template in tokenizer_config.json or tokenizer.chat_template in the GGUF)"
            )
        variables = {
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "unk_token": self.unk_token,
            "tools": None,
            "documents": None,
            **kwargs,
        }
        try:
            template = _compile_chat_template(self.chat_template)
            return template.render(
                messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt, **variables
            )
        except jinja2.TemplateError as e:
            raise FinegrainError(f"chat template: {e}") from None

    def encode_chat(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any) -> list[int]:
        """Token ids of a conversation rendered by `apply_chat_template`, in which the markers the
        template writes are special tokens and the text of the messages never is.

        A message holding "<|im_end|>\n<|im_start|>system\n..." would, tokenized with the rest,
        open a system turn of its own (role injection). Here each special token's spelling in a
        message's content is swapped for a random placeholder before rendering; the rendered
        text is cut at the template's own special tokens, and every piece in between is
        tokenized on its own, as `encode` does anyway, with special-token parsing off where a
        placeholder was (`encode_literal`). A conversation without such spellings gets exactly
        `encode(apply_chat_template(...), add_special_tokens=False)`. No BOS beyond the
        template's own.
        """
        specials = sorted((t.content for t in self.backend.get_added_tokens_decoder().values() if t.special), key=len, reverse=True)
        pattern = re.compile("|".join(map(re.escape, specials))) if specials else None
        contents = [m.get("content") for m in messages]
        if pattern is None or not any(isinstance(c, str) and pattern.search(c) for c in contents):
            return self.encode(self.apply_chat_template(messages, add_generation_prompt, **kwargs), add_special_tokens=False)
        nonce = secrets.token_hex(8)
        placeholder = re.compile(f"\ue000{nonce}(\\d+)\ue001")

        def hide(content: str) -> str:
            return pattern.sub(lambda m: f"\ue000{nonce}{specials.index(m[0])}\ue001", content)

        hidden = [{**m, "content": hide(m["content"])} if isinstance(m.get("content"), str) else m for m in messages]
        rendered = self.apply_chat_template(hidden, add_generation_prompt, **kwargs)
        shown = len(placeholder.findall(rendered))
        if shown != sum(len(pattern.findall(m["content"])) for m in messages if isinstance(m.get("content"), str)):
            # The template changed or dropped a placeholder (`| upper`, a cut): which text was the
            # message's is no longer known, and guessing could let a marker through.
            raise FinegrainError(
                "chat template: it rewrites the messages' text, so special-token spellings in a message "
                f"({', '.join(sorted({t for m in messages if isinstance(m.get('content'), str) for t in pattern.findall(m['content'])}))}) "
                "cannot be kept as text; remove them from the message"
            )
        ids: list[int] = []
        for piece in re.split(f"({pattern.pattern})", rendered):
            if piece in specials:  # the template's own marker
                ids.append(self.backend.token_to_id(piece))
            elif placeholder.search(piece):
                ids += self.encode_literal(placeholder.sub(lambda m: specials[int(m[1])], piece))
            elif piece:
                ids += self.encode(piece, add_special_tokens=False)
        return ids

    def chat_prompt(self, messages: Sequence[dict[str, Any]], **kwargs: Any) -> ChatPrompt:
        """The prompt that asks the model for the next assistant turn, ready for `generate`.

        Its text is `apply_chat_template(messages)` without the BOS the template writes where
        `encode` adds one (so there is one), and its ids are `encode_chat`'s: a message cannot
        forge the template's markers. `encode(prompt)` gives those ids (with BOS as usual).
        """
        text = self.apply_chat_template(messages, **kwargs)
        ids = self.encode_chat(messages, **kwargs)
        bos = self.bos_token
        if self._add_bos and bos and text.startswith(bos) and ids[:1] == [self.bos_token_id]:
            text, ids = text[len(bos) :], ids[1:]  # `encode` adds it again
        return ChatPrompt(text, ids)

    # ----- saving -------------------------------------------------------------------------

    def save(self, directory: str | Path) -> Path:
        """Write `tokenizer.json`, `tokenizer_config.json` and `special_tokens_map.json`.

        `transformers.AutoTokenizer.from_pretrained(directory)` and `Tokenizer.from_dir(directory)`
        load them back with the same ids. Each file is written atomically.

        Returns:
            The directory.
        """
        directory = Path(directory)
        specials = {
            name: value
            for name, value in (
                ("bos_token", self.bos_token),
                ("eos_token", self.eos_token),
                ("unk_token", self.unk_token),
                ("pad_token", self.pad_token),
            )
            if value is not None
        }
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **specials,
            "add_bos_token": self.add_bos,
            "add_eos_token": self.add_eos,
            "clean_up_tokenization_spaces": False,
            "model_max_length": self.model_max_length or 10**30,
        }
        if self.chat_template:
            config["chat_template"] = self.chat_template
        if self._extra_eos_token_ids:
            # Not a transformers key; `from_dir` reads it so the end-of-turn ids survive a round trip.
            config["finegrain_eos_token_ids"] = sorted(self.eos_token_ids)
        atomic_write_text(directory / "tokenizer.json", self.backend.to_str(pretty=True))
        atomic_write_json(directory / "tokenizer_config.json", config)
        atomic_write_json(directory / "special_tokens_map.json", specials)
        return directory


# ----- GGUF vocabularies ----------------------------------------------------------------------


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table: how byte-level vocabularies spell raw bytes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


def _byte_level_bpe(metadata: dict[str, Any]) -> BackendTokenizer:
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    # A token that uses characters outside the byte alphabet is stored as raw text: respell it.
    vocab = {
        token if set(token) <= alphabet else "".join(spelling[b] for b in token.encode("utf-8")): index
        for index, token in enumerate(metadata["tokenizer.ggml.tokens"])
    }
    merges = [tuple(m.split(" ")) for m in metadata.get("tokenizer.ggml.merges", [])]
    merges = [m for m in merges if len(m) == 2]
    backend = BackendTokenizer(BPE(vocab=vocab, merges=merges, dropout=None, fuse_unk=False, byte_fallback=False))
    pre = metadata.get("tokenizer.ggml.pre", "gpt2")
    split = PRE_TOKENIZER_SPLITS.get(pre)
    if split is None:
        warnings.warn(
            f"GGUF tokenizer.ggml.pre '{pre}' is unknown to finegrain; splitting text like GPT-2, which may differ "
            "from the model's own tokenizer (use its Hugging Face directory for exact ids)",
            stacklevel=3,
        )
        split = "gpt2"
    if split == "gpt2":
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif split == "digits":
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_bpe(metadata: dict[str, Any]) -> BackendTokenizer:
    tokens = metadata["tokenizer.ggml.tokens"]
    vocab = {token: index for index, token in enumerate(tokens)}
    if "tokenizer.ggml.merges" in metadata:
        merges = [tuple(m.split(" ")) for m in metadata["tokenizer.ggml.merges"]]
        merges = [m for m in merges if len(m) == 2]
    else:
        scores = metadata.get("tokenizer.ggml.scores") or [-float(i) for i in range(len(tokens))]
        merges = _merges_from_scores(vocab, dict(zip(tokens, scores)))
    unk_id = metadata.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if unk_id is not None and 0 <= unk_id < len(tokens) else None
    model = BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True, dropout=None)
    backend = BackendTokenizer(model)
    add_prefix_space = metadata.get("tokenizer.ggml.add_space_prefix", True)
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if add_prefix_space else "never", split=False
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix_space:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    return backend


def _merges_from_scores(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary: every split of a piece into two pieces,
    best score first (ties: shorter left piece, then shorter right piece, then vocabulary order)."""
    merges = []
    for piece, score in scores.items():
        local = [
            (piece[:i], piece[i:], score)
            for i in range(1, len(piece))
            if piece[:i] in vocab and piece[i:] in vocab
        ]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def _add_gguf_tokens(backend: BackendTokenizer, metadata: dict[str, Any], byte_level: bool) -> None:
    """Control tokens (`<|im_start|>`) become special added tokens, user-defined ones (`<think>`)
    plain added tokens, so both are matched whole in text instead of being cut into pieces."""
    tokens = metadata["tokenizer.ggml.tokens"]
    types = metadata.get("tokenizer.ggml.token_type") or []
    alphabet = set(_bytes_to_unicode().values()) if byte_level else None
    control = [
        AddedToken(token, special=True, normalized=False)
        for token, kind in zip(tokens, types)
        # In a byte-level vocabulary a control token spelled outside the byte alphabet is a llama.cpp mislabel.
        if kind == _CONTROL and (alphabet is None or set(token) <= alphabet)
    ]
    if control:
        backend.add_special_tokens(control)
    vocab = backend.get_vocab(with_added_tokens=True)
    user = [
        AddedToken(token, special=False, normalized=False)
        for token, kind in zip(tokens, types)
        if kind == _USER_DEFINED and token in vocab
    ]
    if user:
        backend.add_tokens(user)


def _encode(backend: BackendTokenizer, text: str, add_special_tokens: bool) -> list[int]:
    """`backend.encode(text)`, through `encode_batch` for a long text: that one releases the GIL."""
    if len(text) >= _RELEASE_GIL_CHARS:
        return backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
    return backend.encode(text, add_special_tokens=add_special_tokens).ids


# ----- chat templates ---------------------------------------------------------------------------


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; render its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def _raise_exception(message: str):
    raise jinja2.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # Jinja's own `tojson` escapes HTML characters, which chat templates do not want.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=16)
def _compile_chat_template(source: str) -> jinja2.Template:
    # The environment transformers renders chat templates in: sandboxed (templates come from
    # model files, i.e. untrusted), blocks trimmed, loop controls, `raise_exception`.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def _read_json(path: Path) -> dict[str, Any]:
    """An optional JSON object file of a model directory: {} when absent (or not an object)."""
    from finegrain.checkpoint.hf import read_json

    value = read_json(path) if path.is_file() else {}
    return value if isinstance(value, dict) else {}
