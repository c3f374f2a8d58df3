"""Sequence classification: a linear head on the last real token (or the mean) of a decoder, or on
the first token (an encoder's [CLS]: `head.pooling: first`).

Single-label (softmax, cross-entropy with optional label smoothing and class weights) or
multi-label (sigmoid, binary cross-entropy, a decision threshold). The module layout,
`model` + `score`, is Hugging Face's `LlamaForSequenceClassification`, so PEFT-format
adapters saved from it load onto `transformers`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field
from torch import nn

from finegrain import rundir
from finegrain.config import HeadConfig
from finegrain.errors import FinegrainError
from finegrain.model.backbone import hidden_states, padding_mask
from finegrain.model.llama import LlamaModel
from finegrain.tasks.base import (
    Endpoint, class_weights, document_mean, kept, labelled_weight, linear_head, pad_inputs, predict_scores,
)
from finegrain.tasks.schemas import Finite, TextsRequest, read_texts
from finegrain.tasks.lexical import LexicalModel


@dataclass
class Encoded:
    """One tokenized example: token ids and the label as class index (or indices).

    With `data.long_texts: windows` a long text is several windows: `input_ids` holds them one
    after another and `row_lengths` their lengths; each window is a row of its own in a batch.
    """

    input_ids: list[int]
    target: int | list[int] | None
    row_lengths: list[int] | None = None
    longer: bool = False  # the text did not fit in data.max_length tokens
    truncated: bool = False  # some of its tokens were left out (all of them are read only by windows)
    text: str | None = None  # the raw text, for the TF-IDF model a run may mix in (finegrain.tasks.lexical)


LONG_TEXTS = ("truncate", "head_tail", "windows")


def encode_texts(tokenizer, texts: list[str], max_length: int, template: str | None = None) -> list[list[int]]:
    """Token ids of each text, at most `max_length`, wrapped in `template` ("... {text} ...").

    Only the text is truncated, so the template's words (often the cue the last token reads,
    like "Sentiment:") always stay in full.
    """
    return [rows[0] for rows, _, _ in encode_long_texts(tokenizer, texts, max_length, template)]


def encode_long_texts(
    tokenizer, texts: list[str], max_length: int, template: str | None = None, long_texts: str = "truncate",
    window_stride: int | None = None, max_windows: int = 8,
) -> list[tuple[list[list[int]], bool, bool]]:
    """Per text: its rows of at most `max_length` ids, whether it was longer, whether tokens were left out.

    What a text longer than the room the template leaves (its `budget` of tokens) becomes:
      truncate: its first `budget` tokens (one row);
      head_tail: its first `budget // 2` and last `budget - budget // 2` tokens (one row);
      windows: rows reading tokens [k * stride, k * stride + budget) for k = 0, 1, ... until a
        window reaches the end or `max_windows` are taken (the rest is left out); `stride` is
        `window_stride`, by default half the budget.
    Every row keeps the template's words (and BOS/EOS) in full: the cue the head reads.
    """
    if template is None and long_texts == "truncate":  # today's ids exactly: special tokens stay as encode puts them
        keep_eos = getattr(tokenizer, "add_eos", False) and max_length > 1  # BERT's [SEP] closes every text, a cut one too
        return [
            ([_cut(ids, max_length, keep_eos)], len(ids) > max_length, len(ids) > max_length)
            for ids in tokenizer.encode_batch(texts)
        ]
    prefix, suffix, bodies = _template_parts(tokenizer, texts, template)
    budget = max_length - len(prefix) - len(suffix)
    if budget < 1 and template is None:
        raise FinegrainError(f"data.max_length: {max_length} leaves no room for the text beside BOS/EOS; raise it")
    if budget < 1:
        raise FinegrainError(
            f"data.template: takes {len(prefix) + len(suffix)} tokens, leaving no room for the text within "
            f"data.max_length={max_length}; raise data.max_length or shorten the template"
        )
    stride = window_stride or max(1, budget // 2)
    if long_texts == "windows" and stride > budget:
        raise FinegrainError(
            f"data.window_stride: {stride} tokens would skip text between windows of {budget} text tokens "
            f"(data.max_length={max_length} less the template); lower it to at most {budget}"
        )
    encoded = []
    for body in bodies:
        if long_texts == "windows":
            pieces = text_windows(len(body), budget, stride, max_windows)
            chunks = [body[start:end] for start, end in pieces]
            truncated = pieces[-1][1] < len(body)
        else:
            chunks = [head_tail(body, budget) if long_texts == "head_tail" else body[:budget]]
            truncated = len(body) > budget
        encoded.append(([prefix + chunk + suffix for chunk in chunks], len(body) > budget, truncated))
    return encoded


def _cut(ids: list[int], max_length: int, keep_last: bool) -> list[int]:
    """The first `max_length` ids; with `keep_last`, a cut row still ends with the last id (EOS)."""
    if len(ids) <= max_length or not keep_last:
        return ids[:max_length]
    return ids[: max_length - 1] + ids[-1:]


def _template_parts(tokenizer, texts: list[str], template: str | None) -> tuple[list[int], list[int], list[list[int]]]:
    """The ids every row starts with (BOS, the template's words before the text), ends with, and each text's ids."""
    if template is None:
        before, after = "", ""
    else:
        before, after = template.split("{text}")
    bos = [tokenizer.bos_token_id] if tokenizer.add_bos else []
    eos = [tokenizer.eos_token_id] if tokenizer.add_eos else []
    prefix = bos + (tokenizer.encode(before, add_special_tokens=False) if before else [])
    suffix = (tokenizer.encode(after, add_special_tokens=False) if after else []) + (eos if template is None else [])
    return prefix, suffix, tokenizer.encode_batch(texts, add_special_tokens=False)


def head_tail(ids: list[int], budget: int) -> list[int]:
    """The first `budget // 2` and the last `budget - budget // 2` of `ids` (all of them when they fit)."""
    if len(ids) <= budget:
        return ids
    head = budget // 2
    return ids[:head] + ids[len(ids) - (budget - head) :]


def text_windows(length: int, budget: int, stride: int, max_windows: int) -> list[tuple[int, int]]:
    """[start, end) of each window over `length` tokens: starts `stride` apart, `budget` long, at most
    `max_windows`; the last ends at the text's end unless the cap came first."""
    spans = [(0, min(budget, length))]
    while spans[-1][1] < length and len(spans) < max_windows:
        start = spans[-1][0] + stride
        spans.append((start, min(start + budget, length)))
    return spans


class SequenceClassifier(nn.Module):
    """A decoder backbone (`model`) and a linear head (`score`) over pooled hidden states."""

    def __init__(self, backbone: LlamaModel, num_labels: int, pooling: str = "last"):
        super().__init__()
        self.model = backbone
        self.score = linear_head(backbone.config.hidden_size, num_labels, bias=False)
        self.pooling = pooling

    def forward(self, batch: dict[str, torch.Tensor], start_layer: int = 0) -> torch.Tensor:
        """Class logits (B, C) for a batch of right-padded `input_ids` (B, T) and `lengths` (B,).

        With `start_layer` > 0 the batch holds `hidden` (B, T, H): the cached output of the
        frozen layers below `start_layer`. With `documents` (R,), the batch's R rows are windows
        of its B texts (row r belongs to text `documents[r]`): a text's pooled state is the mean
        of its windows' (linear, the head gives the mean of their logits too).
        """
        pooled = document_mean(self.pool(batch, start_layer), batch.get("documents"))  # (R, H) -> (B, H)
        return self.score(pooled)  # (B, C)

    def pool(self, batch: dict[str, torch.Tensor], start_layer: int = 0) -> torch.Tensor:
        """The pooled hidden state (R, H) of each row of the batch: its last real token's, the mean, or its first token's."""
        lengths = batch["lengths"]
        if self.pooling == "first":  # an encoder's [CLS]; the last layer runs for that position alone
            return hidden_states(self.model, batch, start_layer, rows=torch.zeros_like(lengths))[:, 0]  # (R, H)
        if self.pooling == "mean":
            x = hidden_states(self.model, batch, start_layer)  # (R, T, H)
            real = padding_mask(lengths, x.shape[1])  # (R, T)
            return (x * real[..., None]).sum(1) / lengths[:, None]
        # The last layer runs for the last token alone: no other position reaches the head.
        return hidden_states(self.model, batch, start_layer, rows=lengths - 1)[:, 0]  # (R, 1, H) -> (R, H)


@dataclass
class TextInputs:
    """How a text task (classification, regression) reads and tokenizes its texts: the template,
    and what a text longer than `data.max_length` becomes (see `encode_long_texts`)."""

    template: str | None = None
    long_texts: str = "truncate"
    window_stride: int | None = None
    max_windows: int = 8

    def __post_init__(self) -> None:
        if self.long_texts not in LONG_TEXTS:
            raise FinegrainError(f"data.long_texts: '{self.long_texts}' is not one of {', '.join(LONG_TEXTS)}")

    @staticmethod
    def examples(inputs: Sequence[Any]) -> list:
        """Examples from the texts a caller passes (each a non-empty string)."""
        from finegrain.data.readers import Example

        examples = []
        for i, text in enumerate(inputs):
            if not isinstance(text, str) or not text.strip():
                raise FinegrainError(f"input:{i + 1}: expected a non-empty text, got {text!r}")
            examples.append(Example(text=text, label=None, source=f"input:{i + 1}"))
        return examples

    def encode(self, tokenizer, examples: Sequence[Any], max_length: int, target: Callable[[Any], Any]) -> list[Encoded]:
        """Items of the examples' texts (windows of long ones), with `target(label)` for labelled examples."""
        encoded = encode_long_texts(
            tokenizer, [e.text for e in examples], max_length, self.template, self.long_texts,
            self.window_stride, self.max_windows,
        )
        items = []
        for (rows, longer, truncated), e in zip(encoded, examples):
            row_lengths = [len(row) for row in rows] if len(rows) > 1 else None
            label = target(e.label) if e.label is not None else None
            items.append(Encoded([i for row in rows for i in row], label, row_lengths, longer, truncated, e.text))
        return items

    @staticmethod
    def long_text_counts(items: list[Encoded]) -> dict[str, int]:
        """How many items' texts were longer than `data.max_length`, and how many lost tokens."""
        return {"longer": sum(item.longer for item in items), "truncated": sum(item.truncated for item in items)}


def scale_temperature(probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(log p / T) of each row of probabilities (N, C), in float64 (a probability that
    underflowed to 0 stays the smallest); with p = softmax(z) this is softmax(z / T)."""
    return (probs.double().clamp_min(1e-300).log() / temperature).softmax(-1).to(probs.dtype)


def attach_temperature(task: Any, run_dir: str | Path) -> None:
    """Give a trained run's classifier the temperature `finegrain calibrate` stored with the run
    (`task.decode` scales the probabilities by it); nothing when the run was not calibrated."""
    temperature = rundir.read_temperature(run_dir)
    if temperature is not None:
        task.temperature = temperature


class Prediction(BaseModel):
    label: str | list[str] = Field(description="The label; a list of labels for a multi-label run.")
    probabilities: dict[str, Finite]


class ClassifyResponse(BaseModel):
    model: str
    predictions: list[Prediction]


class ClassificationTask:
    """Head, collate function, loss, predictions and metrics for text classification."""

    name = "classification"
    endpoint = Endpoint(
        "/v1/classify", TextsRequest, ClassifyResponse, "texts",
        "Label each text with a classification run: the label (labels, multi-label) and every label's probability.",
        read_texts,
    )
    peft_task_type = "SEQ_CLS"
    head_modules = ("score",)
    predicts_from_prefix = True

    def __init__(
        self, labels: list[str], multi_label: bool = False, head: HeadConfig | None = None, template: str | None = None,
        long_texts: str = "truncate", window_stride: int | None = None, max_windows: int = 8,
    ):
        """Args: the labels in head order; `long_texts`, `window_stride`, `max_windows`: see `encode_long_texts`."""
        self.labels = list(labels)
        self.texts = TextInputs(template, long_texts, window_stride, max_windows)
        self.headline_metric = "micro_f1" if multi_label else "accuracy"
        self.index = {label: i for i, label in enumerate(self.labels)}
        self.multi_label = multi_label
        self.head = head or HeadConfig()
        self.class_weights: torch.Tensor | None = None
        self.lexical: LexicalModel | None = None  # mixed into the probabilities (head.tfidf_mix)
        self.temperature = 1.0  # scales the final probabilities; `finegrain calibrate` fits it (rundir.TEMPERATURE)

    @classmethod
    def from_config(cls, config, labels: list[str]) -> ClassificationTask:
        data = config.data
        return cls(labels, data.multi_label, config.head, data.template, data.long_texts, data.window_stride, data.max_windows)

    # -- data ------------------------------------------------------------------------------

    @staticmethod
    def load_splits(data):
        from finegrain import datasets
        from finegrain.data.load import load_splits

        return load_splits(data, datasets_module=datasets)  # data sits below datasets: the loader comes from here

    def read_file(self, data, path: str, require_label: bool = True, skipped: list[str] | None = None) -> list:
        from finegrain.data.load import read_file
        from finegrain.data.readers import check_labels

        examples = kept(read_file(data, str(path), require_label), skipped)
        if require_label:
            examples = kept(check_labels(examples, self.labels, str(path), data.skip_bad_rows), skipped)
        if not examples:
            raise FinegrainError(f"{path}: no usable examples")
        return examples

    def examples_from_inputs(self, inputs, data) -> list:
        return self.texts.examples(inputs)

    def input_record(self, example) -> dict[str, Any]:
        return {"text": example.text}

    def gold(self, examples) -> list:
        return [e.label for e in examples]

    def encode(self, tokenizer, examples: list, max_length: int) -> list[Encoded]:
        return self.texts.encode(tokenizer, examples, max_length, self.target)

    def long_text_counts(self, items: list[Encoded]) -> dict[str, int]:
        return self.texts.long_text_counts(items)

    def target(self, label: Any) -> int | list[int]:
        if self.multi_label:
            return [self.index[x] for x in label]
        return self.index[label]

    def collate(self, items: list[Encoded], pad_id: int, hidden: list[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Right-pad a batch; with `hidden` (cached lower-layer states), pad those instead of ids."""
        batch = pad_inputs(items, pad_id, hidden)
        if items[0].target is not None:
            if self.multi_label:
                targets = torch.zeros(len(items), len(self.labels))
                for row, item in enumerate(items):
                    targets[row, item.target] = 1.0
                batch["targets"] = targets
            else:
                batch["targets"] = torch.tensor([item.target for item in items])
        return batch

    # -- model -----------------------------------------------------------------------------

    def build_model(self, llama, tokenizer=None) -> SequenceClassifier:
        return SequenceClassifier(llama.model, len(self.labels), self.head.pooling)

    def set_class_weights(self, train: list[Encoded]) -> None:
        counts = Counter(t for e in train for t in (e.target if self.multi_label else [e.target]))
        self.class_weights = class_weights(self.head.class_weights, self.labels, counts)

    def loss(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        targets = batch["targets"]
        if self.multi_label:
            return F.binary_cross_entropy_with_logits(logits, targets, pos_weight=self.class_weights)
        return F.cross_entropy(logits, targets, weight=self.class_weights, label_smoothing=self.head.label_smoothing)

    def loss_weight(self, batch: dict[str, torch.Tensor]) -> float:
        """Multi-label: the texts (each row of targets one text, however many windows it runs as);
        single-label: the labelled texts, by their class weights."""
        if self.multi_label:
            return float(batch["targets"].shape[0])
        return labelled_weight(batch, self.class_weights)

    # -- outputs ---------------------------------------------------------------------------

    def predict(self, model, items: list, pad_id: int, batch_size: int = 64, hidden=None, start_layer: int = 0,
                progress: str | None = None) -> list[dict[str, Any]]:
        return predict_scores(self, model, items, pad_id, batch_size, hidden, start_layer, progress)

    def describe(self) -> dict[str, Any]:
        return {"labels": self.labels, "multi_label": self.multi_label}

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.float().sigmoid() if self.multi_label else logits.float().softmax(-1)

    def final_probabilities(self, probs: torch.Tensor, items: list | None = None) -> torch.Tensor:
        """The probabilities a prediction carries, from the model's.

        With the run's TF-IDF model (`lexical`) and the `items` (which carry the texts), its
        probabilities are mixed in first; then a calibrated run's `temperature` scales the result:
        softmax(log p / T), which is softmax(logits / T) without a mix and never moves the argmax.
        """
        if self.lexical is not None and items is not None:
            probs = self.lexical.mix(probs, [item.text for item in items])
        if self.temperature != 1.0 and not self.multi_label:
            probs = scale_temperature(probs, self.temperature)
        return probs

    def decode(self, probs: torch.Tensor, items: list | None = None, mixed: bool = True) -> list[dict[str, Any]]:
        """Per example: the label (or labels) and the probability of every label, from the model's
        probabilities (`final_probabilities` mixes a TF-IDF model in, given the `items` and unless
        `mixed` is False, and applies the temperature)."""
        probs = self.final_probabilities(probs, items if mixed else None)
        results = []
        for row in probs.tolist():
            scores = dict(zip(self.labels, (round(p, 6) for p in row)))
            if self.multi_label:
                label: Any = [l for l, p in zip(self.labels, row) if p >= self.head.threshold]
            else:
                label = self.labels[max(range(len(row)), key=row.__getitem__)]
            results.append({"label": label, "probabilities": scores})
        return results

    def metrics(self, predictions: list[dict[str, Any]], gold: list[Any]) -> dict[str, Any]:
        from finegrain.evaluate.metrics import calibration_metrics, classification_metrics, multilabel_metrics

        predicted = [p["label"] for p in predictions]
        if self.multi_label:
            return multilabel_metrics(gold, predicted, self.labels)
        metrics = classification_metrics(gold, predicted, self.labels)
        if predictions and all("probabilities" in p for p in predictions):
            probabilities = [[p["probabilities"][label] for label in self.labels] for p in predictions]
            metrics["calibration"] = calibration_metrics(gold, probabilities, self.labels)
        return metrics

    def write_report(self, run_dir: Path, metrics: dict[str, Any], split: str, title: str) -> None:
        from finegrain.evaluate.report import write_classification_report

        write_classification_report(run_dir, metrics, split_name=split, title=title)

    @staticmethod
    def report_text(metrics: dict[str, Any]) -> str:
        from finegrain.evaluate.report import format_report_text

        return format_report_text(metrics)
