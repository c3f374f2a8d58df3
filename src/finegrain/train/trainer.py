"""The one training loop every task plugs into.

A task gives the model (backbone + head), a collate function and a loss; the caller gives an
`evaluate` callback returning validation metrics. The loop does AdamW with a warmup schedule,
gradient accumulation and clipping, length-bucketed batches, early stopping with patience,
best-checkpoint selection, metrics to `metrics.jsonl`, and atomic checkpoints that resume
exactly (weights, optimizer, scheduler, RNG states, data position).
"""

from __future__ import annotations

import json
import math
import os
import random
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from finegrain import rundir
from finegrain.atomic import atomic_dir, atomic_write_text, fault_point, recover_dir
from finegrain.config import TrainConfig
from finegrain.cpu import FrozenWeightsInBF16, native_bf16, training_autocast
from finegrain.errors import FinegrainError
from finegrain.peft.base import load_weights, save_weights
from finegrain.evaluate.metrics import higher_is_better
from finegrain.tasks.base import Task
from finegrain.inference import predict_outputs  # also re-exported: `from finegrain.train.trainer import predict_outputs`
from finegrain.train.linear_probe import HeadInputs, fit_head
from finegrain.train.batching import bucketed_batches, micro_batches
from finegrain.train.prefix_cache import compute_prefix, lowest_trainable_layer


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if schedule == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        return max(0.0, 1.0 - progress)

    return factor


