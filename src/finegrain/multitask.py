"""Multi-task learning: several tasks trained together on one backbone, one run directory.

A run config whose `tasks:` names two or more tasks is a multi-task run (`finegrain train
examples/multitask.yaml`). Each task is a mapping of the keys that make it a task of its own:

    tasks:
      sentiment: {task: classification, data: {dataset: rotten_tomatoes}, metric: accuracy}
      entities: {task: ner, data: {dataset: wnut16}, head: {scheme: BIO}, loss_weight: 2.0}

`task`, `data`, `head`, `relation`, `qa` (over the top-level sections of those names), `metric`
(the validation metric the task reports; its headline by default) and `loss_weight` (its share
of the loss, 1 by default). Everything else (`model`, `peft`, `lora`, `train`) is the run's, shared:

- the backbone is loaded once; each task builds its head on it (`task.build_model`);
- `peft.share: true` (the default): one adapter for every task; `false`: one adapter per task on
  the same layers (named adapters, as the server holds them), the batch's task choosing which runs;
- each task is one objective of the one `Trainer` (`train.objectives`), weighted by its
  `loss_weight`; `train.sampler.TaskMixture` picks which task each batch comes from
  (`multitask.sampling`: proportional, temperature with `multitask.temperature`, round_robin);
- the frozen layers below the lowest adapted one run once per example of every task
  (`train.prefix_cache`), validation examples included;
- every validation scores each task; the best checkpoint is the best mean of the tasks' metrics
  (a lower-is-better metric counts negated), or the best of one task's (`multitask.select`).

The run directory holds the training's files (`config.yaml`, `metrics.jsonl`, `checkpoint/`,
`best/`) and, once finished, `metrics.json` (`tasks.<name>.validation`, `tasks.<name>.test`, the
`multitask` summary), `report.md` (a table of the tasks) and one finished single-task run per task
in `tasks/<name>/` (its config, labels, PEFT adapter with its head, metrics and reports), which
`finegrain predict`, `evaluate`, `export` and `serve` read as any run. `finegrain.load(DIR)`
gives a `MultiTaskPredictor`: the base once, every task's head, `predict(texts, task="...")`.
An interrupted run resumes exactly (`finegrain train --resume DIR`).
"""

from __future__ import annotations

import copy
import difflib
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from finegrain import rundir
from finegrain.atomic import atomic_write_json, atomic_write_text
from finegrain.checkpoint.load import DEFAULT_MODEL, load_model
from finegrain.config import DataConfig, HeadConfig, QAConfig, RelationConfig, RunConfig, dump_yaml, from_dict, to_dict, validate
from finegrain.cpu import available_cpus
from finegrain.device import place
from finegrain.errors import FinegrainError
from finegrain.evaluate.baselines import add_baselines
from finegrain.evaluate.metrics import higher_is_better
from finegrain.peft import adapter_layers, inject, load_adapter, method_options, read_adapter, save_adapter, set_adapter
from finegrain.run import attempt, build, input_list, output_dir, run_device, write_results
from finegrain.tasks import long_text_line, long_text_summary, score_file, task_class
from finegrain.tasks.classification import attach_temperature
from finegrain.train.distributed import launched
from finegrain.train.objectives import TaskObjective
from finegrain.train.prefix_cache import compute_prefix
from finegrain.train.sampler import TaskMixture
from finegrain.train.trainer import Trainer, check_metric, flat_metrics, seed_everything, unknown_metric

# The keys of one task under `tasks:`; the sections among them are laid over the run's.
TASK_KEYS = ("task", "data", "head", "relation", "qa", "metric", "loss_weight")
SECTIONS = {"data": DataConfig, "head": HeadConfig, "relation": RelationConfig, "qa": QAConfig}
_NAME = re.compile(r"^[A-Za-z0-9_-]+$")  # a task's name is a folder (tasks/NAME) and part of a served model's name


@dataclass
class TaskSpec:
    """One task of a multi-task run: its name, its config as a single-task run, its loss weight."""

    name: str
    config: RunConfig
    loss_weight: float = 1.0

    @property
    def metric(self) -> str | None:
        return self.config.train.metric


