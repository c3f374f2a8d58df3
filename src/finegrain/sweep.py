"""`finegrain sweep`: one config over seeds, labelled-set sizes and folds, as mean ± std.

A score from 64 labelled examples means little until it is repeated: the same config trained
with another seed, on another draw of the examples, lands somewhere else. A sweep runs the
config once per combination of

- `--seeds N`: seeds 0 .. N-1, each setting `train.seed` (initialisation, dropout, batch order)
  and `data.split_seed` (which examples land in each split and sample);
- `--shots 8,16,...`: k training examples per class (`data.shots`), the few-shot learning curve;
- `--folds K`: K-fold cross-validation (`data.folds`, `data.fold`): every example is tested once,

and writes, under the output directory, each run's own directory (`shots-16/seed-0/`), then
`sweep.json` (every run's test scores and the summary), `sweep.md` (a table per labelled-set
size: mean ± standard deviation and the 95% interval of the mean for each score, the baselines
the runs computed — majority class, TF-IDF + linear model, and with `--prompted 0,4` the base
model prompted zero-shot and with 4 examples per class (`finegrain.evaluate.prompting`) — the
same way) and `sweep.png`
(the headline score against the labelled-set size, or against the run where sizes are not
swept). A killed sweep continues where it stopped when run again with the same arguments:
finished runs are read back, an interrupted one resumes from its checkpoint.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from finegrain import rundir
from finegrain.atomic import atomic_path, atomic_write_json, atomic_write_text, output_directory
from finegrain.checkpoint.load import load_model
from finegrain.config import RunConfig, validate
from finegrain.errors import FinegrainError
from finegrain.run import train_or_resume

SUMMARY, TABLE, PLOT, PROMPTED = "sweep.json", "sweep.md", "sweep.png", "prompted.json"


@dataclass
class Point:
    """One run of the sweep: where it sits in the grid and its directory."""

    shots: int | None
    seed: int
    fold: int | None
    run_dir: Path
    scores: dict[str, float] = field(default_factory=dict)

    @property
    def name(self) -> str:
        parts = [f"shots-{self.shots}" if self.shots else "all", f"seed-{self.seed}"]
        return "/".join(parts + ([f"fold-{self.fold}"] if self.fold is not None else []))


def grid(output: Path, seeds: int, shots: list[int] | None, folds: int | None) -> list[Point]:
    """Every run of the sweep, in the order they train."""
    if seeds < 1:
        raise FinegrainError(f"--seeds: must be at least 1, got {seeds}")
    if shots is not None and (not shots or min(shots) < 1):
        raise FinegrainError(f"--shots: give sizes of at least 1 example per class, e.g. 8,16,32; got {shots}")
    if folds is not None and folds < 2:
        raise FinegrainError(f"--folds: must be at least 2, got {folds}")
    points = []
    for k, seed, fold in itertools.product(shots or [None], range(seeds), range(folds) if folds else [None]):
        point = Point(k, seed, fold, Path())
        point.run_dir = output / point.name
        points.append(point)
    return points


def point_config(base: RunConfig, point: Point, folds: int | None) -> RunConfig:
    """`base` with the point's seed, labelled-set size and fold set, writing to its directory;
    validated, so a bad combination (a fold without folds) fails before any run starts."""
    config = copy.deepcopy(base)  # keeps `explicit` (what the recipe leaves alone) and `sources`
    config.train.seed = config.data.split_seed = point.seed
    if point.shots is not None:
        config.data.shots = point.shots
    if point.fold is not None:
        config.data.folds, config.data.fold = folds, point.fold
    config.output = str(point.run_dir)
    validate(config, "sweep", getattr(base, "sources", None))
    return config


def scores_of(results: dict[str, Any]) -> dict[str, float]:
    """The numbers a sweep summarises from one run's metrics.json: every top-level score of the
    test split (or validation, without one), macro-F1, and the baselines' accuracy and macro-F1."""
    split = results.get("test") or results.get("validation") or {}
    scores = {key: float(value) for key, value in split.items()
              if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("num_examples", "support")}
    if isinstance(split.get("macro"), dict) and "f1" in split["macro"]:
        scores["macro_f1"] = float(split["macro"]["f1"])
    for name, baseline in (results.get("baselines") or {}).items():
        for key in ("accuracy", "f1", "macro_f1"):
            if isinstance(baseline, dict) and isinstance(baseline.get(key), (int, float)):
                scores[f"baseline {name} {key}"] = float(baseline[key])
    scores["train_seconds"] = float(results.get("train", {}).get("train_seconds", 0.0))
    scores["train_examples"] = float(results.get("train", {}).get("examples", 0))
    return scores


