"""Relation extraction: a text with two entity spans -> the relation between them.

Entity markers. The text is encoded with `<e1>`, `</e1>` around the head and `<e2>`, `</e2>`
around the tail (Baldini Soares et al., 2019, "Matching the Blanks"). The four markers are
special tokens added to the tokenizer, but the base model's embedding matrix stays untouched:
their embeddings live in the task model's own `marker_embeddings` (4, H), trained and saved with
the head, so a run's adapter is LoRA plus two small modules and a server can hold many runs on
one shared base. A start marker goes before the spaces in front of its entity ("The<e1> cat</e1>"),
so the entity keeps the tokens it has inside a sentence (" cat", not "cat").

Pooling. The head reads the final hidden states at the two end markers, `</e1>` and `</e2>`,
concatenated (B, 2H), through one linear layer `score`. Under the causal mask of a decoder a
start marker has not yet seen its entity, while an end marker has seen all of it (and the
second entity's end marker has seen both entities and the words between them); with
`model.bidirectional: true` every position sees the whole text and the end markers remain
the entities' own positions, so one choice serves both.

Long texts. Ids are cut to `data.max_length` around the entities: the window keeps both
entities with their markers and as much of the text before them as fits, then dropping what
follows the last entity first (under a causal mask it cannot reach the pooled positions).
Entities too far apart for the window keep only the words next to each entity; two entities
that alone take more than `data.max_length` tokens are an error that names the example.

Metrics. Precision, recall and F1 micro-averaged over the relation labels, leaving out the
no-relation label (`relation.no_relation`, "Other"), the usual relation-extraction score and
the headline `f1`; the per-relation table, the macro and weighted averages over the same labels,
accuracy over all labels, and for SemEval-style directed labels the task's official score
(`semeval_f1`, see `semeval_official_score`).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field
from torch import nn

from finegrain.config import HeadConfig
from finegrain.data.readers import check_labels
from finegrain.data.relation import (
    MARKERS, RelationExample, example_from_input, load_relation_splits, read_relation_file,
)
from finegrain.errors import FinegrainError
from finegrain.model.backbone import hidden_states
from finegrain.model.llama import LlamaModel
from finegrain.tasks.base import Endpoint, class_weights, kept, labelled_weight, linear_head, pad_inputs, predict_scores
from finegrain.tasks.schemas import Finite, ModelName, NonEmptyText, Strict, whole

_DIRECTED = re.compile(r"^(.+)\((e1,e2|e2,e1)\)$")


@dataclass
class RelationEncoded:
    """One tokenized example.

    Attributes:
        input_ids: token ids with the four markers, at most `max_length`.
        positions: the indices of `</e1>` and `</e2>` in `input_ids`, read by the head.
        target: the relation's class index; None unlabelled (or labelled with an unknown relation).
        example: the example, for the spans in the prediction.
    """

    input_ids: list[int]
    positions: tuple[int, int]
    target: int | None
    example: RelationExample


def marker_ids(tokenizer) -> list[int]:
    """The ids of `<e1> </e1> <e2> </e2>`, added to the tokenizer as special tokens if it lacks them."""
    return tokenizer.add_special_tokens(MARKERS)


def marked_text(example: RelationExample) -> str:
    """The example's text with `<e1>`...`</e1>` around the head and `<e2>`...`</e2>` around the tail.

    A start marker moves in front of the whitespace before its entity (never into the other
    entity): "The<e1> cat</e1> sat" tokenizes " cat" as in the plain sentence.
    """
    text = example.text
    spans = (example.head, example.tail)
    inserts = []  # (position, 0 for an end marker and 1 for a start marker, marker)
    for (start, end), (open_marker, close_marker) in zip(spans, (MARKERS[:2], MARKERS[2:])):
        floor = max((e for _, e in spans if e <= start), default=0)
        while start > floor and text[start - 1].isspace():
            start -= 1
        inserts += [(start, 1, open_marker), (end, 0, close_marker)]
    pieces, last = [], 0
    for position, _, marker in sorted(inserts):
        pieces += [text[last:position], marker]
        last = position
    pieces.append(text[last:])
    return "".join(pieces)


def fit_window(ids: list[int], markers: Sequence[int], budget: int, source: str) -> list[int]:
    """At most `budget` of `ids`, keeping both entities and their four markers.

    The window keeps as much text before the entities as fits and cuts what follows them
    first; when the entities are too far apart, the text between them is cut in the middle.

    Raises:
        FinegrainError: the two entities with their markers alone are longer than `budget`.
    """
    if len(ids) <= budget:
        return ids
    first_open, first_close, second_open, second_close = sorted(ids.index(m) for m in markers)
    if second_close - first_open < budget:
        start = max(0, second_close + 1 - budget)
        return ids[start : start + budget]
    needed = (first_close - first_open + 1) + (second_close - second_open + 1)
    if needed > budget:
        raise FinegrainError(
            f"{source}: the two entities take {needed} tokens with their markers, more than the "
            f"{budget} that data.max_length leaves; raise data.max_length or shorten the entities"
        )
    spare = budget - needed
    after_first, before_second = spare - spare // 2, spare // 2
    return ids[first_open : first_close + 1 + after_first] + ids[second_open - before_second : second_close + 1]


class RelationClassifier(nn.Module):
    """A decoder backbone (`model`), the marker embeddings (`marker_embeddings`) and a linear head (`score`).

    Args:
        backbone: the decoder; its `embed_tokens` is used for every id except the markers.
        markers: the tokenizer ids of `<e1> </e1> <e2> </e2>`.
        num_labels: the relations.
    """

    def __init__(self, backbone: LlamaModel, markers: Sequence[int], num_labels: int):
        super().__init__()
        self.model = backbone
        hidden_size = backbone.config.hidden_size
        embeddings = backbone.embed_tokens.weight.detach().float()
        # Like an ordinary token: the vocabulary's mean plus noise of its per-dimension spread, so
        # the four markers start apart from each other and at the scale the layers expect.
        self.marker_embeddings = nn.Embedding(len(MARKERS), hidden_size)
        with torch.no_grad():
            self.marker_embeddings.weight.copy_(
                embeddings.mean(0) + torch.randn(len(MARKERS), hidden_size) * embeddings.std(0)
            )
        self.score = linear_head(2 * hidden_size, num_labels)
        self.register_buffer("markers", torch.tensor(list(markers)), persistent=False)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Embeddings (B, T, H) of ids (B, T): the base embedding matrix, or a marker's own row."""
        slot = input_ids[..., None] == self.markers  # (B, T, 4)
        is_marker = slot.any(-1)  # (B, T)
        # Marker ids may lie beyond the base matrix: look up a harmless id (0) there instead.
        base = self.model.embed_tokens(input_ids.masked_fill(is_marker, 0))  # (B, T, H)
        own = self.marker_embeddings(slot.int().argmax(-1)).to(base.dtype)  # (B, T, H)
        return torch.where(is_marker[..., None], own, base)

    def forward(self, batch: dict[str, torch.Tensor], start_layer: int = 0) -> torch.Tensor:
        """Relation logits (B, C) for right-padded `input_ids` (B, T), `lengths` (B,) and the
        end-marker `positions` (B, 2).

        The markers' embeddings train, so every layer runs: `start_layer` must be 0 (the
        trainer's frozen-prefix cache never starts higher for a model with trainable embeddings).
        """
        if start_layer:
            raise ValueError("RelationClassifier embeds its markers itself; it cannot start at a cached layer")
        x = hidden_states(self.model, batch, embed=self.embed)  # (B, T, H)
        B = x.shape[0]
        rows = torch.arange(B, device=x.device)[:, None]  # (B, 1)
        pooled = x[rows, batch["positions"]].reshape(B, -1)  # (B, 2, H) -> (B, 2H)
        return self.score(pooled)


