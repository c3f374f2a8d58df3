"""The one training loop every task plugs into.

What a step minimises is a list of objectives (`train.objectives`: today the task's own loss),
which items form each batch is a sampler's choice (`train.sampler`: today length buckets), and
what the run writes (metrics, checkpoints, best weights) goes through one `RunWriter` that knows
the process rank (`train.checkpointing`). The loop does AdamW with a warmup schedule, gradient
accumulation and clipping, early stopping with patience, best-checkpoint selection, and
checkpoints that resume exactly (weights, optimizer, scheduler, RNG states, data position).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
import warnings
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from finegrain import rundir
from finegrain.atomic import fault_point
from finegrain.config import TrainConfig
from finegrain.cpu import native_bf16, training_autocast
from finegrain.device import model_device, to_device
from finegrain.errors import FinegrainError
from finegrain.evaluate.metrics import higher_is_better
from finegrain.inference import predict_outputs  # also re-exported: `from finegrain.train.trainer import predict_outputs`
from finegrain.peft.base import lr_scales
from finegrain.tasks.base import Task
from finegrain.train import precision
from finegrain.train.averaging import WeightAverage
from finegrain.train.batching import piece_tokens
from finegrain.train.checkpointing import RunWriter
from finegrain.train.distributed import (
    ShardedSampler, all_sum, broadcast_from_rank0, check_world, lost_peer_error, peer_lost, sum_gradients, world_size,
)
from finegrain.train.linear_probe import HeadInputs, fit_head
from finegrain.train.objectives import Objective, StepHook, TaskObjective, method_training
from finegrain.train.prefix_cache import compute_prefix, lowest_trainable_layer
from finegrain.train.sampler import Draw, LengthBuckets, Sampler


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


FUSED_ADAMW_DEVICES = ("cpu", "cuda")  # where torch 2.13 has the fused AdamW kernel


def adamw(groups: list[dict[str, Any]], lr: float, weight_decay: float, fused: bool = True) -> torch.optim.AdamW:
    """AdamW over parameter `groups`, in torch's fused kernel (with `fused`) where it takes every parameter.

    The default CPU AdamW runs about six tensor operations per parameter from Python, each a pass
    over the weight; the fused kernel updates each weight in one multi-threaded pass. Full
    fine-tuning of the default model (134 M weights) took 1.9 s an optimizer step in the loop and
    0.34 s fused on 2 loaded cores; adapters gain little, their few weights cost little either way.
    The update is AdamW's, equal to float32 rounding (tests/test_full_speed.py). Tensor subclasses
    (FSDP's sharded DTensors) and devices or dtypes without the kernel keep the default. A resumed
    run keeps the implementation its checkpoint's optimizer was saved with (torch's `load_state_dict`).
    The trainer asks for it for `full` alone: a DoRA run killed and resumed under the fused kernel
    ended on an adapter a few bits off the uninterrupted run's (tests/test_dora.py), and adapters
    gain nothing worth that.
    """
    params = [p for group in groups for p in group["params"]]
    fused = fused and all(type(p) is nn.Parameter and p.device.type in FUSED_ADAMW_DEVICES and p.is_floating_point()
                          for p in params)
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, fused=fused or None)


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
    averaged: dict[str, Any] | None = None  # train.average_last: the evaluations averaged and what they scored
    data: dict[str, Any] | None = None  # what the batches are drawn from (`Trainer.data_print`): a resume checks it


class Trainer:
    """Trains `model` (only its parameters with `requires_grad`) on encoded items.

    Args:
        model: a task model whose `forward(batch, start_layer)` returns outputs for `task.loss`;
            its backbone is `model.model` (see `backbone`).
        task: gives `collate(items, pad_id, hidden)`, `loss(outputs, batch)` and `predict(...)`.
        train: encoded training items (each with `input_ids`): the first objective is `task`'s
            loss over them; LP-FT (`head.init: probe`) and the default sampler read them.
        validation: encoded validation items, or an empty list.
        score: turns the task's predictions on `validation` (`task.predict`) into metrics (a dict;
            numbers at its top level and in its `macro`/`micro`/`weighted` sections are logged).
        run_dir: where `metrics.jsonl`, `checkpoint/` and `best/` go (names: `finegrain.rundir`).
        objectives: more objectives beside the task's own (another task's items, a distillation
            term); a batch trains the objective its sampler's draw names.
        main: the run's own objective over `train` (objective 0), in place of the task's loss
            (`TaskObjective`): one that wraps it adds to it (`train.distill`, `train.adversarial`).
        method: the adapter method's config (`finegrain.peft.METHODS`). What it declares beyond the
            objectives (`train.objectives.method_training`: AdaLoRA's regulariser and rank
            allocation) joins every step; None, or a method that declares nothing, adds nothing.
        hooks: the run's own step hooks beside the method's (their state is in every checkpoint).
        sampler: which items form each batch; default length buckets of `train` (objective 0),
            `config.batch_size` items each, seeded by `config.seed`.
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
        objectives: Sequence[Objective] = (),
        sampler: Sampler | None = None,
        method: Any = None,
        main: Objective | None = None,
        hooks: Sequence[StepHook] = (),
    ):
        self.model, self.task, self.config = model, task, config
        self.validation_items, self.score = list(validation), score
        self.pad_id, self.progress = pad_id, progress
        self.objectives: list[Objective] = [main if main is not None else TaskObjective(task, train), *objectives]
        if sampler is None:
            sampler = LengthBuckets(self.objectives[0].lengths, config.batch_size, config.seed)
        self.world_size = world_size()  # under torchrun each rank trains on its share of every batch
        if self.world_size > 1:
            check_world(config.batch_size, len(train), self.world_size)
            sampler = ShardedSampler(sampler, torch.distributed.get_rank(), self.world_size)
        self.sampler = sampler
        self.sharded = self.world_size > 1 and (config.fsdp or getattr(method, "name", None) == "full")
        self.unsharded, own_embedding_unit = model, True
        if self.sharded:  # FSDP2: a twin sliced across the ranks trains in the model's place (finegrain.train.fsdp)
            from finegrain.train import fsdp  # here: FSDP's imports cost one-process runs start-up time for nothing

            sample = to_device(self.objectives[0].pieces([0], pad_id, None)[0][0], model_device(model))
            model, own_embedding_unit = fsdp.shard(model, model_device(model), sample)
            self.model = model
        self.backbone = backbone(model)
        self.trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if not self.trainable:
            raise FinegrainError("nothing to train: no parameter requires grad; check lora.targets and lora.layers")
        if self.world_size > 1 and not self.sharded:
            broadcast_from_rank0(self.trainable.values())
        self.device = model_device(model)  # where `finegrain.device.place` put it; each batch follows
        on_cpu = self.device.type == "cpu"
        self.bf16 = config.bf16 and (not on_cpu or native_bf16())  # decided once: /proc/cpuinfo is not read per step
        if config.bf16 and not self.bf16:
            warnings.warn("train.bf16: this CPU has no native bf16 (avx512_bf16 or amx_bf16), where bf16 is "
                          "slower than float32; training stays float32", stacklevel=2)
        self.autocast = (training_autocast(self.bf16) if on_cpu
                         else torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16))
        self.bf16_copies: dict[str, torch.Tensor] = {}  # made for `fit`: see finegrain.train.precision
        layers = len(self.backbone.layers)
        lowest = lowest_trainable_layer(model, layers)  # layers below it keep no activations for backward
        shape = backbone(self.unsharded).config
        self.piece_tokens = piece_tokens(config.micro_batch_tokens, shape.hidden_size, shape.intermediate_size,
                                         layers - lowest)
        self.start_layer = 0
        if config.prefix_cache:
            self.start_layer = lowest
            if self.start_layer and not own_embedding_unit:  # the cache would run the table outside the root's forward
                self.start_layer = 0
                fsdp.note("train.prefix_cache: off under FSDP: the embedding table is tied to the output head, so it "
                          "cannot be sharded on its own for the cache to run it alone; every step runs every layer")
        if self.sharded and self.bf16:
            fsdp.note("train.bf16 under FSDP: bf16 autocast alone, without bf16 copies of the frozen matrices "
                      "(each rank holds only its slices of them)")
        self.batches_per_epoch = len(self.sampler)
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / config.grad_accum)
        self.total_steps = max(1, math.ceil(config.epochs * self.steps_per_epoch))
        self.terms, self.hooks = method_training(method, self.total_steps)
        self.hooks.extend(hooks)  # the run's own (augment.judge: current's counts), after the method's
        self.average = WeightAverage(config.average_last) if config.average_last else None
        if self.average is not None:  # a step hook's state is in every checkpoint: resume averages the same weights
            check_evaluations(config, self.total_steps, self.steps_per_epoch)
            self.hooks.append(self.average)
        head_names = {n for n in self.trainable if not n.startswith("model.")}
        head_lr = config.head_lr or config.lr
        scaled = lr_scales(model)  # adapter tensors at another rate (LoRA+'s lora_B), after the others
        groups = [
            {"params": [p for n, p in self.trainable.items() if n not in head_names and n not in scaled], "lr": config.lr},
            {"params": [p for n, p in self.trainable.items() if n in head_names], "lr": head_lr},
            *({"params": [p for n, p in self.trainable.items() if scaled.get(n) == factor], "lr": config.lr * factor}
              for factor in sorted(set(scaled.values()))),
        ]
        self.optimizer = adamw([g for g in groups if g["params"]], config.lr, config.weight_decay,
                               fused=getattr(method, "name", None) == "full")
        warmup = int(config.warmup_ratio * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(config.schedule, warmup, self.total_steps)
        )
        self.state = TrainState()
        self.validation_hidden: list[torch.Tensor] | None = None
        self.writer = fsdp.ShardedRunWriter(Path(run_dir), model) if self.sharded else RunWriter(Path(run_dir))

    # -- public ----------------------------------------------------------------------------

    def fit(self, resume: bool = False) -> TrainState:
        """Train to the end (or early stop) and leave the best weights loaded in the model."""
        data = self.data_print()
        if resume:
            self._check_same_data(data)
            saved = self.writer.load_checkpoint(self.trainable, self.optimizer, self.scheduler, self.hooks)
            for key, value in saved.items():
                setattr(self.state, key, value)
        else:
            self.writer.start_log()
        self.state.data = data
        if self.start_layer > 0:
            # Frozen layers below the adapted ones: computed once here instead of every epoch.
            for objective in self.objectives:
                objective.hidden = self._prefix(objective.task, objective.items)
            fault_point("prefix_cache")  # test-only (tests/test_faults.py)
            if self.task.predicts_from_prefix:
                self.validation_hidden = self._prefix(self.task, self.validation_items)
        if not resume and getattr(getattr(self.task, "head", None), "init", "random") == "probe":
            self._fit_head()
        self.model.train()
        bar = tqdm(
            total=self.total_steps, initial=self.state.step, desc="training", unit="step",
            disable=not self.progress, dynamic_ncols=True,
        )
        try:
            if self.bf16 and not self.sharded:  # below start_layer nothing runs in a step; FSDP: autocast alone
                self.bf16_copies = precision.bf16_copies(self.model, skip=self.backbone.layers[: self.start_layer])
            self._loop(bar)
        except RuntimeError as exc:  # under torchrun: a collective call failed because another rank died
            if self.world_size > 1 and peer_lost(exc):
                raise lost_peer_error(self.writer.run_dir) from None
            raise
        finally:
            self.bf16_copies = {}
            bar.close()
            self.writer.close()
        self.model.eval()
        if self.average is not None and self.average.snapshots:
            self._average()
        self.writer.restore_best(self.trainable)
        if self.sharded:
            self._unshard()
        return self.state

    def data_print(self) -> dict[str, Any]:
        """What the run's batches are drawn from: each objective's row count, and one digest of every
        row's token ids and target with the batching keys. The same data and config give the same
        print on any number of processes; a resume must find the checkpoint's."""
        digest = hashlib.sha256(repr((self.config.batch_size, self.config.grad_accum, self.config.seed)).encode())
        for objective in self.objectives:
            for item in objective.items:
                digest.update(array("q", item.input_ids).tobytes())
                digest.update(repr(getattr(item, "target", getattr(item, "targets", None))).encode())
        return {"rows": [len(objective.items) for objective in self.objectives], "sha256": digest.hexdigest()}

    def _check_same_data(self, data: dict[str, Any]) -> None:
        """Refuse to resume onto other rows or batches than the checkpoint's: its place in the epoch
        would point elsewhere (past the end of a shorter epoch, the loop never advanced)."""
        try:
            saved = json.loads((self.writer.run_dir / rundir.CHECKPOINT / rundir.STATE).read_text(encoding="utf-8"))
        except (OSError, ValueError):  # missing or damaged: the checkpoint's loading says so, in one line
            return
        if not isinstance(saved, dict) or saved.get("data") in (None, data):  # from before the print: not checked
            return
        then, now = sum(saved["data"]["rows"]), sum(data["rows"])
        rows = f"{then} rows then, {now} now" if then != now else f"{now} rows, other tokens or labels"
        raise FinegrainError(
            f"{self.writer.run_dir}: the training data or its batching changed since the checkpoint at step "
            f"{saved['step']} ({rows}); --resume goes on with what the run started with: put the data files and "
            "config.yaml back as they were, or train into another --output"
        )

    def _unshard(self) -> None:
        """FSDP: rank 0's model gets the trained weights back, whole (finegrain.train.fsdp.gather), and
        becomes the trainer's again: the test and the saved model that follow run in one process."""
        from finegrain.train import fsdp

        fsdp.gather(self.model, self.unsharded)
        self.model, self.sharded = self.unsharded, False
        self.backbone = backbone(self.model)
        self.trainable = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        self.model.eval()

    # -- the loop --------------------------------------------------------------------------

    def _loop(self, bar: tqdm) -> None:
        config, state = self.config, self.state
        while state.step < self.total_steps and not state.stopped_early:
            batches = self.sampler.epoch(state.epoch)
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
                self.writer.log({"step": state.step, "epoch": round(self._epoch_progress(), 4),
                                 "train_loss": round(loss, 6), "lr": lr, "tokens_per_s": round(tokens_per_s, 1)})
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:.0f}")
                bar.update(1)
                end_of_epoch = state.batch_in_epoch >= len(batches)
                if (config.eval_every and state.step % config.eval_every == 0) or (
                    end_of_epoch and not config.eval_every
                ) or state.step == self.total_steps:
                    self._validate()
                    if self.average is not None:
                        self.average.snapshot(self.trainable, state.step)
                if end_of_epoch:
                    state.epoch += 1
                    state.batch_in_epoch = 0
                if state.stopped_early or state.step % config.checkpoint_every == 0 or end_of_epoch:
                    self.writer.save_checkpoint(self.trainable, self.optimizer, self.scheduler, vars(state), self.hooks)
                if state.stopped_early:
                    break
        if state.best_step is None:
            self.writer.save_best(self.trainable)  # no validation data: the last weights are the best we have

    def _step(self, group: list[Draw]) -> tuple[float, int, float]:
        """One optimizer step on a group of `grad_accum` batches, each run in micro-batches of at
        most `piece_tokens` (`train.micro_batch_tokens`). Each piece's mean loss is weighted by its
        share of its objective's loss terms in the group, so that the gradient is that of each
        objective's one mean loss over the group, times the objective's weight."""
        start = time.perf_counter()
        pieces = [
            (draw.objective, batch, weight)
            for draw in group if draw.indices  # a rank's share of a small last batch may be empty
            for batch, weight in self.objectives[draw.objective].pieces(draw.indices, self.pad_id, self.piece_tokens)
        ]
        real = len(pieces)
        if self.sharded:  # every rank runs as many forwards (each all-gathers), the surplus at weight 0
            from finegrain.train import fsdp

            first = lambda: (0, self.objectives[0].pieces([0], self.pad_id, None)[0][0], 0.0)  # noqa: E731
            pieces, real = fsdp.even_pieces(pieces, first, self.device)
        totals = [0.0] * len(self.objectives)
        for index, _, weight in pieces:
            totals[index] += weight
        if self.world_size > 1:  # each objective's mean loss is over the global batch
            totals = all_sum(totals, self.device)
        sums, tokens = [0.0] * len(self.objectives), 0
        for number, (index, batch, weight) in enumerate(pieces):
            if self.sharded:  # reduce-scatter once per step, after the last backward (as DDP's no_sync)
                self.model.set_requires_gradient_sync(number == len(pieces) - 1 or bool(self.terms))
            batch = to_device(batch, self.device)  # on the CPU: the batch itself
            objective = self.objectives[index]
            with self.autocast:
                loss = objective.loss(self._forward, batch)
            # totals 0: nothing labelled, every loss is 0
            (loss * (objective.weight * weight) / (totals[index] or 1.0)).backward()
            sums[index] += loss.item() * weight
            tokens += int(batch["lengths"].sum()) if number < real else 0
        extra = 0.0
        for term in self.terms:  # on the weights, not a batch: once per step, in float32
            term_loss = term.weight * term.loss(self.model)
            (term_loss / self.world_size).backward()  # the ranks' gradients are summed below
            extra += term_loss.item()
        if self.world_size > 1:  # every rank then holds the gradient of the global batch (FSDP: its slice of it)
            if not self.sharded:
                sum_gradients(self.trainable.values())
            *sums, tokens = all_sum([*sums, tokens], self.device)
            tokens = int(tokens)
        if self.config.max_grad_norm:
            nn.utils.clip_grad_norm_(self.trainable.values(), self.config.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        for hook in self.hooks:  # before zero_grad: AdaLoRA scores the weights by this step's gradients
            hook.after_step(self.model, self.state.step + 1, self.total_steps)
        self.optimizer.zero_grad(set_to_none=True)
        loss = extra + sum(o.weight * s / (t or 1.0) for o, s, t in zip(self.objectives, sums, totals))
        return loss, tokens, time.perf_counter() - start

    def _forward(self, batch: dict[str, Any]) -> torch.Tensor:
        """The model's outputs in a training step: from `start_layer` up, on bf16 copies of the
        frozen matrices under bf16 training."""
        return precision.forward(self.model, batch, self.start_layer, self.bf16_copies)

    def _epoch_progress(self) -> float:
        return self.state.epoch + self.state.batch_in_epoch / self.batches_per_epoch

    def _prefix(self, task: Task, items: list) -> list[torch.Tensor]:
        """The frozen layers' output (below `start_layer`) for each of `task`'s items (`train.prefix_cache`)."""
        return compute_prefix(
            self.backbone, task, items, self.start_layer, self.pad_id, self.config.eval_batch_size,
            self.progress, getattr(torch, self.config.prefix_cache_dtype), self.writer.run_dir,
            self.config.prefix_cache_ram_mb * 2**20,
        )

    def _fit_head(self) -> None:
        """LP-FT (finegrain.train.linear_probe): the head fitted on the frozen model's pooled states,
        its L2 chosen on validation; then validated, so that the fitted head alone is the first
        candidate for the best checkpoint (fine-tuning that does worse on validation is not kept)."""
        head, main = self.task.head_modules[0], self.objectives[0]
        desc = "fitting the head" if self.progress else None
        with HeadInputs(self.model, head):
            features = predict_outputs(self.model, self.task, main.items, self.pad_id, self.config.eval_batch_size,
                                       main.hidden, self.start_layer, desc)
            validation = None
            if self.validation_items:
                validation = (predict_outputs(self.model, self.task, self.validation_items, self.pad_id,
                                              self.config.eval_batch_size, self.validation_hidden, self.start_layer, desc),
                              torch.tensor([item.target for item in self.validation_items]))
        targets = torch.tensor([item.target for item in main.items])
        l2 = fit_head(self.model, head, features, targets, getattr(self.task, "class_weights", None), validation)
        if self.sharded:  # fitted into the head's gathered weights: into the slices with them
            from finegrain.train import fsdp

            fsdp.keep_gathered_writes(self.model)
        if self.progress:
            tqdm.write(f"head fitted on the frozen states (L2 {l2:g}{', chosen on validation' if validation else ''})")
        self._validate()
        self.state.bad_evals = 0  # patience counts fine-tuning's validations only

    # -- validation and best weights -------------------------------------------------------

    def _average(self) -> None:
        """train.average_last: the mean of the last evaluations' weights becomes the run's (`best/`),
        validated like a checkpoint; the best single evaluation's score stays in `state.averaged`."""
        state, average = self.state, self.average
        average.load_mean(self.trainable)
        state.averaged = {"evaluations": len(average.steps), "steps": list(average.steps)}
        if self.score is not None and self.validation_items:
            predictions = self.task.predict(self.model, self.validation_items, self.pad_id,
                                            self.config.eval_batch_size, self.validation_hidden, self.start_layer)
            metrics = self.score(predictions)
            flat = flat_metrics(metrics)
            name = self.config.metric or self.task.headline_metric
            self.writer.log({"step": state.step, "epoch": round(self._epoch_progress(), 4), "split": "validation",
                             "averaged": len(average.steps), **flat})
            best = state.best_metric if higher_is_better(name) else -state.best_metric
            state.averaged.update({"metric": name, "validation": flat[name], "best_single": best,
                                   "best_single_step": state.best_step})
            state.best_validation = metrics
            if self.progress:
                tqdm.write(f"the mean of the weights at steps {average.steps}: validation {name} {flat[name]:.4f} "
                           f"(the best single evaluation, step {state.best_step}: {best:.4f})")
        self.writer.save_best(self.trainable)

    def _validate(self) -> None:
        if self.score is None or not self.validation_items:
            return
        predictions = self.task.predict(  # in float32, like the final test
            self.model, self.validation_items, self.pad_id, self.config.eval_batch_size,
            self.validation_hidden, self.start_layer,
        )
        metrics = self.score(predictions)
        flat = flat_metrics(metrics)
        state, name = self.state, self.config.metric or self.task.headline_metric
        if name not in flat:  # `check_metric` said it before training; this guards other callers
            raise unknown_metric("train.metric", name, flat)
        # Stored as "higher is better", so that loss-like metrics (rmse, mae) select their lowest value.
        value = float(flat[name]) if higher_is_better(name) else -float(flat[name])
        self.writer.log({"step": state.step, "epoch": round(self._epoch_progress(), 4), "split": "validation", **flat})
        if self.progress:
            tqdm.write(validation_line(state.step, name, float(flat[name]), metrics))
        if state.best_metric is None or value > state.best_metric:
            state.best_metric, state.best_step, state.bad_evals = value, state.step, 0
            state.best_validation = metrics
            self.writer.save_best(self.trainable)
        else:
            state.bad_evals += 1
            if self.config.patience is not None and state.bad_evals >= self.config.patience:
                state.stopped_early = True


def evaluation_count(config: TrainConfig, total_steps: int, steps_per_epoch: int) -> int:
    """How many times a run of `total_steps` validates: every `train.eval_every` steps, or once per epoch."""
    every = config.eval_every
    return math.ceil(total_steps / every) if every else math.ceil(total_steps / steps_per_epoch)


def check_evaluations(config: TrainConfig, total_steps: int, steps_per_epoch: int) -> None:
    """train.average_last: a one-line error when the run evaluates fewer times than the weights it averages."""
    every, count = config.eval_every, evaluation_count(config, total_steps, steps_per_epoch)
    if count < config.average_last:
        schedule = f"every {every} steps" if every else "once per epoch"
        raise FinegrainError(
            f"train.average_last: {config.average_last} evaluations to average, but this run evaluates {count} "
            f"time(s) ({schedule}, {total_steps} steps); set train.eval_every to at most "
            f"{max(1, total_steps // config.average_last)}")


def backbone(model: nn.Module) -> nn.Module:
    """A task model's backbone (its decoder, with `layers`): the one place the trainer reaches into the model."""
    return model.model


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


def unknown_metric(key: str, name: str, flat: dict[str, float]) -> FinegrainError:
    """The one-line error for a selection metric (`key`: train.metric, tasks.NAME.metric) that is not
    among the validation metrics `flat` (`flat_metrics`); it lists them, bar the counts, which select nothing."""
    choices = ", ".join(k for k in flat if not k.startswith("num_"))
    return FinegrainError(f"{key}: '{name}' is not a validation metric; choose one of {choices}")


def check_metric(name: str | None, task: Any, model: nn.Module, tokenizer: Any, examples: Sequence, max_length: int,
                 pad_id: int, key: str = "train.metric") -> None:
    """A selection metric the task does not report, said before training rather than at the first
    validation: the task's metrics of its first four validation examples as the untrained model
    predicts them (those examples alone run). Nothing to check without a metric or validation."""
    if name is None or not examples:
        return
    examples = examples[:4]
    items = task.encode(tokenizer, examples, max_length)
    with warnings.catch_warnings():  # a correlation of four examples may warn: only the names count here
        warnings.simplefilter("ignore")
        flat = flat_metrics(task.metrics(task.predict(model, items, pad_id, 4), task.gold(examples)))
    if name not in flat:
        raise unknown_metric(key, name, flat)
