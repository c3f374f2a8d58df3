"""Test score and predict speed against kept parameters: a finished run pruned at a few levels.

    python benchmarks/prune_curve.py runs/rotten_tomatoes --output runs/prune_curve \
        [--levels "16:0:0.25,12:0.34:0.25,10:0.34:0.5"] [--recover-epochs 1] [--distill] [--threads 2] [--rounds 3]

Each level is LAYERS:HEADS:FFN as `finegrain prune` takes them (`--layers LAYERS --heads HEADS
--ffn FFN`), pruned into OUTPUT/LEVEL (a level already there is measured again, not pruned
again). For the unpruned run and each level the table gives the decoder's parameters (and its
layers' alone), the test score from metrics.json, and predict examples/s: `finegrain.load(run)
.predict` over the test texts with `--threads` threads, the runs timed round after round
(unpruned, level 1, level 2, ...) so that each meets the same load, the median of `--rounds`
taken; every run's adapter is merged first, so every model runs plain linear layers (`measure`,
which benchmarks/distill_table.py shares). Writes OUTPUT/curve.md and OUTPUT/curve.json and prints the table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import finegrain
from finegrain import rundir
from finegrain.peft import unload_adapters
from finegrain.prune import parameters, prune_run
from finegrain.tasks import task_class


def level_name(level: str) -> str:
    layers, heads, ffn = level.split(":")
    return f"layers{layers}-heads{heads}-ffn{ffn}"


def predict_seconds(predictor, texts: list[str]) -> float:
    started = time.perf_counter()
    predictor.predict(texts)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a finished classification run (the unpruned model)")
    parser.add_argument("--output", required=True, help="a directory for the pruned runs and the table")
    parser.add_argument("--levels", default="16:0:0.25,12:0.34:0.25,10:0.34:0.5", help="LAYERS:HEADS:FFN,...")
    parser.add_argument("--recover-epochs", type=float, default=1.0)
    parser.add_argument("--distill", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    runs = {"unpruned": Path(args.run)}
    for level in args.levels.split(","):
        target = output / level_name(level)
        if not rundir.is_finished(target):
            layers, heads, ffn = level.split(":")
            prune_run(args.run, target, layers, float(heads), float(ffn), args.recover_epochs, args.distill)
        runs[level] = target

    table = measure(runs, args.threads, args.rounds, output / "curve")
    print(table)


def measure(runs: dict[str, Path], threads: int, rounds: int, stem: Path) -> str:
    """The table of `runs` (the first is the reference): parameters, test score and predict
    examples/s, timed round after round; written as STEM.md and STEM.json and returned."""
    first = next(iter(runs.values()))
    torch.set_num_threads(threads)
    config = rundir.read_config(first)
    splits = task_class(config.task).load_splits(config.data)
    texts = [e.text for e in splits.test]
    predictors = {name: finegrain.load(path) for name, path in runs.items()}
    for predictor in predictors.values():
        unload_adapters(predictor.model, merge=True)  # plain weights everywhere: the same kernels timed
        predictor.predict(texts[:32])  # warm-up: first-call costs out of the timing
    seconds = {name: [] for name in runs}
    for _ in range(rounds):
        for name, predictor in predictors.items():
            seconds[name].append(predict_seconds(predictor, texts))
    metric = config.train.metric or next(iter(predictors.values())).task.headline_metric
    rows = []
    for name, path in runs.items():
        test = json.loads((path / rundir.METRICS).read_text())["test"]
        flat = {**test, **{f"macro_{k}": v for k, v in (test.get("macro") or {}).items()}}
        sizes = parameters(predictors[name].model)
        rows.append({"run": name, "path": str(path), "decoder_parameters": sizes["decoder"], "layer_parameters": sizes["layers"],
                     metric: flat.get(metric), "predict_examples_per_s": len(texts) / statistics.median(seconds[name])})
    base = rows[0]
    lines = [f"| run | decoder parameters | layers' parameters | test {metric} | predict examples/s ({threads} threads) |",
             "|---|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['run']} | {row['decoder_parameters']:,} ({row['decoder_parameters'] / base['decoder_parameters']:.0%}) "
                     f"| {row['layer_parameters']:,} ({row['layer_parameters'] / base['layer_parameters']:.0%}) "
                     f"| {row[metric]:.4f} ({row[metric] / base[metric]:.1%}) | {row['predict_examples_per_s']:.1f} "
                     f"(x{row['predict_examples_per_s'] / base['predict_examples_per_s']:.2f}) |")
    table = "\n".join(lines)
    stem.with_suffix(".md").write_text(table + "\n", encoding="utf-8")
    stem.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    return table

if __name__ == "__main__":
    main()
