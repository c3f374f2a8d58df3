"""The run directory: the name of every file and folder a run writes, and the readers of a finished run.

Training (`finegrain.run`, the trainer), `finegrain.load(...)` and the server take the names
from here, so the layout is written down once and a reader (a dashboard, the server) needs no
import of the training code. A run directory holds:

    config.yaml          the effective configuration
    labels.json          the label set, in head order
    adapter/             the PEFT-format adapter with the task's head (best checkpoint)
    model/               instead of adapter/ for peft.method: full: the trained model as a Hugging Face
                         directory, the task's head in model/head/head.safetensors
    metrics.jsonl        training loss and validation metrics per step
    metrics.json         final validation and test metrics
    report.md, report.html, confusion_matrix.png, learning_curve.png, reliability_diagram.png
    temperature.json     `finegrain calibrate`: the temperature dividing a classifier's logits, fitted on validation
    skipped_rows.txt     the bad rows the data reader skipped
    pruned/, pruning.json   `finegrain prune`: the pruned model before its recovery fine-tune (the run's base), and
                         what was kept and why (finegrain.prune)
    test_predictions.jsonl   ner, relation, qa: each test example's gold and predicted spans (finegrain.evaluate.predictions)
    interpolation.json, interpolation.png   `finegrain interpolate`: the metric between base and tuned weights
    checkpoint/          resumable training state; best/: the best weights so far
    tensorboard/         TensorBoard events, when train.report_to names tensorboard
    .lock                held (flock) by the `train` working in the directory
    error.txt            the one-line error a failed `train` stopped with (removed when it starts again)
    .explicit_keys.json  the config keys the user set (see `finegrain.run.open_run`)
    .data_files.json     the sha256 of each local data file the run started with (`data_file_digests`)

An ensemble directory (`finegrain ensemble`) holds instead `ensemble.json` (the member runs), its
own and its members' test metrics in metrics.json, and its reports. A multi-task run (`tasks:`,
finegrain.multitask) holds the training's files above and `tasks/NAME/`, one finished run per task;
its metrics.json holds every task's metrics under `tasks` and report.md a table of them.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from finegrain.config import CURRENT_JUDGE, SELF_JUDGE, RunConfig, from_dict, read_yaml, to_dict, validate
from finegrain.errors import FinegrainError

CONFIG = "config.yaml"
LABELS = "labels.json"
ADAPTER = "adapter"
ADAPTER_CONFIG = "adapter_config.json"  # inside adapter/: present once the run has finished
MODEL = "model"  # a full fine-tune's weights (peft.method: full), in place of adapter/
MODEL_CONFIG = "config.json"  # inside model/: present once the run has finished
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # inside adapter/ (PEFT's name)
MODEL_WEIGHTS = "model.safetensors"  # inside model/
METRICS_LOG = "metrics.jsonl"
METRICS = "metrics.json"
REPORT_MD = "report.md"
REPORT_HTML = "report.html"
CONFUSION_MATRIX = "confusion_matrix.png"
LEARNING_CURVE = "learning_curve.png"
RELIABILITY_DIAGRAM = "reliability_diagram.png"
TEMPERATURE = "temperature.json"  # `finegrain calibrate` (finegrain.calibrate)
PARAPHRASES = "paraphrases.jsonl"  # augment.paraphrase: every rewrite tried, the judge's label, kept or not (finegrain.paraphrase)
JUDGE = "judge"  # augment.judge: self, the run of this config without augmentation that judges the paraphrases
PRUNED = "pruned"  # `finegrain prune`: the pruned model, a Hugging Face directory (finegrain.prune)
PRUNING = "pruning.json"  # `finegrain prune`: what was kept, the importance scores, the sizes
ENSEMBLE = "ensemble.json"  # an ensemble directory's members (finegrain.ensemble)
TASKS_DIR = "tasks"  # a multi-task run's finished run of each task (finegrain.multitask)
SKIPPED_ROWS = "skipped_rows.txt"
TEST_PREDICTIONS = "test_predictions.jsonl"  # span tasks only (finegrain.evaluate.predictions)
INTERPOLATION = "interpolation.json"  # `finegrain interpolate` (finegrain.interpolate)
INTERPOLATION_PLOT = "interpolation.png"
CHECKPOINT = "checkpoint"
BEST = "best"
TFIDF = "tfidf"  # the TF-IDF model mixed into the classifier's probabilities (head.tfidf_mix), when it is
WORD_MODEL = "word_model"  # the word-feature model mixed into a tagger's probabilities (head.word_mix), when it is
TENSORBOARD = "tensorboard"
LOCK = ".lock"
ERROR = "error.txt"
EXPLICIT_KEYS = ".explicit_keys.json"
DATA_FILES = ".data_files.json"
SEQUENCE = "sequence.yaml"  # a continual sequence's config as it was first run, beside its stages (finegrain.continual)
RECIPE = ".recipe.json"  # the keys the data recipe chose and why, kept for metrics.json of a resumed run

# A `finegrain sweep` directory (the runs it trained below it): every run's scores and their
# summary, the table of mean ± std, and the plot of the headline score.
SWEEP, SWEEP_TABLE, SWEEP_PLOT = "sweep.json", "sweep.md", "sweep.png"

# Inside checkpoint/ (and best/, which holds only the weights).
TRAINABLE = "trainable.safetensors"
OPTIMIZER = "optimizer.pt"
STATE = "state.json"

# What a run writes: a directory holding any of these (and no config.yaml) is not ours to overwrite.
RUN_OUTPUTS = (METRICS, METRICS_LOG, REPORT_MD, REPORT_HTML, LABELS, ADAPTER, CHECKPOINT, BEST, CONFUSION_MATRIX,
               LEARNING_CURVE, TFIDF, MODEL)


def adapter_dir(run_dir: str | Path) -> Path:
    """The run's PEFT adapter folder."""
    return Path(run_dir) / ADAPTER