def is_multitask(config: RunConfig) -> bool:
    return bool(config.tasks)


def task_specs(config: RunConfig) -> list[TaskSpec]:
    """The run's tasks, each as the single-task config it trains like, checked key by key.

    Raises:
        FinegrainError: one line naming the `tasks.NAME...` key (and its config line): an unknown
            key or task type, a task without data, a setting a multi-task run cannot honour.
    """
    sources = getattr(config, "sources", {})
    refuse_unsupported(config, sources)
    base = to_dict(config)
    for key in ("tasks", "multitask", "output"):
        base.pop(key)
    specs = []
    for name, entry in (config.tasks or {}).items():
        at = sources.get(f"tasks.{name}", "config")
        if not _NAME.match(str(name)):
            raise FinegrainError(f"{at}: task name '{name}' must be letters, digits, '_' or '-' (it names tasks/{name}/)")
        if not isinstance(entry, dict):
            raise FinegrainError(f"{at}: 'tasks.{name}' must be a mapping of task keys ({', '.join(TASK_KEYS)})")
        for key in entry:
            if key not in TASK_KEYS:
                nearest = difflib.get_close_matches(str(key), TASK_KEYS, n=1, cutoff=0.5)
                hint = f"did you mean 'tasks.{name}.{nearest[0]}'?" if nearest else f"a task takes {', '.join(TASK_KEYS)}"
                raise FinegrainError(f"{sources.get(f'tasks.{name}.{key}', at)}: unknown key 'tasks.{name}.{key}'; {hint}")
        specs.append(_task_spec(config, base, name, entry, sources))
    return specs


