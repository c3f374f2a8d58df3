"""The models a server holds: one copy of each base model, any number of adapters on it.

Runs fine-tuned from the same base share its weights. Each run's adapter is loaded onto the base
under the run's name by `finegrain.peft`, as training injects it: a linear layer that some run
adapts is wrapped once (`LoraLinear`) and holds the named adapter of every run that adapts it;
`ServedBase.use(name)` makes, under a lock, that run's adapter the active one for the forward
passes of one batch (PEFT's `set_adapter`). A second adapter therefore costs its own matrices and
its head, nothing more (`ServedRun.adapter_bytes`), where `finegrain.load(run)` would copy the
whole base again.

Batches are per adapter: a batch never mixes adapters, so each layer runs exactly the forward
pass of training's layer, and the results match `Predictor.predict` for the same run.
"""

from __future__ import annotations

import copy
import dataclasses
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from finegrain import rundir
from finegrain.errors import FinegrainError
from finegrain.model.llama import Llama
from finegrain.peft import adapter_layers, adapter_state_dict, inference_form, load_tensors, read_adapter, set_adapter
from finegrain.peft.full_files import head_state_dict, load_head
from finegrain.tasks import ServedTask, task_class
from finegrain.tasks.classification import attach_temperature
from finegrain.tokenizer import Tokenizer

# Runs of a task with no endpoint of its own (its adapter steers the language model) answer here.
GENERATE_ENDPOINTS = ("/v1/generate", "/v1/chat/completions")


def shallow_copy(module: nn.Module) -> nn.Module:
    """A second module object holding the same children, parameters and buffers (no tensor is
    copied); assigning a child or attribute on it leaves `module` as it was."""
    view = copy.copy(module)
    for attribute in ("_modules", "_parameters", "_buffers"):
        setattr(view, attribute, dict(getattr(module, attribute)))
    return view


def copy_tokenizer(tokenizer: Tokenizer) -> Tokenizer:
    """A tokenizer like `tokenizer` whose vocabulary can grow (`add_special_tokens`) on its own."""
    from tokenizers import Tokenizer as BackendTokenizer

    twin = copy.copy(tokenizer)
    twin.backend = BackendTokenizer.from_str(tokenizer.backend.to_str())
    return twin


def llama_view(llama: Llama, num_layers: int | None, causal: bool) -> Llama:
    """A `Llama` that shares every tensor of `llama`, but whose decoder runs only its first
    `num_layers` layers with its own causal flag: what `finegrain.run.build` cuts, without a copy.
    A task's `build_model` takes it where training passes the loaded base."""
    backbone = shallow_copy(llama.model)
    count = len(llama.model.layers) if num_layers is None else num_layers
    backbone.layers = nn.ModuleList(list(llama.model.layers)[:count])
    backbone.config = dataclasses.replace(llama.model.config, num_layers=count, causal=causal)
    view = shallow_copy(llama)
    view.model, view.config = backbone, backbone.config
    return view


@dataclass
class ServedBase:
    """A base model held once, with every run's adapter on it: generation uses it bare (or with a
    generative run's adapter), task runs through their task models, which share its layers."""

    name: str  # the id clients use
    source: str | None  # `config.model.name`: None for the default model
    llama: Llama
    tokenizer: Tokenizer
    num_bytes: int
    layers: list[nn.Module] = field(default_factory=list)  # the adapter layers of `llama`, switched per batch
    active: str | None = None  # the run whose adapter those layers apply; None: the bare base
    lock: threading.RLock = field(default_factory=threading.RLock)

    @contextmanager
    def use(self, name: str | None) -> Iterator[None]:
        """Make run `name`'s adapter (None: the bare base) the one every forward pass inside applies.

        One batch at a time, under the lock. The layers stay switched after the batch, so a run's
        next batch switches nothing; every batch says which adapter it needs.
        """
        with self.lock:
            if name != self.active:
                set_adapter(self.layers, name)
                self.active = name
            yield

    @property
    def context_length(self) -> int:
        return self.llama.config.max_position_embeddings


