"""Continual learning: stages trained one after the other, and how much each one forgets.

A config with a `continual:` section is a sequence (`finegrain train examples/continual.yaml`):

- class-incremental (`continual.classes`): the data's labels in groups, one group per stage (TREC's
  six question types in three pairs); one head over every class seen so far, which grows at each
  stage (`data.labels`), so at test time nothing says which stage a text belongs to;
- task-incremental (`continual.tasks`): each stage its own `data:` keys (another dataset, its own
  labels and head); the adapter carries over from stage to stage, and a stage's test set is read
  with the latest adapter and that stage's own head.

Each stage is an ordinary run (`DIR/stage-N/`, with its data files in `DIR/data/stage-N/`),
started from the previous stage's run (`init_from`), trained on what the strategy gives it:

| `continual.strategy` | trains stage k on |
|---|---|
| `sequential` | stage k's examples only: plain fine-tuning, the baseline that forgets |
| `replay` | those plus a buffer of earlier stages' examples (`buffer: balanced` keeps as many of each earlier class as `buffer_size` allows, `reservoir` a uniform sample; `replay_ratio`: that many buffered per new example, else the whole buffer) |
| `joint` | every example of stages 1..k, from the base model: the upper bound |
| `adapters` | stage k's examples on a fresh adapter of its own (task-incremental only: a stage's test set is read with its own adapter, so nothing is forgotten by construction) |
| `ewc` | stage k's examples, the weights held near stage k-1's by their Fisher information on stage k-1's training examples (`ewc_lambda`; `finegrain.train.ewc`) |
| `lwf` | stage k's examples, with the earlier heads' outputs of stage k-1's model on them distilled (`lwf_temperature`, `lwf_alpha`; `finegrain.train.lwf`; classification) |

After each stage, every stage seen so far is tested: `R[i][j]` is the test score (the task's
headline, accuracy for classification) on stage j's test set after training stage i. The
sequence's `DIR/metrics.json` holds `continual.accuracy_matrix` (row i lists stages 0..i),
`average_accuracy` (the last row's mean), `bwt` (backward transfer: the mean over earlier
stages of R[last][j] - R[j][j]; negative is forgetting), `forgetting` (per stage: its best
earlier score minus its last) and each stage's seconds, with a heatmap `accuracy_matrix.png`.
With `continual.fwt` (the default) each later stage is also trained alone from the base model
(`DIR/reference/stage-N`: its own examples, labels and test set; not counted in the sequence's
seconds), and `fwt` (forward transfer) is the mean over stages 1.. of R[j][j] minus that run's
score: what starting from the earlier stages gives the new one (positive helps). `adapters`
trains each stage from the base already, so its references are its own diagonal.
A killed sequence continues when run again: finished stages are read back, an interrupted one
resumes from its checkpoint.
"""

from __future__ import annotations

import copy
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from finegrain import rundir
from finegrain.atomic import atomic_path, atomic_write_json
from finegrain.config import DataConfig, RunConfig, from_dict
from finegrain.data.readers import write_examples
from finegrain.errors import FinegrainError
from finegrain.peft import read_adapter
from finegrain.run import Predictor, keep_settings, train_or_resume
from finegrain.tasks import task_class

MATRIX_PNG = "accuracy_matrix.png"


@dataclass
class Stage:
    """One stage: its name, training examples (before the strategy adds to them), validation and
    test examples, and the label set of its head."""

    name: str
    train: list
    validation: list
    test: list
    labels: list[str]
    data: DataConfig  # the data keys its run starts from (the sequence's, or its task's)


def is_sequence(config: RunConfig) -> bool:
    return bool(config.continual.classes or config.continual.tasks)


def class_stages(config: RunConfig) -> list[Stage]:
    """The stages of a class-incremental sequence: the data split once, then cut by label group."""
    splits = task_class(config.task).load_splits(config.data)
    groups = config.continual.classes
    for group in groups:
        for label in group:
            if label not in splits.labels:
                raise FinegrainError(f"continual.classes: '{label}' is not a label of the data; its labels are "
                                     f"{', '.join(splits.labels)}")
    seen: list[str] = []
    stages = []
    for k, group in enumerate(groups):
        seen += [label for label in group if label not in seen]
        stages.append(Stage(
            f"stage-{k}", [e for e in splits.train if e.label in group],
            [e for e in splits.validation if e.label in seen], [e for e in splits.test if e.label in group],
            list(seen), config.data,
        ))
    return stages


def task_stages(config: RunConfig) -> list[Stage]:
    """The stages of a task-incremental sequence: each its own `data:` keys over the sequence's."""
    stages = []
    base = {k: v for k, v in vars(config.data).items() if k not in ("dataset", "train", "validation", "test", "labels")}
    for k, keys in enumerate(config.continual.tasks):
        data = from_dict(DataConfig, {**copy.deepcopy(base), **keys}, f"continual.tasks[{k}]", "data.")
        splits = task_class(config.task).load_splits(data)
        name = data.dataset or Path(data.train or f"task-{k}").stem
        stages.append(Stage(f"stage-{k}-{name}", splits.train, splits.validation, splits.test, splits.labels, data))
    return stages


