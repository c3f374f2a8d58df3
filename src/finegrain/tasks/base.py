"""The task contract and what every task shares: input padding, class weights, long-text counts.

`Task` is what the trainer, `finegrain.load(...).predict`, the reports and the command line call
on a task; `ServedTask` adds what the server calls for a task with an endpoint of its own. A task
class implements them outright (no base class to inherit from); the helpers here are what two or
more tasks would otherwise each write again.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import nn

from finegrain.errors import FinegrainError
from finegrain.inference import item_rows, predict_outputs

IGNORE_INDEX = -100  # cross_entropy's default ignore_index: positions that carry no loss


def linear_head(in_features: int, out_features: int, bias: bool = True) -> nn.Linear:
    """A task's linear head (`score`), started as transformers starts its heads: weights from
    normal(0, 0.02) (its `initializer_range` for LLaMA and BERT), bias zero. Drawn at hidden^-0.5
    (0.042 on the default model) the untrained head gave confident random logits that the first
    hundred-odd steps spent unlearning: ~7 points of AdaLoRA's accuracy at 2,000 x 1
    (docs/METHODS.md), whose updates start at zero."""
    head = nn.Linear(in_features, out_features, bias=bias)
    nn.init.normal_(head.weight, std=0.02)
    if bias:
        nn.init.zeros_(head.bias)
    return head


@dataclass(frozen=True)
class Endpoint:
    """How the server answers a task: the route and its bodies, and how a request becomes inputs.

    Attributes:
        path: the route, e.g. "/v1/classify"; its last part names the operation ("classify").
        request: the strict pydantic body of a request (`finegrain.tasks.schemas`).
        response: the pydantic body of an answer: `model` and `predictions`, one per input.
        field: the request's list of inputs ("texts", "items"), as the server's errors name it.
        summary: what the endpoint does, shown in the OpenAPI document.
        read: a request body → what `examples_from_inputs` takes, and every text in it with the
            field that holds it ("texts.0", "items.1.context") for the token limit.
    """

    path: str
    request: type
    response: type
    field: str
    summary: str
    read: Callable[[Any], tuple[list, list[tuple[str, str]]]]


@runtime_checkable
class Task(Protocol):
    """What every task gives the training loop, the run directory, `predict` and the command line.

    A task reads its data (`load_splits`, `read_file`, `examples_from_inputs`), tokenizes it
    (`encode` → items with `input_ids`), batches it (`collate`), builds the model around the
    base (`build_model`: a backbone and a head), scores a batch (`loss`, weighed by `loss_weight`)
    and turns model outputs into task-shaped results (`predict`) and metrics (`metrics`, `gold`).

    Attributes:
        name: the `task:` name, its key in `finegrain.tasks.TASKS`.
        endpoint: how the server answers the task (a `ServedTask`), or None for a task whose
            adapter steers the language model itself (served by the generation endpoints).
        headline_metric: the validation metric to select by when `train.metric` is not set.
        peft_task_type: PEFT's `task_type` of the saved adapter.
        head_modules: modules trained and saved whole with the adapter (PEFT's `modules_to_save`).
        labels: what `labels.json` records (classes, entity types, relation types; may be empty).
        predicts_from_prefix: `predict` reads cached lower-layer states (`hidden`); a generative
            task runs the whole model, so the trainer caches no validation prefix for it.
    """

    name: ClassVar[str]
    endpoint: ClassVar[Endpoint | None]
    headline_metric: str
    peft_task_type: ClassVar[str]
    head_modules: ClassVar[tuple[str, ...]]
    labels: list
    predicts_from_prefix: ClassVar[bool]

    @classmethod
    def from_config(cls, config: Any, labels: list) -> Task:
        """The task for a `RunConfig` and the labels of its training data (`labels.json`)."""

    @staticmethod
    def load_splits(data: Any) -> Any:
        """Train, validation and test examples (a `finegrain.data.pipeline.Splits`) from a `DataConfig`."""

    def read_file(self, data: Any, path: str, require_label: bool = True, skipped: list[str] | None = None) -> list:
        """Examples from a file in the run's format, for `evaluate` and `predict --input`; with
        `data.skip_bad_rows`, one `file:line: reason` per row left out is added to `skipped`."""

    def examples_from_inputs(self, inputs: Sequence[Any], data: Any) -> list:
        """Examples from what a Python caller or HTTP client passes (texts, dicts, examples)."""

    def input_record(self, example: Any) -> dict[str, Any]:
        """The fields of an example echoed next to its prediction by `finegrain predict`."""

    def gold(self, examples: Sequence[Any]) -> list:
        """The reference answers of labelled examples, as `metrics` takes them."""

    def encode(self, tokenizer: Any, examples: Sequence[Any], max_length: int) -> list:
        """Items with `input_ids` (at most `max_length`) and whatever `collate` needs."""

    def collate(self, items: list, pad_id: int, hidden: list[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """A batch for the task model: `pad_inputs` plus the task's targets; `hidden` are cached
        lower-layer states to pad instead of the ids."""

    def build_model(self, llama: nn.Module, tokenizer: Any) -> nn.Module:
        """The trainable model around the base `Llama`; its decoder must be `.model`."""

    def set_class_weights(self, train: list) -> None:
        """Loss weights from the training items (`head.class_weights`), for tasks with classes."""

    def long_text_counts(self, items: list) -> dict[str, int] | None:
        """{"longer": texts over `data.max_length`, "truncated": texts that lost tokens} of encoded
        items, for tasks that report it (classification, regression); None for the others."""

    def loss(self, outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The mean loss of the model's outputs on a collated batch."""

    def loss_weight(self, batch: dict[str, torch.Tensor]) -> float:
        """What `loss` averages over in `batch`. The trainer weighs each micro-batch's mean loss by
        this, so a batch cut into pieces, or accumulated over several, gets the gradient of one
        mean over all of it."""

    def predict(
        self, model: nn.Module, items: list, pad_id: int, batch_size: int = 64,
        hidden: list[torch.Tensor] | None = None, start_layer: int = 0, progress: str | None = None,
    ) -> list[dict[str, Any]]:
        """Task-shaped predictions of `model` for encoded items (one per example)."""

    def metrics(self, predictions: list[dict[str, Any]], gold: list) -> dict[str, Any]:
        """Scores of predictions against `gold(examples)`; holds `headline_metric`."""

    def write_report(self, run_dir: Path, metrics: dict[str, Any], split: str, title: str) -> None:
        """Human-readable reports of a split's metrics next to `metrics.json`."""

    @staticmethod
    def report_text(metrics: dict[str, Any]) -> str:
        """The metrics as a terminal table."""


@runtime_checkable
class ServedTask(Task, Protocol):
    """A task the server answers on its own `endpoint`: its model's outputs become scores
    (`probabilities`), and the scores of a request's items its predictions (`decode`)."""

    def describe(self) -> dict[str, Any]:
        """What `/v1/models` shows of a run beyond its name, task and endpoint (its labels)."""

    def probabilities(self, outputs: torch.Tensor) -> torch.Tensor:
        """The model's outputs (N, ...) as the scores `decode` reads."""

    def decode(self, scores: torch.Tensor, items: list) -> list[dict[str, Any]]:
        """One prediction per example from the scores of its encoded items."""


def predict_scores(
    task: ServedTask, model: nn.Module, items: list, pad_id: int, batch_size: int = 64,
    hidden: list[torch.Tensor] | None = None, start_layer: int = 0, progress: str | None = None,
) -> list[dict[str, Any]]:
    """`Task.predict` of a task that decodes scores: the model's outputs in length-sorted batches,
    as probabilities, decoded per example (the server runs the same three steps on its batches)."""
    outputs = predict_outputs(model, task, items, pad_id, batch_size, hidden, start_layer, progress)
    return task.decode(task.probabilities(outputs), items)


def labelled_weight(batch: dict[str, torch.Tensor], class_weights: torch.Tensor | None) -> float:
    """`Task.loss_weight` of a loss averaged over labelled positions (`targets` not -100): their
    number, or the sum of their class weights, as `cross_entropy(weight=...)` averages."""
    targets = batch["targets"]
    labelled = targets[targets != IGNORE_INDEX]
    return float(labelled.numel() if class_weights is None else class_weights[labelled].sum())


def class_weights(spec: Any, names: list[str], counts: Counter) -> torch.Tensor | None:
    """Loss weights per class from `head.class_weights`.

    Args:
        spec: None, "balanced" (inverse frequency, as scikit-learn's) or {name: weight}.
        names: the classes (or tags) in head order.
        counts: training occurrences by class index (used by "balanced").
    """
    if spec is None:
        return None
    if spec == "balanced":
        total = sum(counts.values())
        return torch.tensor([total / (len(names) * max(counts.get(i, 0), 1)) for i in range(len(names))])
    if isinstance(spec, dict):
        unknown = [k for k in spec if k not in names]
        if unknown:
            raise FinegrainError(f"head.class_weights: unknown label '{unknown[0]}'; labels are {', '.join(names)}")
        return torch.tensor([float(spec.get(name, 1.0)) for name in names])
    raise FinegrainError("head.class_weights: use 'balanced' or a mapping {label: weight}")


def refuse_class_weights(head: Any, task: str) -> None:
    """`set_class_weights` of a task without classes: `head.class_weights` set is a mistake to name."""
    if head is not None and head.class_weights is not None:
        raise FinegrainError(f"head.class_weights: {task} has no classes; remove the key")


def pad_inputs(items: list, pad_id: int, hidden: list[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The input part of a batch: `lengths` (R,) and right-padded `input_ids` (R, T), or, with
    `hidden` (cached lower-layer states, one (T_i, H) per item), those padded to (R, T, H).

    R is the number of rows: one per item, unless an item holds windows (`row_lengths`); then
    each window is a row and `documents` (R,) gives the item (0..B-1) each row belongs to.
    """
    rows = [item_rows(item) for item in items]
    lengths = torch.tensor([n for sizes in rows for n in sizes])
    batch: dict[str, torch.Tensor] = {"lengths": lengths}
    if any(len(sizes) > 1 for sizes in rows):
        batch["documents"] = torch.tensor([d for d, sizes in enumerate(rows) for _ in sizes])
    if hidden is not None:
        pieces = [piece.float() for h, sizes in zip(hidden, rows) for piece in h.split(sizes)]
        batch["hidden"] = torch.nn.utils.rnn.pad_sequence(pieces, batch_first=True)
        return batch
    ids = [item.input_ids[start : start + n] for item, sizes in zip(items, rows) for start, n in _spans(sizes)]
    input_ids = torch.full((len(ids), int(lengths.max())), pad_id, dtype=torch.long)
    for row, row_ids in enumerate(ids):
        input_ids[row, : len(row_ids)] = torch.tensor(row_ids)
    batch["input_ids"] = input_ids
    return batch


def long_text_summary(task: Task, data: Any, splits: dict[str, list]) -> dict[str, Any] | None:
    """metrics.json's `data` section: for each split's encoded items, how many texts were longer
    than `data.max_length` and how many lost tokens (NER, `unit: words`: how many sentences lost
    words, and how many words they lost); None for tasks that do not count them."""
    counts = {split: task.long_text_counts(items) for split, items in splits.items()}
    if any(c is None for c in counts.values()):
        return None
    if getattr(task, "name", None) == "ner":  # a sentence loses the words past max_length (tagged O or by the word model)
        summary: dict[str, Any] = {"max_length": data.max_length, "unit": "words"}  # data.long_texts does not apply
    else:
        summary = {"max_length": data.max_length, "long_texts": data.long_texts}
    summary["texts"] = {split: len(items) for split, items in splits.items()}
    for key in ("longer", "truncated", "longest"):  # "longest": a tagger's longest cut sentence, in tokens
        if all(key in c for c in counts.values()):  # type: ignore[operator]
            summary[key] = {split: c[key] for split, c in counts.items()}  # type: ignore[index]
    if summary.get("long_texts") == "windows":
        summary["max_windows"] = data.max_windows
    return summary


def long_text_line(summary: dict[str, Any]) -> str | None:
    """One line telling how many texts did not fit and what became of them; None when all fit."""
    longer = summary["longer"]
    if not any(longer.values()):
        return None
    counts = ", ".join(f"{n} of {summary['texts'][split]} {split}" for split, n in longer.items() if summary["texts"][split])
    if summary.get("unit") == "words":
        words = ", ".join(f"{n} {split}" for split, n in summary["truncated"].items() if n)
        longest = max(summary.get("longest", {}).values(), default=0)
        enough = f" (to {16 * math.ceil(longest / 16)}, the longest of them being {longest} tokens)" if longest else ""
        return (f"long sentences: {counts} sentences are longer than data.max_length={summary['max_length']} tokens; "
                f"their words past it ({words}) are not read by the model (tagged O, or by the word model alone where "
                f"head.word_mix mixes one in): raise data.max_length{enough}")
    line = f"long texts: {counts} texts are longer than data.max_length={summary['max_length']} tokens; "
    mode = summary["long_texts"]
    if mode == "windows":
        cut = sum(summary["truncated"].values())
        return line + f"read in windows ({cut} needed more than data.max_windows={summary['max_windows']} and lost their end)"
    kept = "their first and last tokens" if mode == "head_tail" else "their first tokens"
    return line + f"data.long_texts={mode} kept {kept} (head_tail or windows read more of them)"


def document_mean(states: torch.Tensor, documents: torch.Tensor | None) -> torch.Tensor:
    """Per text, the mean (B, H) of its rows' states (R, H), rows mapped to texts by a batch's
    `documents` (R,) (the windows of long texts); `states` as they are without `documents`."""
    if documents is None:
        return states
    counts = torch.bincount(documents)  # (B,) rows per text
    summed = states.new_zeros(len(counts), states.shape[-1]).index_add(0, documents, states)
    return summed / counts[:, None].to(states.dtype)


def _spans(sizes: list[int]) -> list[tuple[int, int]]:
    """(start, length) of consecutive pieces of the given lengths."""
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return list(zip(starts, sizes))


def kept(result: Any, skipped: list[str] | None) -> list:
    """A reader's examples (`result.examples`); the rows it skipped are added to `skipped` where given."""
    if skipped is not None:
        skipped.extend(result.skipped)
    return result.examples


def labelled_examples(task: Task, data: Any, path: str | Path | None, skipped: list[str] | None = None) -> tuple[list, str]:
    """The labelled examples to score and where they come from: the file `path`, read as `data`
    says, or with None the test split of `data` as the run held it out (`evaluate` without --data)."""
    if path is not None:
        return task.read_file(data, str(path), skipped=skipped), str(path)
    splits = task.load_splits(data)
    if not splits.test:
        raise FinegrainError("the run's data has no test split (data.test, or a third part in data.split); "
                             "give a labelled file with --data FILE")
    return splits.test, splits.origin["test"]


def score_file(task: Task, data: Any, path: str | Path | None,
               predict: Callable[[list], list | None]) -> dict[str, Any] | None:
    """Metrics of `predict` (examples -> predictions) on the labelled file `path`, read as `data`
    says, or on the run's test split (`path` None: `labelled_examples`); `skipped_rows` and
    `skipped_example` tell the rows `data.skip_bad_rows` left out. None where `predict` gives None
    (a torchrun rank above 0)."""
    skipped: list[str] = []
    examples, source = labelled_examples(task, data, path, skipped)
    predictions = predict(examples)
    if predictions is None:
        return None
    metrics = task.metrics(predictions, task.gold(examples))
    metrics["source"] = source
    if skipped:
        metrics["skipped_rows"], metrics["skipped_example"] = len(skipped), skipped[0]
    if path is not None and (shared := _shared_with_training(task, data, examples)):
        metrics["shared_with_training"] = shared
    return metrics


def _shared_with_training(task: Task, data: Any, examples: list) -> dict[str, Any] | None:
    """`data.split.shared_texts` of a labelled file's examples with the run's training split; None
    also where the run's training data cannot be read any more (moved, or edited into bad rows)."""
    from finegrain.data.split import shared_texts

    try:
        train = task.load_splits(data).train
    except FinegrainError:
        return None
    return shared_texts(train, examples)