def t_quantile(df: int) -> float:
    """The 97.5% quantile of Student's t with `df` degrees of freedom (the 95% interval's factor)."""
    from scipy.stats import t

    return float(t.ppf(0.975, df))


def summarise(values: list[float]) -> dict[str, float]:
    """Mean, sample standard deviation and the 95% interval of the mean (t-based) of `values`."""
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    half = t_quantile(len(values) - 1) * std / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return {"mean": mean, "std": std, "low": mean - half, "high": mean + half, "n": len(values)}


def summary_table(points: list[Point]) -> dict[str, dict[str, dict[str, float]]]:
    """Per labelled-set size ('all' without --shots): per score, `summarise` over its runs."""
    table: dict[str, dict[str, dict[str, float]]] = {}
    for size in dict.fromkeys(str(p.shots or "all") for p in points):
        runs = [p for p in points if str(p.shots or "all") == size and p.scores]
        names = list(dict.fromkeys(name for p in runs for name in p.scores))
        table[size] = {name: summarise([p.scores[name] for p in runs if name in p.scores]) for name in names}
    return table


def markdown(table: dict[str, dict[str, dict[str, float]]], headline: str, short: list[int] = ()) -> str:
    """sweep.md: a table per labelled-set size; `short`: the sizes that some class of the
    training split could not fill (it gave all it had)."""
    lines = ["# Sweep", "", f"Scores on the test split: mean ± standard deviation over the runs, and the 95% "
             f"interval of the mean. The headline score is {headline}.", ""]
    for size, scores in table.items():
        shown = "all training examples" if size == "all" else f"{size} training examples per class"
        if size != "all" and int(size) in short:
            shown += " (fewer in some classes: their training split holds fewer, all of them were used; see train_examples)"
        lines += [f"## {shown}", "", "| score | mean ± std | 95% interval | runs |", "|---|---|---|---|"]
        for name, s in scores.items():
            lines.append(f"| {name} | {s['mean']:.4f} ± {s['std']:.4f} | {s['low']:.4f} – {s['high']:.4f} | {s['n']} |")
        lines.append("")
    return "\n".join(lines)