def replay_buffer(earlier: list, size: int, kind: str, seed: int) -> list:
    """At most `size` of the earlier stages' training examples: `balanced` as many of each class
    as fit (the rest to the classes with more), `reservoir` a uniform sample."""
    rng = random.Random(seed)
    if len(earlier) <= size:
        return list(earlier)
    if kind == "reservoir":
        return rng.sample(earlier, size)
    by_label: dict[str, list] = {}
    for example in earlier:
        by_label.setdefault(str(example.label), []).append(example)
    for examples in by_label.values():
        rng.shuffle(examples)
    kept: list = []
    while len(kept) < size:
        for examples in by_label.values():
            if examples and len(kept) < size:
                kept.append(examples.pop())
    return kept


def stage_training(config: RunConfig, stages: list[Stage], k: int) -> list:
    """Stage k's training examples under `continual.strategy`."""
    continual, stage = config.continual, stages[k]
    if continual.strategy == "joint":
        return [e for s in stages[: k + 1] for e in s.train]
    if continual.strategy != "replay" or k == 0:
        return list(stage.train)
    buffer = replay_buffer([e for s in stages[:k] for e in s.train], continual.buffer_size, continual.buffer,
                           config.train.seed + k)
    if continual.replay_ratio is not None:
        buffer = random.Random(config.train.seed + k).sample(buffer, min(len(buffer), round(continual.replay_ratio * len(stage.train))))
    return list(stage.train) + buffer


CARRIED = ("sequential", "replay", "ewc", "lwf")  # strategies whose stage k starts from stage k-1's run
HOLDING = ("ewc", "lwf")  # strategies whose stage k also holds on to stage k-1's run in training


def stage_config(config: RunConfig, stages: list[Stage], k: int, output: Path, alone: bool = False) -> RunConfig:
    """The run config of stage k: its data written as files, started from stage k-1 where the
    strategy carries the model over. `alone`: stage k's own examples from the base model instead
    (the reference of forward transfer), in `DIR/reference/`."""
    stage = stages[k]
    files = output / "data" / (f"reference-{stage.name}" if alone else stage.name)
    training = list(stage.train) if alone else stage_training(config, stages, k)
    paths = {}
    for split, examples in (("train", training), ("validation", stage.validation),
                            ("test", stage.test)):
        if examples:
            paths[split] = files / f"{split}.jsonl"
            write_examples(paths[split], examples)
    run = copy.deepcopy(config)
    run.continual = type(config.continual)()
    run.data = copy.deepcopy(stage.data)
    run.data.dataset, run.data.dataset_options = None, {}
    run.data.train, run.data.validation, run.data.test = (str(paths[s]) if s in paths else None
                                                          for s in ("train", "validation", "test"))
    run.data.max_train_examples = None  # the stage's examples are already chosen
    if config.continual.classes:
        run.data.labels = stage.labels
    if not run.data.validation:
        run.data.split = [1.0 - run.data.split[1] if run.data.split[1] else 1.0, run.data.split[1], 0.0]
    carries = k and not alone and config.continual.strategy in CARRIED
    run.init_from = str(output / stages[k - 1].name) if carries else config.init_from
    run.output = str(output / "reference" / stage.name if alone else output / stage.name)
    if carries and config.continual.strategy in HOLDING:
        for key in ("strategy", "ewc_lambda", "lwf_temperature", "lwf_alpha"):
            setattr(run.continual, key, getattr(config.continual, key))
        if config.continual.tasks:  # every earlier task's head, each kept frozen beside this stage's
            run.continual.lwf_heads = [str(output / s.name) for s in stages[:k]]
    return run


def score(predictor: Predictor, stage: Stage, output: Path) -> float:
    """The headline test score of `predictor` on `stage`'s test examples."""
    path = output / "data" / stage.name / "test.jsonl"
    metrics = predictor.evaluate(path)
    headline = getattr(predictor.task, "headline_metric", "accuracy")
    return float(metrics[headline])


def reader(config: RunConfig, stages: list[Stage], k: int, j: int, output: Path) -> Predictor:
    """The model that reads stage j's test set after stage k."""
    own, latest = output / stages[j].name, output / stages[k].name
    if config.continual.classes or config.continual.strategy == "joint":
        return Predictor(latest)  # one head over every label seen so far
    if config.continual.strategy == "adapters" or j == k:
        return Predictor(own)
    return with_adapter_of(Predictor(own), latest)


def with_adapter_of(predictor: Predictor, run_dir: Path) -> Predictor:
    """`predictor` (a stage's run: its head) with the adapter of a later stage's run (task-incremental)."""
    _, tensors = read_adapter(rundir.adapter_dir(run_dir))
    heads = tuple(f"{name}." for name in predictor.task.head_modules)
    predictor.model.load_state_dict({k: v for k, v in tensors.items() if not k.startswith(heads)}, strict=False)
    return predictor