def model_dir(run_dir: str | Path) -> Path:
    """A full fine-tune's model directory (peft.method: full)."""
    return Path(run_dir) / MODEL


def has_model(run_dir: str | Path) -> bool:
    """Whether the run is a finished full fine-tune: its weights are a model directory, not an adapter."""
    return (model_dir(run_dir) / MODEL_CONFIG).is_file()


def tfidf_dir(run_dir: str | Path) -> Path:
    """The TF-IDF model's folder (finegrain.tasks.lexical); absent when the run does not mix one in."""
    return Path(run_dir) / TFIDF


def word_model_dir(run_dir: str | Path) -> Path:
    """The word-feature model's folder (finegrain.tasks.lexical.WordModel); absent when the run does not mix one in."""
    return Path(run_dir) / WORD_MODEL


def has_adapter(run_dir: str | Path) -> bool:
    """Whether training finished far enough to save the adapter, or a full run's model directory
    (it is written last but the reports)."""
    return (adapter_dir(run_dir) / ADAPTER_CONFIG).is_file() or has_model(run_dir)


def has_checkpoint(run_dir: str | Path) -> bool:
    """A run has started once it wrote its first checkpoint; before that it can only start over."""
    return (Path(run_dir) / CHECKPOINT / STATE).is_file()


def resume_hint(run_dir: str | Path) -> str:
    """How `finegrain train --resume` goes on with a run that stopped part-way (Ctrl-C): from its
    last checkpoint, or from the beginning before the first; "" when the start wrote no config."""
    run_dir = Path(run_dir)
    if has_checkpoint(run_dir):
        try:
            at = f" at step {json.loads((run_dir / CHECKPOINT / STATE).read_text(encoding='utf-8'))['step']}"
        except (OSError, ValueError, KeyError, TypeError):  # what --resume reads and checks itself
            at = ""
        return f"`finegrain train --resume {run_dir}` goes on from its checkpoint{at}"
    if (run_dir / CONFIG).is_file():
        return f"no checkpoint yet: `finegrain train --resume {run_dir}` starts it again"
    return ""


def is_finished(run_dir: str | Path) -> bool:
    """A finished run: its adapter or its final metrics are there (nothing may overwrite it)."""
    return has_adapter(run_dir) or (Path(run_dir) / METRICS).is_file()


def refuse_single_run(output: str | Path, what: str) -> None:
    """Refuse, as the --output of a command that writes several runs, a directory that holds one run."""
    if (Path(output) / CONFIG).is_file():
        raise FinegrainError(f"{output}: holds a single run; choose another --output for {what}")