def _task_spec(config: RunConfig, base: dict[str, Any], name: str, entry: dict[str, Any],
               sources: dict[str, str]) -> TaskSpec:
    """One task's config: the run's, with the task's sections laid over (its own data replaces the run's files)."""
    at = sources.get(f"tasks.{name}", "config")
    kind = entry.get("task", config.task)
    try:
        cls = task_class(kind)
    except FinegrainError as exc:
        raise FinegrainError(f"{sources.get(f'tasks.{name}.task', at)}: tasks.{name}.{exc}") from None
    if cls.endpoint is None:
        raise FinegrainError(f"{sources.get(f'tasks.{name}.task', at)}: tasks.{name}.task: '{kind}' generates text; a "
                             "multi-task run trains heads: classification, regression, ner, relation or qa")
    values = copy.deepcopy(base)
    for section, cls_ in SECTIONS.items():
        own = entry.get(section) or {}
        from_dict(cls_, own, at, f"tasks.{name}.{section}.", sources)  # each bad key named where it is
        if section == "data" and ("dataset" in own or "train" in own):
            for key in ("dataset", "dataset_options", "train", "validation", "test", "labels"):
                values["data"].pop(key, None)
        values[section] = {**values[section], **own}
    values["task"] = kind
    values["train"]["metric"] = entry.get("metric")
    if values["train"]["metric"] is not None and not isinstance(values["train"]["metric"], str):
        raise FinegrainError(f"{sources.get(f'tasks.{name}.metric', at)}: 'tasks.{name}.metric' must be a metric's name, "
                             "such as accuracy, macro_f1 or f1")
    run = from_dict(RunConfig, values, at)
    if not (run.data.dataset or run.data.train):
        raise FinegrainError(f"{at}: tasks.{name}: no training data; set tasks.{name}.data.dataset or tasks.{name}.data.train")
    try:
        validate(run, at)
    except FinegrainError as exc:
        raise FinegrainError(f"tasks.{name}: {exc}") from None
    weight = entry.get("loss_weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
        raise FinegrainError(f"{sources.get(f'tasks.{name}.loss_weight', at)}: 'tasks.{name}.loss_weight' must be a number above 0")
    word_mix = "word_mix" in (entry.get("head") or {}) or "head.word_mix" in getattr(config, "explicit", set())
    if run.head.init != "random" or run.head.tfidf_mix not in (0, 0.0) or word_mix:
        raise FinegrainError(f"{at}: tasks.{name}: head.init: probe, head.tfidf_mix and head.word_mix fit one task's "
                             "model alone; leave them unset in a multi-task run")
    return TaskSpec(str(name), run, float(weight))


def refuse_unsupported(config: RunConfig, sources: dict[str, str]) -> None:
    """The settings of a single run that a multi-task run does not take, each refused in one line."""
    select = config.multitask.select
    if select is not None and select not in (config.tasks or {}):
        nearest = difflib.get_close_matches(str(select), list(config.tasks or {}), n=1)
        hint = f"did you mean '{nearest[0]}'? " if nearest else ""
        raise FinegrainError(f"{sources.get('multitask.select', 'config')}: multitask.select: '{select}' is not a task "
                             f"of this run; {hint}choose one of {', '.join(config.tasks or {})}, or null for the mean")
    refused = [
        (config.train.metric is not None, "train.metric", "set each task's metric as tasks.NAME.metric (the best "
                                                           "checkpoint is their mean, or multitask.select's)"),
        (bool(config.continual.classes or config.continual.tasks), "continual", "a sequence of stages is another kind of run; drop tasks: or continual:"),
        (config.distill.teacher is not None, "distill.teacher", "distillation is of one task; unset it"),
        (config.adversarial.method is not None, "adversarial.method", "unset it in a multi-task run"),
        (config.init_from is not None, "init_from", "a multi-task run starts from the base model; unset it"),
        (config.peft.method == "full", "peft.method", "full trains the backbone of one task; use an adapter method (lora)"),
        (not config.peft.share and config.train.head_lr is not None, "train.head_lr",
         "with peft.share: false the tasks' adapters would train at it too; unset it"),
        (any(getattr(config.augment, kind) for kind in ("deletion", "swap", "typos", "paraphrase", "mixup")), "augment", "unset it in a multi-task run"),
        (launched(), "tasks", "a multi-task run trains in one process; run it without torchrun"),
    ]
    for bad, key, fix in refused:
        if bad:
            raise FinegrainError(f"{sources.get(key, 'config')}: {key}: not in a multi-task run (tasks:); {fix}")


# ---------------------------------------------------------------------------------------------- the model


class Routed:
    """A task whose batches carry its name (`batch["task"]`), so that `MultiTaskModel` runs its head.

    Everything but `collate` is the task's own (its loss, loss weight, and so on)."""

    def __init__(self, task: Any, name: str):
        self.task, self.name = task, name

    def collate(self, items: list, pad_id: int, hidden: list[torch.Tensor] | None = None) -> dict[str, Any]:
        batch = self.task.collate(items, pad_id, hidden)
        batch["task"] = self.name
        return batch

    def __getattr__(self, attribute: str) -> Any:
        if attribute == "task":  # not set yet (a copy being made): no lookup through it
            raise AttributeError(attribute)
        return getattr(self.task, attribute)


class MultiTaskModel(nn.Module):
    """One backbone (`model`) and each task's model on it (`heads[name]`: the task's own
    `build_model`, whose `.model` is that same backbone, so every head reads the same layers).

    `forward(batch)` runs the head of `batch["task"]`. With an adapter per task (`own_adapters`)
    it first makes that task's adapter the active one; their tensors are then also held under
    `task_adapters.NAME...`, so that the trainer, its checkpoints and `best/` see all of them at
    once under fixed names (an adapter layer shows only its active adapter as a parameter).
    """

    def __init__(self, backbone: nn.Module, models: dict[str, nn.Module]):
        super().__init__()
        self.model = backbone
        self.heads = nn.ModuleDict(models)
        self.own_adapters = False
        self.adapter_layers: list[nn.Module] = []

    def forward(self, batch: dict[str, Any], start_layer: int = 0) -> torch.Tensor:
        name = batch["task"]
        self.use(name)
        return self.heads[name](batch, start_layer=start_layer)

    def use(self, name: str) -> None:
        """Make task `name`'s adapter the active one (nothing to do when the tasks share one)."""
        if self.own_adapters:
            set_adapter(self.adapter_layers, name)

    def give_each_task_an_adapter(self, adapter: Any) -> None:
        """Inject a fresh adapter per task (named after it), all trainable, none active."""
        if adapter.layer is None or hasattr(adapter, "attach") or hasattr(adapter, "step_hooks") or hasattr(adapter, "loss_terms"):
            raise FinegrainError(f"peft.share: false needs a method of adapter layers (lora, dora, ia3, ...); "
                                 f"'{adapter.name}' has none or trains them with hooks; use peft.share: true")
        for name in self.heads:
            inject(self, adapter, adapter_name=name)
        layers = adapter_layers(self)
        self.adapter_layers = list(layers.values())
        holder = nn.Module()
        for name in self.heads:
            set_adapter(self.adapter_layers, name)
            for path, layer in layers.items():
                for key in layer.adapter_keys:
                    _hold(holder, f"{name}.{path}.{key}", layer.get_parameter(key))
        set_adapter(self.adapter_layers, None)
        self.task_adapters = holder
        for param in holder.parameters():
            param.requires_grad_(True)
        self.own_adapters = True


def _hold(root: nn.Module, path: str, param: nn.Parameter) -> None:
    """Register `param` at dotted `path` under `root`, making the modules on the way (the path keeps
    `layers.N.`, which the prefix cache reads the lowest trained layer from)."""
    *parents, leaf = path.split(".")
    module = root
    for part in parents:
        if not hasattr(module, part):
            module.add_module(part, nn.Module())
        module = getattr(module, part)
    module.register_parameter(leaf, param)


def build_multitask(config: RunConfig, specs: list[TaskSpec], labels: dict[str, list], progress: bool = True,
                    with_adapter: bool = True) -> tuple[MultiTaskModel, Any, dict[str, Any], dict[str, Any]]:
    """The base loaded once and cut as `finegrain.run.build` cuts it, each task's model on it, and
    the adapter(s) of `peft.method` (unless not `with_adapter`).

    Returns:
        The multi-task model, the tokenizer, each task by name, and each task's adapter config
        (the method's, with that task's head as `modules_to_save`, as its run saves it).
    """
    loaded = load_model(config.model.name, dtype=getattr(torch, config.model.dtype), progress=progress,
                        quantize=config.model.quantize)
    models, tasks, adapters = {}, {}, {}
    for spec in specs:
        models[spec.name], tokenizer, tasks[spec.name], adapters[spec.name] = build(
            spec.config, labels[spec.name], progress, with_adapter=False, loaded=loaded)
    model = MultiTaskModel(loaded[0].model, models)
    if with_adapter:
        adapter = copy.deepcopy(adapters[specs[0].name])
        adapter.modules_to_save = None  # the heads train below; each run saves its own
        if config.peft.share:
            inject(model, adapter)
        else:
            model.give_each_task_an_adapter(adapter)
        for spec in specs:
            for head in tasks[spec.name].head_modules:
                models[spec.name].get_submodule(head).requires_grad_(True)
    return model, tokenizer, tasks, adapters


# ---------------------------------------------------------------------------------------------- validation


class Validation:
    """What the trainer validates a multi-task run with: every task's validation split, scored.

    The trainer's validation "items" are the task names (`names`); `predict` predicts each task's
    own validation items with its head (their frozen-layer states cached once, below the trainer's
    start layer) and `score` turns them into one metrics dict: `mean` (of each task's metric,
    negated where lower is better), `NAME.METRIC` per task, and every task's full metrics under
    `tasks`. `headline_metric` is `mean`, or `NAME.METRIC` of `multitask.select`.
    """

    predicts_from_prefix = False  # it caches its tasks' validation states itself (`_hidden`)
    head_modules: tuple[str, ...] = ()

    def __init__(self, specs: list[TaskSpec], tasks: dict[str, Any], items: dict[str, list], gold: dict[str, list],
                 select: str | None, run_dir: Path):
        self.tasks, self.items, self.gold, self.run_dir = tasks, items, gold, run_dir
        self.metric = {s.name: s.metric or tasks[s.name].headline_metric for s in specs}
        self.configs = {s.name: s.config for s in specs}
        self.names = [s.name for s in specs if items[s.name]]
        self.headline_metric = "mean" if select is None else f"{select}.{self.metric[select]}"
        self._cache: dict[str, list[torch.Tensor]] = {}
        self._cached_layer = 0

    def predict(self, model: MultiTaskModel, names: list[str], pad_id: int, batch_size: int = 64,
                hidden: Any = None, start_layer: int = 0, progress: str | None = None) -> list[dict[str, Any]]:
        return [{"task": name, "predictions": self.predict_task(model, name, pad_id, batch_size, start_layer)}
                for name in names]

    def predict_task(self, model: MultiTaskModel, name: str, pad_id: int, batch_size: int, start_layer: int) -> list:
        model.use(name)
        task, items = self.tasks[name], self.items[name]
        return task.predict(model.heads[name], items, pad_id, batch_size, self._hidden(model, name, pad_id, start_layer),
                            start_layer)

    def _hidden(self, model: MultiTaskModel, name: str, pad_id: int, start_layer: int) -> list[torch.Tensor] | None:
        """Task `name`'s validation states below `start_layer`, computed at its first validation."""
        if start_layer == 0:
            return None
        if self._cached_layer != start_layer:
            self._cache, self._cached_layer = {}, start_layer
        if name not in self._cache:
            train = self.configs[name].train
            self._cache[name] = compute_prefix(
                model.model, self.tasks[name], self.items[name], start_layer, pad_id, train.eval_batch_size, False,
                getattr(torch, train.prefix_cache_dtype), self.run_dir, train.prefix_cache_ram_mb * 2**20)
        return self._cache[name]

    def score(self, predictions: list[dict[str, Any]]) -> dict[str, Any]:
        metrics: dict[str, Any] = {}
        per_task, oriented = {}, []
        for entry in predictions:
            name = entry["task"]
            per_task[name] = self.tasks[name].metrics(entry["predictions"], self.gold[name])
            flat, metric = flat_metrics(per_task[name]), self.metric[name]
            if metric not in flat:
                raise unknown_metric(f"tasks.{name}.metric", metric, flat)
            value = float(flat[metric])
            metrics[f"{name}.{metric}"] = value
            oriented.append(value if higher_is_better(metric) else -value)
        metrics["mean"] = statistics.fmean(oriented)
        metrics["tasks"] = per_task
        return metrics


# ---------------------------------------------------------------------------------------------- training


def train(config: RunConfig | None, resume_dir: str | Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Train a multi-task run, test every task, write the run directory; returns metrics.json's content.

    As `finegrain.run.train`: the directory is locked while this runs; with `resume_dir`, the run
    continues from its checkpoint (or starts again when it never reached one); a directory this
    call created is removed again if it fails before a checkpoint.
    """
    if resume_dir is None:
        task_specs(config)  # every task key checked before anything is created
        method_options(config, note=False)  # and the adapter method's options
        if not config.output:
            config.output = f"runs/multitask-{time.strftime('%Y%m%d-%H%M%S')}"
    elif not rundir.read_config(resume_dir).tasks:
        raise FinegrainError(f"{resume_dir}: not a multi-task run (no tasks: in its config.yaml); resume it with `finegrain train --resume`")
    run_dir = Path(resume_dir) if resume_dir is not None else output_dir(config)
    return attempt(run_dir, config, resume_dir is not None,
                   lambda config, resume_from: _train(config, run_dir, resume_from is not None, progress))


@dataclass
class TaskData:
    """One task's examples and encoded items."""

    splits: Any
    train: list
    validation: list
    test: list
    long_texts: dict[str, Any] | None


def _train(config: RunConfig, run_dir: Path, resume: bool, progress: bool) -> dict[str, Any]:
    torch.set_num_threads(config.train.threads or available_cpus())
    seed_everything(config.train.seed)
    started = time.perf_counter()
    specs = task_specs(config)
    splits = {s.name: task_class(s.config.task).load_splits(s.config.data) for s in specs}
    labels = {name: s.labels for name, s in splits.items()}
    atomic_write_json(run_dir / rundir.LABELS, labels)
    model, tokenizer, tasks, adapters = build_multitask(config, specs, labels, progress)
    device = run_device(config)
    place(model, device)
    pad_id = tokenizer.pad_token_id
    data = {}
    for spec in specs:
        task, split, max_length = tasks[spec.name], splits[spec.name], spec.config.data.max_length
        encoded = [task.encode(tokenizer, examples, max_length) if examples else []
                   for examples in (split.train, split.validation, split.test)]
        long_texts = long_text_summary(task, spec.config.data, dict(zip(("train", "validation", "test"), encoded)))
        if long_texts and long_text_line(long_texts) and progress:
            print(f"{spec.name}: {long_text_line(long_texts)}", flush=True)
        task.set_class_weights(encoded[0])
        if torch.is_tensor(getattr(task, "class_weights", None)):
            task.class_weights = task.class_weights.to(device)
        data[spec.name] = TaskData(split, *encoded, long_texts)

    objectives = [TaskObjective(Routed(tasks[s.name], s.name), data[s.name].train, s.loss_weight) for s in specs]
    sampler = TaskMixture(tuple(tuple(o.lengths) for o in objectives), config.train.batch_size, config.train.seed,
                          config.multitask.sampling, config.multitask.temperature)
    validation = Validation(specs, tasks, {n: d.validation for n, d in data.items()},
                            {n: tasks[n].gold(d.splits.validation) for n, d in data.items()}, config.multitask.select, run_dir)
    for spec in specs:  # a misspelt tasks.NAME.metric, said before training
        model.use(spec.name)
        check_metric(spec.metric, tasks[spec.name], model.heads[spec.name], tokenizer, data[spec.name].splits.validation,
                     spec.config.data.max_length, pad_id, f"tasks.{spec.name}.metric")
    trainer = Trainer(model, validation, objectives[0].items, config.train, run_dir, pad_id, validation.names,
                      validation.score, progress, objectives=objectives[1:], sampler=sampler,
                      method=adapters[specs[0].name], main=objectives[0])
    state = trainer.fit(resume=resume)

    best = state.best_validation or {}
    results: dict[str, Any] = {
        "multitask": {
            "tasks": [s.name for s in specs], "sampling": config.multitask.sampling,
            **({"temperature": config.multitask.temperature} if config.multitask.sampling == "temperature" else {}),
            "batches_per_epoch": dict(zip((s.name for s in specs), sampler.shares())),
            "peft_share": config.peft.share, "selected_by": validation.headline_metric,
        },
        "tasks": {},
        "train": {
            "steps": state.step, "epochs": round(state.step / trainer.steps_per_epoch, 3), "best_step": state.best_step,
            "stopped_early": state.stopped_early, "train_seconds": round(state.train_seconds, 2),
            "tokens_per_s": round(state.train_tokens / max(state.train_seconds, 1e-9), 1),
            "frozen_prefix_layers": trainer.start_layer, "device": device.type, "peft_method": config.peft.method,
            "trainable_parameters": sum(p.numel() for p in trainer.trainable.values()),
        },
    }
    if best:
        results["validation"] = {k: v for k, v in best.items() if k != "tasks"}
    tests = []
    for spec in specs:
        task, task_data = tasks[spec.name], data[spec.name]
        sub = _finish_task(config, spec, task, model, tokenizer, adapters[spec.name], task_data, best.get("tasks", {}),
                           results["train"], run_dir, pad_id, progress)
        metric = validation.metric[spec.name]
        results["tasks"][spec.name] = {"task": spec.config.task, "metric": metric, "loss_weight": spec.loss_weight,
                                       "run": f"{rundir.TASKS_DIR}/{spec.name}", **sub}
        if "test" in sub:
            value = float(flat_metrics(sub["test"]).get(metric, float("nan")))
            tests.append(value if higher_is_better(metric) else -value)
    if tests and len(tests) == len(specs):
        results["multitask"]["mean_test"] = statistics.fmean(tests)
    results["train"]["total_seconds"] = round(time.perf_counter() - started, 2)
    _write(run_dir, results, validation.headline_metric)
    trainer.writer.finish()
    return results


def _finish_task(config: RunConfig, spec: TaskSpec, task: Any, model: MultiTaskModel, tokenizer: Any, adapter: Any,
                 data: TaskData, best: dict[str, Any], train_summary: dict[str, Any], run_dir: Path, pad_id: int,
                 progress: bool) -> dict[str, Any]:
    """Test one task and write its single-task run (`tasks/NAME/`); returns its part of metrics.json."""
    sub_dir = run_dir / rundir.TASKS_DIR / spec.name
    sub_dir.mkdir(parents=True, exist_ok=True)
    sub_config = rundir.with_absolute_paths(copy.deepcopy(spec.config))  # works from any directory, as a run's
    sub_config.output = str(sub_dir)
    atomic_write_text(sub_dir / rundir.CONFIG, dump_yaml(sub_config))
    atomic_write_json(sub_dir / rundir.LABELS, data.splits.labels)
    model.use(spec.name)
    results: dict[str, Any] = {"task": spec.config.task, "labels": data.splits.labels, "train": {
        "examples": len(data.splits.train), "rows": len(data.train), **train_summary,
        "multitask_run": str(run_dir), "skipped_rows": len(data.splits.skipped)}}
    if spec.name in best:
        results["validation"] = {**best[spec.name], "source": data.splits.origin["validation"]}
    if data.long_texts:
        results["data"] = data.long_texts
    if data.test:
        testing = f"testing {spec.name}" if progress else None
        predictions = task.predict(model.heads[spec.name], data.test, pad_id, config.train.eval_batch_size, progress=testing)
        results["test"] = {**task.metrics(predictions, task.gold(data.splits.test)), "source": data.splits.origin["test"]}
    add_baselines(results, spec.config.data, data.splits)
    write_results(sub_dir, results, task, spec.metric or task.headline_metric)
    # The adapter last: it marks the task's run finished (`rundir.is_finished`).
    save_adapter(model.heads[spec.name], adapter, rundir.adapter_dir(sub_dir),
                 base_model_name_or_path=config.model.name or DEFAULT_MODEL, modules_to_save=list(task.head_modules),
                 task_type=task.peft_task_type)
    return {k: v for k, v in results.items() if k not in ("task", "train")} | {"examples": len(data.splits.train)}


def _write(run_dir: Path, results: dict[str, Any], metric: str) -> None:
    """metrics.json, the learning curve of the selection metric and report.md (the tasks' table)."""
    from finegrain.evaluate.report import plot_learning_curve

    atomic_write_json(run_dir / rundir.METRICS, results)
    curve = ""
    if (run_dir / rundir.METRICS_LOG).exists() and "." not in metric:  # a dotted name would be read as nested
        try:
            plot_learning_curve(run_dir / rundir.METRICS_LOG, run_dir / rundir.LEARNING_CURVE, metric)
            curve = f"\n![learning curve]({rundir.LEARNING_CURVE})\n"
        except FinegrainError:
            curve = ""  # no validation in the log: no curve
    atomic_write_text(run_dir / rundir.REPORT_MD, f"# multi-task run\n\n{summary_table(results)}\n{curve}")


def summary_table(results: dict[str, Any]) -> str:
    """A Markdown table of the tasks: type, metric, best validation, test, training examples, run."""
    rows = ["| task | type | metric | validation | test | train examples | run |", "|---|---|---|---|---|---|---|"]
    for name, task in results["tasks"].items():
        metric = task["metric"]
        cells = [_cell(task.get(split), metric) for split in ("validation", "test")]
        rows.append(f"| {name} | {task['task']} | {metric} | {cells[0]} | {cells[1]} | {task['examples']} | "
                    f"[{task['run']}]({task['run']}/{rundir.REPORT_MD}) |")
    summary = results["multitask"]
    lines = [f"Sampling: {summary['sampling']}; adapter {'shared' if summary['peft_share'] else 'per task'}; "
             f"best checkpoint by {summary['selected_by']} (step {results['train']['best_step']} of {results['train']['steps']}); "
             f"training {results['train']['train_seconds']:.0f} s, whole run {results['train'].get('total_seconds', 0):.0f} s."]
    if "mean_test" in summary:
        lines.append(f"Mean test score: {summary['mean_test']:.4f}.")
    return "\n".join(rows) + "\n\n" + " ".join(lines) + "\n"


def _cell(metrics: dict[str, Any] | None, metric: str) -> str:
    value = flat_metrics(metrics).get(metric) if metrics else None
    return "" if value is None else f"{value:.4f}"


# ---------------------------------------------------------------------------------------------- prediction


class MultiTaskPredictor:
    """A finished multi-task run, ready to label new texts: `finegrain.load(DIR).predict(texts, task="...")`.

    The base is loaded once; every task's head sits on it, with the shared adapter (or each task's
    own), read from the tasks' runs in `DIR/tasks/`.
    """

    def __init__(self, run_dir: str | Path, progress: bool = False, device: str | None = None):
        run_dir = Path(run_dir)
        self.config = rundir.read_config(run_dir)
        self.runs = rundir.task_runs(run_dir)
        for sub in self.runs.values():
            rundir.require_adapter(sub)
        self.specs = [TaskSpec(name, rundir.read_config(sub)) for name, sub in self.runs.items()]
        labels = {name: rundir.read_labels(sub) for name, sub in self.runs.items()}
        self.model, self.tokenizer, self.tasks, _ = build_multitask(self.config, self.specs, labels, progress, with_adapter=False)
        for k, (name, sub) in enumerate(self.runs.items()):
            head = self.model.heads[name]
            if not self.config.peft.share:
                load_adapter(head, rundir.adapter_dir(sub), adapter_name=name)
            elif k == 0:
                load_adapter(head, rundir.adapter_dir(sub))
            else:  # the adapter is the first task's: only this task's head
                _, tensors = read_adapter(rundir.adapter_dir(sub))
                own = tuple(f"{module}." for module in self.tasks[name].head_modules)
                head.load_state_dict({key: value for key, value in tensors.items() if key.startswith(own)}, strict=False)
            attach_temperature(self.tasks[name], sub)
        if not self.config.peft.share:
            self.model.own_adapters, self.model.adapter_layers = True, list(adapter_layers(self.model).values())
        self.device = run_device(self.config, device)
        place(self.model, self.device)
        self.model.eval()

    @property
    def task_names(self) -> list[str]:
        return list(self.runs)

    def predict(self, inputs: list, task: str | None = None, batch_size: int = 64) -> list[dict[str, Any]]:
        """Task `task`'s predictions, one per input, shaped as that task's `Predictor.predict` gives them."""
        spec, inputs = self._spec(task), input_list(inputs)
        if not inputs:
            return []
        examples = self.tasks[spec.name].examples_from_inputs(inputs, spec.config.data)
        return self.predict_examples(examples, spec.name, batch_size)

    def predict_examples(self, examples: list, task: str, batch_size: int = 64) -> list[dict[str, Any]]:
        """Predictions for examples in the task's own type (as its `read_file` returns them)."""
        spec = self._spec(task)
        model_task = self.tasks[spec.name]
        items = model_task.encode(self.tokenizer, examples, spec.config.data.max_length)
        self.model.use(spec.name)
        return model_task.predict(self.model.heads[spec.name], items, self.tokenizer.pad_token_id, batch_size)

    def evaluate(self, path: str | Path, task: str | None = None) -> dict[str, Any]:
        """Metrics of task `task` on a labelled file in that task's format."""
        spec = self._spec(task)
        return score_file(self.tasks[spec.name], spec.config.data, path,
                          lambda examples: self.predict_examples(examples, spec.name))

    def _spec(self, task: str | None) -> TaskSpec:
        names = self.task_names
        if task is None or task not in names:
            nearest = difflib.get_close_matches(str(task), names, n=1) if task is not None else []
            hint = f"did you mean '{nearest[0]}'? " if nearest else ""
            said = "no task given" if task is None else f"'{task}' is not a task of this run"
            raise FinegrainError(f"predict: {said}; {hint}pass task= one of {', '.join(names)}")
        return next(s for s in self.specs if s.name == task)
