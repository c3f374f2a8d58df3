"""Token classification (NER): a linear head on every token of a decoder, labels per word.

Words and subwords. Each word is tokenized on its own, the first with nothing before it and
every later one with the one space that separates it from the previous word in the text
(nothing for text without spaces, such as Chinese), and the ids are concatenated. For
byte-level BPE this gives the ids of the joined text wherever the pre-tokenizer splits at
word starts (it does for words, punctuation and digits), and it guarantees that no token
straddles two words, so every word owns its tokens. The word's label sits on its first
token (`subword="first"`, the usual choice) or on its last (`subword="last"`: under a causal
mask only the last token has seen the whole word); the word's other tokens are left out of
the loss (-100). Predictions are read at the same tokens and mapped back to words, and
through the words' offsets to characters of the text.

Long inputs: the ids are cut at `max_length` tokens; words whose labelled token falls beyond
the cut are predicted `O` (or, where the run mixes in its word model, `head.word_mix`, as that
model alone tags them) and counted in the prediction's `truncated_words`. Raise
`data.max_length` when that count is not zero.

Schemes and decoding. Files may use BIO, IOB1, BIOES or IO: their entities are read
(conlleval's way) and written in the head's scheme (BIO, BIOES or IO). `decoding="viterbi"`
picks the most probable tag sequence that is valid in the scheme (no `I-PER` after `O`);
`"argmax"` takes each word's most probable tag, and entities are then read leniently.
Plain tags (`data.scheme: plain`: parts of speech, chunks) are predicted as they are, each
word its most probable tag, and scored word by word as classification is (accuracy,
precision/recall/F1 per tag, a confusion matrix); they have no entities.

The module layout, `model` + `score` (a `Linear` with bias), is Hugging Face's
`LlamaForTokenClassification`, so a PEFT adapter saved with `task_type="TOKEN_CLS"` and
`modules_to_save=["score"]` loads onto `transformers`. A bidirectional model
(`config.causal = False`) gives different numbers there, since transformers' LLaMA is causal.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field
from torch import nn

from finegrain import datasets
from finegrain.config import HeadConfig
from finegrain.data.conll import TokenExample, load_token_splits, read_token_examples
from finegrain.errors import FinegrainError
from finegrain.evaluate.entities import entity_errors, entity_metrics
from finegrain.evaluate.metrics import classification_metrics
from finegrain.model.backbone import hidden_states, padding_mask
from finegrain.model.llama import LlamaModel
from finegrain.tags import PLAIN, allowed_transitions, convert_tags, normalize_scheme, tag_set, tags_to_entities
from finegrain.tasks.base import (
    IGNORE_INDEX, Endpoint, class_weights, kept, labelled_weight, linear_head, pad_inputs, predict_scores,
)
from finegrain.tasks.lexical import WordModel
from finegrain.tasks.schemas import Finite, TextsRequest, read_texts


@dataclass
class TokenEncoded:
    """One tokenized sentence.

    Attributes:
        input_ids: the token ids, at most `max_length`.
        positions: for each word, the index of the token that carries its label; -1 for a
            word cut off by `max_length` (or, rarely, one the tokenizer turns into nothing).
        targets: per token, the tag index at labelled tokens and -100 elsewhere; None unlabelled.
        example: the sentence, for mapping predictions back to words and characters.
        truncated_words: words beyond `max_length`.
        tokens: the sentence's tokens before `max_length` cut them (what would read it whole).
    """

    input_ids: list[int]
    positions: list[int]
    targets: list[int] | None
    example: TokenExample
    truncated_words: int = 0
    tokens: int = 0


def encode_words(
    tokenizer, examples: Sequence[TokenExample], max_length: int, subword: str = "first"
) -> list[tuple[list[int], list[int], int]]:
    """Token ids of each sentence built word by word, the labelled token of each word, words cut off.

    Returns:
        Per sentence: (ids, positions, truncated_words, tokens); see `TokenEncoded`.
    """
    pieces: list[str] = []
    for ex in examples:
        for i, word in enumerate(ex.words):
            spaced = i > 0 and ex.offsets[i][0] > ex.offsets[i - 1][1]
            pieces.append(" " + word if spaced else word)
    # Words repeat (characters of Chinese text most of all): encode each distinct piece once.
    distinct = list(dict.fromkeys(pieces))
    ids_of = dict(zip(distinct, tokenizer.encode_batch(distinct, add_special_tokens=False) if distinct else []))
    encoded = [ids_of[piece] for piece in pieces]
    bos = [tokenizer.bos_token_id] if tokenizer.add_bos and tokenizer.bos_token_id is not None else []
    # An encoder's tokenizer closes a text with EOS ([SEP]), cut or not: the words get the room before it.
    closes = getattr(tokenizer, "add_eos", False) and tokenizer.eos_token_id is not None and max_length > 1
    eos = [tokenizer.eos_token_id] if closes else []
    room = max_length - len(eos)
    results, k = [], 0
    for ex in examples:
        ids = list(bos)
        positions = []
        truncated = 0
        for _ in ex.words:
            word_ids = encoded[k]
            k += 1
            if not word_ids:
                positions.append(-1)
                continue
            position = len(ids) if subword == "first" else len(ids) + len(word_ids) - 1
            if position >= room:
                positions.append(-1)
                truncated += 1
            else:
                positions.append(position)
            ids.extend(word_ids)
        results.append((ids[:room] + eos, positions, truncated, len(ids) + len(eos)))
    return results


class TokenClassifier(nn.Module):
    """A decoder backbone (`model`) and a linear head (`score`, with bias) over every token's hidden state."""

    def __init__(self, backbone: LlamaModel, num_tags: int, dropout: float = 0.0):
        super().__init__()
        self.model = backbone
        self.dropout = nn.Dropout(dropout)
        self.score = linear_head(backbone.config.hidden_size, num_tags)

    def forward(self, batch: dict[str, torch.Tensor], start_layer: int = 0) -> torch.Tensor:
        """Tag logits (B, T, C) for right-padded `input_ids` (B, T) and `lengths` (B,).

        With `start_layer` > 0 the batch holds `hidden` (B, T, H), the cached output of the layers
        below. Logits at padding are 0; with `output_length` in the batch they are zero-padded to that
        many positions, so the rows of batches of different lengths stack (`predict_outputs` does).
        """
        x = hidden_states(self.model, batch, start_layer)  # (B, T, H)
        T = x.shape[1]
        real = padding_mask(batch["lengths"], T)  # (B, T)
        # Zero at padding, so that an example's outputs do not depend on the batch it came in.
        logits = self.score(self.dropout(x)).masked_fill(~real[..., None], 0.0)  # (B, T, C)
        width = int(batch.get("output_length", T))
        if width > T:
            logits = F.pad(logits, (0, 0, 0, width - T))  # (B, width, C)
        return logits


