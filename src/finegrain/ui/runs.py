"""What the dashboard shows of runs: summaries, curves, configs side by side, and the files it may
serve. Everything is read through `finegrain.rundir`; a path from a request is resolved here and
refused unless it stays inside the runs directory."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from finegrain import rundir
from finegrain.config import RunConfig, dotted
from finegrain.errors import FinegrainError
from finegrain.tasks import task_class

# The files of a run the page may fetch, with their media types: nothing else is ever served.
FILES = {
    rundir.REPORT_HTML: "text/html; charset=utf-8",
    rundir.REPORT_MD: "text/markdown; charset=utf-8",
    rundir.CONFUSION_MATRIX: "image/png",
    rundir.LEARNING_CURVE: "image/png",
    rundir.CONFIG: "text/plain; charset=utf-8",
    rundir.SKIPPED_ROWS: "text/plain; charset=utf-8",
    rundir.TEST_PREDICTIONS: "application/x-ndjson; charset=utf-8",
}
# Metrics to headline when the task's own is absent from metrics.json, in order of preference.
FALLBACK_METRICS = ("accuracy", "micro_f1", "f1", "rougeL", "mse")


class NotFound(FinegrainError):
    """A run or file a request names that is not served: unknown, or outside the runs directory."""


def run_id(root: Path, run_dir: Path) -> str:
    """The id the page uses for a run: its path relative to the runs directory ("." for the root)."""
    return run_dir.relative_to(root).as_posix()


def resolve_run(root: Path, identifier: str) -> Path:
    """The run directory `identifier` names, refusing anything that leaves `root`: `..`, an absolute
    path, or a symbolic link whose target lies elsewhere."""
    parts = Path(identifier).parts
    if not identifier or "\x00" in identifier or Path(identifier).is_absolute() or ".." in parts:
        raise NotFound(f"run '{identifier}': not a run under the runs directory")
    base = root.resolve()
    path = (base / identifier).resolve()
    if not path.is_relative_to(base) or not (path / rundir.CONFIG).is_file():
        raise NotFound(f"run '{identifier}': not a run under the runs directory")
    return path


def resolve_sweep(root: Path, identifier: str) -> Path:
    """The `finegrain sweep` directory `identifier` names, refused like `resolve_run` outside `root`."""
    return _resolve_marked(root, identifier, rundir.SWEEP_TABLE, "sweep")


def resolve_sequence(root: Path, identifier: str) -> Path:
    """The continual sequence (`finegrain train` of a config with `continual:`) `identifier` names:
    a directory whose metrics.json holds `continual`, refused like `resolve_run` outside `root`."""
    path = _resolve_marked(root, identifier, rundir.METRICS, "continual sequence")
    if read_continual(path) is None:
        raise NotFound(f"continual sequence '{identifier}': not a continual sequence under the runs directory")
    return path


def _resolve_marked(root: Path, identifier: str, marker: str, what: str) -> Path:
    """The directory under `root` that `identifier` names and that holds file `marker`."""
    parts = Path(identifier).parts
    base = root.resolve()
    path = (base / identifier).resolve()
    if not identifier or "\x00" in identifier or Path(identifier).is_absolute() or ".." in parts \
            or not path.is_relative_to(base) or not (path / marker).is_file():
        raise NotFound(f"{what} '{identifier}': not a {what} under the runs directory")
    return path


def list_sweeps(root: Path) -> list[str]:
    """The sweep directories under `root`, as ids."""
    return [run_id(root, path) for path in rundir.find_runs(root, marker=rundir.SWEEP_TABLE)]


def list_sequences(root: Path) -> list[str]:
    """The continual sequences under `root` (their stages are runs below them), as ids."""
    return [run_id(root, path) for path in rundir.find_runs(root, marker=rundir.METRICS)
            if not (path / rundir.CONFIG).is_file() and read_continual(path) is not None]


def holding(root: Path, ids: list[str], run_dirs: list[Path]) -> list[str]:
    """The ones of `ids` (sweeps, sequences) whose directory holds every one of `run_dirs`."""
    base = root.resolve()
    return [i for i in ids if all(d.resolve().is_relative_to(base / i) for d in run_dirs)]


def read_continual(directory: Path) -> dict[str, Any] | None:
    """The `continual` section of a sequence's metrics.json (accuracy matrix, BWT, ...), None for anything else."""
    metrics = rundir.read_metrics(directory)
    section = metrics.get("continual") if isinstance(metrics, dict) else None
    return section if isinstance(section, dict) and isinstance(section.get("accuracy_matrix"), list) else None


def read_predictions(run_dir: Path, errors_only: bool, offset: int, limit: int) -> dict[str, Any] | None:
    """A page of the run's test predictions (`test_predictions.jsonl`: NER, relation and QA runs),
    the wrong ones only when `errors_only`, with the counts; None when the run has none."""
    path = (run_dir / rundir.TEST_PREDICTIONS).resolve()
    if not path.is_relative_to(run_dir.resolve()) or not path.is_file():
        return None
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a file some other tool cut short: what is whole still shows
            continue
    errors = [r for r in records if not r.get("correct")]
    chosen = errors if errors_only else records
    return {"total": len(records), "errors": len(errors), "matched": len(chosen), "offset": offset,
            "records": chosen[offset : offset + limit]}


