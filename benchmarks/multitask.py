"""A multi-task run against each of its tasks trained alone at the same settings.

    python benchmarks/multitask.py examples/multitask.yaml --output runs/multitask-bench [--set KEY=VALUE ...]

Trains the multi-task config once (`OUTPUT/multitask`), then every task of it as an ordinary
single-task run (`OUTPUT/single-NAME`): the config `finegrain.multitask.task_specs` derives for
the task (the run's shared keys, the task's own data, head and metric), which is what the task
trains like inside the multi-task run. Prints a table of each task's test score both ways and the
whole-run seconds, and writes it to OUTPUT/comparison.md. Finished runs are read back, so an
interrupted comparison continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config")
    parser.add_argument("--output", required=True)
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args()
    output = Path(args.output)
    config = load_config(args.config, args.set)
    specs = task_specs(config)
    config.output = str(output / "multitask")
    together = finished(Path(config.output)) or train_tasks(config)
    alone = {}
    for spec in specs:
        spec.config.output = str(output / f"single-{spec.name}")
        alone[spec.name] = finished(Path(spec.config.output)) or train(spec.config)
    rows = ["| task | metric | alone | together | difference |", "|---|---|---|---|---|"]
    for spec in specs:
        metric = together["tasks"][spec.name]["metric"]
        a = flat_metrics(alone[spec.name]["test"])[metric]
        b = flat_metrics(together["tasks"][spec.name]["test"])[metric]
        rows.append(f"| {spec.name} | {metric} | {a:.4f} | {b:.4f} | {100 * (b - a):+.1f} points |")
    seconds_alone = sum(run["train"]["total_seconds"] for run in alone.values())
    train_alone = sum(run["train"]["train_seconds"] for run in alone.values())
    rows.append(f"\nwhole runs: {seconds_alone:.0f} s for the {len(specs)} single-task runs together "
                f"({train_alone:.0f} s training), {together['train']['total_seconds']:.0f} s for the multi-task run "
                f"({together['train']['train_seconds']:.0f} s training)")
    table = "\n".join(rows) + "\n"
    atomic_write_text(output / "comparison.md", table)
    print(table, end="")


if __name__ == "__main__":
    main()