@dataclass
class ServedRun:
    """A fine-tuned run: its config and, once loaded, its task and task model on a shared base.

    Generative runs have no task model: generation runs the base with the run's adapter.
    """

    name: str
    run_dir: Path
    config: Any  # finegrain.config.RunConfig
    base: ServedBase | None = None
    task: ServedTask | None = None  # None for a generative run (and until loaded)
    model: nn.Module | None = None  # the task's model (`task.build_model`) on a view of the base
    own_tokenizer: Tokenizer | None = None  # when the task added tokens (relation markers): the run's own copy
    adapter_bytes: int = 0
    # An ensemble of `finegrain ensemble`: the names of its member runs (served under NAME#1, NAME#2, ...,
    # not listed on their own); it has a task (to decode the averaged probabilities) and no model.
    members: list[str] = field(default_factory=list)
    part_of: str | None = None  # a member run: its ensemble's name

    @property
    def generative(self) -> bool:
        return task_class(self.config.task).endpoint is None

    @property
    def endpoint(self) -> str:
        """The run's route: its task's (the task table's), or chat for a generative run."""
        endpoint = task_class(self.config.task).endpoint
        return "/v1/chat/completions" if endpoint is None else endpoint.path

    @property
    def tokenizer(self) -> Tokenizer:
        assert self.base is not None
        return self.own_tokenizer if self.own_tokenizer is not None else self.base.tokenizer


def parse_run_arguments(arguments: list[str]) -> list[tuple[str, Path]]:
    """`RUN_DIR` or `NAME=RUN_DIR` arguments as (name, directory); the name defaults to the folder's."""
    named = []
    for argument in arguments:
        name, sep, path = argument.partition("=")
        if not sep or not name or "/" in name:
            name, path = Path(argument.rstrip("/")).name, argument
        named.append((name, Path(path)))
    return named


def task_run_arguments(runs: list[tuple[str, Path]]) -> list[tuple[str, Path]]:
    """Runs to serve, a multi-task run (finegrain.multitask) as its tasks' runs: NAME.TASK for
    DIR/tasks/TASK, each on its task's endpoint, all on the one base."""
    expanded = []
    for name, run_dir in runs:
        tasks = rundir.task_runs(run_dir)
        expanded += [(f"{name}.{task}", path) for task, path in tasks.items()] or [(name, run_dir)]
    return expanded


def base_id(source: str | None) -> str:
    from finegrain.checkpoint.load import DEFAULT_MODEL

    if source and Path(source).exists():
        path = Path(source)
        # A full fine-tune's model directory is named after its run: every such directory is `model/`.
        return f"{path.parent.name}-{path.name}" if (path.parent / rundir.CONFIG).is_file() else path.name
    return source or DEFAULT_MODEL