Span = Annotated[list[whole(0)], Field(min_length=2, max_length=2, description="[start, end) character offsets.")]


class RelationItem(Strict):
    text: NonEmptyText = Field(description="The text, without <e1>/<e2> markers: the spans mark the entities.")
    head: Span
    tail: Span


class RelationRequest(Strict):
    items: list[RelationItem] = Field(min_length=1, description="Texts with two marked entities (at most --max-texts).")
    model: ModelName | None = Field(None, description="The relation run to use (see /v1/models).")


class Mention(BaseModel):
    start: int
    end: int = Field(description="Exclusive.")
    text: str


class Relation(BaseModel):
    label: str = Field(description="The relation type, or the run's no-relation label.")
    probabilities: dict[str, Finite]
    head: Mention
    tail: Mention


class RelationResponse(BaseModel):
    model: str
    predictions: list[Relation]


def read_relation_request(body: RelationRequest) -> tuple[list, list[tuple[str, str]]]:
    """The items as `examples_from_inputs` takes them ({"text", "head", "tail"}) and their texts."""
    return [item.model_dump() for item in body.items], [(f"items.{i}.text", item.text) for i, item in enumerate(body.items)]


class RelationTask:
    """Head, collate function, loss, predictions and metrics for relation classification.

    Args:
        labels: the relations of the training data, in head order.
        no_relation: the label meaning "no relation", left out of the averaged scores; None when
            every example has a relation.
        head: label smoothing and class weights ("balanced" or {relation: weight}).
    """

    name = "relation"
    endpoint = Endpoint(
        "/v1/relation", RelationRequest, RelationResponse, "items",
        "Classify the relation between the head and tail spans of each text with a relation run.", read_relation_request,
    )
    headline_metric = "f1"
    predicts_from_prefix = True
    # The head reads two positions, so transformers' LlamaForSequenceClassification cannot hold it;
    # PEFT's sequence-classification type still names what the adapter does.
    peft_task_type = "SEQ_CLS"
    head_modules = ("marker_embeddings", "score")

    def __init__(self, labels: Sequence[str], no_relation: str | None = "Other", head: HeadConfig | None = None):
        self.labels = list(labels)
        self.index = {label: i for i, label in enumerate(self.labels)}
        self.no_relation = no_relation
        self.head = head or HeadConfig()
        self.class_weights: torch.Tensor | None = None

    @classmethod
    def from_config(cls, config, labels: list[str]) -> RelationTask:
        no_relation = config.relation.no_relation
        if no_relation is not None and no_relation not in labels:
            raise FinegrainError(
                f"relation.no_relation: {no_relation!r} is not a label of the training data ({', '.join(labels)}); "
                "set the label that means no relation, or null when every example has one"
            )
        if config.data.multi_label:
            raise FinegrainError("data.multi_label: a relation example has one label; remove the key")
        if config.data.template is not None:
            raise FinegrainError(
                "data.template: task relation marks the entities instead of using a template; remove the key"
            )
        return cls(labels, no_relation, config.head)

    # -- data ------------------------------------------------------------------------------

    @staticmethod
    def load_splits(data):
        return load_relation_splits(data)

    def read_file(self, data, path: str, require_label: bool = True, skipped: list[str] | None = None) -> list[RelationExample]:
        examples = kept(read_relation_file(str(path), data.text_field, data.label_field, require_label, data.skip_bad_rows,
                                           data.label_names), skipped)
        if require_label:
            examples = kept(check_labels(examples, self.labels, str(path), data.skip_bad_rows), skipped)
        return examples

    def examples_from_inputs(self, inputs: Sequence[Any], data) -> list[RelationExample]:
        """Examples from texts with inline markers ("The <e1>fire</e1> ... <e2>smoke</e2>"), dicts
        `{"text", "head": [start, end], "tail": [start, end]}` (character offsets, end exclusive)
        or `RelationExample`s."""
        return [example_from_input(value, f"input:{i + 1}") for i, value in enumerate(inputs)]

    def input_record(self, example: RelationExample) -> dict[str, Any]:
        """The text, and the SemEval sentence id when there is one (the official scorer matches by id)."""
        return {"id": example.id, "text": example.text} if example.id is not None else {"text": example.text}

    def gold(self, examples: Sequence[RelationExample]) -> list[str]:
        return [e.label for e in examples]

    def encode(self, tokenizer, examples: Sequence[RelationExample], max_length: int) -> list[RelationEncoded]:
        """Token ids of the marked texts, cut to `max_length` around the entities (see `fit_window`)."""
        markers = marker_ids(tokenizer)
        bos = [tokenizer.bos_token_id] if tokenizer.add_bos and tokenizer.bos_token_id is not None else []
        texts = [marked_text(e) for e in examples]
        items = []
        for example, ids in zip(examples, tokenizer.encode_batch(texts, add_special_tokens=False) if texts else []):
            ids = bos + fit_window(ids, markers, max_length - len(bos), example.source)
            # A label the model does not know (predicting on a labelled file) is no target; the
            # training and evaluation examples were checked against the labels when read.
            target = self.index.get(example.label)
            items.append(RelationEncoded(ids, (ids.index(markers[1]), ids.index(markers[3])), target, example))
        return items

    def collate(
        self, items: list[RelationEncoded], pad_id: int, hidden: list[torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """Right-padded ids (B, T), `lengths` (B,), end-marker `positions` (B, 2) and, labelled, `targets` (B,)."""
        batch = pad_inputs(items, pad_id, hidden)
        batch["positions"] = torch.tensor([item.positions for item in items])
        if all(item.target is not None for item in items):
            batch["targets"] = torch.tensor([item.target for item in items])
        return batch

    # -- model -----------------------------------------------------------------------------

    def build_model(self, llama, tokenizer) -> RelationClassifier:
        return RelationClassifier(llama.model, marker_ids(tokenizer), len(self.labels))

    def set_class_weights(self, train: list[RelationEncoded]) -> None:
        self.class_weights = class_weights(self.head.class_weights, self.labels, Counter(e.target for e in train))

    def long_text_counts(self, items: list[RelationEncoded]) -> None:
        return None  # texts are cut around their entities (`fit_window`), never past them

    def loss_weight(self, batch: dict[str, torch.Tensor]) -> float:
        return labelled_weight(batch, self.class_weights)

    def loss(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(
            logits, batch["targets"], weight=self.class_weights, label_smoothing=self.head.label_smoothing
        )

    # -- outputs ---------------------------------------------------------------------------

    def predict(self, model, items: list, pad_id: int, batch_size: int = 64, hidden=None, start_layer: int = 0,
                progress: str | None = None) -> list[dict[str, Any]]:
        return predict_scores(self, model, items, pad_id, batch_size, hidden, start_layer, progress)

    def describe(self) -> dict[str, Any]:
        return {"labels": self.labels}

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.float().softmax(-1)

    def decode(self, probs: torch.Tensor, items: Sequence[RelationEncoded]) -> list[dict[str, Any]]:
        """Per example: the relation `label`, the `probabilities` of every relation, and the
        `head` and `tail` entities as `{"start", "end", "text"}`."""
        results = []
        for row, item in zip(probs.tolist(), items):
            results.append({
                "label": self.labels[max(range(len(row)), key=row.__getitem__)],
                "probabilities": dict(zip(self.labels, (round(p, 6) for p in row))),
                "head": item.example.span("head"),
                "tail": item.example.span("tail"),
            })
        return results

    def metrics(self, predictions: list[dict[str, Any]], gold: list[str]) -> dict[str, Any]:
        return relation_metrics(gold, [p["label"] for p in predictions], self.labels, self.no_relation)

    def write_report(self, run_dir: Path, metrics: dict[str, Any], split: str, title: str) -> None:
        """report.md and report.html (the per-relation table, the confusion matrix) and confusion_matrix.png."""
        from finegrain.evaluate.report import plot_confusion_matrix, write_classification_report

        if metrics.get("no_relation") is not None:
            title = f"{title} (averages leave out {metrics['no_relation']!r})"
        plot_confusion_matrix(metrics, Path(run_dir) / "confusion_matrix.png", title=f"{title}: confusion matrix")
        write_classification_report(run_dir, metrics, split_name=split, title=title)

    @staticmethod
    def report_text(metrics: dict[str, Any]) -> str:
        from finegrain.evaluate.report import format_report_text

        lines = [format_report_text(metrics)]
        left_out = f"; averages leave out {metrics['no_relation']!r}" if metrics.get("no_relation") is not None else ""
        lines.append(f"accuracy {metrics['accuracy']:.4f} over all {metrics['num_examples']} examples{left_out}\n")
        if "semeval_f1" in metrics:
            official = metrics["semeval_f1"]
            lines.append(f"SemEval-2010 Task 8 official score (macro F1, 9+1-way, with direction): {official:.4f}\n")
        return "".join(lines)


def relation_metrics(
    gold: Sequence[str], predicted: Sequence[str], labels: Sequence[str], no_relation: str | None
) -> dict[str, Any]:
    """Relation-extraction scores.

    Per-relation precision/recall/F1 and the confusion matrix come from `classification_metrics`
    over all labels; the `micro`, `macro` and `weighted` averages run over the relations only
    (all labels but `no_relation`), as scikit-learn's `classification_report(labels=relations)`
    computes them: a relation predicted for a no-relation example is a false positive, a missed
    relation a false negative, and no-relation examples predicted as such count for nothing.

    Returns:
        `classification_metrics`' keys (with `task: "relation"` and the averages as above), plus
        `precision`, `recall`, `f1` (the micro averages, the headline), `no_relation`, and where
        the labels are SemEval's directed ones `semeval` (`semeval_official_score`) and `semeval_f1`.
    """
    from finegrain.evaluate.metrics import classification_metrics

    relations = [label for label in labels if label != no_relation]
    metrics = classification_metrics(gold, predicted, labels, average_labels=relations)
    micro = metrics["micro"]
    metrics.update(
        task="relation", no_relation=no_relation, precision=micro["precision"], recall=micro["recall"], f1=micro["f1"]
    )
    official = semeval_official_score(gold, predicted, no_relation)
    if official is not None:
        metrics["semeval"] = official
        metrics["semeval_f1"] = official["f1"]
    return metrics


def semeval_official_score(
    gold: Sequence[str], predicted: Sequence[str], no_relation: str | None = "Other"
) -> dict[str, Any] | None:
    """SemEval-2010 Task 8's official score, computed as its scorer (semeval2010_task8_scorer-v1.2.pl) does.

    "(9+1)-way evaluation with directionality taken into account": labels are grouped by relation
    type, both directions together; a prediction is correct only with the right direction. For
    each relation type R of the gold labels (the no-relation label left out): precision = correct /
    predictions of R in either direction, recall = correct / gold examples of R in either
    direction. The official score is the macro-averaged F1 over those types. Fractions, where the
    scorer prints percentages. Any `Name(e1,e2)`/`Name(e2,e1)` labels qualify, not only SemEval's 9.

    Returns:
        `precision`, `recall`, `f1` (macro averages) and `per_relation` (type -> `precision`,
        `recall`, `f1`, `support`); None when a label is neither `no_relation` nor directed,
        or no gold label is a relation.
    """
    types = {}
    for label in {*gold, *predicted}:
        if label != no_relation:
            match = _DIRECTED.match(label)
            if match is None:
                return None
            types[label] = match.group(1)
    relations = sorted({types[g] for g in gold if g != no_relation})
    if not relations:
        return None
    per_relation = {}
    for relation in relations:
        correct = sum(g == p and types.get(g) == relation for g, p in zip(gold, predicted))
        proposed = sum(types.get(p) == relation for p in predicted)
        actual = sum(types.get(g) == relation for g in gold)
        precision = correct / proposed if proposed else 0.0
        recall = correct / actual
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_relation[relation] = {"precision": precision, "recall": recall, "f1": f1, "support": actual}
    return {
        **{key: sum(s[key] for s in per_relation.values()) / len(relations) for key in ("precision", "recall", "f1")},
        "per_relation": per_relation,
    }
