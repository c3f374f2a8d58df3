"""`finegrain compare`: one run config trained once per model × method (× seed) on the same splits,
beside the baselines, as one table and one plot.

    finegrain compare examples/rotten_tomatoes.yaml --models smollm2-135m,minilm-l6 --methods lora,full --seeds 3 --output DIR

`--methods` applies each method to every model, or to one model written as `MODEL:METHOD`
(`--methods smollm2-135m:lora,minilm-l6:full`: an adapter for the decoder, full fine-tuning for
the encoder, without the two cells neither needs); a model named that way runs only its own.

Each cell is an ordinary `finegrain train` run in its own process (its peak RSS is its own), in
`DIR/runs/MODEL-METHOD-sSEED`; a cell whose run already finished is read, not trained again, and
one stopped part-way (Ctrl-C, a kill) goes on from its checkpoint, so a compare cut short continues
where it stopped and a finished one rewrites its table in seconds.
The table (`DIR/report.md`, `DIR/report.html`, the rows in `DIR/compare.json`) gives per model
and method the test score (mean ± sample std over seeds), training and whole-run time, prediction speed
(test examples per second through `finegrain.load`), peak RSS and trainable parameters, and the
majority-class and TF-IDF baselines the runs measured on the same test split (classification; a
tagger's: each word's most frequent tag and a logistic regression on word features);
`DIR/compare.png` plots score against whole-run time.

For single-label classification the table also holds the zero-shot prompted decoder
(`finegrain.evaluate.prompting`: the base model asked for each text's label by name, no training)
on the same test split, up to `PROMPTED_EXAMPLES` of it: the first decoder of `--models` (the
config's model when every one is an encoder and the config names a decoder). It is computed once
and kept in `DIR/prompted.json`, so a rerun reads it.

A config is usually written for one model. What does not carry over to an encoder is replaced,
and each replacement is listed under the table: `model.num_layers` (a decoder's layer cut),
`head.pooling: last` (an encoder's last token is [SEP]; it pools the mean), the adapted layers
`lora.layers` / `peft.layers` (the decoder's choice above its cached prefix: the encoder adapts,
or fully fine-tunes, every layer), the data recipe (its layer probe is the decoder's). Full
fine-tuning takes a lower learning rate than an adapter (`FULL_LR`) unless `--set train.lr=...`
says otherwise.
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finegrain import rundir
from finegrain.atomic import atomic_path, atomic_write_json, output_directory
from finegrain.checkpoint.load import DEFAULT_MODEL, is_encoder, load_model
from finegrain.config import RunConfig, load_config
from finegrain.cpu import peak_rss_mb
from finegrain.children import refuse_other_settings, train_args, watch
from finegrain.errors import RUN_AGAIN, FinegrainError, Interrupted
from finegrain.evaluate.report import Table, write_report
from finegrain.peft import METHODS
from finegrain.tasks import task_class
from finegrain.train.trainer import flat_metrics

RUNS = "runs"
USAGE_SUFFIX = ".usage.json"  # beside a cell's run directory: its peak RSS, which the run itself does not record
JSON_NAME, PLOT_NAME = "compare.json", "compare.png"
FULL_LR = {"encoder": 1e-4, "decoder": 2e-5}  # peft.method full: every weight moves, an adapter's lr would wreck them
POOLING_TASKS = ("classification", "regression")
PREDICT_EXAMPLES = 512  # test examples timed through finegrain.load per cell
PROMPTED_NAME = "prompted.json"
PROMPTED_EXAMPLES = 200  # test examples the prompted decoder labels (a sample, drawn with seed 0)


@dataclass
class Cell:
    """One run of the comparison: a model, a method, a seed, and the overrides that make its config."""

    model: str
    method: str
    seed: int
    run_dir: Path
    overrides: list[str]
    notes: list[str] = field(default_factory=list)  # the replacements made for this model, for the table


def plan(config_path: str | None, models: list[str], methods: list[str], seeds: int, output: Path,
         overrides: list[str] = ()) -> list[Cell]:
    """The cells of a comparison, each config checked (model, method, keys) before any training starts.

    Raises:
        FinegrainError: no models, an unknown method, a seed count below 1, or a config that does not load.
    """
    if not models:
        raise FinegrainError("--models: name at least one model, e.g. --models smollm2-135m,minilm-l6")
    models = list(dict.fromkeys(models))  # a model named twice is one model's cells (as for --methods)
    per_model = methods_per_model(models, methods)
    if seeds < 1:
        raise FinegrainError(f"--seeds: {seeds}; run at least 1 seed")
    base = load_config(config_path, list(overrides))
    if task_class(base.task).peft_task_type == "CAUSAL_LM":
        raise FinegrainError(f"task '{base.task}' generates text: compare scores classifiers and taggers; pick another config")
    user_set = {o.partition("=")[0].strip() for o in overrides}
    cells = []
    for model in models:
        encoder = is_encoder(model)
        for method in per_model[model]:
            adjusted, notes = _adjustments(base, encoder, method, user_set)
            for seed in range(seeds):
                cell_overrides = [*overrides, f"model.name={model}", f"peft.method={method}", f"train.seed={seed}", *adjusted]
                load_config(config_path, cell_overrides)  # every cell's config is valid before the first trains
                run_dir = output / RUNS / f"{_slug(model)}-{method}-s{seed}"
                cells.append(Cell(model, method, seed, run_dir, cell_overrides, notes))
    return cells


def methods_per_model(models: list[str], methods: list[str]) -> dict[str, list[str]]:
    """The methods each model runs: a plain `METHOD` of `--methods` for every model, a
    `MODEL:METHOD` for that model alone (a model named so runs only the methods named for it).

    Raises:
        FinegrainError: an unknown method, a `MODEL:` that is not in `--models`, or a model left with no method.
    """
    plain, pinned = [], {}
    for entry in methods:
        model, _, method = entry.rpartition(":")
        if method not in METHODS:
            raise FinegrainError(f"--methods: '{method}' is not a method; use some of {', '.join(METHODS)}")
        if not model:
            plain.append(method)
        elif model not in models:
            raise FinegrainError(f"--methods: '{entry}' names model '{model}', which is not in --models ({', '.join(models)}); "
                                 "write MODEL:METHOD with a model of --models")
        else:
            pinned.setdefault(model, []).append(method)
    per_model = {model: list(dict.fromkeys(pinned.get(model, plain))) for model in models}
    for model, chosen in per_model.items():
        if not chosen:
            raise FinegrainError(f"--methods: no method for model '{model}'; add {model}:METHOD or a plain METHOD, e.g. lora")
    return per_model


def _adjustments(base, encoder: bool, method: str, user_set: set[str]) -> tuple[list[str], list[str]]:
    """The overrides (and their notes) that fit a config to the model kind and the method."""
    overrides, notes = [], []
    if encoder:
        if base.model.num_layers is not None and "model.num_layers" not in user_set:
            overrides.append("model.num_layers=null")
            notes.append(f"model.num_layers {base.model.num_layers} → all layers (a decoder's cut)")
        for key, layers in (("lora.layers", base.lora.layers), ("peft.layers", base.peft.options.get("layers"))):
            if isinstance(layers, list) and key not in user_set:
                overrides.append(f"{key}=null")
                notes.append(f"{key} {layers} → every layer (the decoder's adapted layers)")
        if base.task in POOLING_TASKS and base.head.pooling == "last" and "head.pooling" not in user_set:
            overrides.append("head.pooling=mean")
            notes.append("head.pooling last → mean (an encoder's last token is [SEP])")
        if base.train.recipe not in ("off", False) and "train.recipe" not in user_set:
            overrides.append("train.recipe=off")
            notes.append("train.recipe → off (its layer probe is the decoder's)")
    if method == "full" and "train.lr" not in user_set:
        lr = FULL_LR["encoder" if encoder else "decoder"]
        if base.train.lr > lr:
            overrides.append(f"train.lr={lr}")
            notes.append(f"train.lr {base.train.lr:g} → {lr:g} (full fine-tuning)")
    return overrides, notes


def _slug(model: str) -> str:
    """A directory name for a model name or path."""
    name = Path(model.rstrip("/")).name or model
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def run_cell(cell: Cell, config_path: str | None, progress: bool = True) -> dict[str, Any]:
    """Train one cell in its own process (unless its run already finished) and read its figures.

    The child's stderr (progress bars, warnings) goes to `RUN_DIR.log` beside the run; its stdout
    (the test report) to ours when `progress`. Its peak RSS (`finegrain.cpu.peak_rss_mb`, written by the child
    itself) is kept in `RUN_DIR.usage.json` beside them, so a rerun that reads the finished run still has it.

    Returns:
        The cell's row: model, method, seed, score, train seconds, predict examples/s, peak RSS MB
        (None for a run that compare did not train), trainable parameters, the run's baselines.

    Raises:
        FinegrainError: the run failed (its one-line error is in the message).
    """
    usage_path = cell.run_dir.with_name(cell.run_dir.name + USAGE_SUFFIX)
    refuse_other_settings(config_path, cell.run_dir, cell.overrides)
    if rundir.read_metrics(cell.run_dir) is None:
        _train_cell(cell, config_path, usage_path, progress)
    kept = _read_json(usage_path)
    return _row(cell, kept.get("peak_rss_mb") if isinstance(kept, dict) else None)


def _train_cell(cell: Cell, config_path: str | None, usage_path: Path, progress: bool) -> None:
    """`finegrain train` of one cell in a child process that writes its peak RSS to `usage_path`."""
    if progress:
        print(f"compare: training {cell.model} {cell.method} seed {cell.seed} -> {cell.run_dir}", flush=True)
    # A cell stopped part-way by an earlier compare goes on from its checkpoint.
    command = [sys.executable, "-c", CHILD, str(usage_path), "train", *train_args(config_path, cell.run_dir, cell.overrides)]
    log = cell.run_dir.with_name(cell.run_dir.name + ".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w", encoding="utf-8") as stderr:
        child = subprocess.Popen(command, stdout=None if progress else subprocess.DEVNULL, stderr=stderr)
        try:
            watch(child)
        except KeyboardInterrupt:  # Ctrl-C: the cell's run stops at its checkpoint
            raise Interrupted(RUN_AGAIN) from None
    if child.returncode != 0:
        error = rundir.read_error(cell.run_dir) or _last_line(log)
        raise FinegrainError(f"compare: the {cell.model} {cell.method} seed {cell.seed} run failed ({log}): {error}")


# A cell's process: `finegrain train ARGS`, then its own peak RSS written to the path before them.
CHILD = ("import sys; from finegrain.cli import main; from finegrain.compare import write_peak_rss; "
         "code = main(sys.argv[2:]); code == 0 and write_peak_rss(sys.argv[1]); sys.exit(code)")


def write_peak_rss(usage_path: str) -> None:
    """Write this process's peak RSS (`finegrain.cpu.peak_rss_mb`) to a cell's `RUN_DIR.usage.json`."""
    atomic_write_json(Path(usage_path), {"peak_rss_mb": peak_rss_mb()})


def _last_line(path: Path) -> str:
    lines = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    return lines[-1].strip() if lines else "no message"


def _row(cell: Cell, peak_rss_mb: float | None) -> dict[str, Any]:
    results = rundir.read_metrics(cell.run_dir)
    if results is None:
        raise FinegrainError(f"{cell.run_dir / rundir.METRICS}: cannot be read; delete {cell.run_dir} to train the cell again")
    config = rundir.read_config(cell.run_dir)
    split = "test" if "test" in results else "validation"
    metric = config.train.metric or task_class(config.task).from_config(config, results.get("labels", [])).headline_metric
    return {
        "model": cell.model, "method": cell.method, "seed": cell.seed, "run": str(cell.run_dir),
        "split": split, "metric": metric, "score": _lookup(results.get(split, {}), metric),
        "train_seconds": results["train"]["train_seconds"], "total_seconds": results["train"].get("total_seconds"),
        "predict_per_s": predict_speed(cell.run_dir), "peak_rss_mb": peak_rss_mb,
        "trainable_parameters": results["train"].get("trainable_parameters"),
        "baselines": results.get("baselines"), "notes": cell.notes,
    }


def _lookup(metrics: dict[str, Any], name: str) -> float | None:
    """A metric by the name `train.metric` takes: a top-level number or an average (`macro_f1`)."""
    value = flat_metrics(metrics).get(name)
    return None if value is None else float(value)


def predict_speed(run_dir: Path) -> float:
    """Test examples per second through `finegrain.load(run_dir)`, on up to `PREDICT_EXAMPLES` of them."""
    from finegrain.run import Predictor

    predictor = Predictor(run_dir)
    splits = predictor.task.load_splits(predictor.config.data)
    examples = (splits.test or splits.validation)[:PREDICT_EXAMPLES]
    started = time.perf_counter()
    predictor.predict_examples(examples)
    return round(len(examples) / (time.perf_counter() - started), 1)


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per model × method: the mean (and sample std) over its seeds."""
    lines = []
    for key in dict.fromkeys((r["model"], r["method"]) for r in rows):
        group = [r for r in rows if (r["model"], r["method"]) == key]
        scores = [r["score"] for r in group if r["score"] is not None]
        rss = [r["peak_rss_mb"] for r in group if r["peak_rss_mb"] is not None]
        lines.append({
            "model": key[0], "method": key[1], "seeds": len(group), "metric": group[0]["metric"],
            "score": statistics.fmean(scores) if scores else None,
            "std": statistics.stdev(scores) if len(scores) > 1 else 0.0,
            "train_seconds": statistics.fmean(r["train_seconds"] for r in group),
            "total_seconds": statistics.fmean(r["total_seconds"] or r["train_seconds"] for r in group),
            "predict_per_s": statistics.fmean(r["predict_per_s"] for r in group),
            "peak_rss_mb": max(rss) if rss else None,
            "trainable_parameters": group[0]["trainable_parameters"], "notes": group[0]["notes"],
        })
    return lines