class ModelRegistry:
    """The runs and base models one server answers for.

    Construction only reads each run's config (cheap, and every user error shows up before the
    server binds its port); `load()` reads the weights.

    Args:
        runs: (name, run directory) pairs.
        base_models: base models to serve for generation even without a run (`--model`).
    """

    def __init__(self, runs: list[tuple[str, Path]], base_models: list[str | None] = ()):
        self.runs: dict[str, ServedRun] = {}
        for name, run_dir in task_run_arguments(runs):
            if name in self.runs:
                raise FinegrainError(f"{run_dir}: a second run named '{name}'; name them with NAME=RUN_DIR")
            if rundir.is_ensemble(run_dir):
                self._add_ensemble(name, Path(run_dir))
                continue
            config = rundir.read_config(run_dir)
            rundir.require_adapter(run_dir)
            rundir.require_base_model(run_dir, config)
            if rundir.has_model(run_dir):  # a full fine-tune: its own model is its base, shared with no one
                config.model.name = str(rundir.model_dir(run_dir).resolve())
            try:
                task_class(config.task)  # before the port is bound: a task this version does not know
            except FinegrainError as exc:
                raise FinegrainError(f"{Path(run_dir) / rundir.CONFIG}: {exc}") from None
            self.runs[name] = ServedRun(name, run_dir, config)
        sources = [*base_models, *(run.config.model.name for run in self.runs.values())]
        self.base_sources = list(dict.fromkeys(sources))
        self.bases: dict[str, ServedBase] = {}
        for source in self.base_sources:
            if base_id(source) in self.runs:
                raise FinegrainError(f"run name '{base_id(source)}' is also the name of a base model; name the run with NAME=RUN_DIR")
        if not self.base_sources:
            raise FinegrainError("serve: nothing to serve; give run directories and/or --model")

    def _add_ensemble(self, name: str, directory: Path) -> None:
        """An ensemble directory: its member runs (named NAME#1, NAME#2, ...) and the ensemble itself,
        which averages their probabilities (`serve.engine.Engine.predict`) as `finegrain.load(ENS)` does.
        A request's texts are encoded once for all members: they must share the base and the encoding keys."""
        spec = rundir.read_ensemble(directory)
        members, labels = [Path(m) for m in spec["members"]], [str(label) for label in spec["labels"]]
        configs, served = [], []
        for i, member in enumerate(members):
            config = rundir.read_config(member)
            rundir.require_adapter(member)
            rundir.require_base_model(member, config)
            if rundir.has_model(member):
                config.model.name = str(rundir.model_dir(member).resolve())
            configs.append(config)
            served.append(ServedRun(f"{name}#{i + 1}", member, config, part_of=name))
        for key in ("model.name", "data.max_length", "data.template", "data.long_texts", "data.window_stride",
                    "data.max_windows"):
            section, option = key.split(".")
            values = {repr(getattr(getattr(config, section), option)) for config in configs}
            if len(values) > 1:
                raise FinegrainError(f"{directory}: its runs differ in {key} ({', '.join(sorted(values))}), and the server "
                                     f"encodes a text once for all of them; serve the runs one by one, or ensemble runs "
                                     f"that share {key}")
        config = copy.deepcopy(configs[0])
        config.data.labels = labels
        # The ensemble before its members: a reader of one directory's registry (the dashboard) takes the first run.
        self.runs[name] = ServedRun(name, directory, config, members=[run.name for run in served])
        self.runs.update((run.name, run) for run in served)

    def endpoints(self) -> list[str]:
        """The task endpoints the served runs need, generation endpoints always."""
        return sorted({run.endpoint for run in self.runs.values()}) + list(GENERATE_ENDPOINTS)

    def load(self, load_base: Callable[[str | None], tuple[Llama, Tokenizer]] | None = None) -> None:
        """Read every base model once and every adapter onto its base; a second call does nothing.

        Args:
            load_base: reads a base model from its source (default `load_model`); `finegrain serve
                --workers` passes one that maps the weights from a file all workers share.
        """
        from finegrain.checkpoint.load import load_model

        if self.bases:  # loaded already: a worker of `serve --workers` loads before it accepts connections
            return
        by_source: dict[str | None, ServedBase] = {}
        for source in self.base_sources:
            llama, tokenizer = load_model(source, progress=False) if load_base is None else load_base(source)
            llama.eval().requires_grad_(False)
            num_bytes = sum(p.nbytes for p in {id(p): p for p in llama.parameters()}.values())
            base = ServedBase(base_id(source), source, llama, tokenizer, num_bytes)
            by_source[source] = self.bases[base.name] = base
        for run in self.runs.values():
            if not run.members:
                self._load_run(run, by_source[run.config.model.name])
        for run in self.runs.values():  # an ensemble: the task that decodes its members' averaged probabilities
            if run.members:
                run.base = self.runs[run.members[0]].base
                run.task = task_class(run.config.task).from_config(run.config, run.config.data.labels)
                run.adapter_bytes = sum(self.runs[member].adapter_bytes for member in run.members)
        for base in self.bases.values():
            base.layers = list(adapter_layers(base.llama).values())
            set_adapter(base.layers, None)  # until a batch asks for an adapter

    def _load_run(self, run: ServedRun, base: ServedBase) -> None:
        """Build the run's task model around a view of the base, load the run's adapter onto the
        base's layers under the run's name (a generative run's onto the base itself), and the whole
        modules the adapter saved (`task.head_modules`) into the task model."""
        from finegrain.tasks.lexical import attach as attach_tfidf

        if rundir.has_model(run.run_dir):
            self._load_full_run(run, base)
            return
        adapter_dir = rundir.adapter_dir(run.run_dir)
        adapter, tensors = inference_form(*read_adapter(adapter_dir))  # an AdaLoRA run shares LoRA's layers
        source = str(adapter_dir / "adapter_model.safetensors")
        names = tuple(f".{key}" for key in adapter.layer.adapter_keys)
        pairs = {k: v for k, v in tensors.items() if k.endswith(names)}
        whole = {k: v for k, v in tensors.items() if k not in pairs}
        config = run.config
        task = None
        if not run.generative:
            task = task_class(config.task).from_config(config, rundir.read_labels(run.run_dir))
            attach_tfidf(task, run.run_dir)  # a classifier's TF-IDF model, when its run mixes one in
            attach_temperature(task, run.run_dir)  # `finegrain calibrate`'s
        own = task.head_modules if task is not None else ()
        shared = [k for k in whole if not k.startswith(tuple(f"{name}." for name in own))]
        if shared:
            raise FinegrainError(
                f"{source}: '{shared[0]}' is a whole module, which a shared base cannot hold; "
                "serve runs whose adapters save only adapter tensors and their task's head"
            )
        num_layers = config.model.num_layers
        if num_layers is not None and not 1 <= num_layers <= len(base.llama.model.layers):
            raise FinegrainError(f"{run.run_dir}: model.num_layers={num_layers} does not fit the base's {len(base.llama.model.layers)} layers")
        run.base = base
        if task is None:
            run.adapter_bytes = load_run_adapter(base.llama, adapter, pairs, adapter_dir, run.name)
            return
        view = llama_view(base.llama, num_layers, causal=not config.model.bidirectional)
        tokenizer = copy_tokenizer(base.tokenizer)
        model = task.build_model(view, tokenizer)
        run.adapter_bytes = load_run_adapter(model, adapter, pairs, adapter_dir, run.name)
        for name in own:
            load_whole_module(model, name, whole, source)
        run.task, run.model = task, model.eval().requires_grad_(False)
        # Tokens a task adds (relation's <e1> markers) must not reach other runs or generation,
        # whose embeddings have no row for them: only such a run keeps a tokenizer of its own.
        if tokenizer.vocab_size != base.tokenizer.vocab_size:
            run.own_tokenizer = tokenizer
        run.adapter_bytes += sum(t.nbytes for t in whole.values())

    def _load_full_run(self, run: ServedRun, base: ServedBase) -> None:
        """A full fine-tune (peft.method: full): its model directory is its base, already cut to its
        layers; the task model is built on it and its head read from the directory's head file."""
        from finegrain.tasks.lexical import attach as attach_tfidf

        run.base = base
        if run.generative:  # generation runs the base, which is the run's own model
            return
        config = run.config
        task = task_class(config.task).from_config(config, rundir.read_labels(run.run_dir))
        attach_tfidf(task, run.run_dir)
        attach_temperature(task, run.run_dir)  # `finegrain calibrate`'s
        tokenizer = copy_tokenizer(base.tokenizer)
        model = task.build_model(llama_view(base.llama, None, causal=not config.model.bidirectional), tokenizer)
        load_head(model, task.head_modules, rundir.model_dir(run.run_dir), f"train {run.run_dir} again")
        run.task, run.model = task, model.eval().requires_grad_(False)
        if tokenizer.vocab_size != base.tokenizer.vocab_size:
            run.own_tokenizer = tokenizer
        run.adapter_bytes = sum(t.nbytes for t in head_state_dict(model, task.head_modules).values())

    def describe(self) -> list[dict[str, Any]]:
        """`/v1/models` entries: runs first, then base models."""
        entries = []
        for run in self.runs.values():
            if run.part_of is not None:  # served through its ensemble only
                continue
            entry = {"id": run.name, "task": run.config.task, "endpoint": run.endpoint, "base": base_id(run.config.model.name)}
            if run.members:
                entry["members"] = [str(self.runs[member].run_dir) for member in run.members]
            if run.task is not None:
                entry.update(run.task.describe())  # labels (classification, ner, relation), multi_label
            if run.base is not None:
                entry["adapter_bytes"] = run.adapter_bytes
            entries.append(entry)
        for source in self.base_sources:
            entry = {"id": base_id(source), "task": "generation", "endpoint": "/v1/chat/completions", "base": None}
            if base_id(source) in self.bases:
                entry["parameter_bytes"] = self.bases[base_id(source)].num_bytes
            entries.append(entry)
        return entries


