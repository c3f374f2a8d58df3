"""A run end to end: data, model, LoRA, training, test evaluation, reports; and using the result.

A run directory holds:
    config.yaml      the effective configuration
    labels.json      the label set, in head order
    adapter/         the PEFT-format adapter with the classification head (best checkpoint)
    metrics.jsonl    training loss and validation metrics per step
    metrics.json     final validation and test metrics
    report.md, report.html, confusion_matrix.png, learning_curve.png
    checkpoint/      resumable training state
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from finegrain.atomic import atomic_write_json, atomic_write_text
from finegrain.checkpoint.load import DEFAULT_MODEL, load_model
from finegrain.config import RunConfig, dump_yaml, from_dict, validate
from finegrain.errors import FinegrainError
from finegrain.peft import LoraConfig, apply_lora, load_adapter, save_adapter
from finegrain.tasks.classification import ClassificationTask
from finegrain.tasks.tokens import TokenClassificationTask
from finegrain.train.trainer import Trainer, predict_outputs, seed_everything

ADAPTER_DIR = "adapter"


def adapted_layers(layers: list[int] | None, num_layers: int) -> list[int] | None:
    """Layer indices with negatives counted from the top (-1 is the last kept layer)."""
    if layers is None:
        return None
    resolved = sorted({i + num_layers if i < 0 else i for i in layers})
    if resolved and not (0 <= resolved[0] and resolved[-1] < num_layers):
        raise FinegrainError(f"lora.layers: {layers} is outside the model's {num_layers} layers")
    return resolved


def build(config: RunConfig, labels: list[str], progress: bool = True, with_lora: bool = True):
    """The base model cut and configured for the run, the task, the task model (with fresh LoRA)."""
    llama, tokenizer = load_model(config.model.name, progress=progress)
    backbone = llama.model
    total = len(backbone.layers)
    if config.model.num_layers is not None:
        if not 1 <= config.model.num_layers <= total:
            raise FinegrainError(f"model.num_layers: {config.model.num_layers} is not between 1 and {total}")
        backbone.layers = backbone.layers[: config.model.num_layers]
        backbone.config.num_layers = config.model.num_layers
    backbone.config.causal = not config.model.bidirectional
    task = make_task(config, labels)
    model = task.build_model(backbone)
    lora = LoraConfig(
        r=config.lora.r, alpha=config.lora.alpha, dropout=config.lora.dropout,
        targets=config.lora.targets, use_rslora=config.lora.rslora,
        layers=adapted_layers(config.lora.layers, len(backbone.layers)), modules_to_save=["score"],
    )
    if with_lora:
        apply_lora(model, lora)
        model.score.requires_grad_(True)  # weight, and the bias of the token head
    return model, tokenizer, task, lora


def make_task(config: RunConfig, labels: list[str]):
    """The task object of `config.task`: labels are classes, or entity types for ner."""
    if config.task == "ner":
        head = config.head
        return TokenClassificationTask(labels, head.scheme, head, head.subword, head.decoding)
    return ClassificationTask(labels, config.data.multi_label, config.head, config.data.template)


def load_task_splits(config: RunConfig):
    from finegrain.data.conll import load_token_splits
    from finegrain.data.load import load_splits

    return load_token_splits(config.data) if config.task == "ner" else load_splits(config.data)


def prepare_run_dir(config: RunConfig) -> Path:
    run_dir = Path(config.output or f"runs/{config.task}-{time.strftime('%Y%m%d-%H%M%S')}")
    if (run_dir / "config.yaml").exists():
        raise FinegrainError(
            f"{run_dir}: already holds a run; continue it with `finegrain train --resume {run_dir}` or choose another --output"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def train(config: RunConfig, resume_dir: str | Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Train, evaluate on the test split, write the run directory; returns metrics.json's content."""
    if resume_dir is not None:
        run_dir = Path(resume_dir)
        config = load_run_config(run_dir)
    else:
        run_dir = prepare_run_dir(config)
        if config.model.name and Path(config.model.name).exists():
            config.model.name = str(Path(config.model.name).resolve())
        atomic_write_text(run_dir / "config.yaml", dump_yaml(config))
    torch.set_num_threads(config.train.threads or os.cpu_count() or 1)
    seed_everything(config.train.seed)
    started = time.perf_counter()

    splits = load_task_splits(config)
    atomic_write_json(run_dir / "labels.json", splits.labels)
    model, tokenizer, task, lora = build(config, splits.labels, progress)
    pad_id = tokenizer.pad_token_id
    max_length = config.data.max_length
    train_items = task.encode(tokenizer, splits.train, max_length)
    val_items = task.encode(tokenizer, splits.validation, max_length)
    task.set_class_weights(train_items)
    val_gold = [e.label for e in splits.validation]
    eval_batch = config.train.eval_batch_size

    def score(outputs: torch.Tensor) -> dict[str, Any]:
        return task.metrics(task.decode(task.probabilities(outputs), val_items), val_gold)

    trainer = Trainer(model, task, train_items, config.train, run_dir, pad_id, val_items, score, progress)
    state = trainer.fit(resume=resume_dir is not None)
    save_adapter(
        model, lora, run_dir / ADAPTER_DIR, base_model_name_or_path=config.model.name or DEFAULT_MODEL,
        modules_to_save=["score"], task_type=task.peft_task_type,
    )

    results: dict[str, Any] = {
        "task": config.task,
        "labels": splits.labels,
        "train": {
            "examples": len(train_items),
            "steps": state.step,
            "epochs": round(state.step / trainer.steps_per_epoch, 3),
            "best_step": state.best_step,
            "stopped_early": state.stopped_early,
            "train_seconds": round(state.train_seconds, 2),
            "tokens_per_s": round(state.train_tokens / max(state.train_seconds, 1e-9), 1),
            "frozen_prefix_layers": trainer.start_layer,
            "skipped_rows": len(splits.skipped),
        },
    }
    if state.best_validation is not None:  # measured when the best weights were chosen
        results["validation"] = {**state.best_validation, "source": splits.origin["validation"]}
    if splits.test:
        items = task.encode(tokenizer, splits.test, max_length)
        outputs = predict_outputs(model, task, items, pad_id, eval_batch, progress="testing" if progress else None)
        probs = task.probabilities(outputs)
        results["test"] = task.metrics(task.decode(probs, items), [e.label for e in splits.test])
        results["test"]["source"] = splits.origin["test"]
    results["train"]["total_seconds"] = round(time.perf_counter() - started, 2)
    if splits.skipped:
        atomic_write_text(run_dir / "skipped_rows.txt", "\n".join(splits.skipped) + "\n")
    write_results(run_dir, results, config, config.train.metric or task.headline_metric)
    return results


