"""Sequence classification: a linear head on the last real token (or the mean) of a decoder.

Single-label (softmax, cross-entropy with optional label smoothing and class weights) or
multi-label (sigmoid, binary cross-entropy, a decision threshold). The module layout,
`model` + `score`, is Hugging Face's `LlamaForSequenceClassification`, so PEFT-format
adapters saved from it load onto `transformers`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from finegrain.config import HeadConfig
from finegrain.errors import FinegrainError
from finegrain.model.llama import LlamaModel
from finegrain.tasks import Task, class_weights, document_mean, pad_inputs


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
        return [([ids[:max_length]], len(ids) > max_length, len(ids) > max_length) for ids in tokenizer.encode_batch(texts)]
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
        self.score = nn.Linear(backbone.config.hidden_size, num_labels, bias=False)
        nn.init.normal_(self.score.weight, std=backbone.config.hidden_size**-0.5)
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
        """The pooled hidden state (R, H) of each row of the batch: its last real token's or the mean."""
        lengths = batch["lengths"]
        x = batch["hidden"] if start_layer else self.model.embed_tokens(batch["input_ids"])  # (R, T, H)
        T = x.shape[1]
        real = torch.arange(T, device=x.device)[None, :] < lengths[:, None]  # (R, T)
        # Right padding cannot reach real tokens under a causal mask, so none is needed there.
        mask = None if self.model.config.causal else real
        if self.pooling == "mean":
            x = self.model.norm(self.model.run_layers(x, attention_mask=mask, start=start_layer))
            return (x * real[..., None]).sum(1) / lengths[:, None]
        # The last layer runs for the last token alone: no other position reaches the head.
        last = self.model.run_layers(x, attention_mask=mask, start=start_layer, rows=lengths - 1)  # (R, 1, H)
        return self.model.norm(last[:, 0])


class ClassificationTask(Task):
    """Head, collate function, loss, predictions and metrics for text classification."""

    name = "classification"
    peft_task_type = "SEQ_CLS"

    def __init__(
        self, labels: list[str], multi_label: bool = False, head: HeadConfig | None = None, template: str | None = None,
        long_texts: str = "truncate", window_stride: int | None = None, max_windows: int = 8,
    ):
        """Args: the labels in head order; `long_texts`, `window_stride`, `max_windows`: see `encode_long_texts`."""
        self.labels = list(labels)
        self.template = template
        if long_texts not in LONG_TEXTS:
            raise FinegrainError(f"data.long_texts: '{long_texts}' is not one of {', '.join(LONG_TEXTS)}")
        self.long_texts, self.window_stride, self.max_windows = long_texts, window_stride, max_windows
        self.headline_metric = "micro_f1" if multi_label else "accuracy"
        self.index = {label: i for i, label in enumerate(self.labels)}
        self.multi_label = multi_label
        self.head = head or HeadConfig()
        self.class_weights: torch.Tensor | None = None

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

    def read_file(self, data, path: str, require_label: bool = True) -> list:
        from finegrain.data.load import read_file
        from finegrain.data.readers import check_labels

        examples = read_file(data, str(path), require_label).examples
        if require_label:
            examples = check_labels(examples, self.labels, str(path), data.skip_bad_rows).examples
        if not examples:
            raise FinegrainError(f"{path}: no usable examples")
        return examples

    def examples_from_inputs(self, inputs, data) -> list:
        from finegrain.data.readers import Example

        examples = []
        for i, text in enumerate(inputs):
            if not isinstance(text, str) or not text.strip():
                raise FinegrainError(f"input:{i + 1}: expected a non-empty text, got {text!r}")
            examples.append(Example(text=text, label=None, source=f"input:{i + 1}"))
        return examples

    def encode(self, tokenizer, examples: list, max_length: int) -> list[Encoded]:
        encoded = encode_long_texts(
            tokenizer, [e.text for e in examples], max_length, self.template, self.long_texts,
            self.window_stride, self.max_windows,
        )
        items = []
        for (rows, longer, truncated), e in zip(encoded, examples):
            target = self.target(e.label) if e.label is not None else None
            row_lengths = [len(row) for row in rows] if len(rows) > 1 else None
            items.append(Encoded([i for row in rows for i in row], target, row_lengths, longer, truncated))
        return items

    def long_text_counts(self, items: list[Encoded]) -> dict[str, int]:
        """How many items' texts were longer than `data.max_length`, and how many lost tokens."""
        return {"longer": sum(item.longer for item in items), "truncated": sum(item.truncated for item in items)}

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

    # -- outputs ---------------------------------------------------------------------------

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.float().sigmoid() if self.multi_label else logits.float().softmax(-1)

    def decode(self, probs: torch.Tensor, items: list | None = None) -> list[dict[str, Any]]:
        """Per example: the label (or labels) and the probability of every label."""
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
        from finegrain.evaluate.metrics import classification_metrics, multilabel_metrics

        predicted = [p["label"] for p in predictions]
        if self.multi_label:
            return multilabel_metrics(gold, predicted, self.labels)
        return classification_metrics(gold, predicted, self.labels)