def plot(points: list[Point], headline: str, out_png: Path) -> None:
    """The headline score of every run, and the mean with its 95% interval, against the
    labelled-set size (or against the run index where sizes are not swept)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    sized = all(p.shots for p in points)
    xs = sorted({p.shots for p in points}) if sized else list(range(1, len(points) + 1))
    if sized:
        for k in xs:
            values = [p.scores[headline] for p in points if p.shots == k and headline in p.scores]
            if values:
                s = summarise(values)
                ax.scatter([k] * len(values), values, color="tab:blue", alpha=0.4, s=14)
                ax.errorbar([k], [s["mean"]], yerr=[[s["mean"] - s["low"]], [s["high"] - s["mean"]]], color="tab:red",
                            capsize=4, marker="o")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("training examples per class")
    else:
        values = [p.scores.get(headline, math.nan) for p in points]
        ax.scatter(xs, values, color="tab:blue")
        finite = [v for v in values if not math.isnan(v)]
        if finite:
            s = summarise(finite)
            ax.axhline(s["mean"], color="tab:red")
            ax.axhspan(s["low"], s["high"], color="tab:red", alpha=0.15)
        ax.set_xlabel("run")
    ax.set_ylabel(f"test {headline}")
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png")


def prompted_scores(config: RunConfig, point: Point, prompted: list[int], base: Any) -> dict[str, float]:
    """The prompted baselines (`finegrain.evaluate.prompting`) on the point's own splits: the base
    model with k examples per class in its prompt, for each k in `prompted` (0: zero-shot); kept
    in the run directory (`prompted.json`) so that a continued sweep does not compute them again."""
    from finegrain.evaluate.prompting import prompted_baseline
    from finegrain.tasks import task_class

    path = point.run_dir / PROMPTED
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    splits = task_class(config.task).load_splits(config.data)
    test = splits.test or splits.validation
    scores = {}
    for k in prompted:
        result = prompted_baseline(*base, splits.train, test, splits.labels, k=k, seed=point.seed)
        for key in ("accuracy", "macro_f1"):
            scores[f"baseline prompted {k}-shot {key}"] = result[key]
    atomic_write_json(path, scores)
    return scores


def sweep(config: RunConfig, output: str | Path, seeds: int = 1, shots: list[int] | None = None,
          folds: int | None = None, progress: bool = True, prompted: list[int] | None = None) -> dict[str, Any]:
    """Run the sweep (see the module docstring) and write its summary; returns sweep.json's content.

    `prompted`: also score the base model prompted with k examples per class for each k (0:
    zero-shot) on each run's test split (classification)."""
    output = output_directory(output)
    rundir.refuse_single_run(output, "the sweep")
    shots = list(dict.fromkeys(shots)) if shots is not None else None  # a size named twice trains once
    prompted = list(dict.fromkeys(prompted or []))
    if prompted and min(prompted) < 0:
        raise FinegrainError(f"--prompted: give numbers of examples per class of 0 (zero-shot) or more, e.g. 0,4; got {prompted}")
    if folds and config.data.test:
        raise FinegrainError(f"--folds: data.test ({config.data.test}) is set; cross-validation holds out its own "
                             "test folds, so drop data.test")
    points = grid(output, seeds, shots, folds)
    configs = [point_config(config, point, folds) for point in points]
    bar = tqdm(points, desc="sweep", unit="run", disable=not progress)
    headline = None
    if prompted and config.task != "classification":
        raise FinegrainError(f"--prompted: prompted baselines label texts with class names; task {config.task} has none")
    base = load_model(config.model.name, progress=False) if prompted else None
    short: list[int] = []  # the sizes some class could not fill
    for point, run_config in zip(bar, configs):
        bar.set_postfix_str(point.name)
        results = train_or_resume(run_config, progress=False)  # config.output is point.run_dir
        point.scores = scores_of(results)
        if point.shots and point.scores["train_examples"] < point.shots * len(results.get("labels") or []):
            short.append(point.shots)
        if prompted:
            point.scores.update(prompted_scores(run_config, point, prompted, base))
        headline = headline or _headline(results)
    table = summary_table(points)
    summary = {
        "seeds": seeds, "shots": shots, "folds": folds, "headline": headline, "short_shots": sorted(set(short)),
        "runs": [{"name": p.name, "shots": p.shots, "seed": p.seed, "fold": p.fold, "run_dir": str(p.run_dir),
                  "scores": p.scores} for p in points],
        "summary": table,
    }
    atomic_write_json(output / SUMMARY, summary)
    atomic_write_text(output / TABLE, markdown(table, headline, short))
    plot(points, headline, output / PLOT)
    return summary


def _headline(results: dict[str, Any]) -> str:
    split = results.get("test") or results.get("validation") or {}
    for name in ("accuracy", "micro_f1", "f1", "rougeL", "pearson"):
        if name in split:
            return name
    return next(iter(scores_of(results)), "train_seconds")
