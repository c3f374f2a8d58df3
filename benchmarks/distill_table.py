"""Distillation: a teacher run against students with fewer kept layers, each with and without it.

    python benchmarks/distill_table.py examples/rotten_tomatoes.yaml --output runs/distill_rt \
        [--teacher runs/rotten_tomatoes] [--students 12,8] [--set KEY=VALUE] [--distilled-set KEY=VALUE] \
        [--threads 2] [--rounds 3]

Trains the teacher from CONFIG into OUTPUT/teacher unless `--teacher` names a finished run of it;
then, for each student size N, `finegrain train CONFIG --set model.num_layers=N` alone (OUTPUT/lN)
and with `--set distill.teacher=TEACHER` (OUTPUT/lN-distilled). A finished run already there is
kept. `--set` goes to every run, `--distilled-set` to the distilled students' alone (say,
distill.unlabelled=FILE for the teacher to label more text). The table (benchmarks/prune_curve.py's
`measure`, adapters merged, runs timed round after round): decoder parameters, test score and its
share of the teacher's, predict examples/s and its ratio to the teacher's; written as
OUTPUT/table.md and table.json.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prune_curve import measure  # noqa: E402

from finegrain import rundir  # noqa: E402


def train(config: str, output: Path, settings: list[str]) -> Path:
    """`finegrain train CONFIG --set ... --output OUTPUT`, unless OUTPUT is a finished run."""
    if not rundir.is_finished(output):
        command = [sys.executable, "-m", "finegrain", "train", config, "--output", str(output)]
        for setting in settings:
            command += ["--set", setting]
        print("+", " ".join(command), flush=True)
        subprocess.run(command, check=True)
    return output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="the teacher's config; the students keep all of it but model.num_layers")
    parser.add_argument("--output", required=True, type=Path)
    parser.add_argument("--teacher", help="a finished run of CONFIG to distil from (default: train one)")
    parser.add_argument("--students", default="12,8", help="kept layers of each student, comma-separated")
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--distilled-set", dest="distilled", action="append", default=[], metavar="KEY=VALUE",
                        help="a setting of the distilled students' runs only")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    args.output.mkdir(parents=True, exist_ok=True)
    teacher = Path(args.teacher) if args.teacher else train(args.config, args.output / "teacher", args.settings)
    runs = {f"teacher ({rundir.read_config(teacher).model.num_layers} layers)": teacher}
    for layers in (int(n) for n in args.students.split(",")):
        student = [*args.settings, f"model.num_layers={layers}"]
        runs[f"{layers} layers"] = train(args.config, args.output / f"l{layers}", student)
        runs[f"{layers} layers, distilled"] = train(args.config, args.output / f"l{layers}-distilled",
                                                    [*student, f"distill.teacher={teacher}", *args.distilled])
    print(measure(runs, args.threads, args.rounds, args.output / "table"))


if __name__ == "__main__":
    main()