class RegressionTask(ClassificationTask):
    """A number per text: one output on the last real token, mean squared error.

    The head predicts the target standardised by the training data's mean and standard
    deviation (kept in `labels.json` as `["<label field>", mean, std]`), so its initial
    outputs are already on the targets' scale whatever their units.
    """

    name = "regression"
    peft_task_type = "SEQ_CLS"

    def __init__(
        self, labels: list, head: HeadConfig | None = None, template: str | None = None, long_texts: str = "truncate",
        window_stride: int | None = None, max_windows: int = 8,
    ):
        super().__init__(["score"], False, head, template, long_texts, window_stride, max_windows)
        self.headline_metric = "neg_mse"  # selecting needs "higher is better"; metrics also hold mse, r2, pearson
        self.labels = list(labels)
        self.mean = float(labels[1]) if len(labels) > 1 else 0.0
        self.std = float(labels[2]) if len(labels) > 2 else 1.0

    @classmethod
    def from_config(cls, config, labels: list) -> RegressionTask:
        data = config.data
        return cls(labels, config.head, data.template, data.long_texts, data.window_stride, data.max_windows)

    @staticmethod
    def load_splits(data):
        from finegrain import datasets
        from finegrain.data.load import load_splits

        splits = load_splits(data, regression=True, datasets_module=datasets)
        values = torch.tensor([e.label for e in splits.train], dtype=torch.float64)
        std = float(values.std()) if len(values) > 1 else 1.0
        splits.labels = [data.label_field, round(float(values.mean()), 6), round(std if std > 0 else 1.0, 6)]
        return splits

    def read_file(self, data, path: str, require_label: bool = True) -> list:
        from finegrain.data.load import read_file

        examples = read_file(data, str(path), require_label, regression=True).examples
        if not examples:
            raise FinegrainError(f"{path}: no usable examples")
        return examples

    def target(self, label: Any) -> float:
        return (float(label) - self.mean) / self.std

    def collate(self, items: list[Encoded], pad_id: int, hidden: list[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        batch = pad_inputs(items, pad_id, hidden)
        if items[0].target is not None:
            batch["targets"] = torch.tensor([item.target for item in items], dtype=torch.float32)
        return batch

    def build_model(self, llama, tokenizer=None) -> SequenceClassifier:
        return SequenceClassifier(llama.model, 1, self.head.pooling)

    def set_class_weights(self, train: list[Encoded]) -> None:
        if self.head.class_weights is not None:
            raise FinegrainError("head.class_weights: regression has no classes; remove the key")

    def loss(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.mse_loss(logits[:, 0], batch["targets"])

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.float()[:, 0] * self.std + self.mean  # back in the targets' units

    def decode(self, values: torch.Tensor, items: list | None = None) -> list[dict[str, Any]]:
        """Per example: the predicted `value`."""
        return [{"value": round(v, 6)} for v in values.tolist()]

    def metrics(self, predictions: list[dict[str, Any]], gold: list[Any]) -> dict[str, Any]:
        from finegrain.evaluate.metrics import regression_metrics

        truth = [float(g) for g in gold]
        predicted = [p["value"] for p in predictions]
        metrics = regression_metrics(truth, predicted)
        metrics["neg_mse"] = -metrics["mse"]
        metrics["by_range"] = _by_range(truth, predicted)
        return metrics

    def write_report(self, run_dir, metrics: dict[str, Any], split: str, title: str) -> None:
        """report.md/html: the error and correlation figures, and predictions by range of the true value (PNG)."""
        from finegrain.evaluate.report import Table, plot_bars, write_report

        ranges = metrics["by_range"]
        names = [f"{r['low']:.2f} to {r['high']:.2f}" for r in ranges]
        plot_bars(
            run_dir / "by_range.png", f"{split}: mean prediction by range of the true value", names,
            {"mean predicted": [r["mean_predicted"] for r in ranges]}, "value", [r["mean_true"] for r in ranges],
        )
        keys = ("mse", "rmse", "mae", "r2", "pearson", "spearman")
        summary = f"split: {split} · {metrics['num_examples']:,} examples · " + " · ".join(
            f"{k} {metrics[k]:.4f}" for k in keys if metrics[k] is not None
        )
        rows = [[n, r["count"], r["mean_true"], r["mean_predicted"], r["mae"]] for n, r in zip(names, ranges)]
        table = Table("By range of the true value", ["true value", "examples", "mean true", "mean predicted", "mae"], rows)
        write_report(run_dir, title, summary, [table], [("by_range.png", "Mean prediction by range of the true value")])


def _by_range(truth: list[float], predicted: list[float], bins: int = 5) -> list[dict[str, Any]]:
    """Examples grouped into (at most) `bins` equal-count ranges of the true value: count, means, MAE.

    Shows what a single correlation hides: predictions pulled towards the mean at the extremes.
    """
    order = sorted(range(len(truth)), key=truth.__getitem__)
    groups = [order[len(order) * b // bins : len(order) * (b + 1) // bins] for b in range(bins)]
    rows = []
    for group in (g for g in groups if g):
        t, p = [truth[i] for i in group], [predicted[i] for i in group]
        rows.append({
            "low": t[0], "high": t[-1], "count": len(group), "mean_true": sum(t) / len(t),
            "mean_predicted": sum(p) / len(p), "mae": sum(abs(a - b) for a, b in zip(t, p)) / len(t),
        })
    return rows