def write_results(run_dir: Path, results: dict[str, Any], config: RunConfig, metric: str) -> None:
    from finegrain.evaluate.report import plot_learning_curve, write_classification_report

    atomic_write_json(run_dir / "metrics.json", results)
    if (run_dir / "metrics.jsonl").exists():  # before the report, which embeds the curve
        plot_learning_curve(run_dir / "metrics.jsonl", run_dir / "learning_curve.png", metric)
    split = "test" if "test" in results else "validation"
    if split in results:
        write_classification_report(run_dir, results[split], split_name=split, title=f"{config.task}: {split}")


def load_run_config(run_dir: str | Path) -> RunConfig:
    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        raise FinegrainError(f"{run_dir}: not a finegrain run directory (no config.yaml); pass the --output of `finegrain train`")
    import yaml

    config = from_dict(RunConfig, yaml.safe_load(path.read_text(encoding="utf-8")) or {}, str(path))
    validate(config, str(path))
    return config


class Predictor:
    """A trained run, ready to label new texts: `finegrain.load(RUN_DIR).predict([...])`."""

    def __init__(self, run_dir: str | Path, progress: bool = False):
        run_dir = Path(run_dir)
        self.config = load_run_config(run_dir)
        if not (run_dir / ADAPTER_DIR / "adapter_config.json").exists():
            raise FinegrainError(f"{run_dir}: the run has no trained adapter yet; finish it with `finegrain train --resume {run_dir}`")
        labels = json.loads((run_dir / "labels.json").read_text(encoding="utf-8"))
        self.model, self.tokenizer, self.task, _ = build(self.config, labels, progress, with_lora=False)
        load_adapter(self.model, run_dir / ADAPTER_DIR)
        self.model.eval()

    def predict(self, texts: list, batch_size: int = 64) -> list[dict[str, Any]]:
        """Per text: `label` (a list for multi-label) and `probabilities` of every label.

        For ner, per text (a string, a list of words, or a `TokenExample`): `words`, their `tags`,
        the `entities` (type, start, end, text, words, score) and `truncated_words`.
        """
        from finegrain.data.readers import Example

        if self.config.task == "ner":
            examples = self.task.examples_from_inputs(texts, self.config.data.char_level)
            items = self.task.encode(self.tokenizer, examples, self.config.data.max_length)
            outputs = predict_outputs(self.model, self.task, items, self.tokenizer.pad_token_id, batch_size)
            return self.task.decode(self.task.probabilities(outputs), items)
        examples = [Example(text=t, label=None, source=f"input:{i + 1}") for i, t in enumerate(texts)]
        items = self.task.encode(self.tokenizer, examples, self.config.data.max_length)
        for item, example in zip(items, examples):
            if not item.input_ids:
                raise FinegrainError(f"{example.source}: empty text; every input needs some text")
        outputs = predict_outputs(self.model, self.task, items, self.tokenizer.pad_token_id, batch_size)
        return self.task.decode(self.task.probabilities(outputs))

    def evaluate(self, path: str | Path) -> dict[str, Any]:
        """Metrics of the run's model on a labelled file (same fields as the training data)."""
        from finegrain.data.load import read_file
        from finegrain.data.readers import check_labels

        if self.config.task == "ner":
            return self._evaluate_tokens(path)
        examples = read_file(self.config.data, str(path)).examples
        examples = check_labels(examples, self.task.labels, str(path), self.config.data.skip_bad_rows).examples
        if not examples:
            raise FinegrainError(f"{path}: no usable examples")
        predictions = self.predict([e.text for e in examples])
        metrics = self.task.metrics(predictions, [e.label for e in examples])
        metrics["source"] = str(path)
        return metrics

    def _evaluate_tokens(self, path: str | Path) -> dict[str, Any]:
        from finegrain.data.conll import read_token_examples

        d = self.config.data
        examples = read_token_examples(
            path, scheme=d.scheme, tag_column=d.tag_column, char_level=d.char_level, repair=d.repair_tags,
            skip_bad_rows=d.skip_bad_rows, text_field=d.text_field,
        ).examples
        metrics = self.task.metrics(self.predict(examples), [e.tags for e in examples])
        metrics["source"] = str(path)
        return metrics
