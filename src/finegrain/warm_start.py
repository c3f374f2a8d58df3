"""Warm starts (`init_from: RUN_DIR`): a new run begins from an earlier run's adapter and head.

The common case is the same task a month later, with more examples and perhaps more labels.
The new run takes the earlier run's adapter whole (its method and shape: `r`, targets and layers
come from the earlier `adapter_config.json`, not from this config's `lora:`/`peft:` keys) and
its head row by row: a label both runs have keeps its row (`init_labels: {old: new}` renames the
earlier run's labels first), a new label starts from a fresh row, and an earlier label this run
lacks is dropped. A head that is not one row per label (QA's start/end, regression's one output)
must have the same shape in both runs.

A run of `task: lm` (domain-adaptive pretraining on the user's unlabelled text) starts any task:
its adapter carries over and the task's head starts fresh.

Refused in one line: an earlier run that is unfinished, of another task (other than lm), or of
another base model; an `init_labels` key the earlier run does not have.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from finegrain import rundir
from finegrain.checkpoint.load import DEFAULT_MODEL
from finegrain.config import RunConfig
from finegrain.errors import FinegrainError
from finegrain.peft import load_tensors, read_adapter
from finegrain.peft.base import AdapterConfig


def check_init_from(config: RunConfig) -> RunConfig:
    """The earlier run's config, once it is known to fit this one (see the module docstring)."""
    source = Path(config.init_from)
    earlier = rundir.read_config(source)
    rundir.require_adapter(source)
    if earlier.task != config.task and earlier.task != "lm":  # an lm run (domain pretraining) gives its adapter to any task
        raise FinegrainError(f"init_from: {source} is a {earlier.task} run and this config trains {config.task}; "
                             "start from a run of the same task, or drop init_from")
    if (earlier.model.name or DEFAULT_MODEL) != (config.model.name or DEFAULT_MODEL):
        raise FinegrainError(f"init_from: {source} adapted {earlier.model.name or DEFAULT_MODEL}, this config "
                             f"{config.model.name or DEFAULT_MODEL}; an adapter only fits the model it was trained on")
    if earlier.model.num_layers != config.model.num_layers:
        raise FinegrainError(f"init_from: {source} kept model.num_layers={earlier.model.num_layers}, this config "
                             f"{config.model.num_layers}; set model.num_layers to {earlier.model.num_layers}")
    unknown = sorted(set(config.init_labels or {}) - set(map(str, rundir.read_labels(source))))
    if unknown:
        raise FinegrainError(f"init_labels: {source} has no label '{unknown[0]}'; its labels are "
                             f"{', '.join(map(str, rundir.read_labels(source)))}")
    return earlier


def warm_start(model: nn.Module, config: RunConfig, labels: list, head_modules: list[str]) -> AdapterConfig:
    """Inject the earlier run's adapter into `model` and load it with its head mapped onto `labels`.

    Returns:
        The adapter's config (the earlier run's, with this task's head modules to save).
    """
    source = Path(config.init_from)
    check_init_from(config)
    old_labels = [(config.init_labels or {}).get(label, label) for label in rundir.read_labels(source)]
    adapter, tensors = read_adapter(rundir.adapter_dir(source))
    adapter.modules_to_save = list(head_modules)
    own = model.state_dict()
    for key, tensor in list(tensors.items()):
        per_label = tensor.dim() >= 1 and tensor.shape[0] == len(old_labels) and own.get(key, tensor).shape[0] == len(labels)
        if key in own and any(key.startswith(f"{name}.") for name in head_modules) and per_label and old_labels != labels:
            tensors[key] = _head_rows(tensor, own[key], old_labels, labels)
        elif key in own and tensor.shape != own[key].shape:
            raise FinegrainError(f"init_from: {source}'s '{key}' has shape {tuple(tensor.shape)} and this run needs "
                                 f"{tuple(own[key].shape)}; the head changed shape in a way labels do not explain")
    load_tensors(model, adapter, tensors, rundir.adapter_dir(source))
    for name in head_modules:
        model.get_submodule(name).requires_grad_(True)
    return adapter


def _head_rows(old: torch.Tensor, fresh: torch.Tensor, old_labels: list, labels: list) -> torch.Tensor:
    """`fresh` (this run's new head tensor, one row per label) with the rows of the labels both runs
    have taken from `old`."""
    rows = fresh.detach().clone()
    where = {label: i for i, label in enumerate(old_labels)}
    for i, label in enumerate(labels):
        if label in where:
            rows[i] = old[where[label]]
    return rows
