"""A multi-task run against each of its tasks trained alone at the same settings.

    python benchmarks/multitask.py examples/multitask.yaml --output runs/multitask-bench [--seeds 0,1,2] [--alone spam] [--set KEY=VALUE ...]

Trains the multi-task config once (`OUTPUT/seed-S/multitask`), then every task of it as an
ordinary single-task run (`OUTPUT/seed-S/single-NAME`): the config `finegrain.multitask.task_specs`
derives for the task (the run's shared keys, the task's own data, head and metric), which is what
the task trains like inside the multi-task run. `--seeds`: the whole comparison once per
`train.seed` (default: the config's), the table then giving each side's mean and standard
deviation over the seeds and the mean of the differences; `--alone`: train only these tasks
alone (the others' rows are left out). Prints a table of each task's test score both ways and the
whole-run seconds, and writes it to OUTPUT/comparison.md. Finished runs are read back, so an
interrupted comparison continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from finegrain import rundir
from finegrain.atomic import atomic_write_text
from finegrain.config import load_config
from finegrain.multitask import task_specs, train as train_tasks
from finegrain.run import train
from finegrain.train.trainer import flat_metrics


def finished(run_dir: Path) -> dict | None:
    path = run_dir / rundir.METRICS
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def compare(config_path: str, overrides: list[str], seed_dir: Path, alone_names: list[str] | None) -> tuple[dict, dict]:
    """One seed's multi-task run and single-task runs: (metrics.json of the multi-task run, of each single run)."""
    config = load_config(config_path, overrides)
    specs = [spec for spec in task_specs(config) if alone_names is None or spec.name in alone_names]
    config.output = str(seed_dir / "multitask")
    together = finished(Path(config.output)) or train_tasks(config)
    alone = {}
    for spec in specs:
        spec.config.output = str(seed_dir / f"single-{spec.name}")
        alone[spec.name] = finished(Path(spec.config.output)) or train(spec.config)
    return together, alone


def spread(values: list[float]) -> str:
    return f"{values[0]:.4f}" if len(values) == 1 else f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config")
    parser.add_argument("--output", required=True)
    parser.add_argument("--seeds", default=None, help="comma-separated train.seed values (default: the config's)")
    parser.add_argument("--alone", default=None, help="comma-separated tasks to train alone (default: every task)")
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args()
    output = Path(args.output)
    config = load_config(args.config, args.set)
    names = [spec.name for spec in task_specs(config)]
    alone_names = args.alone.split(",") if args.alone else None
    unknown = [name for name in alone_names or [] if name not in names]
    if unknown:
        parser.error(f"--alone: {', '.join(unknown)} not a task of {args.config} ({', '.join(names)})")
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else [config.train.seed]
    runs = [compare(args.config, [*args.set, f"train.seed={seed}"], output / f"seed-{seed}", alone_names) for seed in seeds]
    rows = [f"seeds: {', '.join(map(str, seeds))}", "",
            "| task | metric | alone | together | difference |", "|---|---|---|---|---|"]
    for name in alone_names or names:
        metric = runs[0][0]["tasks"][name]["metric"]
        a = [flat_metrics(alone[name]["test"])[metric] for _, alone in runs]
        b = [flat_metrics(together["tasks"][name]["test"])[metric] for together, _ in runs]
        each = "" if len(seeds) == 1 else f" ({', '.join(f'{100 * (y - x):+.1f}' for x, y in zip(a, b))})"
        rows.append(f"| {name} | {metric} | {spread(a)} | {spread(b)} | "
                    f"{100 * (statistics.mean(b) - statistics.mean(a)):+.1f} points{each} |")
    for seed, (together, alone) in zip(seeds, runs):
        rows.append(f"\nseed {seed}: {sum(run['train']['total_seconds'] for run in alone.values()):.0f} s for the "
                    f"{len(alone)} single-task runs together ({sum(run['train']['train_seconds'] for run in alone.values()):.0f} s "
                    f"training), {together['train']['total_seconds']:.0f} s for the multi-task run "
                    f"({together['train']['train_seconds']:.0f} s training)")
    table = "\n".join(rows) + "\n"
    atomic_write_text(output / "comparison.md", table)
    print(table, end="")


if __name__ == "__main__":
    main()