def train_sequence(config: RunConfig, progress: bool = True) -> dict[str, Any]:
    """Train every stage, test each on every stage so far, and write the sequence's metrics.json."""
    if not config.output:
        raise FinegrainError("continual: a sequence writes one run per stage under --output; give --output DIR")
    output = Path(config.output)
    class_incremental = bool(config.continual.classes)
    if config.continual.strategy == "adapters" and class_incremental:
        raise FinegrainError("continual.strategy: adapters needs task-incremental stages (continual.tasks); with one "
                             "head over all classes nothing says which stage's adapter reads a text")
    rundir.refuse_single_run(output, "a sequence")
    keep_or_check_settings(config, output)
    stages = class_stages(config) if class_incremental else task_stages(config)  # two or more: config.validate
    matrix: list[list[float]] = []
    seconds = []
    bar = tqdm(range(len(stages)), desc="continual", unit="stage", disable=not progress)
    for k in bar:
        bar.set_postfix_str(stages[k].name)
        started = time.perf_counter()
        train_or_resume(stage_config(config, stages, k, output), progress=False)
        seconds.append(round(time.perf_counter() - started, 1))
        matrix.append([score(reader(config, stages, k, j, output), stages[j], output) for j in range(k + 1)])
    reference, reference_seconds = references(config, stages, matrix, output, progress)
    summary = transfer(matrix, reference)
    results = {"continual": {"strategy": config.continual.strategy,
                             "kind": "class-incremental" if class_incremental else "task-incremental",
                             "stages": [s.name for s in stages], "accuracy_matrix": matrix, **summary,
                             "seconds": seconds, "total_seconds": round(sum(seconds), 1),
                             **({"fwt_reference": reference, "reference_seconds": reference_seconds}
                                if reference else {})}}
    atomic_write_json(output / rundir.METRICS, results)
    heatmap(matrix, [s.name for s in stages], output / MATRIX_PNG, config.continual.strategy)
    return results


def keep_or_check_settings(config: RunConfig, output: Path) -> None:
    """The sequence's config and the keys the user set, kept when it starts; run again (to go on
    after a stop, or to read it back), it must be run with the same settings: a stage's own config
    does not hold them all (the strategy, the buffer), and its data files are written anew."""
    if (output / rundir.SEQUENCE).is_file():
        rundir.refuse_other_settings(output, config, rundir.SEQUENCE)
        return
    keep_settings(output, config, rundir.SEQUENCE)


def references(config: RunConfig, stages: list[Stage], matrix: list[list[float]], output: Path,
               progress: bool) -> tuple[list[float] | None, list[float]]:
    """The score of each stage 1.. trained alone from the base model on its own examples (forward
    transfer's reference), and the seconds each took; (None, []) with `continual.fwt` off.

    A reference run already finished under `DIR/reference/` is read back, as a stage is.
    """
    if not config.continual.fwt:
        return None, []
    if config.continual.strategy == "adapters":  # each stage is trained alone from the base already
        return [matrix[k][k] for k in range(1, len(stages))], []
    scores, seconds = [], []
    for k in tqdm(range(1, len(stages)), desc="forward transfer: stages alone", unit="stage", disable=not progress):
        started = time.perf_counter()
        run = stage_config(config, stages, k, output, alone=True)
        train_or_resume(run, progress=False)
        seconds.append(round(time.perf_counter() - started, 1))
        scores.append(score(Predictor(run.output), stages[k], output))
    return scores, seconds


def transfer(matrix: list[list[float]], reference: list[float] | None = None) -> dict[str, Any]:
    """Average accuracy, backward transfer and per-stage forgetting of a lower-triangular matrix;
    forward transfer too given `reference` (stage 1..'s scores trained alone from the base)."""
    last = matrix[-1]
    earlier = range(len(matrix) - 1)
    summary = {
        "average_accuracy": statistics.fmean(last),
        "bwt": statistics.fmean(last[j] - matrix[j][j] for j in earlier),
        "forgetting": [max(matrix[i][j] for i in range(j, len(matrix) - 1)) - last[j] for j in earlier],
    }
    if reference is not None:
        summary["fwt"] = statistics.fmean(matrix[k][k] - reference[k - 1] for k in range(1, len(matrix)))
    return summary


def heatmap(matrix: list[list[float]], names: list[str], out_png: Path, strategy: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = len(names)
    grid = [[matrix[i][j] if j <= i else float("nan") for j in range(n)] for i in range(n)]
    fig = Figure(figsize=(1.2 * n + 2.5, 1.0 * n + 1.5), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis")
    for i in range(n):
        for j in range(i + 1):
            ax.text(j, i, f"{matrix[i][j]:.3f}", ha="center", va="center", color="white" if matrix[i][j] < 0.6 else "black")
    ax.set_xticks(range(n), names, rotation=30, ha="right")
    ax.set_yticks(range(n), [f"after {name}" for name in names])
    ax.set_xlabel("tested on")
    ax.set_title(f"test score, strategy {strategy}")
    fig.colorbar(image, ax=ax)
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png")
