"""Seed ensembles: how far a k-seed ensemble lands from its best member, over every k of N seeds.

    python benchmarks/ensemble_seeds.py examples/rotten_tomatoes.yaml --seeds 6 --output runs/ens_seeds \
        [--size 3] [--run SEED=DIR] [--set KEY=VALUE]

Trains `finegrain train CONFIG --set train.seed=S` into OUTPUT/sS for S = 0 .. N-1; a finished run
there, or one named by `--run S=DIR` (say, the README's run as seed 0), is kept. Each run predicts
its config's test split once, and every k-subset of the N runs is scored as `finegrain ensemble`
scores it: the mean of the members' probabilities (`finegrain.ensemble.average`). One subset asks
whether an ensemble beats its best member; all of them say how often and by how much, free of
which seeds happened to be drawn. Each run's predict time on the test split is measured too (after
a warm-up, the runs one after another); an ensemble's members predict in turn, so it costs the sum.
Written as OUTPUT/table.md and OUTPUT/table.json.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from distill_table import train  # noqa: E402

import finegrain  # noqa: E402
import torch  # noqa: E402
from finegrain import rundir  # noqa: E402
from finegrain.atomic import atomic_write_json, atomic_write_text  # noqa: E402
from finegrain.ensemble import average  # noqa: E402
from finegrain.tasks import task_class  # noqa: E402


def subsets(accuracies: dict[int, float], probabilities: dict[int, list[dict]], labels: list[str], gold: list[str],
            size: int) -> list[dict]:
    """Per subset of `size` seeds: the members' accuracies, the ensemble's, and its gains."""
    rows = []
    for seeds in itertools.combinations(sorted(accuracies), size):
        members = [accuracies[s] for s in seeds]
        votes = average([probabilities[s] for s in seeds], labels).argmax(-1).tolist()
        accuracy = sum(labels[v] == g for v, g in zip(votes, gold)) / len(gold)
        rows.append({"seeds": list(seeds), "members": members, "ensemble": accuracy,
                     "over_best": accuracy - max(members), "over_mean": accuracy - statistics.mean(members)})
    return rows


def table(rows: list[dict], accuracies: dict[int, float], size: int) -> str:
    """The markdown: each seed's accuracy, each subset, and the summary over subsets."""
    lines = ["| seed | test accuracy |", "|---|---:|"]
    lines += [f"| {seed} | {accuracy:.4f} |" for seed, accuracy in accuracies.items()]
    lines += ["", f"| seeds | members | ensemble of {size} | over the best | over the mean |", "|---|---|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {', '.join(map(str, row['seeds']))} | {' / '.join(f'{m:.4f}' for m in row['members'])} "
                     f"| {row['ensemble']:.4f} | {100 * row['over_best']:+.2f} | {100 * row['over_mean']:+.2f} |")
    over_best = [100 * row["over_best"] for row in rows]
    over_mean = [100 * row["over_mean"] for row in rows]
    lines += ["", f"Over {len(rows)} ensembles of {size}: against the best member {statistics.mean(over_best):+.2f} "
              f"points on the mean ({min(over_best):+.2f} to {max(over_best):+.2f}; {sum(g >= 1 for g in over_best)} "
              f"at +1 or more, {sum(g > 0 for g in over_best)} above 0); against the members' mean "
              f"{statistics.mean(over_mean):+.2f} ({min(over_mean):+.2f} to {max(over_mean):+.2f})."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="the members' config (a single-label classification task)")
    parser.add_argument("--output", required=True, type=Path)
    parser.add_argument("--seeds", type=int, default=6, help="how many seeds, 0 .. N-1 (default: 6)")
    parser.add_argument("--size", type=int, default=3, help="members of each ensemble (default: 3)")
    parser.add_argument("--run", action="append", default=[], metavar="SEED=DIR",
                        help="a finished run of CONFIG at that train.seed, used instead of training OUTPUT/sSEED")
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    if not 2 <= args.size <= args.seeds:
        parser.error(f"--size {args.size}: an ensemble needs 2 to --seeds ({args.seeds}) members")
    given = {}
    for item in args.run:
        seed, _, path = item.partition("=")
        if not seed.isdigit() or not rundir.is_finished(Path(path)):
            parser.error(f"--run {item}: give SEED=DIR, DIR a finished run of CONFIG at that seed")
        given[int(seed)] = Path(path)
    args.output.mkdir(parents=True, exist_ok=True)
    runs = {seed: given.get(seed) or train(args.config, args.output / f"s{seed}", [*args.settings, f"train.seed={seed}"])
            for seed in range(args.seeds)}
    config = rundir.read_config(runs[0])
    test = task_class(config.task).load_splits(config.data).test
    texts, gold = [e.text for e in test], [str(e.label) for e in test]
    labels = [str(label) for label in rundir.read_labels(runs[0])]
    probabilities, seconds = {}, {}
    for seed, path in runs.items():
        predictor = finegrain.load(path)
        predictor.predict(texts[:32])  # warm-up: first-call costs out of the timing
        start = time.perf_counter()
        probabilities[seed] = predictor.predict(texts)
        seconds[seed] = time.perf_counter() - start
    accuracies = {seed: sum(p["label"] == g for p, g in zip(predictions, gold)) / len(gold)
                  for seed, predictions in probabilities.items()}
    rows = subsets(accuracies, probabilities, labels, gold, args.size)
    one = statistics.median(len(texts) / t for t in seconds.values())
    ensemble = statistics.median(len(texts) / sum(seconds[s] for s in row["seeds"]) for row in rows)
    text = table(rows, accuracies, args.size) + (
        f"\n\nPredict ({torch.get_num_threads()} threads, {len(texts):,} test texts): one run {one:.1f} examples/s, "
        f"an ensemble of {args.size} {ensemble:.1f} (its members predict in turn; medians over seeds and ensembles)."
    )
    atomic_write_text(args.output / "table.md", text + "\n")
    atomic_write_json(args.output / "table.json", {"runs": {s: str(p) for s, p in runs.items()}, "accuracies": accuracies,
                                                   "predict_seconds": seconds, "ensembles": rows})
    print(text)


if __name__ == "__main__":
    main()