def load_run_adapter(model: nn.Module, adapter: Any, tensors: dict[str, torch.Tensor], directory: Path, name: str) -> int:
    """Load a run's adapter tensors into `model` (which shares the base's layers) as adapter `name`,
    frozen, the way `finegrain.load` loads it, with the other runs' adapters left in place.

    Returns:
        The bytes the adapter's tensors take.
    """
    load_tensors(model, adapter, tensors, directory, strict=True, adapter_name=name)
    model.requires_grad_(False)  # serving only reads it; loading made the new adapter trainable
    return sum(t.nbytes for t in adapter_state_dict(model).values())  # `name` is the active adapter now


def load_whole_module(model: nn.Module, name: str, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy `tensors["<name>.<key>"]` into every entry of `model.<name>`'s state dict.

    Raises:
        FinegrainError: a tensor is missing or has another shape than the module's.
    """
    module = model.get_submodule(name)
    state = {}
    for key, target in module.state_dict().items():
        tensor = tensors.get(f"{name}.{key}")
        if tensor is None:
            raise FinegrainError(f"{source}: '{name}.{key}' is missing; the run's task saves its '{name}' module, save the adapter again")
        if tensor.shape != target.shape:
            raise FinegrainError(
                f"{source}: '{name}.{key}' has shape {tuple(tensor.shape)}, the task's model needs {tuple(target.shape)}; "
                "do labels.json and config.yaml belong to this adapter?"
            )
        state[key] = tensor
    module.load_state_dict(state)
