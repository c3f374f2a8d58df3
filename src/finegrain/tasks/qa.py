"""Extractive question answering: start and end logits on every token, answers as character spans.

Input. A decoder reads left to right, so the question comes first and every context token
has seen it: `[bos] "Question: {question}\\nContext:\\n" <context tokens> "\\nAnswer:"`. A
context longer than the room `data.max_length` leaves is cut into overlapping windows, each
repeating the whole question; consecutive windows share `qa.stride` context tokens, so an
answer cut by one window's edge is whole in the next. Each window is one item.

Head. The token classifier of `tasks/tokens.py` with two outputs: column 0 scores each token
as the answer's first token, column 1 as its last. The window's last token (the end of
"Answer:", which has read everything in both attention modes) stands for "no answer": its
start and end scores make the null span (SQuAD v2 style). Training targets are the gold
answer's first and last token in the window that holds it whole, and the null span in every
other window and for unanswerable questions; the loss is the mean of the start and end
cross-entropies over the window's context tokens and the null token.

Decoding. In each window, start and end scores are log-softmaxed over the context tokens and
the null token; a span (i, j) of context tokens with i <= j < i + `qa.max_answer_length` and
neither end a whitespace-only token scores log P(start=i) + log P(end=j). The best span over
all windows of a question is compared with the null span of the window least sure there is
no answer (the smallest null score, as Hugging Face's SQuAD v2 post-processing): no answer
when it scores `qa.null_threshold` more. The answer's text is the context between the span's
tokens' character offsets (from the tokenizer), without surrounding whitespace, so `start`
and `end` index the original context exactly, whatever its unicode or spacing.

The head is `score` (a `Linear` with bias, as in `LlamaForTokenClassification`); adapters are
saved with PEFT's `task_type="QUESTION_ANS"`. Transformers' `LlamaForQuestionAnswering` calls
the decoder `transformer` and the head `qa_outputs`, so its keys differ from ours.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import groupby
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field

from finegrain.data.squad import QAExample, load_qa_splits, read_squad
from finegrain.errors import FinegrainError
from finegrain.tasks.base import Endpoint, kept, pad_inputs, predict_scores
from finegrain.tasks.schemas import Finite, ModelName, NonEmptyText, Strict
from finegrain.tasks.tokens import TokenClassifier

QUESTION = "Question: {question}\nContext:\n"
ANSWER_CUE = "\nAnswer:"


@dataclass
class QAWindow:
    """One window of one question's context, ready for the model.

    Attributes:
        input_ids: question prefix, the window's context tokens, the answer cue.
        index: the question's position in the list `encode` was given (windows of one question are adjacent).
        example: the question.
        context_start: the position in `input_ids` of the window's first context token.
        offsets: (start, end) characters in `example.context` of each context token of the window.
        target: (start, end) positions of the gold answer's first and last token in `input_ids`,
            the null position (the last) twice when the window does not hold it, None unlabelled.
    """

    input_ids: list[int]
    index: int
    example: QAExample
    context_start: int
    offsets: list[tuple[int, int]]
    target: tuple[int, int] | None


def window_starts(num_tokens: int, room: int, stride: int) -> list[int]:
    """First context token of each window: `room` tokens per window, `stride` shared by neighbours."""
    starts = [0]
    while starts[-1] + room < num_tokens:
        starts.append(starts[-1] + room - stride)
    return starts


def answer_tokens(example: QAExample, offsets: Sequence[tuple[int, int]]) -> tuple[int, int] | None:
    """Indices of the first and last context token of the first gold answer (whitespace around it
    left out), or None for an unanswerable or unlabelled question."""
    if not example.answers:
        return None
    text, start = example.answers[0]
    first_char = start + len(text) - len(text.lstrip())
    end_char = start + len(text.rstrip())
    first = next(k for k, (_, end) in enumerate(offsets) if end > first_char)
    last = max(k for k, (begin, _) in enumerate(offsets) if begin < end_char)
    return first, last


class QAItem(Strict):
    question: NonEmptyText
    context: NonEmptyText


class QARequest(Strict):
    items: list[QAItem] = Field(min_length=1, description="Questions about contexts (at most --max-texts).")
    model: ModelName | None = Field(None, description="The QA run to use (see /v1/models).")


class Answer(BaseModel):
    answer: str = Field(description="The answer span of the context.")
    start: int | None = Field(description="Its character offset in the context.")
    end: int | None = Field(description="Character offset just past it (exclusive).")
    score: Finite


class QAResponse(BaseModel):
    model: str
    predictions: list[Answer]


def read_qa_request(body: QARequest) -> tuple[list, list[tuple[str, str]]]:
    """The items as `examples_from_inputs` takes them ({"question", "context"}) and their texts."""
    texts = [(f"items.{i}.{key}", getattr(item, key)) for i, item in enumerate(body.items) for key in ("question", "context")]
    return [item.model_dump() for item in body.items], texts


class QATask:
    """Windows, collate function, loss, span decoding and SQuAD metrics for extractive QA.

    Args:
        stride: context tokens shared by consecutive windows.
        max_answer_length: the longest answer, in tokens.
        no_answer: whether "no answer" may be predicted (False for SQuAD v1.1-style data).
        null_threshold: how much more (log-probability) the null span must score than the best span.
    """

    name = "qa"
    endpoint = Endpoint(
        "/v1/qa", QARequest, QAResponse, "items", "Answer each question with a span of its context, with an extractive QA run.",
        read_qa_request,
    )
    headline_metric = "f1"
    peft_task_type = "QUESTION_ANS"
    head_modules = ("score",)
    predicts_from_prefix = True

    def __init__(
        self, stride: int = 128, max_answer_length: int = 30, no_answer: bool = True, null_threshold: float = 0.0
    ):
        self.stride, self.max_answer_length = stride, max_answer_length
        self.no_answer, self.null_threshold = no_answer, null_threshold
        self.labels = []
        self.output_length = 0  # the longest `max_length` encoded so far: predict_outputs stacks rows this wide

    @classmethod
    def from_config(cls, config, labels: list) -> QATask:
        qa = config.qa
        if qa.stride < 0:
            raise FinegrainError(f"qa.stride: {qa.stride} must be 0 or more (context tokens shared by windows)")
        if qa.max_answer_length < 1:
            raise FinegrainError(f"qa.max_answer_length: {qa.max_answer_length} must be at least 1 token")
        if qa.stride >= config.data.max_length:
            raise FinegrainError(
                f"qa.stride: {qa.stride} must be below data.max_length={config.data.max_length}; "
                "lower it or raise data.max_length"
            )
        if config.head.class_weights is not None or config.head.label_smoothing:
            key = "head.class_weights" if config.head.class_weights is not None else "head.label_smoothing"
            raise FinegrainError(f"{key}: task qa has no classes to weight or smooth; remove the key")
        if config.data.template is not None:
            raise FinegrainError(
                "data.template: task qa writes its own 'Question: ... Context: ...' prompt; remove the key"
            )
        return cls(qa.stride, qa.max_answer_length, qa.no_answer, qa.null_threshold)

    # -- data ------------------------------------------------------------------------------

    @staticmethod
    def load_splits(data):
        return load_qa_splits(data)

    def read_file(self, data, path: str, require_label: bool = True, skipped: list[str] | None = None) -> list[QAExample]:
        examples = kept(read_squad(path, data.skip_bad_rows, require_answers=require_label), skipped)
        if not examples:
            raise FinegrainError(f"{path}: no usable questions")
        return examples

    def examples_from_inputs(self, inputs: Sequence[Any], data) -> list[QAExample]:
        """Questions to answer: `{"question": ..., "context": ...}` dicts (an `id` is kept), the same
        as a JSON text (one line of `finegrain predict RUN --input -`), or `QAExample`s as they are."""
        examples = []
        for i, value in enumerate(inputs):
            source = f"input:{i + 1}"
            if isinstance(value, QAExample):
                examples.append(value)
                continue
            if isinstance(value, str):
                try:
                    value = json.loads(value)
                except json.JSONDecodeError:
                    value = None
            if not isinstance(value, dict):
                shown = str(inputs[i])[:60]
                raise FinegrainError(f'{source}: expected {{"question": ..., "context": ...}}, got {shown!r}')
            question, context = value.get("question"), value.get("context")
            for key, text in (("question", question), ("context", context)):
                if not isinstance(text, str) or not text.strip():
                    raise FinegrainError(f"{source}: '{key}' must be a non-empty text")
            examples.append(QAExample(question, context, None, str(value.get("id", source)), source))
        return examples

    def input_record(self, example: QAExample) -> dict[str, Any]:
        return {"id": example.id, "question": example.question}

    def gold(self, examples: Sequence[QAExample]) -> list[dict[str, Any]]:
        """Per question: the gold answer texts and the context's length in words (for the breakdown)."""
        return [{"answers": e.label, "context_words": len(e.context.split())} for e in examples]

    def encode(self, tokenizer, examples: Sequence[QAExample], max_length: int) -> list[QAWindow]:
        """Cut each question's context into windows of at most `max_length` tokens with their question."""
        self.output_length = max(self.output_length, max_length)
        bos = [tokenizer.bos_token_id] if tokenizer.add_bos and tokenizer.bos_token_id is not None else []
        cue = tokenizer.encode(ANSWER_CUE, add_special_tokens=False)
        questions = tokenizer.encode_batch(
            [QUESTION.format(question=e.question) for e in examples], add_special_tokens=False
        )
        contexts = tokenizer.encode_with_offsets([e.context for e in examples])
        items = []
        for index, (ex, question, (ids, offsets)) in enumerate(zip(examples, questions, contexts)):
            prefix = bos + question
            room = max_length - len(prefix) - len(cue)
            if room <= self.stride:
                raise FinegrainError(
                    f"{ex.source}: the question and prompt take {len(prefix) + len(cue)} of "
                    f"data.max_length={max_length} tokens, leaving {max(room, 0)} for the context, not more than qa.stride={self.stride}; "
                    "raise data.max_length or lower qa.stride"
                )
            gold = answer_tokens(ex, offsets)
            for begin in window_starts(len(ids), room, self.stride):
                end = min(begin + room, len(ids))
                input_ids = prefix + ids[begin:end] + cue
                null = len(input_ids) - 1
                target = None
                if gold is not None and begin <= gold[0] and gold[1] < end:
                    target = (len(prefix) + gold[0] - begin, len(prefix) + gold[1] - begin)
                elif ex.answers is not None:
                    target = (null, null)
                items.append(QAWindow(input_ids, index, ex, len(prefix), offsets[begin:end], target))
        return items

    def collate(
        self, items: list[QAWindow], pad_id: int, hidden: list[torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """Right-pad a batch (or its cached lower-layer states); `span_mask` (B, T) marks the positions
        an answer may start or end at (context tokens and the null token); `starts`/`ends` (B,) the targets."""
        batch = pad_inputs(items, pad_id, hidden)
        T = int(batch["lengths"].max())
        batch["output_length"] = torch.tensor(max(self.output_length, T))
        span_mask = torch.zeros(len(items), T, dtype=torch.bool)
        for row, item in enumerate(items):
            span_mask[row, item.context_start : item.context_start + len(item.offsets)] = True
            span_mask[row, len(item.input_ids) - 1] = True
        batch["span_mask"] = span_mask
        if items[0].target is not None:
            batch["starts"] = torch.tensor([item.target[0] for item in items])
            batch["ends"] = torch.tensor([item.target[1] for item in items])
        return batch

    # -- model -----------------------------------------------------------------------------

    def build_model(self, llama, tokenizer=None) -> TokenClassifier:
        return TokenClassifier(llama.model, 2)

    def set_class_weights(self, train: list[QAWindow]) -> None:
        """Nothing to weigh: QA has no classes (`from_config` refuses `head.class_weights`)."""

    def long_text_counts(self, items: list[QAWindow]) -> None:
        return None  # long contexts are read whole, in windows (`qa.stride`)

    def loss_weight(self, batch: dict[str, torch.Tensor]) -> float:
        """The windows: each has one start and one end target."""
        return float(len(batch["lengths"]))

    def loss(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean of the start and end cross-entropies over each window's possible positions."""
        span_mask = batch["span_mask"]  # (B, T)
        logits = logits[:, : span_mask.shape[1]].masked_fill(~span_mask[..., None], float("-inf"))  # (B, T, 2)
        return (F.cross_entropy(logits[..., 0], batch["starts"]) + F.cross_entropy(logits[..., 1], batch["ends"])) / 2

    # -- outputs ---------------------------------------------------------------------------

    def predict(self, model, items: list, pad_id: int, batch_size: int = 64, hidden=None, start_layer: int = 0,
                progress: str | None = None) -> list[dict[str, Any]]:
        return predict_scores(self, model, items, pad_id, batch_size, hidden, start_layer, progress)

    def describe(self) -> dict[str, Any]:
        return {}  # no labels: answers are spans of the context

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """The start/end logits (N, T, 2) as they are: `decode` normalises them per window."""
        return logits.float()

    def decode(self, logits: torch.Tensor, items: Sequence[QAWindow]) -> list[dict[str, Any]]:
        """One answer per question from its windows' start/end logits (N, T, 2).

        Returns:
            Per question: `answer` (text, "" for no answer), `start` and `end` (characters of the
            context, `end` exclusive; None for no answer) and `score` (the answer's probability,
            P(start) * P(end), in the window it was read from).
        """
        results = []
        for _, windows in groupby(zip(logits, items), key=lambda pair: pair[1].index):
            best = (-math.inf, None, None)  # (log-probability, window, (i, j))
            null = math.inf
            for row, item in windows:
                span_score, span, null_score = self._window_scores(row, item)
                null = min(null, null_score)
                if span_score > best[0]:
                    best = (span_score, item, span)
            score, item, span = best
            if item is None or (self.no_answer and null - score > self.null_threshold):
                results.append({"answer": "", "start": None, "end": None, "score": round(math.exp(null), 6)})
                continue
            context = item.example.context
            start, end = item.offsets[span[0]][0], item.offsets[span[1]][1]
            start += len(context[start:end]) - len(context[start:end].lstrip())
            end -= len(context[start:end]) - len(context[start:end].rstrip())
            answer = context[start:end]
            results.append({"answer": answer, "start": start, "end": end, "score": round(math.exp(score), 6)})
        return results

    def _window_scores(self, row: torch.Tensor, item: QAWindow) -> tuple[float, tuple[int, int] | None, float]:
        """(log-probability of the best span, its context token indices, log-probability of the null span)."""
        length, first, n = len(item.input_ids), item.context_start, len(item.offsets)
        possible = torch.zeros(length, dtype=torch.bool)
        possible[first : first + n] = True
        possible[length - 1] = True
        log_probs = row[:length].masked_fill(~possible[:, None], -math.inf).log_softmax(0)  # (T, 2)
        null = float(log_probs[length - 1].sum())
        context = item.example.context
        words = torch.tensor([bool(context[s:e].strip()) for s, e in item.offsets])  # (n,) not whitespace only
        spans = log_probs[first : first + n, 0, None] + log_probs[None, first : first + n, 1]  # (n, n): start i, end j
        i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
        allowed = (j >= i) & (j - i < self.max_answer_length) & words[:, None] & words[None, :]
        spans = spans.masked_fill(~allowed, -math.inf)
        if n == 0 or not bool(allowed.any()):
            return -math.inf, None, null
        flat = int(spans.argmax())
        return float(spans.view(-1)[flat]), (flat // n, flat % n), null

    def metrics(self, predictions: list[dict[str, Any]], gold: list[dict[str, Any]]) -> dict[str, Any]:
        """SQuAD v2.0 exact match and F1 (fractions), overall, for has-answer / no-answer questions, by length."""
        from finegrain.evaluate.squad import squad_metrics

        if any(g["answers"] is None for g in gold):
            raise FinegrainError("qa metrics need gold answers (or is_impossible) for every question")
        return squad_metrics(
            [p["answer"] for p in predictions], [g["answers"] for g in gold], [g["context_words"] for g in gold]
        )

    def write_report(self, run_dir, metrics: dict[str, Any], split: str, title: str) -> None:
        from finegrain.evaluate.squad import write_qa_report

        write_qa_report(run_dir, metrics, split, title)

    @staticmethod
    def report_text(metrics: dict[str, Any]) -> str:
        from finegrain.evaluate.squad import format_qa_text

        return format_qa_text(metrics)