@dataclass
class TrainState:
    """Where training stands; saved with every checkpoint."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of `epoch` already consumed
    best_metric: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    stopped_early: bool = False
    train_seconds: float = 0.0
    train_tokens: int = 0
    best_validation: dict[str, Any] | None = None  # all validation metrics at the best step


class Trainer:
    """Trains `model` (only its parameters with `requires_grad`) on encoded items.

    Args:
        model: a task model whose `forward(batch, start_layer)` returns outputs for `task.loss`;
            its decoder is `model.model`.
        task: gives `collate(items, pad_id, hidden)`, `loss(outputs, batch)` and `predict(...)`.
        train: encoded training items (each with `input_ids`).
        validation: encoded validation items, or an empty list.
        score: turns the task's predictions on `validation` (`task.predict`) into metrics (a dict;
            numbers at its top level and in its `macro`/`micro`/`weighted` sections are logged).
        run_dir: where `metrics.jsonl`, `checkpoint/` and `best/` go (names: `finegrain.rundir`).
    """

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        train: list,
        config: TrainConfig,
        run_dir: Path,
        pad_id: int,
        validation: list = (),
        score: Callable[[list[dict[str, Any]]], dict[str, Any]] | None = None,
        progress: bool = True,
    ):
        self.model, self.task, self.train_items, self.config = model, task, train, config
        self.validation_items, self.score = list(validation), score
        self.run_dir, self.pad_id, self.progress = Path(run_dir), pad_id, progress
        self.trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if not self.trainable:
            raise FinegrainError("nothing to train: no parameter requires grad; check lora.targets and lora.layers")
        bf16 = config.bf16 and native_bf16()  # decided once: /proc/cpuinfo is not read per step
        if config.bf16 and not bf16:
            warnings.warn("train.bf16: this CPU has no native bf16 (avx512_bf16 or amx_bf16), where bf16 is "
                          "slower than float32; training stays float32", stacklevel=2)
        self.autocast = training_autocast(bf16)
        self.start_layer = 0
        if config.prefix_cache:
            self.start_layer = lowest_trainable_layer(model, len(model.model.layers))
        # Layers below start_layer never run in a training step (their outputs are cached).
        self.bf16_weights = FrozenWeightsInBF16(model, enabled=bf16, skip=model.model.layers[: self.start_layer])
        self.lengths = [len(item.input_ids) for item in train]
        self.batches_per_epoch = math.ceil(len(train) / config.batch_size)
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / config.grad_accum)
        self.total_steps = max(1, math.ceil(config.epochs * self.steps_per_epoch))
        head_names = {n for n in self.trainable if not n.startswith("model.")}
        head_lr = config.head_lr or config.lr
        groups = [
            {"params": [p for n, p in self.trainable.items() if n not in head_names], "lr": config.lr},
            {"params": [p for n, p in self.trainable.items() if n in head_names], "lr": head_lr},
        ]
        self.optimizer = torch.optim.AdamW(
            [g for g in groups if g["params"]], lr=config.lr, weight_decay=config.weight_decay
        )
        warmup = int(config.warmup_ratio * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(config.schedule, warmup, self.total_steps)
        )
        self.state = TrainState()
        self.metrics_path = self.run_dir / rundir.METRICS_LOG
        self.hidden: list[torch.Tensor] | None = None
        self.validation_hidden: list[torch.Tensor] | None = None
        self.tensorboard = _tensorboard_writer(self.run_dir / rundir.TENSORBOARD)

    # -- public ----------------------------------------------------------------------------

    def fit(self, resume: bool = False) -> TrainState:
        """Train to the end (or early stop) and leave the best weights loaded in the model."""
        if resume:
            self._load_checkpoint()
        elif self.metrics_path.exists():
            self.metrics_path.unlink()
        if self.start_layer > 0:
            # Frozen layers below the adapted ones: computed once here instead of every epoch.
            def prefix(items: list) -> list[torch.Tensor]:
                return compute_prefix(
                    self.model.model, self.task, items, self.start_layer, self.pad_id, self.config.eval_batch_size,
                    self.progress, getattr(torch, self.config.prefix_cache_dtype), self.run_dir,
                    self.config.prefix_cache_ram_mb * 2**20,
                )

            self.hidden = prefix(self.train_items)
            fault_point("prefix_cache")  # test-only (tests/test_faults.py)
            if self.task.predicts_from_prefix:
                self.validation_hidden = prefix(self.validation_items)
        if not resume and getattr(getattr(self.task, "head", None), "init", "random") == "probe":
            self._fit_head()
        self.model.train()
        bar = tqdm(
            total=self.total_steps, initial=self.state.step, desc="training", unit="step",
            disable=not self.progress, dynamic_ncols=True,
        )
        try:
            self.bf16_weights.hold()
            self._loop(bar)
        finally:
            self.bf16_weights.release()
            bar.close()
            if self.tensorboard is not None:
                self.tensorboard.close()
        self.model.eval()
        self._restore_best()
        return self.state

    # -- the loop --------------------------------------------------------------------------

    def _loop(self, bar: tqdm) -> None:
        config, state = self.config, self.state
        while state.step < self.total_steps and not state.stopped_early:
            batches = bucketed_batches(self.lengths, config.batch_size, config.seed, state.epoch)
            groups = [batches[i : i + config.grad_accum] for i in range(0, len(batches), config.grad_accum)]
            first_group = state.batch_in_epoch // config.grad_accum
            for group in groups[first_group:]:
                if state.step >= self.total_steps:
                    break
                loss, tokens, seconds = self._step(group)
                state.step += 1
                fault_point("train_step")  # test-only (tests/test_faults.py)
                state.batch_in_epoch += len(group)
                state.train_seconds += seconds
                state.train_tokens += tokens
                lr = self.scheduler.get_last_lr()[0]
                tokens_per_s = state.train_tokens / max(state.train_seconds, 1e-9)
                self._log({"step": state.step, "epoch": round(self._epoch_progress(), 4),
                           "train_loss": round(loss, 6), "lr": lr, "tokens_per_s": round(tokens_per_s, 1)})
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:.0f}")
                bar.update(1)
                end_of_epoch = state.batch_in_epoch >= len(batches)
                if (config.eval_every and state.step % config.eval_every == 0) or (
                    end_of_epoch and not config.eval_every
                ) or state.step == self.total_steps:
                    self._validate()
                if end_of_epoch:
                    state.epoch += 1
                    state.batch_in_epoch = 0
                if state.stopped_early or state.step % config.checkpoint_every == 0 or end_of_epoch:
                    self._save_checkpoint()
                if state.stopped_early:
                    break
        if state.best_step is None:
            self._save_best()  # no validation data: the last weights are the best we have

    def _step(self, group: list[list[int]]) -> tuple[float, int, float]:
        """One optimizer step on a group of `grad_accum` batches, each run in micro-batches of at
        most `micro_batch_tokens`; each piece's mean loss is weighted by its share of the
        group's loss terms, so the gradient is that of one mean loss over the group."""
        start = time.perf_counter()
        pieces = []
        for indices in group:
            for piece in micro_batches(indices, self.lengths, self.config.micro_batch_tokens):
                hidden = [self.hidden[i] for i in piece] if self.hidden is not None else None
                batch = self.task.collate([self.train_items[i] for i in piece], self.pad_id, hidden)
                pieces.append((batch, self.task.loss_weight(batch)))
        total = sum(weight for _, weight in pieces) or 1.0  # 0: nothing labelled, every loss is 0
        loss_sum, tokens = 0.0, 0
        for batch, weight in pieces:
            with self.autocast:
                outputs = self.model(batch, start_layer=self.start_layer)
                loss = self.task.loss(outputs, batch)
            (loss * weight / total).backward()
            loss_sum += loss.item() * weight
            tokens += int(batch["lengths"].sum())
        if self.config.max_grad_norm:
            nn.utils.clip_grad_norm_(self.trainable.values(), self.config.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum / total, tokens, time.perf_counter() - start

    def _epoch_progress(self) -> float:
        return self.state.epoch + self.state.batch_in_epoch / self.batches_per_epoch

    def _fit_head(self) -> None:
        """LP-FT (finegrain.train.linear_probe): the head fitted on the frozen model's pooled states."""
        head = self.task.head_modules[0]
        with HeadInputs(self.model, head):
            features = predict_outputs(self.model, self.task, self.train_items, self.pad_id, self.config.eval_batch_size,
                                       self.hidden, self.start_layer, "fitting the head" if self.progress else None)
        targets = torch.tensor([item.target for item in self.train_items])
        fit_head(self.model, head, features, targets, getattr(self.task, "class_weights", None))

    # -- validation and best weights -------------------------------------------------------

    def _validate(self) -> None:
        if self.score is None or not self.validation_items:
            return
        with self.bf16_weights.released():  # validation predicts in float32, like the final test
            predictions = self.task.predict(
                self.model, self.validation_items, self.pad_id, self.config.eval_batch_size,
                self.validation_hidden, self.start_layer,
            )
        metrics = self.score(predictions)
        flat = flat_metrics(metrics)
        state, name = self.state, self.config.metric or self.task.headline_metric
        if name not in flat:
            raise FinegrainError(f"train.metric: '{name}' is not a validation metric; choose one of {', '.join(flat)}")
        # Stored as "higher is better", so that loss-like metrics (rmse, mae) select their lowest value.
        value = float(flat[name]) if higher_is_better(name) else -float(flat[name])
        self._log({"step": state.step, "epoch": round(self._epoch_progress(), 4), "split": "validation", **flat})
        if self.progress:
            tqdm.write(validation_line(state.step, name, float(flat[name]), metrics))
        if state.best_metric is None or value > state.best_metric:
            state.best_metric, state.best_step, state.bad_evals = value, state.step, 0
            state.best_validation = metrics
            self._save_best()
        else:
            state.bad_evals += 1
            if self.config.patience is not None and state.bad_evals >= self.config.patience:
                state.stopped_early = True

    def _trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone().contiguous() for n, p in self.trainable.items()}

    def _save_best(self) -> None:
        with atomic_dir(self.run_dir / rundir.BEST) as tmp:
            save_weights(self._trainable_state(), os.path.join(tmp, rundir.TRAINABLE))

    def _restore_best(self) -> None:
        path = self.run_dir / rundir.BEST / rundir.TRAINABLE
        if path.exists():
            self._load_trainable(path, _weights_fix(self.run_dir))

    def _load_trainable(self, path: Path, fix: str) -> None:
        """Load saved trainable weights, refusing a damaged file or one of another config."""
        tensors = load_weights(path, fix)
        for name, param in self.trainable.items():
            if name not in tensors or tensors[name].shape != param.shape:
                found = tuple(tensors[name].shape) if name in tensors else "nothing"
                raise FinegrainError(f"{path}: '{name}' is {found}, the model needs {tuple(param.shape)}; {fix}")
        with torch.no_grad():
            for name, param in self.trainable.items():
                param.copy_(tensors[name])

    # -- metrics.jsonl ---------------------------------------------------------------------

    def _log(self, record: dict[str, Any]) -> None:
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.tensorboard is not None:
            prefix = record.get("split", "train")
            for key, value in record.items():
                if key not in ("step", "split") and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(f"{prefix}/{key}", value, record["step"])

    # -- checkpoints -----------------------------------------------------------------------

    def _save_checkpoint(self) -> None:
        state = vars(self.state)
        rng = {
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
        }
        with atomic_dir(self.run_dir / rundir.CHECKPOINT) as tmp:
            save_weights(self._trainable_state(), os.path.join(tmp, rundir.TRAINABLE))
            fault_point("checkpoint_write")  # test-only (tests/test_faults.py)
            torch.save(
                {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(), "rng": rng},
                os.path.join(tmp, rundir.OPTIMIZER),
            )
            Path(tmp, rundir.STATE).write_text(json.dumps(state, indent=2), encoding="utf-8")

    def _load_checkpoint(self) -> None:
        directory = recover_dir(self.run_dir / rundir.CHECKPOINT)
        recover_dir(self.run_dir / rundir.BEST)
        if not (directory / rundir.STATE).exists():
            raise FinegrainError(f"{directory}: no checkpoint to resume from; start the run again without --resume")
        fix = _weights_fix(self.run_dir)
        self._load_trainable(directory / rundir.TRAINABLE, fix)
        try:
            saved = torch.load(directory / rundir.OPTIMIZER, weights_only=False)
            saved_state = json.loads((directory / rundir.STATE).read_text(encoding="utf-8"))
        except Exception as exc:  # a damaged pickle raises any of a dozen types
            raise FinegrainError(f"{directory}: cannot be read ({type(exc).__name__}: {exc}); {fix}") from None
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        for key, value in saved_state.items():
            setattr(self.state, key, value)
        random.setstate(saved["rng"]["python"])
        np.random.set_state(saved["rng"]["numpy"])
        torch.set_rng_state(saved["rng"]["torch"])
        # Records logged after this checkpoint belong to work that will be done again; a kill
        # may also have cut the last line short.
        if self.metrics_path.exists():
            kept = []
            for line in self.metrics_path.read_text(encoding="utf-8").splitlines():
                try:
                    if json.loads(line)["step"] <= self.state.step:
                        kept.append(line)
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue
            atomic_write_text(self.metrics_path, "".join(line + "\n" for line in kept))