def read_config(run_dir: str | Path, name: str = CONFIG) -> RunConfig:
    """The run's validated config.yaml (or `name`); a one-line error when `run_dir` is not a run directory."""
    path = Path(run_dir) / name
    if not path.exists() and name == CONFIG and is_ensemble(run_dir):
        members = ", ".join(str(m) for m in read_ensemble(run_dir)["members"])
        raise FinegrainError(f"{run_dir}: an ensemble (finegrain ensemble), which this command does not take "
                             f"(predict, evaluate and serve do); give it one of its runs: {members}")
    if not path.exists():
        raise FinegrainError(f"{run_dir}: not a finegrain run directory (no config.yaml); pass the --output of `finegrain train`")
    values, sources = read_yaml(path)
    config = from_dict(RunConfig, values, str(path), sources=sources)
    validate(config, str(path))
    return config


# The keys of a run's config that may name a local file or directory, which a run keeps absolute.
PATH_KEYS = ("model.name", "data.train", "data.validation", "data.test", "init_from", "head.weights",
             "distill.teacher", "distill.unlabelled", "augment.paraphraser", "augment.judge")


def with_absolute_paths(config: RunConfig) -> RunConfig:
    """`config`, changed in place, with every local path of `PATH_KEYS` made absolute: a run's
    config.yaml then works from any directory (`evaluate RUN`, `calibrate`, `train --resume`), where
    a path relative to where it was trained was looked for in the directory of the command."""
    def absolute(value: Any) -> Any:
        if isinstance(value, str) and value not in (SELF_JUDGE, CURRENT_JUDGE) and Path(value).exists():
            return str(Path(value).resolve())
        return value

    for key in PATH_KEYS:
        section, _, name = key.rpartition(".")
        owner = getattr(config, section) if section else config
        setattr(owner, name, absolute(getattr(owner, name)))
    for data in _task_data(config):
        data.update({k: absolute(data[k]) for k in ("train", "validation", "test") if k in data})
    return config


def _task_data(config: RunConfig) -> list[dict[str, Any]]:
    """The data sections of a multi-task run's tasks (`tasks.NAME.data`) and of a sequence's stages (`continual.tasks[i]`)."""
    sections = [entry.get("data") for entry in (config.tasks or {}).values() if isinstance(entry, dict)]
    sections += config.continual.tasks or []
    return [data for data in sections if isinstance(data, dict)]


def data_file_digests(config: RunConfig) -> dict[str, str]:
    """The sha256 of each local data file `config` reads (its splits, `distill.unlabelled`, the data of
    its tasks or stages), by path as the config gives it: what `refuse_other_settings` compares."""
    paths = [config.data.train, config.data.validation, config.data.test, config.distill.unlabelled]
    paths += [data.get(k) for data in _task_data(config) for k in ("train", "validation", "test")]
    paths += teacher_weights(config.distill.teacher)  # a distilled run learns from them at each (re)start
    return {path: _sha256(path) for path in dict.fromkeys(paths) if isinstance(path, str) and Path(path).is_file()}


def teacher_weights(teacher: str | None) -> list[str]:
    """The weight files of `distill.teacher` (a run, or each member of an ensemble): its adapter's,
    or a full fine-tune's model; none where it is not a run directory."""
    if not teacher or not Path(teacher).is_dir():
        return []
    runs = [teacher]
    if is_ensemble(teacher):
        try:
            runs = read_ensemble(teacher)["members"]
        except FinegrainError:  # the distillation's own checks name it
            return []
    files = [path for run in runs for path in (adapter_dir(run) / ADAPTER_WEIGHTS, model_dir(run) / MODEL_WEIGHTS)]
    return [str(path) for path in files if path.is_file()]


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def require_base_model(run_dir: str | Path, config: RunConfig) -> None:
    """Refuse a run (its adapter, or its checkpoint to resume) whose base model, a local path in its
    config.yaml, is no longer there: moved or deleted since the run was trained."""
    name = config.model.name
    if name and Path(name).is_absolute() and not Path(name).exists() and not has_model(run_dir):
        raise FinegrainError(f"{run_dir}: its base model {name} (model.name in its {CONFIG}) is not there any more; "
                             f"put it back, or set model.name in {Path(run_dir) / CONFIG} to where it is now")


