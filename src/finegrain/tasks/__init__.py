"""Tasks: each gives a head, a collate function, a loss, decoding and metrics to the one training loop."""

from __future__ import annotations

import importlib
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from finegrain.errors import FinegrainError
from finegrain.inference import item_rows, predict_outputs

IGNORE_INDEX = -100  # cross_entropy's default ignore_index: positions that carry no loss


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
    than `data.max_length` and how many lost tokens; None for tasks that do not count them."""
    counts = {split: task.long_text_counts(items) for split, items in splits.items()}
    if any(c is None for c in counts.values()):
        return None
    summary: dict[str, Any] = {"max_length": data.max_length, "long_texts": data.long_texts}
    summary["texts"] = {split: len(items) for split, items in splits.items()}
    for key in ("longer", "truncated"):
        summary[key] = {split: c[key] for split, c in counts.items()}  # type: ignore[index]
    if data.long_texts == "windows":
        summary["max_windows"] = data.max_windows
    return summary


def long_text_line(summary: dict[str, Any]) -> str | None:
    """One line telling how many texts did not fit and what became of them; None when all fit."""
    longer = summary["longer"]
    if not any(longer.values()):
        return None
    counts = ", ".join(f"{n} of {summary['texts'][split]} {split}" for split, n in longer.items() if summary["texts"][split])
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


# The task of each `task:` name in a run config, imported when first used.
TASKS = {
    "classification": "finegrain.tasks.classification:ClassificationTask",
    "regression": "finegrain.tasks.classification:RegressionTask",
    "ner": "finegrain.tasks.tokens:TokenClassificationTask",
    "relation": "finegrain.tasks.relation:RelationTask",
    "qa": "finegrain.tasks.qa:QATask",
    "instruct": "finegrain.tasks.instruct:InstructTask",
}


def task_class(name: str) -> type[Task]:
    """The task class registered for `task: name`."""
    if name not in TASKS:
        raise FinegrainError(f"task: '{name}' is not one of {', '.join(TASKS)}")
    module, _, attribute = TASKS[name].partition(":")
    return getattr(importlib.import_module(module), attribute)


class Task:
    """What every task gives the training loop, the run directory, `predict` and the server.

    A task reads its data (`load_splits`, `read_file`, `examples_from_inputs`), tokenizes it
    (`encode` → items with `input_ids`), batches it (`collate`), builds the model around the
    base (`build_model`), scores a batch (`loss`) and turns model outputs into task-shaped
    results (`predict`, by default `decode(probabilities(outputs), items)`) and metrics.

    Attributes:
        name: the `task:` name.
        headline_metric: the validation metric to select by when `train.metric` is not set.
        peft_task_type: PEFT's `task_type` of the saved adapter.
        head_modules: modules trained and saved whole with the adapter (PEFT's `modules_to_save`).
        labels: what `labels.json` records (classes, entity types, relation types; may be empty).
        predicts_from_prefix: `predict` reads cached lower-layer states (`hidden`); a generative
            task runs the whole model, so the trainer caches no validation prefix for it.
    """

    name = ""
    headline_metric = ""
    peft_task_type = ""
    head_modules: tuple[str, ...] = ("score",)
    labels: list[str] = []
    predicts_from_prefix = True
    class_weights: torch.Tensor | None = None

    @classmethod
    def from_config(cls, config: Any, labels: list[str]) -> Task:
        """The task for a `RunConfig` and the labels of its training data."""
        raise NotImplementedError

    @staticmethod
    def load_splits(data: Any) -> Any:
        """Train, validation and test examples (a `finegrain.data.pipeline.Splits`) from a `DataConfig`."""
        raise NotImplementedError

    def read_file(self, data: Any, path: str, require_label: bool = True) -> list:
        """Examples from a file in the run's format, for `evaluate` and `predict --input`."""
        raise NotImplementedError

    def examples_from_inputs(self, inputs: Sequence[Any], data: Any) -> list:
        """Examples from what a Python caller or HTTP client passes (texts, dicts, examples)."""
        raise NotImplementedError

    def input_record(self, example: Any) -> dict[str, Any]:
        """The fields of an example echoed next to its prediction by `finegrain predict`."""
        return {"text": example.text}

    def gold(self, examples: Sequence[Any]) -> list:
        """The reference answers of labelled examples, as `metrics` takes them."""
        return [e.label for e in examples]

    def build_model(self, llama: nn.Module, tokenizer: Any) -> nn.Module:
        """The trainable model around the base `Llama`; its decoder must be `.model`."""
        raise NotImplementedError

    def set_class_weights(self, train: list) -> None:
        """Loss weights from the training items (`head.class_weights`); nothing by default."""

    def long_text_counts(self, items: list) -> dict[str, int] | None:
        """{"longer": texts over `data.max_length`, "truncated": texts that lost tokens} of encoded
        items, for tasks that report it (classification, regression); None for the others."""
        return None

    def loss_weight(self, batch: dict[str, torch.Tensor]) -> float:
        """What `loss` averages over in `batch`: its labelled positions (their class weights, with
        `head.class_weights`), or its examples when the targets are not class indices.

        The trainer weighs each micro-batch's mean loss by this, so a batch cut into pieces, or
        accumulated over several, gets the gradient of one mean over all of it.
        """
        targets = batch.get("targets")
        if targets is None:
            return float(len(batch["lengths"]))
        if targets.is_floating_point():  # one row of targets per example, however many rows (windows) it runs as
            return float(targets.shape[0])
        labelled = targets[targets != IGNORE_INDEX]
        return float(labelled.numel() if self.class_weights is None else self.class_weights[labelled].sum())

    def predict(
        self, model: nn.Module, items: list, pad_id: int, batch_size: int = 64,
        hidden: list[torch.Tensor] | None = None, start_layer: int = 0, progress: str | None = None,
    ) -> list[dict[str, Any]]:
        """Task-shaped predictions of `model` for encoded items (one per example)."""
        outputs = predict_outputs(model, self, items, pad_id, batch_size, hidden, start_layer, progress)
        return self.decode(self.probabilities(outputs), items)

    def probabilities(self, outputs: torch.Tensor) -> torch.Tensor:
        return outputs.float().softmax(-1)

    def write_report(self, run_dir: Path, metrics: dict[str, Any], split: str, title: str) -> None:
        """Human-readable reports of a split's metrics next to `metrics.json`."""
        from finegrain.evaluate.report import write_classification_report

        write_classification_report(run_dir, metrics, split_name=split, title=title)

    @staticmethod
    def report_text(metrics: dict[str, Any]) -> str:
        """The metrics as a terminal table."""
        from finegrain.evaluate.report import format_report_text

        return format_report_text(metrics)