def _weights_fix(run_dir: Path) -> str:
    """What to do about a damaged checkpoint: without it an unfinished run restarts from its start,
    and a finished one (whose adapter is what counts) can only be trained again elsewhere."""
    if rundir.is_finished(run_dir):
        return "the finished run's adapter does not need it; to train on, train the run again into another --output"
    return f"delete {run_dir / rundir.CHECKPOINT} and {run_dir / rundir.BEST}, then `finegrain train --resume {run_dir}` restarts the run from its start"


def _tensorboard_writer(directory: Path):
    """A TensorBoard writer when the `tensorboard` package is installed; metrics.jsonl is always written."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(directory))


def validation_line(step: int, name: str, value: float, metrics: dict[str, Any], width: int = 12) -> str:
    """One line for the terminal at each validation: the selection metric and, where the task has
    classes, each class's recall, so that a class the model never predicts shows at once."""
    line = f"validation at step {step}: {name} {value:.4f}"
    per_class = metrics.get("per_class")
    if isinstance(per_class, dict) and per_class and all("recall" in v for v in per_class.values()):
        recalls = sorted(per_class.items(), key=lambda item: item[1]["recall"])
        shown = " ".join(f"{label[:width]} {v['recall']:.2f}" for label, v in recalls[:8])
        more = f" (+{len(recalls) - 8} higher)" if len(recalls) > 8 else ""
        line += f"; recall by class, lowest first: {shown}{more}"
    return line


def flat_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The scalar metrics: top-level numbers and `macro_f1`-style averages, to log and select by."""
    flat = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    for average in ("macro", "micro", "weighted", "samples"):
        for name, value in (metrics.get(average) or {}).items():
            if name != "support":
                flat[f"{average}_{name}"] = value
    return flat
