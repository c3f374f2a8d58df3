"""`finegrain tune`: hyperparameter search with Optuna, pruning poor trials on validation.

    finegrain tune CONFIG --trials 20 --space "train.lr=log(1e-5,1e-2)" --space "lora.r=4|8|16" --output DIR

Each trial is one `finegrain train` of CONFIG with the trial's values set (`--set`), in its own
process, writing `DIR/trial-N/`. While it trains, its validation scores (the records of its
`metrics.jsonl`) are reported to Optuna; when the pruner (median of the earlier trials at the
same step) says the trial is behind, the process is stopped and the trial counts as pruned. A
trial's value is its run's best validation score (`--metric`, default the task's headline).

The study lives in `DIR/study.db` (SQLite), so a killed or interrupted (Ctrl-C) search continues
when run again with the same arguments: finished and pruned trials count towards `--trials`, and
a trial that was running when the search stopped is run again from its checkpoint. `--storage URL` (e.g.
`postgresql://...`) shares one study between workers on several machines, each running the same
command. At the end: `DIR/best.yaml` (CONFIG with the best trial's values, ready for `finegrain
train`), `DIR/trials.json`, `DIR/trials.md` and `DIR/trials.png` (each trial's value, and the
best so far).

Optuna is an optional dependency: `pip install optuna` (or `finegrain[tune]`).

A space is `KEY=log(LOW,HIGH)` (log-uniform float), `KEY=float(LOW,HIGH)`, `KEY=int(LOW,HIGH)`,
or `KEY=A|B|C` (a choice; each value read as YAML, so `4|8|16` are numbers and `true|false` booleans).
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from tqdm import tqdm

from finegrain import rundir
from finegrain.atomic import atomic_path, atomic_write_json, atomic_write_text, output_directory
from finegrain.children import refuse_other_settings, train_args, watch
from finegrain.config import RunConfig, dump_yaml, load_config
from finegrain.errors import FinegrainError, Interrupted
from finegrain.evaluate.metrics import higher_is_better
from finegrain.tasks import task_class
from finegrain.train.trainer import flat_metrics

STUDY_DB, BEST, TRIALS_JSON, TRIALS_MD, TRIALS_PNG = "study.db", "best.yaml", "trials.json", "trials.md", "trials.png"
POLL_SECONDS = 0.5
_RANGE = re.compile(r"^(log|float|int)\(\s*([^,]+?)\s*,\s*([^,]+?)\s*\)$")


@dataclass
class Dimension:
    """One `--space`: a config key and how to draw its value."""

    key: str
    kind: str  # log | float | int | choice
    low: float = 0.0
    high: float = 0.0
    choices: tuple = ()

    def suggest(self, trial: Any) -> Any:
        if self.kind == "choice":
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high))
        return trial.suggest_float(self.key, self.low, self.high, log=self.kind == "log")


def parse_space(text: str) -> Dimension:
    """`train.lr=log(1e-5,1e-2)`, `train.epochs=int(1,4)`, `lora.r=4|8|16` as a Dimension."""
    key, sep, spec = text.partition("=")
    key, spec = key.strip(), spec.strip()
    example = 'e.g. --space "train.lr=log(1e-5,1e-2)" or --space "lora.r=4|8|16"'
    if not sep or not key or not spec or "." not in key:
        raise FinegrainError(f"--space {text}: expected SECTION.KEY=RANGE, {example}")
    match = _RANGE.match(spec)
    if match:
        kind, low, high = match.groups()
        try:
            low_value, high_value = float(low), float(high)
        except ValueError:
            raise FinegrainError(f"--space {text}: the bounds must be numbers, {example}") from None
        if not low_value < high_value or (kind == "log" and low_value <= 0):
            raise FinegrainError(f"--space {text}: needs LOW < HIGH{' and LOW > 0 on a log scale' if kind == 'log' else ''}")
        return Dimension(key, kind, low_value, high_value)
    try:
        choices = tuple(yaml.safe_load(part) for part in spec.split("|"))
    except yaml.YAMLError as e:
        raise FinegrainError(f"--space {text}: a choice is not valid YAML ({getattr(e, 'problem', e)})") from None
    if len(choices) < 2:
        raise FinegrainError(f"--space {text}: give a range such as log(1e-5,1e-2) or two or more choices A|B, {example}")
    return Dimension(key, "choice", choices=choices)


def _optuna():
    try:
        import optuna
    except ImportError:
        raise FinegrainError("finegrain tune needs Optuna: pip install optuna (or pip install 'finegrain[tune]')") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def _overrides(params: dict[str, Any]) -> list[str]:
    return [f"{key}={json.dumps(value)}" for key, value in params.items()]


def _metric(config: RunConfig, metric: str | None) -> str:
    if metric or config.train.metric:
        return metric or config.train.metric
    headline = getattr(task_class(config.task), "headline_metric", None)
    return headline if isinstance(headline, str) else ("micro_f1" if config.data.multi_label else "accuracy")


def _validation_records(path: Path, seen: int) -> tuple[list[dict[str, Any]], int]:
    """Validation records of a growing metrics.jsonl past the first `seen` lines (a line being
    written is left for the next poll)."""
    if not path.is_file():
        return [], seen
    lines = path.read_text(encoding="utf-8").split("\n")[:-1]  # the last piece has no newline yet
    records = [json.loads(line) for line in lines[seen:] if line.strip()]
    return [r for r in records if r.get("split") == "validation"], len(lines)


def run_trial(trial: Any, config_path: str | None, overrides: list[str], run_dir: Path, log: Path, metric: str) -> float:
    """Train one trial in its own process, reporting validation scores and stopping it when pruned.

    Returns:
        The run's best validation `metric`.

    Raises:
        optuna.TrialPruned: the pruner stopped it.
        KeyboardInterrupt: Ctrl-C reached the search (the trial's process is stopped too) or the trial.
        FinegrainError: the training failed (its last error line and the log file named).
    """
    refuse_other_settings(config_path, run_dir, overrides)
    if not (run_dir / rundir.METRICS).is_file():  # a finished trial (the search stopped before it was told) is read
        command = [sys.executable, "-m", "finegrain.cli", "train", *train_args(config_path, run_dir, overrides)]
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a", encoding="utf-8") as out:
            process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
            watch(process, lambda: _follow(trial, process, run_dir, metric))  # Ctrl-C: it stops at its checkpoint
        if process.returncode != 0:
            lines = [line for line in log.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
            raise FinegrainError(f"trial {trial.number}: training failed ({lines[-1] if lines else 'no output'}); see {log}")
    results = json.loads((run_dir / rundir.METRICS).read_text(encoding="utf-8"))
    flat = flat_metrics(results.get("validation") or {})
    if metric not in flat:
        raise FinegrainError(f"--metric: '{metric}' is not among trial {trial.number}'s validation scores "
                             f"({', '.join(flat) or 'none'}); "
                             "the config needs a validation split (data.split or data.validation)")
    return float(flat[metric])


def _follow(trial: Any, process: subprocess.Popen, run_dir: Path, metric: str) -> None:
    """Report the trial's validation scores to Optuna as its run logs them, until the run ends;
    stop it (optuna.TrialPruned) when the pruner says it is behind."""
    optuna = _optuna()
    seen = 0
    while True:
        finished = process.poll() is not None
        records, seen = _validation_records(run_dir / rundir.METRICS_LOG, seen)
        for record in records:
            if metric in record:
                trial.report(float(record[metric]), int(record["step"]))
                if trial.should_prune():
                    process.send_signal(signal.SIGTERM)
                    process.wait()
                    raise optuna.TrialPruned(f"validation {metric} {record[metric]} at step {record['step']}")
        if finished:
            return
        time.sleep(POLL_SECONDS)


def tune(config_path: str | None, overrides: list[str], space: list[str], trials: int, output: str | Path,
         metric: str | None = None, storage: str | None = None, seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Run (or continue) the search; returns trials.json's content. See the module docstring."""
    optuna = _optuna()
    dimensions = [parse_space(text) for text in space]
    if not dimensions:
        raise FinegrainError('tune: give at least one --space, e.g. --space "train.lr=log(1e-5,1e-2)"')
    if trials < 1:
        raise FinegrainError(f"--trials: must be at least 1, got {trials}")
    base = load_config(config_path, overrides)  # a bad config or key fails here, before any trial
    for dimension in dimensions:
        for value in _values(dimension):
            load_config(config_path, [*overrides, *_overrides({dimension.key: value})])
    metric = _metric(base, metric)
    output = output_directory(output)
    rundir.refuse_single_run(output, "the study")
    output.mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(
        study_name="finegrain", storage=storage or f"sqlite:///{output / STUDY_DB}", load_if_exists=True,
        direction="maximize" if higher_is_better(metric) else "minimize",
        sampler=optuna.samplers.TPESampler(seed=seed),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0),
    )
    if storage is None:  # our own file: a trial still "running" died with an earlier search
        for stale in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            _run_again(study, stale, stale.user_attrs.get("run_dir", ""))
    done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    for earlier in study.get_trials(deepcopy=False, states=done):  # their scores count: trained as asked now?
        if earlier.user_attrs.get("run_dir"):
            refuse_other_settings(config_path, Path(earlier.user_attrs["run_dir"]), [*overrides, *_overrides(earlier.params)])
    remaining = trials - len(study.get_trials(deepcopy=False, states=done))
    bar = tqdm(total=trials, initial=trials - max(remaining, 0), desc="tune", unit="trial", disable=not progress)
    with bar:  # closed before an error's line is printed
        while remaining > 0:
            trial = study.ask()
            params = {d.key: d.suggest(trial) for d in dimensions}
            run_dir = Path(trial.user_attrs.get("run_dir") or output / f"trial-{trial.number}")
            trial.set_user_attr("run_dir", str(run_dir))
            try:
                value = run_trial(trial, config_path, [*overrides, *_overrides(params)], run_dir,
                                  output / "logs" / f"{run_dir.name}.log", metric)
            except optuna.TrialPruned:
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            except KeyboardInterrupt:  # as a killed search's running trial: run on by the same command again
                _run_again(study, trial, str(run_dir))
                raise Interrupted("the same command again goes on: finished trials count towards --trials, the one it "
                                  "stopped in continues from its checkpoint") from None
            except BaseException:
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                raise
            else:
                study.tell(trial, value)
            remaining -= 1
            bar.update(1)
            bar.set_postfix_str(f"best {study.best_value:.4f}" if _has_complete(study, optuna) else "")
    return write_results(study, optuna, base, config_path, overrides, metric, output)