def baseline_lines(rows: list[dict[str, Any]], metric: str, prompted: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The majority-class and TF-IDF baselines (a tagger's: each word's most frequent tag and the logistic
    regression) as the runs measured them (the first run's: same splits),
    and the zero-shot prompted decoder (`prompted_baseline`) when there is one."""
    measured = next((r["baselines"] for r in rows if r.get("baselines")), None) or {}
    key = "macro_f1" if metric in ("macro_f1", "macro.f1") else "f1" if metric == "f1" else "accuracy"
    names = ({"majority": "each word's most frequent tag", "linear": "logistic regression on word features"}
             if "linear" in measured else {"majority": "majority class", "tfidf": "TF-IDF + linear model"})
    lines = [
        {"model": names[name], "score": measured[name].get(key), "train_seconds": measured[name].get("seconds"),
         "total_seconds": measured[name].get("seconds"), "predict_per_s": None}
        for name in names if isinstance(measured.get(name), dict)
    ]
    if prompted:
        lines.append({
            "model": f"zero-shot prompted {_slug(prompted['model'])} ({prompted['examples']} {prompted['split']} examples)",
            "score": prompted.get(key), "train_seconds": 0.0, "total_seconds": prompted["seconds"],
            "predict_per_s": round(prompted["examples"] / max(prompted["seconds"], 1e-9), 1),
        })
    return lines


def prompted_model(base: RunConfig, models: list[str]) -> str | None:
    """The decoder to prompt: the first of `models` that is not an encoder, else the config's model
    when it is a decoder; None when the task is not single-label classification or no decoder is named."""
    if base.task != "classification" or base.data.multi_label:
        return None
    for model in [*models, base.model.name or DEFAULT_MODEL]:
        if not is_encoder(model):
            return model
    return None


def prompted_baseline(config_path: str | None, models: list[str], output: Path, overrides: list[str] = (),
                      progress: bool = True) -> dict[str, Any] | None:
    """The zero-shot prompted decoder on the runs' test split (validation when there is none), read
    from `output/prompted.json` when an earlier compare computed it for the same model.

    Returns:
        model, split, examples, accuracy, macro_f1 and seconds (loading the model and labelling); None
        where the comparison has no prompted baseline (`prompted_model`).
    """
    from finegrain.evaluate.prompting import prompted_baseline as prompted_scores

    base = load_config(config_path, list(overrides))
    model = prompted_model(base, models)
    if model is None:
        return None
    path = output / PROMPTED_NAME
    if path.is_file():
        kept = _read_json(path)
        if isinstance(kept, dict) and kept.get("model") == model:
            return kept
    if progress:
        print(f"compare: prompting {model} zero-shot on the test split", flush=True)
    started = time.perf_counter()
    splits = task_class(base.task).load_splits(base.data)
    split, examples = ("test", splits.test) if splits.test else ("validation", splits.validation)
    llama, tokenizer = load_model(model, progress=False)
    scores = prompted_scores(llama, tokenizer, splits.train, examples, splits.labels, k=0, seed=0,
                             max_examples=PROMPTED_EXAMPLES)
    result = {"model": model, "split": split, "examples": scores["examples"], "accuracy": scores["accuracy"],
              "macro_f1": scores["macro_f1"], "seconds": round(time.perf_counter() - started, 2)}
    output.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, result)
    return result


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # unreadable: computed again


def write_outputs(output: Path, rows: list[dict[str, Any]], title: str, prompted: dict[str, Any] | None = None) -> dict[str, Path]:
    """compare.json, compare.png and report.md / report.html (the table with the plot) in `output`."""
    lines = summarize(rows)
    metric = lines[0]["metric"]
    baselines = baseline_lines(rows, metric, prompted)
    atomic_write_json(output / JSON_NAME, {"rows": rows, "summary": lines, "baselines": baselines})
    plot_score_time(output / PLOT_NAME, lines, baselines, metric)
    table = Table(
        "Models and methods",
        ["model", "method", "seeds", f"{metric} (mean ± std)", "train s", "run s", "predict ex/s", "peak RSS MB",
         "trainable params"],
        [[l["model"], l["method"], l["seeds"], _score(l), _figure(l["train_seconds"], ".1f"), _figure(l["total_seconds"], ".1f"),
          _figure(l["predict_per_s"], ".1f"), _figure(l["peak_rss_mb"], ".0f"), _figure(l["trainable_parameters"], ",")]
         for l in lines]
        + [[b["model"], "baseline", 1, _score(b), _figure(b["train_seconds"], ".3f"), _figure(b["total_seconds"], ".3f"),
            _figure(b["predict_per_s"], ".1f"), None, None] for b in baselines],
    )
    notes = sorted({f"{l['model']}: {n}" for l in lines for n in l["notes"]})
    tables = [table] + ([Table("Settings changed per model", ["change"], [[n] for n in notes])] if notes else [])
    best = max((l for l in lines if l["score"] is not None), key=lambda l: l["score"], default=None)
    summary = f"{len(rows)} runs on the same splits ({rows[0]['split']} {metric})"
    if best:
        summary += f"; best: {best['model']} {best['method']} {best['score']:.4f}"
    written = write_report(output, title, summary, tables, [(PLOT_NAME, f"{metric} against whole-run time")])
    return {**written, "json": output / JSON_NAME, "plot": output / PLOT_NAME}


def _figure(value: float | int | None, spec: str) -> str | None:
    """A table cell: `value` in `spec`'s format (None stays empty, shown as n/a)."""
    return None if value is None else format(value, spec)


def _score(line: dict[str, Any]) -> str:
    if line.get("score") is None:
        return "n/a"
    return f"{line['score']:.4f}" + (f" ± {line['std']:.4f}" if line.get("seeds", 1) > 1 else "")


def plot_score_time(out_png: Path, lines: list[dict[str, Any]], baselines: list[dict[str, Any]], metric: str) -> Path:
    """Score against whole-run seconds (log scale: loading, the frozen-prefix cache, training and
    testing, what a user waits for): a point per model × method (its std as an error bar), the
    baselines as grey crosses at their fitting time."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for line in lines:
        if line["score"] is None:
            continue
        ax.errorbar([max(line["total_seconds"], 1e-3)], [line["score"]], yerr=[line["std"]], fmt="o", capsize=4,
                    label=f"{line['model']} {line['method']}")
    for base in baselines:
        if base["score"] is not None:
            seconds = max(base["total_seconds"] or 1e-3, 1e-3)
            ax.plot([seconds], [base["score"]], "x", color="grey", markersize=9)
            ax.annotate(base["model"], (seconds, base["score"]), fontsize=8, xytext=(5, 3), textcoords="offset points",
                        color="dimgrey")
    ax.set_xscale("log")
    ax.set_xlabel("whole-run seconds (log scale)")
    ax.set_ylabel(metric)
    ax.grid(True, alpha=0.3)
    if lines:
        ax.legend(fontsize=8, loc="lower right")
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png")
    return out_png


def compare(config_path: str | None, models: list[str], methods: list[str], seeds: int, output: str | Path,
            overrides: list[str] = (), progress: bool = True, prompted: bool = True) -> dict[str, Path]:
    """Train every cell (or read it when finished) and write the comparison; returns the files written.
    `prompted`: add the zero-shot prompted decoder baseline (`prompted_baseline`) where the task allows."""
    output = output_directory(output)
    rundir.refuse_single_run(output, "the comparison")
    cells = plan(config_path, models, methods, seeds, output, overrides)
    rows = [run_cell(cell, config_path, progress) for cell in cells]
    if not any(r["score"] is not None and not math.isnan(r["score"]) for r in rows):
        raise FinegrainError("compare: no run has a score on its test or validation split; give the config a test split")
    scores = prompted_baseline(config_path, models, output, overrides, progress) if prompted else None
    title = f"finegrain compare: {Path(config_path).name if config_path else 'default config'}"
    return write_outputs(output, rows, title, scores)