def resolve_file(run_dir: Path, name: str) -> Path:
    """A file of the run that `FILES` lists, refused when missing or when a link leads out of the run."""
    if name not in FILES:
        raise NotFound(f"'{name}': not a file the dashboard serves (one of {', '.join(FILES)})")
    path = (run_dir / name).resolve()
    if not path.is_relative_to(run_dir.resolve()) or not path.is_file():
        raise NotFound(f"'{name}': the run has no such file")
    return path


def read_config(run_dir: Path) -> tuple[RunConfig | None, str | None]:
    """The run's config, or None and the one-line reason it cannot be read (another version's keys)."""
    try:
        return rundir.read_config(run_dir), None
    except FinegrainError as exc:
        return None, str(exc)


def headline(config: RunConfig, metrics: dict[str, Any] | None) -> tuple[str | None, float | None, str | None]:
    """(metric, value, split) of the run's headline score: test when there is a test split, else validation."""
    if not metrics:
        return None, None, None
    wanted = config.train.metric or getattr(task_class(config.task), "headline_metric", None)
    for split in ("test", "validation"):
        scores = metrics.get(split)
        if not isinstance(scores, dict):
            continue
        for name in (wanted, *FALLBACK_METRICS):
            if isinstance(scores.get(name), (int, float)):
                return name, float(scores[name]), split
    return None, None, None


def summary(root: Path, run_dir: Path) -> dict[str, Any]:
    """One row of the Runs table."""
    config, config_error = read_config(run_dir)
    metrics = rundir.read_metrics(run_dir)
    status = rundir.status(run_dir)
    started = (run_dir / rundir.CONFIG).stat().st_mtime
    row: dict[str, Any] = {
        "id": run_id(root, run_dir), "status": status, "started": started,
        "duration": _duration(run_dir, status, started, metrics),
        "task": None, "model": None, "method": None, "metric": None, "value": None, "split": None,
        "error": rundir.read_error(run_dir) if status == rundir.FAILED else None,
    }
    if config is None:
        return {**row, "error": config_error}
    method = ((metrics or {}).get("train") or {}).get("peft_method") or config.peft.method
    row.update(task=config.task, model=Path(config.model.name).name if config.model.name else "smollm2-135m", method=method)
    try:
        row["metric"], row["value"], row["split"] = headline(config, metrics)
    except FinegrainError:  # a task this version does not know: no headline, the rest still shows
        pass
    return row


def _duration(run_dir: Path, status: str, started: float, metrics: dict[str, Any] | None) -> float | None:
    """Seconds the run took (finished), has taken (running) or took until it stopped."""
    if metrics and isinstance(metrics.get("train"), dict) and "total_seconds" in metrics["train"]:
        return float(metrics["train"]["total_seconds"])
    if status == rundir.RUNNING:
        return max(0.0, time.time() - started)
    log = run_dir / rundir.METRICS_LOG
    return max(0.0, log.stat().st_mtime - started) if log.exists() else None


def list_runs(root: Path) -> list[dict[str, Any]]:
    """Every run under `root`, newest first."""
    rows = [summary(root, run_dir) for run_dir in rundir.find_runs(root)]
    return sorted(rows, key=lambda row: -row["started"])


def config_values(config: RunConfig | None) -> dict[str, Any]:
    """The effective config as dotted keys (defaults included), for a diff."""
    if config is None:
        return {}
    return dotted(dataclasses.asdict(config))


def metric_values(metrics: dict[str, Any] | None) -> dict[str, float]:
    """The numbers of metrics.json worth comparing: each split's scores (averages one level down),
    the training time, speed and size."""
    if not metrics:
        return {}
    values: dict[str, float] = {}
    for split in ("validation", "test"):
        for key, value in dotted(metrics.get(split) or {}, f"{split}.").items():
            last = key.rsplit(".", 1)[-1]
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key.count(".") <= 2 \
                    and ".per_class." not in key and last != "support" and last != "num_outside_labels":
                values[key] = float(value)
    for key in ("train_seconds", "total_seconds", "tokens_per_s", "steps", "trainable_parameters"):
        value = (metrics.get("train") or {}).get(key)
        if isinstance(value, (int, float)):
            values[f"train.{key}"] = float(value)
    return values


def differing(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The keys whose values are not the same in every one of `rows` (a missing key counts as None)."""
    keys = sorted({key for row in rows for key in row})
    return [{"key": key, "values": [row.get(key) for row in rows]} for key in keys
            if len({repr(row.get(key)) for row in rows}) > 1]


def table(rows: list[dict[str, float]]) -> list[dict[str, Any]]:
    """Every key of `rows`, with each row's value (None where a row lacks it)."""
    keys = sorted({key for row in rows for key in row})
    return [{"key": key, "values": [row.get(key) for row in rows]} for key in keys]