def _run_again(study: Any, trial: Any, run_dir: str) -> None:
    """A trial that stopped unfinished (the search killed or Ctrl-C'd) counts as failed and is queued
    again with its values and run directory, where the next trial continues it from its checkpoint."""
    study.tell(trial.number, state=_optuna().trial.TrialState.FAIL)
    study.enqueue_trial(trial.params, user_attrs={"run_dir": run_dir})


def _values(dimension: Dimension) -> tuple:
    """Every choice, or both ends of a range: checked against the config before any trial."""
    if dimension.kind == "choice":
        return dimension.choices
    if dimension.kind == "int":
        return int(dimension.low), int(dimension.high)
    return dimension.low, dimension.high


def _has_complete(study: Any, optuna: Any) -> bool:
    return any(t.state == optuna.trial.TrialState.COMPLETE for t in study.get_trials(deepcopy=False))


def write_results(study: Any, optuna: Any, base: RunConfig, config_path: str | None, overrides: list[str],
                  metric: str, output: Path) -> dict[str, Any]:
    """trials.json, trials.md, trials.png and best.yaml of the study."""
    rows = [{"number": t.number, "state": t.state.name.lower(), "value": t.value, "params": t.params,
             "run_dir": t.user_attrs.get("run_dir"),
             "seconds": round(t.duration.total_seconds(), 1) if t.duration else None}
            for t in study.get_trials(deepcopy=False)]
    best = None
    if _has_complete(study, optuna):
        best = {"number": study.best_trial.number, "value": study.best_value, "params": study.best_params}
        config = load_config(config_path, [*overrides, *_overrides(study.best_params)])
        config.output = None
        atomic_write_text(output / BEST, f"# finegrain tune: trial {best['number']}, validation {metric} "
                          f"{best['value']:.4f}\n" + dump_yaml(config))
    summary = {"metric": metric, "direction": study.direction.name.lower(), "best": best, "trials": rows}
    atomic_write_json(output / TRIALS_JSON, summary)
    keys = list(dict.fromkeys(k for row in rows for k in row["params"]))
    lines = [f"# Trials (validation {metric}, {summary['direction']})", "",
             "| trial | state | value | " + " | ".join(keys) + " | seconds |",
             "|---|---|---|" + "---|" * len(keys) + "---|"]
    for row in rows:
        value = f"{row['value']:.4f}" if row["value"] is not None else ""
        cells = [_cell(row["params"].get(k)) for k in keys]
        mark = " (best)" if best and row["number"] == best["number"] else ""
        lines.append(f"| {row['number']}{mark} | {row['state']} | {value} | " + " | ".join(cells) + f" | {row['seconds'] or ''} |")
    atomic_write_text(output / TRIALS_MD, "\n".join(lines) + "\n")
    _plot(rows, metric, summary["direction"] == "maximize", output / TRIALS_PNG)
    return summary


def _cell(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else "" if value is None else str(value)


def _plot(rows: list[dict[str, Any]], metric: str, maximize: bool, out_png: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    complete = [(r["number"], r["value"]) for r in rows if r["state"] == "complete"]
    pruned = [r["number"] for r in rows if r["state"] == "pruned"]
    if complete:
        ax.scatter(*zip(*complete), label="complete")
        best, running = [], None
        for number, value in complete:
            running = value if running is None else (max if maximize else min)(running, value)
            best.append((number, running))
        ax.step(*zip(*best), where="post", color="tab:red", label="best so far")
    if pruned:
        low = min((v for _, v in complete), default=0.0)
        ax.scatter(pruned, [low] * len(pruned), marker="x", color="grey", label="pruned")
    ax.set_xlabel("trial")
    ax.set_ylabel(f"validation {metric}")
    ax.legend()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png")