def kept_keys(directory: str | Path) -> set[str] | None:
    """The keys the user set, as `finegrain.run.keep_settings` kept them; None where they were not kept."""
    path = Path(directory) / EXPLICIT_KEYS
    return set(json.loads(path.read_text(encoding="utf-8"))) if path.is_file() else None


def refuse_other_settings(run_dir: str | Path, config: RunConfig, name: str = CONFIG) -> None:
    """Refuse to go on with (or read back) the run in `run_dir` when it was started with other
    settings than `config` (a command of several runs run again with another --set, which would
    otherwise continue or report the old run): every key the user set then or sets now must hold
    the same value, and every data file it started with must be as it was then. `name`: the config
    file kept there (a continual sequence's: SEQUENCE)."""
    then_keys = kept_keys(run_dir)
    if then_keys is not None and hasattr(config, "explicit"):  # else a run from before the keys were kept
        then = to_dict(read_config(run_dir, name))
        now = to_dict(with_absolute_paths(copy.deepcopy(config)))
        for key in sorted((then_keys | config.explicit) - {"output"}):
            old, new = _at(then, key), _at(now, key)
            if old == new or (new == "auto" and key in then_keys & config.explicit):  # set to auto: the run has its choice
                continue
            how = "set" if key in then_keys else "not set: the recipe's or the default"
            asked = f"sets {new!r}" if key in config.explicit else "leaves it unset"
            raise FinegrainError(f"{run_dir}: this run has {key}: {old!r} ({how}) and this command {asked}; to go on, "
                                 "run the command as it was first run, or choose another --output")
    if name == CONFIG:  # a sequence's stages check their own files
        path = changed_data_file(run_dir)
        if path is not None:
            raise FinegrainError(f"{run_dir}: {path} changed since this run was trained on it, and its scores are of the "
                                 "file as it was; to go on, put the file back as it was, or choose another --output")


def changed_data_file(run_dir: str | Path, skip: tuple[str | None, ...] = ()) -> str | None:
    """The first data file the run in `run_dir` started with (`DATA_FILES`) that is there but no longer
    as it was, other than those in `skip`; None when there is none, or the run predates the record."""
    digests = Path(run_dir) / DATA_FILES
    if not digests.is_file():
        return None
    for path, digest in json.loads(digests.read_text(encoding="utf-8")).items():
        if path not in skip and Path(path).is_file() and _sha256(path) != digest:
            return path
    return None


