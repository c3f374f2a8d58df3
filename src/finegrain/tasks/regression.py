"""Regression: a number per text, from one output of the sequence classifier's head.

It reads and tokenizes texts as classification does (`TextInputs`, the same windows for long
texts) and runs the same model (`SequenceClassifier`, one output); the targets, the loss, the
decoding and the metrics are its own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field

from finegrain.config import HeadConfig
from finegrain.errors import FinegrainError
from finegrain.tasks.base import Endpoint, kept, pad_inputs, predict_scores, refuse_class_weights
from finegrain.tasks.classification import Encoded, SequenceClassifier, TextInputs
from finegrain.tasks.schemas import Finite, TextsRequest, read_texts


class Value(BaseModel):
    value: Finite = Field(description="The predicted number, in the units of the training targets.")


class RegressResponse(BaseModel):
    model: str
    predictions: list[Value]


class RegressionTask:
    """A number per text: one output on the last real token, mean squared error.

    The head predicts the target standardised by the training data's mean and standard
    deviation (kept in `labels.json` as `["<label field>", mean, std]`), so its initial
    outputs are already on the targets' scale whatever their units.
    """

    name = "regression"
    endpoint = Endpoint(
        "/v1/regress", TextsRequest, RegressResponse, "texts", "Score each text with a regression run: the predicted `value`.",
        read_texts,
    )
    peft_task_type = "SEQ_CLS"
    head_modules = ("score",)
    predicts_from_prefix = True
    headline_metric = "neg_mse"  # selecting needs "higher is better"; metrics also hold mse, r2, pearson

    def __init__(
        self, labels: list, head: HeadConfig | None = None, template: str | None = None, long_texts: str = "truncate",
        window_stride: int | None = None, max_windows: int = 8,
    ):
        self.labels = list(labels)
        self.mean = float(labels[1]) if len(labels) > 1 else 0.0
        self.std = float(labels[2]) if len(labels) > 2 else 1.0
        self.head = head or HeadConfig()
        self.texts = TextInputs(template, long_texts, window_stride, max_windows)

    @classmethod
    def from_config(cls, config, labels: list) -> RegressionTask:
        data = config.data
        return cls(labels, config.head, data.template, data.long_texts, data.window_stride, data.max_windows)

    # -- data ------------------------------------------------------------------------------

    @staticmethod
    def load_splits(data):
        """The splits, with labels.json's `[label field, mean, std]` of the training targets."""
        from finegrain import datasets
        from finegrain.data.load import load_splits

        splits = load_splits(data, regression=True, datasets_module=datasets)
        values = torch.tensor([e.label for e in splits.train], dtype=torch.float64)
        std = float(values.std()) if len(values) > 1 else 1.0
        splits.labels = [data.label_field, round(float(values.mean()), 6), round(std if std > 0 else 1.0, 6)]
        return splits

    def read_file(self, data, path: str, require_label: bool = True, skipped: list[str] | None = None) -> list:
        from finegrain.data.load import read_file

        examples = kept(read_file(data, str(path), require_label, regression=True), skipped)
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

    def target(self, label: Any) -> float:
        return (float(label) - self.mean) / self.std

    def collate(self, items: list[Encoded], pad_id: int, hidden: list[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        batch = pad_inputs(items, pad_id, hidden)
        if items[0].target is not None:
            batch["targets"] = torch.tensor([item.target for item in items], dtype=torch.float32)
        return batch

    # -- model -----------------------------------------------------------------------------

    def build_model(self, llama, tokenizer=None) -> SequenceClassifier:
        return SequenceClassifier(llama.model, 1, self.head.pooling)

    def set_class_weights(self, train: list[Encoded]) -> None:
        refuse_class_weights(self.head, "regression")

    def loss(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.mse_loss(logits[:, 0], batch["targets"])

    def loss_weight(self, batch: dict[str, torch.Tensor]) -> float:
        """The texts: one target each, however many rows (windows) it runs as."""
        return float(batch["targets"].shape[0])

    # -- outputs ---------------------------------------------------------------------------

    def predict(self, model, items: list, pad_id: int, batch_size: int = 64, hidden=None, start_layer: int = 0,
                progress: str | None = None) -> list[dict[str, Any]]:
        return predict_scores(self, model, items, pad_id, batch_size, hidden, start_layer, progress)

    def describe(self) -> dict[str, Any]:
        return {}  # labels.json holds the targets' field, mean and deviation, no labels

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

    def write_report(self, run_dir: Path, metrics: dict[str, Any], split: str, title: str) -> None:
        """report.md/html: the error and correlation figures, and predictions by range of the true value (PNG)."""
        from finegrain.evaluate.report import Table, plot_bars, training_line, write_report

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
        write_report(run_dir, title, summary, [table], [("by_range.png", "Mean prediction by range of the true value")],
                     note=training_line(metrics))


    @staticmethod
    def report_text(metrics: dict[str, Any]) -> str:
        from finegrain.evaluate.report import format_report_text

        return format_report_text(metrics)


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
