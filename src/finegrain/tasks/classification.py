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
from finegrain.tasks import class_weights, pad_inputs


@dataclass
class Encoded:
    """One tokenized example: token ids and the label as class index (or indices)."""

    input_ids: list[int]
    target: int | list[int] | None


def encode_texts(tokenizer, texts: list[str], max_length: int, template: str | None = None) -> list[list[int]]:
    """Token ids of each text, at most `max_length`, wrapped in `template` ("... {text} ...").

    Only the text is truncated, so the template's words (often the cue the last token reads,
    like "Sentiment:") always stay in full.
    """
    bos = [tokenizer.bos_token_id] if tokenizer.add_bos else []
    if template is None:
        return [ids[:max_length] for ids in tokenizer.encode_batch(texts)]
    before, after = template.split("{text}")
    prefix = bos + (tokenizer.encode(before, add_special_tokens=False) if before else [])
    suffix = tokenizer.encode(after, add_special_tokens=False) if after else []
    budget = max_length - len(prefix) - len(suffix)
    if budget < 1:
        raise FinegrainError(
            f"data.template: takes {len(prefix) + len(suffix)} tokens, leaving no room for the text within "
            f"data.max_length={max_length}; raise data.max_length or shorten the template"
        )
    return [prefix + ids[:budget] + suffix for ids in tokenizer.encode_batch(texts, add_special_tokens=False)]


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
        frozen layers below `start_layer`.
        """
        lengths = batch["lengths"]
        x = batch["hidden"] if start_layer else self.model.embed_tokens(batch["input_ids"])  # (B, T, H)
        B, T, _ = x.shape
        real = torch.arange(T, device=x.device)[None, :] < lengths[:, None]  # (B, T)
        # Right padding cannot reach real tokens under a causal mask, so none is needed there.
        mask = None if self.model.config.causal else real
        x = self.model.norm(self.model.run_layers(x, attention_mask=mask, start=start_layer))
        if self.pooling == "mean":
            pooled = (x * real[..., None]).sum(1) / lengths[:, None]
        else:
            pooled = x[torch.arange(B, device=x.device), lengths - 1]  # (B, H)
        return self.score(pooled)


class ClassificationTask:
    """Head, collate function, loss, predictions and metrics for text classification."""

    name = "classification"
    peft_task_type = "SEQ_CLS"

    def __init__(
        self, labels: list[str], multi_label: bool = False, head: HeadConfig | None = None, template: str | None = None
    ):
        self.labels = list(labels)
        self.template = template
        self.headline_metric = "micro_f1" if multi_label else "accuracy"
        self.index = {label: i for i, label in enumerate(self.labels)}
        self.multi_label = multi_label
        self.head = head or HeadConfig()
        self.class_weights: torch.Tensor | None = None

    # -- data ------------------------------------------------------------------------------

    def encode(self, tokenizer, examples: list, max_length: int) -> list[Encoded]:
        ids = encode_texts(tokenizer, [e.text for e in examples], max_length, self.template)
        return [Encoded(i, self.target(e.label) if e.label is not None else None) for i, e in zip(ids, examples)]

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

    def build_model(self, backbone: LlamaModel) -> SequenceClassifier:
        return SequenceClassifier(backbone, len(self.labels), self.head.pooling)

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