def _at(values: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        values = values.get(part) if isinstance(values, dict) else None
    return values


def require_adapter(run_dir: str | Path) -> None:
    """Refuse a run that has no trained adapter yet (predicting and serving need one)."""
    if not has_adapter(run_dir) and task_runs(run_dir):
        raise FinegrainError(f"{run_dir}: a multi-task run; load it with finegrain.load (predict(texts, task=...)) or "
                             f"pass one task's run, {Path(run_dir) / TASKS_DIR}/NAME")
    if not has_adapter(run_dir):
        raise FinegrainError(f"{run_dir}: the run has no trained adapter yet; finish it with `finegrain train --resume {run_dir}`")


def read_temperature(run_dir: str | Path) -> float | None:
    """The temperature `finegrain calibrate` stored with the run, or None when it was not calibrated."""
    path = Path(run_dir) / TEMPERATURE
    if not path.is_file():
        return None
    try:
        temperature = float(json.loads(path.read_text(encoding="utf-8"))["temperature"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise FinegrainError(f"{path}: unreadable ({exc}); calibrate again with `finegrain calibrate {run_dir}`") from None
    if not 0 < temperature < float("inf"):
        raise FinegrainError(f"{path}: temperature {temperature} is not a positive number; calibrate again with `finegrain calibrate {run_dir}`")
    return temperature


def task_runs(run_dir: str | Path) -> dict[str, Path]:
    """A multi-task run's tasks (`tasks:`, finegrain.multitask) and the run directory of each
    (`tasks/NAME`), in config order; empty for any other run."""
    if not (Path(run_dir) / CONFIG).is_file():
        return {}
    return {name: Path(run_dir) / TASKS_DIR / name for name in read_config(run_dir).tasks or {}}


def is_ensemble(path: str | Path) -> bool:
    """Whether `path` is an ensemble directory written by `finegrain ensemble`."""
    return (Path(path) / ENSEMBLE).is_file()


def read_ensemble(ensemble_dir: str | Path) -> dict[str, Any]:
    """ensemble.json (`members`: the run directories, `labels`), with a one-line error when it is
    missing or damaged."""
    ensemble_dir = Path(ensemble_dir)
    path = ensemble_dir / ENSEMBLE
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(spec.get("members"), list) or not spec["members"]:
            raise ValueError("no list of members")
        if not isinstance(spec.get("labels"), list):
            raise ValueError("no list of labels")
    except (OSError, ValueError, AttributeError) as exc:
        raise FinegrainError(f"{path}: not a readable ensemble ({exc}); write it again with `finegrain ensemble RUN1 RUN2 ... --output {ensemble_dir}`") from None
    return spec


def read_labels(run_dir: str | Path) -> list:
    """labels.json: the label set in head order (for regression: `[label field, mean, std]`)."""
    return json.loads((Path(run_dir) / LABELS).read_text(encoding="utf-8"))


# -- the state of a run, for readers of many runs (the dashboard) ---------------------------------

RUNNING, FINISHED, FAILED, INTERRUPTED = "running", "finished", "failed", "interrupted"


def is_running(run_dir: str | Path) -> bool:
    """Whether a `train` holds the run's `.lock` now. The kernel's lock table is read, not the
    lock taken: a reader polling the run must never make a starting `train` find it in use."""
    path = Path(run_dir) / LOCK
    try:
        stat = path.stat()
    except OSError:
        return False
    key = f"{os.major(stat.st_dev):02x}:{os.minor(stat.st_dev):02x}:{stat.st_ino}"
    try:
        with open("/proc/locks", encoding="ascii") as table:
            return any(line.split()[5:6] == [key] for line in table)
    except OSError:  # no /proc (not Linux): try the lock, shared and at once, and let it go
        return _lock_held(path)


def _lock_held(path: Path) -> bool:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no locks at all
        return False
    with open(path, encoding="utf-8") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
    return False


def read_error(run_dir: str | Path) -> str | None:
    """The one-line error a failed `train` recorded (error.txt), or None."""
    try:
        return (Path(run_dir) / ERROR).read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


def status(run_dir: str | Path) -> str:
    """running (a `train` holds the lock), finished, failed (error.txt) or interrupted (stopped
    without an error: killed, Ctrl-C, or the machine went down; `--resume` continues it)."""
    if is_running(run_dir):
        return RUNNING
    if is_finished(run_dir):
        return FINISHED
    return FAILED if read_error(run_dir) is not None else INTERRUPTED


def read_metrics(run_dir: str | Path) -> dict[str, Any] | None:
    """metrics.json (final validation and test metrics), or None before the run finished."""
    try:
        return json.loads((Path(run_dir) / METRICS).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def read_metrics_log(run_dir: str | Path, start: int = 0) -> list[dict[str, Any]]:
    """The records of metrics.jsonl from the `start`-th on; a line being written (cut short) is left out."""
    try:
        lines = (Path(run_dir) / METRICS_LOG).read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records[start:]


def find_runs(root: str | Path, depth: int = 3, marker: str = CONFIG) -> list[Path]:
    """The run directories (holding config.yaml; or the sweeps, with `marker` SWEEP_TABLE) under
    `root`, `root` itself included, at most `depth` levels down; symbolic links are not followed,
    so nothing outside `root` is listed."""
    root = Path(root)
    found = []
    for directory, subdirectories, files in os.walk(root):
        level = len(Path(directory).relative_to(root).parts)
        if marker in files:
            found.append(Path(directory))
        subdirectories[:] = sorted(d for d in subdirectories if not d.startswith(".") and level < depth
                                   and d not in (ADAPTER, MODEL, CHECKPOINT, BEST, TENSORBOARD, TFIDF, PRUNED))
    return sorted(found)