class Entity(BaseModel):
    type: str
    start: int = Field(description="Character offset of the first character in the text.")
    end: int = Field(description="Character offset just past the last character (exclusive).")
    text: str
    words: list[int] = Field(description="[first, end) word indices.")
    score: Finite = Field(description="The mean probability of the entity's word tags.")


class Tagging(BaseModel):
    words: list[str]
    tags: list[str] = Field(description="One tag per word, in the run's scheme (BIO, BIOES, IO or plain).")
    entities: list[Entity] = Field(description="Empty for plain tags (parts of speech, chunks).")
    truncated_words: int = Field(description="Words past the run's data.max_length: tagged O, or by the run's word model alone.")


class NerResponse(BaseModel):
    model: str
    predictions: list[Tagging]


class TokenClassificationTask:
    """Head, collate function, loss, decoding and entity metrics for NER and other word tagging.

    Args:
        types: the entity types (the labels of the run), e.g. ["LOC", "ORG", "PER"]; plain: the tags.
        scheme: the tags the head predicts: "BIO" (IOB2), "BIOES" (IOBES), "IO", or "plain" (the
            file's tags as they are, scored word by word).
        head: label smoothing and class weights ("balanced" or {tag: weight}).
        subword: which token of a word carries its label: "first" or "last".
        decoding: "viterbi" (valid sequences only) or "argmax".
        dropout: on the hidden states before the head, while training (`head.dropout`).
    """

    name = "ner"
    endpoint = Endpoint(
        "/v1/ner", TextsRequest, NerResponse, "texts",
        "Tag each text's words with an NER run: words, tags and the entities with character offsets.", read_texts,
    )
    headline_metric = "f1"
    peft_task_type = "TOKEN_CLS"
    head_modules = ("score",)
    predicts_from_prefix = True

    def __init__(
        self,
        types: Sequence[str],
        scheme: str = "BIO",
        head: HeadConfig | None = None,
        subword: str = "first",
        decoding: str = "viterbi",
        dropout: float = 0.0,
    ):
        try:
            self.scheme = normalize_scheme(scheme)
        except ValueError as exc:
            raise FinegrainError(f"head.scheme: {exc}") from None
        if self.scheme == "IOB1":
            raise FinegrainError("head.scheme: IOB1 is read from files, not predicted; use BIO, BIOES or IO")
        if subword not in ("first", "last"):
            raise FinegrainError(f"head.subword: {subword!r} is not 'first' or 'last'")
        if decoding not in ("viterbi", "argmax"):
            raise FinegrainError(f"head.decoding: {decoding!r} is not 'viterbi' or 'argmax'")
        self.types = list(types)
        self.labels = self.types  # what the run records in labels.json
        self.tags = tag_set(self.types, self.scheme)
        self.index = {tag: i for i, tag in enumerate(self.tags)}
        self.head = head or HeadConfig()
        self.subword, self.decoding, self.dropout = subword, decoding, dropout
        if self.scheme == PLAIN:
            self.headline_metric = "accuracy"  # of words; the micro F1 at the top of the metrics is close to it
        self.class_weights: torch.Tensor | None = None
        self.lexical: WordModel | None = None  # mixed into the tag probabilities (head.word_mix)
        self.output_length = 0  # the longest `max_length` encoded so far: predict_outputs stacks rows this wide
        self._first, self._pairs, self._last = allowed_transitions(self.tags, self.scheme)

    @classmethod
    def from_config(cls, config, labels: list[str]) -> TokenClassificationTask:
        head = config.head
        return cls(labels, predicted_scheme(config), head, head.subword, head.decoding, head.dropout)

    # -- data ------------------------------------------------------------------------------

    @staticmethod
    def load_splits(data):
        return load_token_splits(data, datasets_module=datasets)  # data sits below datasets: the loader comes from here

    def read_file(self, data, path: str, require_label: bool = True, skipped: list[str] | None = None) -> list[TokenExample]:
        examples = kept(read_token_examples(
            path, require_tags=require_label, scheme=data.scheme, tag_column=data.tag_column,
            char_level=data.char_level, repair=data.repair_tags, skip_bad_rows=data.skip_bad_rows,
            text_field=data.text_field, tag_names=data.tag_names,
        ), skipped)
        if not examples:
            raise FinegrainError(f"{path}: no usable sentences")
        return examples

    def input_record(self, example: TokenExample) -> dict[str, Any]:
        return {"text": example.text}

    def gold(self, examples: Sequence[TokenExample]) -> list:
        return [e.tags for e in examples]

    def encode(self, tokenizer, examples: Sequence[TokenExample], max_length: int) -> list[TokenEncoded]:
        """Tokenize sentences word by word; labelled tokens get their word's tag index (in `scheme`)."""
        self.output_length = max(self.output_length, max_length)
        items = []
        for ex, (ids, positions, truncated, tokens) in zip(
            examples, encode_words(tokenizer, examples, max_length, self.subword)
        ):
            targets = None
            if ex.tags is not None:
                if len(ex.tags) != len(ex.words):
                    raise FinegrainError(f"{ex.source}: {len(ex.words)} words but {len(ex.tags)} tags")
                tags = convert_tags(ex.tags, self.scheme)
                targets = [IGNORE_INDEX] * len(ids)
                for tag, position in zip(tags, positions):
                    if position >= 0:
                        # A type the training data never had cannot be learnt; metrics still count it.
                        targets[position] = self.index.get(tag, IGNORE_INDEX)
            items.append(TokenEncoded(ids, positions, targets, ex, truncated, tokens))
        return items

    def examples_from_inputs(self, inputs: Sequence[str | Sequence[str] | TokenExample], data) -> list[TokenExample]:
        """Sentences to predict: raw texts (split by `split_words`), lists of words, or `TokenExample`s as they are."""
        char_level = data.char_level
        examples = []
        for i, value in enumerate(inputs):
            source = f"input:{i + 1}"
            if isinstance(value, TokenExample):
                examples.append(value)
            elif isinstance(value, str):
                examples.append(TokenExample.from_text(value, source, char_level))
            else:
                words = [str(w) for w in value]
                if not words or not all(w.strip() for w in words):
                    raise FinegrainError(f"{source}: a list of words must be non-empty, with no empty word")
                examples.append(TokenExample.from_words(words, None, source, char_level))
        return examples

    def collate(
        self, items: list[TokenEncoded], pad_id: int, hidden: list[torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """Right-pad a batch; with `hidden` (cached lower-layer states), pad those instead of ids."""
        batch = pad_inputs(items, pad_id, hidden)
        T = int(batch["lengths"].max())
        batch["output_length"] = torch.tensor(max(self.output_length, T))
        if items[0].targets is not None:
            targets = torch.full((len(items), T), IGNORE_INDEX, dtype=torch.long)
            for row, item in enumerate(items):
                targets[row, : len(item.targets)] = torch.tensor(item.targets)
            batch["targets"] = targets
        return batch

    # -- model -----------------------------------------------------------------------------

    def build_model(self, llama, tokenizer=None) -> TokenClassifier:
        return TokenClassifier(llama.model, len(self.tags), self.dropout)

    def set_class_weights(self, train: list[TokenEncoded]) -> None:
        """Weights per tag from `head.class_weights`: "balanced" (inverse frequency) or {tag: weight}."""
        counts = Counter(t for item in train for t in (item.targets or []) if t != IGNORE_INDEX)
        self.class_weights = class_weights(self.head.class_weights, self.tags, counts)

    def long_text_counts(self, items: list[TokenEncoded]) -> dict[str, int]:
        """Sentences that lost words to `max_length` ("longer"), the words they lost ("truncated"), and
        the tokens of the longest of them ("longest", 0 where none lost words)."""
        cut = [item for item in items if item.truncated_words]
        return {"longer": len(cut), "truncated": sum(item.truncated_words for item in cut),
                "longest": max((item.tokens for item in cut), default=0)}

    def loss_weight(self, batch: dict[str, torch.Tensor]) -> float:
        return labelled_weight(batch, self.class_weights)

    def loss(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean cross-entropy over the labelled tokens of the batch."""
        targets = batch["targets"]  # (B, T)
        logits = logits[:, : targets.shape[1]]  # drop the output padding
        if not (targets != IGNORE_INDEX).any():
            return logits.sum() * 0.0  # every word cut off: nothing to learn, but a graph to backprop
        return F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            targets.reshape(-1),
            weight=self.class_weights,
            ignore_index=IGNORE_INDEX,
            label_smoothing=self.head.label_smoothing,
        )

    # -- outputs ---------------------------------------------------------------------------

    def predict(self, model, items: list, pad_id: int, batch_size: int = 64, hidden=None, start_layer: int = 0,
                progress: str | None = None) -> list[dict[str, Any]]:
        return predict_scores(self, model, items, pad_id, batch_size, hidden, start_layer, progress)

    def describe(self) -> dict[str, Any]:
        return {"labels": self.labels}

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.float().softmax(-1)

    def decode(self, probs: torch.Tensor, items: Sequence[TokenEncoded], mixed: bool = True) -> list[dict[str, Any]]:
        """Per sentence: `words`, their `tags`, the `entities` and `truncated_words`.

        Each entity: `type`, `start` and `end` (character offsets in the sentence's text, `end`
        exclusive), `text`, `words` ([first, end) word indices) and `score` (the mean probability
        of its words' tags). With the run's word model (`lexical`, `head.word_mix`) its tag
        probabilities are mixed into the model's first, unless `mixed` is False.
        """
        word_probs, words = self.word_probabilities(probs, items), [labelled_words(item) for item in items]
        if mixed and self.lexical is not None:  # then every word has its probabilities: the cut ones the word model's
            word_probs = self.lexical.mix(word_probs, [item.example.words for item in items], words)
            words = [range(len(item.example.words)) for item in items]
        return [self.decode_words(p, item, w) for p, item, w in zip(word_probs, items, words)]

    def word_probabilities(self, probs: torch.Tensor, items: Sequence[TokenEncoded]) -> list[np.ndarray]:
        """Per sentence, (words, tags) probabilities at the labelled token of each word within
        max_length (`labelled_words`), from the (sentences, tokens, tags) probabilities."""
        rows = [[item.positions[i] for i in labelled_words(item)] for item in items]
        return [row[tokens].double().numpy() if tokens else np.zeros((0, len(self.tags))) for row, tokens in zip(probs, rows)]

    def decode_words(self, word_probs: np.ndarray, item: TokenEncoded, words: Sequence[int]) -> dict[str, Any]:
        """One sentence's prediction (`decode`) from the tag probabilities of its `words` (a word
        without them, cut off by max_length, is tagged O)."""
        ex = item.example
        if self.decoding == "viterbi" and len(words) and self.scheme != PLAIN:
            path = viterbi(np.log(np.maximum(word_probs, 1e-30)), self._first, self._pairs, self._last)
        else:
            path = word_probs.argmax(-1).tolist()
        tags = ["O"] * len(ex.words)
        confidence = [1.0] * len(ex.words)
        for i, tag_index, p in zip(words, path, word_probs):
            tags[i] = self.tags[tag_index]
            confidence[i] = float(p[tag_index])
        entities = []
        for type_, first, end in tags_to_entities(tags) if self.scheme != PLAIN else ():
            start, stop = ex.offsets[first][0], ex.offsets[end - 1][1]
            entities.append(
                {
                    "type": type_,
                    "start": start,
                    "end": stop,
                    "text": ex.text[start:stop],
                    "words": [first, end],
                    "score": round(sum(confidence[first:end]) / (end - first), 6),
                }
            )
        return {"words": ex.words, "tags": tags, "entities": entities, "truncated_words": item.truncated_words}

    def metrics(self, predictions: list[dict[str, Any]], gold: list[Sequence[str]]) -> dict[str, Any]:
        """Entity-level scores in seqeval's default mode (conlleval), strict-mode micro scores, an error breakdown.

        Args:
            predictions: from `decode`.
            gold: the gold tags of each sentence (any scheme; `TokenExample.label`).
        """
        if any(g is None for g in gold):
            raise FinegrainError("ner metrics need gold tags for every sentence")
        predicted = [p["tags"] for p in predictions]
        gold = [list(g) for g in gold]
        if self.scheme == PLAIN:
            return self._word_metrics(predictions, gold)
        metrics = entity_metrics(gold, predicted, mode="default")
        if self.scheme in ("BIO", "BIOES"):
            gold_in_scheme = [convert_tags(g, self.scheme) for g in gold]
            strict = entity_metrics(gold_in_scheme, predicted, mode="strict", scheme=self.scheme)
            metrics["strict"] = strict["micro"]
        metrics["errors"] = entity_errors(gold, predicted)
        metrics["scheme"] = self.scheme
        metrics["decoding"] = self.decoding
        metrics["truncated_words"] = sum(p.get("truncated_words", 0) for p in predictions)
        return metrics

    def _word_metrics(self, predictions: list[dict[str, Any]], gold: list[list[str]]) -> dict[str, Any]:
        """Plain tags: every word an example of classification (scikit-learn's `classification_report`
        of the words). A word cut off by `max_length` is tagged as `decode` tags it: by the run's word
        model where it mixes one in, else `O`, wrong unless its tag is `O`."""
        flat_gold = [tag for sentence in gold for tag in sentence]
        flat_predicted = [tag for p in predictions for tag in p["tags"]]
        labels = self.tags + sorted(set(flat_gold) - set(self.tags))  # a tag training never had still counts
        metrics = classification_metrics(flat_gold, flat_predicted, labels)
        micro = metrics["micro"]
        metrics.update(precision=micro["precision"], recall=micro["recall"], f1=micro["f1"])
        metrics["num_sentences"] = len(gold)
        metrics["scheme"] = PLAIN
        metrics["truncated_words"] = sum(p.get("truncated_words", 0) for p in predictions)
        return metrics

    def write_report(self, run_dir: Path, metrics: dict[str, Any], split: str, title: str) -> None:
        from finegrain.evaluate.report import write_classification_report

        write_classification_report(run_dir, metrics, split_name=split, title=title)

    @staticmethod
    def report_text(metrics: dict[str, Any]) -> str:
        from finegrain.evaluate.report import format_report_text

        return format_report_text(metrics)


def labelled_words(item: TokenEncoded) -> list[int]:
    """The words of a sentence whose labelled token is within max_length (the others are tagged O, or
    by the run's word model alone: `head.word_mix`)."""
    return [i for i, position in enumerate(item.positions) if position >= 0]


def predicted_scheme(config) -> str:
    """The tags a run's head predicts, in one spelling: plain where its data is plain, else `head.scheme`
    (IOB2 is BIO, IOBES is BIOES)."""
    if normalize_scheme(config.data.scheme) == PLAIN:
        return PLAIN
    return normalize_scheme(config.head.scheme)


def viterbi(scores: np.ndarray, first: np.ndarray, pairs: np.ndarray, last: np.ndarray) -> list[int]:
    """The best path through per-word tag scores (W, C) using only allowed tags and transitions.

    Args:
        scores: log-probabilities of each word's tags.
        first, pairs, last: from `allowed_transitions`.
    """
    blocked = np.where(pairs, 0.0, -np.inf)  # (C_prev, C)
    total = scores[0] + np.where(first, 0.0, -np.inf)  # (C,)
    back = []
    for w in range(1, len(scores)):
        candidates = total[:, None] + blocked  # (C_prev, C)
        best = candidates.argmax(0)
        total = candidates[best, np.arange(len(best))] + scores[w]
        back.append(best)
    total = total + np.where(last, 0.0, -np.inf)
    path = [int(total.argmax())]
    for best in reversed(back):
        path.append(int(best[path[-1]]))
    return path[::-1]
