"""A run end to end: data, model, adapter, training, test evaluation, reports; and using the result.

What the run directory holds, and the names of its files, is `finegrain.rundir`'s.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

from finegrain import paraphrase, rundir
from finegrain.atomic import atomic_write_json, atomic_write_text, exclusive_lock, fault_point, remove_stale_temps
from finegrain.checkpoint.load import DEFAULT_MODEL, is_encoder, load_model, resolve_model
from finegrain.config import CURRENT_JUDGE, SELF_JUDGE, AugmentConfig, RunConfig, dump_yaml, validate
from finegrain.cpu import available_cpus
from finegrain.data.augment import augment_examples
from finegrain.data.split import id_labels, joined_labels, look_alike_labels, shared_line, shared_with_training, stratified_subset
from finegrain.device import model_device, peak_memory_mb, place, reset_peak_memory, resolve_device
from finegrain.errors import RUN_AGAIN, FinegrainError, Interrupted
from finegrain.evaluate.baselines import add_baselines
from finegrain.evaluate.predictions import write_test_predictions
from finegrain.tags import PLAIN
from finegrain.model.bert import BertConfig
from finegrain.peft import (
    DEFAULT_ADAPTER, adapter_layers, inject, load_adapter, method_config, method_options, read_adapter, save_adapter,
    set_adapter,
)
from finegrain.peft.full import FullConfig
from finegrain.peft.full_files import load_head, save_model_dir
from finegrain.rundir import has_checkpoint, is_finished
from finegrain.tasks import long_text_line, long_text_summary, score_file, task_class
from finegrain.warm_start import check_init_from, warm_start
from finegrain.tasks.lexical import attach as attach_tfidf
from finegrain.tasks.classification import attach_temperature
from finegrain.tasks.tokens import predicted_scheme
from finegrain.train.adversarial import AdversarialObjective
from finegrain.train.agreement import AgreeingObjective, Agreement
from finegrain.train.distill import (
    DistillObjective, attach_hidden_match, averaged_outputs, check_teacher, matched_layers, soft_objective,
    teacher_pass, unlabelled_examples, with_unlabelled,
)
from finegrain.train.prefix_cache import lowest_trainable_layer as trained_from
from finegrain.train.ewc import EwcObjective, anchors, fisher_diagonal
from finegrain.train.lwf import LwfObjective, old_head, teacher_outputs
from finegrain.train.mixup import MixupObjective
from finegrain.train.objectives import Objective, TaskObjective
from finegrain.train.recipe import Recipe, recipe_comments, recipe_text
from finegrain.train.recipe import probe_scope
from finegrain.train.tfidf_mix import fit_tfidf_mix, fit_word_mix, frozen_sample, mix_line, test_metrics_mixed
from finegrain.train.checkpointing import process_rank, rng_states, set_rng_states
from finegrain.train.distributed import cpus_per_rank, init_from_env, launched, world_size
from finegrain.train.prefix_cache import compute_prefix, lowest_trainable_layer
from finegrain.train.trainer import Trainer, check_metric, seed_everything

load_run_config = rundir.read_config  # the name `finegrain.cli` and the benchmarks read a run's config by


def build(config: RunConfig, labels: list, progress: bool = True, with_adapter: bool = True, loaded=None):
    """The base model cut and configured for the run, the task, the task model (with a fresh adapter
    of `peft.method`, unless not `with_adapter`), and the adapter's config.

    `loaded`: the (model, tokenizer) pair already read for this config (the recipe's probe reads it).
    """
    llama, tokenizer = loaded or load_model(
        config.model.name, dtype=getattr(torch, config.model.dtype), progress=progress, quantize=config.model.quantize
    )
    backbone = llama.model
    total = len(backbone.layers)
    if config.model.num_layers is not None:
        check_num_layers(config, total)
        backbone.layers = backbone.layers[: config.model.num_layers]
        backbone.config.num_layers = config.model.num_layers
    if isinstance(backbone.config, BertConfig):  # an encoder attends both ways, whatever model.bidirectional says
        _check_encoder_length(config, backbone.config)
        config.lora.targets = encoder_targets(config.lora.targets)
    else:
        backbone.config.causal = not config.model.bidirectional
    backbone.gradient_checkpointing = config.train.activation_checkpointing
    task = task_class(config.task).from_config(config, labels)
    model = task.build_model(llama, tokenizer)
    if config.model.dtype != "float32":
        _heads_take_any_dtype(model, task.head_modules)
    adapter = method_config(config, len(backbone.layers), list(task.head_modules))
    if with_adapter:
        if hasattr(adapter, "tokenize"):  # a method that starts from a text (prompt tuning's init_text)
            adapter.tokenize(tokenizer, config.model.name or DEFAULT_MODEL)
        if config.init_from:  # the earlier run's adapter and head (finegrain.warm_start)
            adapter = warm_start(model, config, labels, list(task.head_modules))
        else:
            inject(model, adapter)
            if config.head.weights:  # the head a pruned model kept (`finegrain prune`'s pruned/)
                load_head(model, task.head_modules, config.head.weights,
                          "set head.weights to a model directory that holds one (finegrain prune's pruned/), or null")
        for name in task.head_modules:  # weights and biases of the head
            model.get_submodule(name).requires_grad_(True)
    return model, tokenizer, task, adapter


def run_device(config: RunConfig, name: str | None = None) -> torch.device:
    """Where the run computes: `name` (a `--device` flag) or `train.device` (`finegrain.device`).

    A quantised base (`model.quantize`) computes in finegrain's CPU kernels: `auto` keeps it on
    the CPU, another device is the one-line error.
    """
    key = "--device" if name else "train.device"
    name = name or config.train.device
    if config.model.quantize and name != "cpu":
        if name == "auto":
            return torch.device("cpu")
        raise FinegrainError(f"{key}: {name}, but model.quantize: {config.model.quantize} runs on finegrain's CPU "
                             "kernels only; use cpu, or model.quantize: null")
    return resolve_device(name, key)


def base_model_metrics(task, model, items: list, examples: list, pad_id: int, batch_size: int) -> dict[str, Any]:
    """The test metrics of the base model: every adapter switched off, then the run's switched on again."""
    layers = list(adapter_layers(model).values())
    set_adapter(layers, None)
    try:
        return task.metrics(task.predict(model, items, pad_id, batch_size), task.gold(examples))
    finally:
        set_adapter(layers, DEFAULT_ADAPTER)


def _check_encoder_length(config: RunConfig, encoder: BertConfig) -> None:
    """An encoder's learned positions end at `max_position_embeddings`: longer rows have no position to read."""
    if config.data.max_length > encoder.max_position_embeddings:
        raise FinegrainError(
            f"data.max_length: {config.data.max_length} tokens is beyond the encoder's {encoder.max_position_embeddings} "
            f"positions; set data.max_length to at most {encoder.max_position_embeddings} (data.long_texts: windows reads the rest)"
        )


# The decoder's attention projections by their BERT names: LoRA's default targets (q_proj, v_proj) then
# adapt an encoder's query and value, which is also PEFT's default for BERT.
ENCODER_TARGETS = {"q_proj": "query", "k_proj": "key", "v_proj": "value"}


def encoder_targets(targets: list[str] | str) -> list[str] | str:
    """`lora.targets` for an encoder: q_proj, k_proj, v_proj by their BERT names, the rest as they are."""
    return [ENCODER_TARGETS.get(t, t) for t in targets] if isinstance(targets, list) else targets


def refuse_generative_on_encoder(config: RunConfig) -> None:
    """A task that generates text (instruct) needs a decoder's language-model head: on an encoder it is
    refused from the model's config.json alone, before any weights load."""
    if task_class(config.task).peft_task_type == "CAUSAL_LM" and is_encoder(config.model.name):
        where = getattr(config, "sources", {}).get("task", "config")
        raise FinegrainError(
            f"{where}: task '{config.task}' generates text, which needs a decoder's language-model head, and "
            f"model '{config.model.name}' is a BERT encoder; use a LLaMA-family model (smollm2-135m) for it"
        )


def _heads_take_any_dtype(model, head_modules) -> None:
    """Heads stay float32 (their optimizer state needs it) over a bfloat16 backbone (`model.dtype`):
    each casts its input to its own dtype, for every task, instead of a dtype mismatch in predict."""
    def cast(module, args):
        dtype = next(module.parameters()).dtype
        return tuple(a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)

    for name in head_modules:
        head = model.get_submodule(name)
        if any(True for _ in head.parameters()):
            head.register_forward_pre_hook(cast)


def output_dir(config: RunConfig) -> Path:
    """The run directory `config.output` names (or a new dated one), refused when a run cannot go there."""
    run_dir = Path(config.output or f"runs/{config.task}-{time.strftime('%Y%m%d-%H%M%S')}")
    if run_dir.exists() and not run_dir.is_dir():
        raise FinegrainError(f"{run_dir}: exists and is a file, not a run directory; choose another --output")
    if run_dir.is_dir() and not (run_dir / rundir.CONFIG).exists():
        found = [name for name in rundir.RUN_OUTPUTS if (run_dir / name).exists()]
        if found:
            raise FinegrainError(
                f"{run_dir}: holds {found[0]} but no config.yaml, so it is not a finegrain run and a run would "
                "overwrite it; choose another --output (a new or empty directory)"
            )
    return run_dir


def open_run(run_dir: Path, config: RunConfig | None, resume: bool) -> tuple[RunConfig, Path | None]:
    """Decide, with the run directory locked, whether the run continues, starts over or is refused.

    The rule (README, docs/RELIABILITY.md): a directory with a checkpoint or a finished adapter
    holds a run, which only `--resume` continues and nothing overwrites. One with only what a
    start writes (config.yaml, labels.json, a partial metrics.jsonl: a start that failed or was
    killed before its first checkpoint) is not a run yet: `--output` starts it again with the new
    config, `--resume` starts it again from the beginning with its config.yaml.

    Returns:
        The config to train with, and the run directory when training continues from its
        checkpoint (None when it starts from the beginning).
    """
    if (run_dir / rundir.CONFIG).exists():  # only in a run's own directories, never a stranger's
        for directory in (run_dir, rundir.adapter_dir(run_dir), rundir.model_dir(run_dir)):
            remove_stale_temps(directory)  # also puts back a checkpoint a kill left moved aside
    if resume:
        config = rundir.read_config(run_dir)
        if has_checkpoint(run_dir):
            rundir.require_base_model(run_dir, config)
            # The training rows are checked against the checkpoint's print (Trainer.fit), the other files here.
            if (path := rundir.changed_data_file(run_dir, skip=(config.data.train,))) is not None:
                raise FinegrainError(f"{run_dir}: {path} changed since the run started; --resume goes on with what the "
                                     "run started with: put the file back as it was, or train into another --output")
            return config, run_dir
        if is_finished(run_dir):
            raise FinegrainError(
                f"{run_dir}: a finished run without a checkpoint to continue from; train it again into another --output"
            )
        _clear_unstarted(run_dir)
        # The keys the user set, kept from a start so that `--resume` of a start that never reached a
        # checkpoint (config.yaml then predates the recipe's choices) plans the same recipe again.
        if (kept := rundir.kept_keys(run_dir)) is not None:
            config.explicit = kept
        return config, None
    if (run_dir / rundir.CONFIG).exists():
        if not _holds_run_config(run_dir) or has_checkpoint(run_dir) or is_finished(run_dir):
            raise FinegrainError(
                f"{run_dir}: already holds a run; continue it with `finegrain train --resume {run_dir}` or choose another --output"
            )
        _clear_unstarted(run_dir)
    keep_settings(run_dir, config)
    return config, None


def keep_settings(directory: Path, config: RunConfig, name: str = rundir.CONFIG) -> None:
    """Write `config` as `name` (its local paths made absolute), the keys the user set and a run's data
    files' digests beside it: what a start records and `rundir.refuse_other_settings` compares a later
    command with."""
    rundir.with_absolute_paths(config)
    atomic_write_text(directory / name, dump_yaml(config))
    if hasattr(config, "explicit"):  # the keys the user set, which the data recipe leaves alone
        atomic_write_json(directory / rundir.EXPLICIT_KEYS, sorted(config.explicit))
    if name == rundir.CONFIG:
        atomic_write_json(directory / rundir.DATA_FILES, rundir.data_file_digests(config))


def check_num_layers(config: RunConfig, total: int) -> None:
    """model.num_layers against the `total` layers of the loaded model (a config written for another)."""
    if isinstance(config.model.num_layers, int) and not 1 <= config.model.num_layers <= total:
        raise FinegrainError(f"model.num_layers: {config.model.num_layers} is not between 1 and {total}, the layers of "
                             f"{config.model.name or DEFAULT_MODEL}; set one of those, or leave it out to keep them all")


def _holds_run_config(run_dir: Path) -> bool:
    """Whether config.yaml is a finegrain run config (a file of another program is never replaced)."""
    try:
        rundir.read_config(run_dir)
    except FinegrainError:
        return False
    return True


def _clear_unstarted(run_dir: Path) -> None:
    """Remove what a start that never reached a checkpoint left, so the next start is a clean one."""
    for name in (rundir.METRICS_LOG, rundir.LABELS, rundir.SKIPPED_ROWS, rundir.RECIPE):
        (run_dir / name).unlink(missing_ok=True)
    for name in (rundir.BEST, rundir.CHECKPOINT, rundir.TENSORBOARD, rundir.TFIDF):
        shutil.rmtree(run_dir / name, ignore_errors=True)


def _discard(run_dir: Path) -> None:
    """Delete a run directory this call created, after an error before any checkpoint: nothing
    in it is worth keeping, and an empty shell would only be in the way of the next try."""
    if not has_checkpoint(run_dir) and not is_finished(run_dir):
        shutil.rmtree(run_dir, ignore_errors=True)


def train(config: RunConfig, resume_dir: str | Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Train, evaluate on the test split, write the run directory; returns metrics.json's content.

    The run directory is locked while this runs: a second `train` on it fails at once. With
    `resume_dir`, a run that never reached its first checkpoint starts again from the beginning
    (see `open_run`). A directory this call created is removed again if it fails before a checkpoint.
    """
    if launched() and world_size() == 1:  # under torchrun: join the job (gloo on the CPU, nccl on CUDA)
        init_from_env(run_device(config if resume_dir is None else rundir.read_config(resume_dir)))
    if process_rank() > 0:
        return _train_beside_rank0()
    if resume_dir is not None and not (Path(resume_dir) / rundir.CONFIG).is_file():
        rundir.read_config(resume_dir)  # the one-line "not a run directory" error, before anything is created
    if resume_dir is None:
        try:
            task_class(config.task)  # the config layer cannot read the task table: checked here, before anything is created
        except FinegrainError as exc:
            raise FinegrainError(f"{getattr(config, 'sources', {}).get('task', 'config')}: {exc}") from None
        method_options(config, note=False)  # nor the method table (build notes what a switch of method drops)
        refuse_generative_on_encoder(config)
        if config.tasks:
            raise FinegrainError("tasks: this config is a multi-task run; train it with `finegrain train` "
                                 "or finegrain.multitask.train, which trains every task together")
        if config.continual.classes or config.continual.tasks:
            raise FinegrainError("continual: this config is a sequence of stages; train it with `finegrain train` "
                                 "or finegrain.continual.train_sequence, which run one stage at a time")
        if config.init_from:
            check_init_from(config)
        if config.distill.teacher:
            check_teacher(config)  # a finished run of this task and label set (reads the data's labels)
            config.distill.teacher = str(Path(config.distill.teacher).resolve())  # config.yaml resumes from anywhere
        check_paraphrase_sources(config)
        run_device(config)  # a device torch cannot see: refused before the model loads
    run_dir = Path(resume_dir) if resume_dir is not None else output_dir(config)
    return attempt(run_dir, config, resume_dir is not None,
                   lambda config, resume_from: _train(config, run_dir, resume_from, progress))


def attempt(run_dir: Path, config: RunConfig | None, resume: bool,
            start: Callable[[RunConfig, Path | None], dict[str, Any]]) -> dict[str, Any]:
    """One attempt at a run, for `train` and the multi-task `train`: `start(config, resume_from)`
    with the run directory locked and opened (`open_run`: continue, start over or refuse). A
    failure's line is recorded in error.txt, and a directory this call created is removed again
    when it holds no checkpoint; Ctrl-C leaves the run as it is and says how it goes on."""
    created = not run_dir.exists()
    with exclusive_lock(run_dir, "finegrain train"):
        try:
            config, resume_from = open_run(run_dir, config, resume)
            (run_dir / rundir.ERROR).unlink(missing_ok=True)  # a previous try's: this one starts afresh
            try:
                return start(config, resume_from)
            except Exception as exc:  # recorded for readers of the run (`finegrain ui`); Ctrl-C is no failure
                atomic_write_text(run_dir / rundir.ERROR, error_line(exc) + "\n")
                raise
        except Exception:
            if created:
                _discard(run_dir)
            raise
        except KeyboardInterrupt:
            raise Interrupted(rundir.resume_hint(run_dir)) from None


def train_or_resume(config: RunConfig, progress: bool = True) -> dict[str, Any]:
    """One run of a command of several (sweep, continual): trained, read back where an earlier
    attempt finished it, or resumed from its checkpoint; so the same command, run again after a
    stop, goes on where it stopped. Returns the run's metrics.json content."""
    run_dir = Path(config.output)
    if (run_dir / rundir.CONFIG).is_file():
        rundir.refuse_other_settings(run_dir, config)
    if (run_dir / rundir.METRICS).is_file():
        return json.loads((run_dir / rundir.METRICS).read_text(encoding="utf-8"))
    try:
        if has_checkpoint(run_dir):
            return train(None, resume_dir=run_dir, progress=progress)
        return train(config, progress=progress)
    except Interrupted:  # not this run's own `train --resume`: the command's
        raise Interrupted(RUN_AGAIN) from None


def _train_beside_rank0() -> dict[str, Any]:
    """A torchrun rank above 0: it waits for rank 0 to open the run and plan its config, trains its
    share of every batch with that config and writes nothing; rank 0 tests and writes the results.
    Returns an empty dict."""
    shared: list[Any] = [None, None]
    torch.distributed.broadcast_object_list(shared)  # rank 0's, in `_train`
    run_dir, resume = Path(shared[0]), shared[1]
    config = rundir.read_config(run_dir)
    vars(config).pop("explicit", None)  # final as rank 0 planned it: no recipe here
    return _train(config, run_dir, run_dir if resume else None, progress=False)


def error_line(exc: BaseException) -> str:
    """The error as one line, as the command line prints it."""
    text = str(exc) if isinstance(exc, FinegrainError) else f"internal error: {type(exc).__name__}: {exc}"
    return " ".join(text.split()) or type(exc).__name__


def _train(config: RunConfig, run_dir: Path, resume_dir: Path | None, progress: bool) -> dict[str, Any]:
    """`train` once the run directory is locked and open; `resume_dir` is set when continuing a checkpoint."""
    torch.set_num_threads(config.train.threads or cpus_per_rank(available_cpus()))
    writes = process_rank() == 0  # under torchrun, only rank 0 writes the run
    seed_everything(config.train.seed)
    started = time.perf_counter()

    splits = task_class(config.task).load_splits(config.data)
    plain = config.task == "ner" and predicted_scheme(config) == PLAIN  # tags without entities: PRP and PRP$, JJ|VBN
    if writes and resume_dir is None:  # a resume keeps the start's (a changed training file is refused: Trainer.fit)
        atomic_write_json(run_dir / rundir.LABELS, splits.labels)
        notes = (look_alike_labels(splits.labels, punctuation=not plain), None if plain else joined_labels(splits.labels),
                 id_labels(splits.labels))
        for note in notes:
            if note:
                print(note, flush=True)
    shared = shared_with_training(splits)  # before augmentation, whose copies are of training texts
    if writes and resume_dir is None and shared:
        print(shared_line(shared, splits.origin), flush=True)
    paraphrases, tried = paraphrase_training(config, splits, run_dir, resume_dir is not None, writes, progress)
    splits.train, augmented = augment_examples(splits.train, config.augment, config.train.seed)  # training only
    if config.augment.paraphrase:  # after the token-level noise, which copies originals alone
        splits.train, augmented = splits.train + paraphrases, {**augmented, "paraphrase": len(paraphrases)}
    loaded, recipe = None, []
    scope = probe_scope(config)  # None: the whole recipe; the auto keys alone (model.num_layers: auto) under recipe: off
    if resume_dir is None and (scope is None or scope):
        loaded = load_model(
            config.model.name, dtype=getattr(torch, config.model.dtype), progress=progress, quantize=config.model.quantize
        )
        check_num_layers(config, len(loaded[0].model.layers))  # before the probe, which takes a while on a real model
        recipe = Recipe(config, getattr(config, "explicit", set()), scope).plan(splits, loaded[1], loaded[0], progress)
        validate(config, "the recipe")
        if recipe:
            atomic_write_json(run_dir / rundir.RECIPE, {c.key: {"value": c.value, "reason": c.reason} for c in recipe})
        atomic_write_text(run_dir / rundir.CONFIG, recipe_comments(recipe) + dump_yaml(config))
        if progress and recipe:
            print(recipe_text(recipe), flush=True)
    every = splits  # what the TF-IDF mix and the baselines learn from: every training example
    if config.train.fine_tune_examples and config.train.fine_tune_examples < len(splits.train):
        sampled = stratified_subset(splits.train, config.train.fine_tune_examples, seed=config.train.seed)
        splits = dataclasses.replace(splits, train=sampled)
    if writes and world_size() > 1:  # the other ranks wait for the run's final config (`_train_beside_rank0`)
        torch.distributed.broadcast_object_list([str(run_dir), resume_dir is not None])
    model, tokenizer, task, adapter = build(config, splits.labels, progress, loaded=loaded)
    device = run_device(config)
    place(model, device)  # on the CPU: nothing
    reset_peak_memory(device)
    pad_id = tokenizer.pad_token_id
    max_length = config.data.max_length
    train_items = task.encode(tokenizer, splits.train, max_length)
    val_items = task.encode(tokenizer, splits.validation, max_length)
    test_items = task.encode(tokenizer, splits.test, max_length) if splits.test else []
    long_texts = long_text_summary(task, config.data, {"train": train_items, "validation": val_items, "test": test_items})
    if writes and long_texts and long_text_line(long_texts):  # never cut in silence (said once, by rank 0)
        print(long_text_line(long_texts), flush=True)
    task.set_class_weights(train_items)
    if torch.is_tensor(getattr(task, "class_weights", None)):  # the loss weighs the logits by them, on their device
        task.class_weights = task.class_weights.to(device)
    val_gold = task.gold(splits.validation)
    eval_batch = config.train.eval_batch_size

    def score(predictions: list[dict[str, Any]]) -> dict[str, Any]:
        return task.metrics(predictions, val_gold)

    check_metric(config.train.metric, task, model, tokenizer, splits.validation, max_length, pad_id)  # before training
    # head.tfidf_mix: auto on a small validation split scores the training texts too, by the untrained model's states
    frozen = frozen_sample(config, task, model, tokenizer, every, pad_id) if writes else None
    extra: list[Objective] = []  # distill.unlabelled's objective, beside the main one
    hooks: list[Agreement] = []  # augment.judge: current's counts
    main = training_objective(config, task, model, train_items, splits, progress, tokenizer, extra, hooks)
    if config.continual.strategy in ("ewc", "lwf"):  # a run started from an earlier one holds on to it
        main = continual_objective(config, task, model, train_items, splits.labels,
                                   main or TaskObjective(task, train_items), pad_id, progress)
    trainer = Trainer(model, task, train_items, config.train, run_dir, pad_id, val_items, score, progress, method=adapter,
                      main=main, objectives=extra, hooks=hooks,
                      sampler=with_unlabelled(train_items, extra, config.train.batch_size, config.train.seed))
    state = trainer.fit(resume=resume_dir is not None)
    if not writes:
        return {}
    # Before the adapter, which marks the run finished: a finished run's TF-IDF or word model is complete.
    mix_key, fit_mix = (("word_mix", fit_word_mix) if config.task == "ner"
                        else ("tfidf_mix", partial(fit_tfidf_mix, frozen=frozen)))
    mix = fit_mix(config, task, model, every, val_items, pad_id, run_dir, trainer.validation_hidden, trainer.start_layer)
    if mix and progress:
        print(mix_line(mix), flush=True)
    if isinstance(adapter, FullConfig):  # the trained model itself, as a Hugging Face directory
        save_model_dir(model, tokenizer, task.head_modules, rundir.model_dir(run_dir))
    else:
        save_adapter(
            model, adapter, rundir.adapter_dir(run_dir), base_model_name_or_path=config.model.name or DEFAULT_MODEL,
            modules_to_save=list(task.head_modules), task_type=task.peft_task_type,
        )

    results: dict[str, Any] = {
        "task": config.task,
        "labels": splits.labels,
        "train": {
            "examples": len(splits.train),
            **({"sampled_from": len(every.train)} if every is not splits else {}),  # train.fine_tune_examples
            "rows": len(train_items),  # what the model trains on: QA windows, packed instruct rows
            "steps": state.step,
            "epochs": round(state.step / trainer.steps_per_epoch, 3),
            "best_step": state.best_step,
            "stopped_early": state.stopped_early,
            "train_seconds": round(state.train_seconds, 2),
            "tokens_per_s": round(state.train_tokens / max(state.train_seconds, 1e-9), 1),
            "frozen_prefix_layers": trainer.start_layer,
            "device": device.type,
            "peft_method": config.peft.method,
            "trainable_parameters": sum(p.numel() for p in trainer.trainable.values()),
            "skipped_rows": len(splits.skipped),
            **({"unlabelled": len(extra[0].items)} if extra else {}),  # distill.unlabelled's texts, the teacher's labels
            **({"average_last": state.averaged} if state.averaged else {}),  # the run's weights are this mean
            **({"augmented": augmented} if augmented else {}),  # perturbed copies among `examples`, per kind
            **({"paraphrases": tried} if config.augment.paraphrase else {}),  # rewrites tried; augmented.paraphrase kept
            **({"paraphrase_agreement": hooks[0].state_dict()} if hooks else {}),  # judge: current: rows seen, agreed with
        },
    }
    if (run_dir / rundir.RECIPE).is_file():  # planned when the run started, which may be a process before this
        results["recipe"] = json.loads((run_dir / rundir.RECIPE).read_text(encoding="utf-8"))
    if state.best_validation is not None:  # measured when the best weights were chosen
        results["validation"] = {**state.best_validation, "source": splits.origin["validation"]}
    if long_texts or shared:
        results["data"] = {**(long_texts or {}), **({"shared_with_training": shared} if shared else {})}
    if mix:
        results[mix_key] = mix
    if splits.test:
        fault_point("test")  # test-only (tests/test_faults.py)
        testing = "testing" if progress else None
        if mix and mix["weight"]:
            results["test"], mix["test_model_alone"], predictions = test_metrics_mixed(
                task, model, test_items, splits.test, pad_id, eval_batch, testing)
        else:
            predictions = task.predict(model, test_items, pad_id, eval_batch, progress=testing)
            results["test"] = task.metrics(predictions, task.gold(splits.test))
        records = "tags" if plain else config.task  # plain tags have no entities to show
        write_test_predictions(run_dir / rundir.TEST_PREDICTIONS, records, splits.test, predictions)
        if getattr(task, "reports_base_model", False) and adapter_layers(model):  # the test text, adapter off (task lm)
            results["test"]["base_model"] = base_model_metrics(task, model, test_items, splits.test, pad_id, eval_batch)
        results["test"]["source"] = splits.origin["test"]
    results["train"]["total_seconds"] = round(time.perf_counter() - started, 2)
    if device.type == "cuda":  # on the CPU the process's peak RSS tells (benchmarks read it)
        results["train"]["peak_memory_mb"] = peak_memory_mb(device)
    add_baselines(results, config.data, every)  # after the clock: the whole-run time is finegrain's own
    if splits.skipped:
        atomic_write_text(run_dir / rundir.SKIPPED_ROWS, "\n".join(splits.skipped) + "\n")
    write_results(run_dir, results, task, config.train.metric or task.headline_metric)
    trainer.writer.finish()  # the trackers of train.report_to get the final metrics, reports and adapter
    return results


def training_objective(config: RunConfig, task, model, items: list, splits, progress: bool, tokenizer=None,
                       extra: list | None = None, hooks: list | None = None) -> Objective | None:
    """The run's objective over its training `items`: the task's loss, distilled from `distill.teacher`
    (`train.distill`: the teacher runs here, once, also over `distill.unlabelled`'s texts, whose
    objective, encoded by the student's `tokenizer`, is appended to `extra`), with mixed pairs of
    texts (`augment.mixup`, `train.mixup`), counting the paraphrases only where the model agrees
    with their label (`augment.judge: current`, `train.agreement`, whose counts are appended to
    `hooks`) and made adversarial by `adversarial.method` (`train.adversarial`) where the config
    says so; None for the task's loss alone."""
    judged = config.augment.paraphrase and config.augment.judge == CURRENT_JUDGE
    if not (config.distill.teacher or config.adversarial.method or config.augment.mixup or judged):
        return None
    objective: Objective = TaskObjective(task, items)
    if judged:
        hooks.append(Agreement())
        objective = AgreeingObjective(objective, {i for i, e in enumerate(splits.train) if paraphrase.is_paraphrase(e)},
                                      hooks[-1])
    if config.distill.teacher:
        distill, layers = config.distill, len(model.model.layers)
        unlabelled = unlabelled_examples(task, config) if distill.unlabelled else []
        passes = []
        for teacher_dir, teacher_config in check_teacher(config, splits.labels):  # one run, or an ensemble's members
            with torch.random.fork_rng():  # building a teacher draws a head init: the student's seeds stay its own
                teacher, teacher_tokenizer, teacher_task = build_trained(teacher_config, teacher_dir, progress)
            place(teacher, model_device(model))  # beside the student (off the CPU its batches follow it there)
            pairs = (matched_layers(layers, len(teacher.model.layers), trained_from(model, layers))
                     if distill.hidden else [])
            passes.append(teacher_pass(teacher, teacher_task, teacher_tokenizer, splits.train + unlabelled,
                                       teacher_config.data.max_length, splits.labels, config.train.eval_batch_size,
                                       progress, [t for _, t in pairs]))
            width = teacher.model.config.hidden_size
            del teacher
        labelled, rest = averaged_outputs(passes).split(len(splits.train))
        match = attach_hidden_match(model, pairs, width, distill.hidden_weight) if pairs else None
        objective = DistillObjective(task, items, teacher=labelled, temperature=distill.temperature,
                                     alpha=distill.alpha, match=match)
        if unlabelled:
            soft = soft_objective(task, task.encode(tokenizer, unlabelled, config.data.max_length), rest,
                                  distill.temperature, match)
            extra.append(adversarial_objective(config, model, soft))
    if config.augment.mixup:
        head = model.get_submodule(task.head_modules[0])
        objective = MixupObjective(objective, head, config.augment.mixup, config.augment.mixup_alpha)
    return adversarial_objective(config, model, objective)


def paraphrase_training(config: RunConfig, splits, run_dir: Path, resume: bool, writes: bool,
                        progress: bool) -> tuple[list, int]:
    """`augment.paraphrase`: the rewrites of training examples its judge kept (finegrain.paraphrase)
    and how many were tried; written to the run's paraphrases.jsonl, and read back from it on resume."""
    augment = config.augment
    if not augment.paraphrase:
        return [], 0
    path = run_dir / rundir.PARAPHRASES
    found = paraphrase.read_rewrites(path, splits.train) if resume else None
    if found is None:
        if launched():
            raise FinegrainError("augment.paraphrase: the paraphrases are written in one process; "
                                 "train without torchrun, or set augment.paraphrase to 0")
        if augment.judge == CURRENT_JUDGE:
            judge = None  # every usable rewrite is kept: the model judges them as it trains
        elif augment.judge == SELF_JUDGE:
            judge = judge_run(str(train_own_judge(config, run_dir, progress)), splits.labels)
        elif augment.judge:
            judge = judge_run(augment.judge, splits.labels)
        else:
            judge = paraphrase.tfidf_judge(splits.train, splits.labels)
        llama, tokenizer = load_paraphraser(augment.paraphraser, progress)
        found = paraphrase.paraphrase_examples(
            splits.train, augment.paraphrase, config.train.seed, judge=judge,
            write=lambda texts: paraphrase.rewrite(llama, tokenizer, texts, config.train.seed, augment.paraphrase_prompt,
                                                   progress=progress))
        if writes:
            paraphrase.write_rewrites(path, found[1])
    kept, records = found
    if progress and augment.judge == CURRENT_JUDGE:
        print(f"paraphrases: {len(kept)} of {len(records)} written; the classifier judges them as it trains", flush=True)
    elif progress:
        print(f"paraphrases: {len(kept)} of {len(records)} kept (written and given their text's label by the judge)",
              flush=True)
    return kept, len(records)


def train_own_judge(config: RunConfig, run_dir: Path, progress: bool) -> Path:
    """`augment.judge: self`: this run's config without augmentation, trained into RUN/judge (LAMBADA's
    classifier of the original data, in the same command); a judge an earlier start left is trained again.
    The run's own random streams are left as they were, so its training is the same as with `judge: RUN`."""
    judge_dir = run_dir / rundir.JUDGE
    shutil.rmtree(judge_dir, ignore_errors=True)
    judge_config = copy.deepcopy(config)
    judge_config.augment, judge_config.output = AugmentConfig(), str(judge_dir)
    if progress:
        print(f"augment.judge: self: training the judge, this config without augmentation, into {judge_dir}", flush=True)
    streams = rng_states()
    with torch.random.fork_rng():  # the devices' streams too
        train(judge_config, progress=progress)
    set_rng_states(streams)
    return judge_dir


def check_paraphrase_sources(config: RunConfig) -> None:
    """`augment.paraphrase`'s judge and paraphraser checked before anything is created (one-line
    errors), their paths made absolute so that config.yaml resumes from anywhere."""
    augment = config.augment
    if not augment.paraphrase:
        return
    if augment.judge in (SELF_JUDGE, CURRENT_JUDGE):
        if (Path(augment.judge) / rundir.CONFIG).is_file():
            raise FinegrainError(f"augment.judge: {augment.judge} is a keyword, and ./{augment.judge} is also a run "
                                 f"here; write ./{augment.judge} to judge with that run, or start from another directory")
    elif augment.judge:
        check_judge(augment.judge)
        augment.judge = str(Path(augment.judge).resolve())
    if augment.paraphraser and (Path(augment.paraphraser) / rundir.CONFIG).is_file():
        instruct_run(augment.paraphraser)
        augment.paraphraser = str(Path(augment.paraphraser).resolve())
    else:
        try:
            resolve_model(augment.paraphraser)
        except FinegrainError as exc:
            raise FinegrainError(f"augment.paraphraser: {exc}") from None


def instruct_run(source: str) -> RunConfig:
    """The config of `augment.paraphraser` naming a run: a finished run of task instruct, or a one-line error."""
    try:
        config = rundir.read_config(source)
        rundir.require_adapter(source)
    except FinegrainError as exc:
        raise FinegrainError(f"augment.paraphraser: {exc}") from None
    if config.task != "instruct":
        raise FinegrainError(f"augment.paraphraser: {source} is a {config.task} run; name a run of task instruct, or a model")
    return config


def load_paraphraser(source: str | None, progress: bool):
    """The instruct model and tokenizer of `augment.paraphraser`: a run of task instruct (its model with
    the adapter), else a model as `model.name` takes it; null: the default model."""
    source = source or DEFAULT_MODEL
    with torch.random.fork_rng():  # building draws initial weights: the run's own seed stream stays its own
        if (Path(source) / rundir.CONFIG).is_file():
            model, tokenizer, _ = build_trained(instruct_run(source), source, progress)
            return model.llama, tokenizer
        try:
            return load_model(source, progress=progress)
        except FinegrainError as exc:
            raise FinegrainError(f"augment.paraphraser: {exc}") from None


def check_judge(judge_dir: str, labels: list | None = None) -> None:
    """`augment.judge` is a finished single-label classification run (of `labels`, when given)."""
    try:
        config = rundir.read_config(judge_dir)
        rundir.require_adapter(judge_dir)
        theirs = rundir.read_labels(judge_dir)
    except FinegrainError as exc:
        raise FinegrainError(f"augment.judge: {exc}") from None
    if config.task != "classification" or config.data.multi_label or (labels is not None and sorted(theirs) != sorted(labels)):
        raise FinegrainError(f"augment.judge: {judge_dir} is not a single-label classification run"
                             + (f" of this run's labels {labels}" if labels is not None else "")
                             + "; name one, set augment.judge: self (this config trained without augmentation "
                             "judges) or current (the model as it trains), or unset it (TF-IDF judges)")


def judge_run(judge_dir: str, labels: list) -> Any:
    """`augment.judge`: the labels a finished classification run of this run's label set gives texts."""
    check_judge(judge_dir, labels)
    with torch.random.fork_rng():
        predictor = Predictor(judge_dir)
    return lambda texts: [p["label"] for p in predictor.predict(texts)] if texts else []


def adversarial_objective(config: RunConfig, model, objective: Objective) -> Objective:
    """`objective` made adversarial by `adversarial.method` (`train.adversarial`), or as it is."""
    adversarial = config.adversarial
    if not adversarial.method:
        return objective
    return AdversarialObjective(objective, adversarial.method, adversarial.epsilon, adversarial.steps,
                                model.model.embed_tokens)


def continual_objective(config: RunConfig, task, model, items: list, labels: list, inner: Objective, pad_id: int,
                        progress: bool) -> Objective:
    """`continual.strategy` ewc or lwf of a run started from an earlier one (`init_from`): the earlier
    run's trained model is built here, once, and gives the Fisher information and weights to hold
    (`train.ewc`), or its heads' outputs on this run's training items (`train.lwf`)."""
    strategy, continual, source = config.continual.strategy, config.continual, config.init_from
    if not source:
        raise FinegrainError(f"continual.strategy: {strategy} holds on to an earlier run; set init_from (its run directory)")
    if strategy == "lwf" and (config.task != "classification" or config.distill.teacher):
        raise FinegrainError(f"continual.strategy: lwf distils the earlier run's class outputs (classification, without "
                             f"distill.teacher); this run is {config.task}" + (" with a teacher" if config.distill.teacher else "")
                             + "; use ewc or replay")
    earlier_config = rundir.read_config(source)
    with torch.random.fork_rng():  # building draws a head init: this run's seed stream stays its own
        earlier, tokenizer, earlier_task = build_trained(earlier_config, source, progress)
    place(earlier, model_device(model))
    batch_size = config.train.eval_batch_size
    if strategy == "lwf":
        head = task.head_modules[0]
        runs = continual.lwf_heads or [source]
        weights = [read_adapter(rundir.adapter_dir(run))[1][f"{head}.weight"] for run in runs]
        heads = [old_head(rundir.read_labels(run), w, labels) for run, w in zip(runs, weights)]
        teacher = teacher_outputs(earlier, earlier_task, items, pad_id, head, weights, batch_size, progress)
        return LwfObjective(task, items, teacher=teacher, temperature=continual.lwf_temperature,
                            alpha=continual.lwf_alpha, model=model, head=head, heads=heads)
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    for name, p in earlier.named_parameters():  # the weights this run trains, and only those, need F
        p.requires_grad_(name in trained)
    earlier_splits = task_class(earlier_config.task).load_splits(earlier_config.data)
    earlier_items = earlier_task.encode(tokenizer, earlier_splits.train, earlier_config.data.max_length)
    start, hidden = 0, None
    if config.train.prefix_cache:  # the frozen layers run once per example, as in training
        start = lowest_trainable_layer(earlier, len(earlier.model.layers))
        hidden = compute_prefix(earlier.model, earlier_task, earlier_items, start, pad_id, batch_size, False) if start else None
    fisher = fisher_diagonal(earlier, earlier_task, earlier_items, set(trained), pad_id, hidden, start, progress)
    theta, weights = anchors(dict(earlier.named_parameters()), fisher, trained, list(task.head_modules),
                             rundir.read_labels(source), labels)
    del earlier
    return EwcObjective(inner, trained, theta, weights, continual.ewc_lambda)


def write_results(run_dir: Path, results: dict[str, Any], task, metric: str) -> None:
    from finegrain.evaluate.report import plot_learning_curve

    atomic_write_json(run_dir / rundir.METRICS, results)
    if (run_dir / rundir.METRICS_LOG).exists():  # before the report, which embeds the curve
        plot_learning_curve(run_dir / rundir.METRICS_LOG, run_dir / rundir.LEARNING_CURVE, metric)
    split = "test" if "test" in results else "validation"
    if split in results:
        metrics = {**results[split], "training": results["train"]}  # the report says what augmentation added
        if "baselines" in results:
            metrics["baselines"] = results["baselines"]
        if shared := (results.get("data") or {}).get("shared_with_training", {}).get(split):
            metrics["shared_with_training"] = shared  # the report warns of the split's copies of training texts
        task.write_report(run_dir, metrics, split, f"{task.name}: {split}")


def build_trained(config: RunConfig, run_dir: str | Path, progress: bool = False):
    """The finished run's task model with its trained weights, its tokenizer and its task: the base
    with the run's adapter, or for a full fine-tune (peft.method: full) its own model directory and head."""
    labels = rundir.read_labels(run_dir)
    if not rundir.has_model(run_dir):
        rundir.require_base_model(run_dir, config)
        model, tokenizer, task, _ = build(config, labels, progress, with_adapter=False)
        load_adapter(model, rundir.adapter_dir(run_dir))
        return model, tokenizer, task
    config = copy.deepcopy(config)
    config.model.name = str(rundir.model_dir(run_dir))  # already cut to model.num_layers
    model, tokenizer, task, _ = build(config, labels, progress, with_adapter=False)
    fix = f"train the run again (or `finegrain train --resume {run_dir}` while its checkpoint is there)"
    load_head(model, task.head_modules, rundir.model_dir(run_dir), fix)
    return model, tokenizer, task


def report_long_texts(summary: dict[str, Any] | None) -> None:
    """Say on stderr (stdout may carry the predictions) how many input texts did not fit."""
    line = summary and long_text_line(summary)
    if line:
        print(line, file=sys.stderr, flush=True)


def input_list(inputs) -> list:
    """`predict`'s inputs as a list; one bare string is refused, since it would be read as its characters."""
    if isinstance(inputs, (str, bytes)):
        raise FinegrainError("predict: give a list of inputs, such as predict([text]), not one string")
    return list(inputs)


class Predictor:
    """A trained run, ready to label new texts: `finegrain.load(RUN_DIR).predict([...])`."""

    def __init__(self, run_dir: str | Path, progress: bool = False, device: str | None = None):
        run_dir = Path(run_dir)
        self.config = rundir.read_config(run_dir)
        rundir.require_adapter(run_dir)
        self.model, self.tokenizer, self.task = build_trained(self.config, run_dir, progress)
        self.device = run_device(self.config, device)  # `device` (--device) or the run's train.device
        place(self.model, self.device)
        attach_tfidf(self.task, run_dir)
        attach_temperature(self.task, run_dir)  # `finegrain calibrate`'s, when the run has one
        self.model.eval()
        self.long_texts: dict[str, Any] | None = None  # the last inputs' long-text counts (long_text_summary)
        self.progress_bar: str | None = None  # the name of a bar over predict_examples' batches (the CLI's); None: none

    def predict(self, inputs: list, batch_size: int = 64) -> list[dict[str, Any]]:
        """Task-shaped predictions, one per input.

        Inputs and results by task: classification, texts → `label` (a list for multi-label) and
        `probabilities`; regression, texts → `value`; ner, texts, lists of words or `TokenExample`s
        → `words`, `tags`, `entities` (type, start, end, text, words, score), `truncated_words`;
        relation, qa and instruct: see their task classes' `examples_from_inputs` and `decode`.
        """
        inputs = input_list(inputs)
        return self.predict_examples(self.task.examples_from_inputs(inputs, self.config.data), batch_size) if inputs else []

    def predict_examples(self, examples: list, batch_size: int = 64, report: bool = True) -> list[dict[str, Any]]:
        """Predictions for examples in the task's own type (as `read_file` returns them); `report`:
        say how many texts did not fit (off where a caller says it once for several parts)."""
        items = self.task.encode(self.tokenizer, examples, self.config.data.max_length)
        self.long_texts = long_text_summary(self.task, self.config.data, {"input": items})
        if report:
            report_long_texts(self.long_texts)
        return self.task.predict(self.model, items, self.tokenizer.pad_token_id, batch_size, progress=self.progress_bar)

    def evaluate(self, path: str | Path) -> dict[str, Any]:
        """Metrics of the run's model on a labelled file (same format as the training data)."""
        metrics = score_file(self.task, self.config.data, path, self.predict_examples)
        if self.long_texts:
            metrics["data"] = self.long_texts
        return metrics
