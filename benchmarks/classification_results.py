"""The classification results table of docs/RESULTS.md: the recipe from the data against the
demo recipe and the TF-IDF baseline, on every bundled classification dataset (and any
held-out files you give).

For each dataset it runs, one after the other on the same split:
  - `finegrain train --dataset D` with no config (the recipe from the data);
  - `finegrain train examples/rotten_tomatoes.yaml --set data.dataset=D` (the demo recipe);
and reads the TF-IDF and majority baselines that every classification run computes on the
same splits. Each run's peak RSS comes from /usr/bin/time when present.

    python benchmarks/classification_results.py                       # every bundled set
    python benchmarks/classification_results.py --datasets trec_fine --max-train 2000
    python benchmarks/classification_results.py --files train.jsonl test.jsonl --name mine --only recipe
    python benchmarks/classification_results.py --table /tmp/finegrain-classification-results/results.json
    python benchmarks/classification_results.py --only recipe --set train.time_budget=null   # on a busy host

Prints a Markdown table and writes it with every run's metrics.json under --output.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATASETS = {  # name in the table -> the --set options that select it
    "rotten_tomatoes": ["data.dataset=rotten_tomatoes"],
    "sms_spam": ["data.dataset=sms_spam"],
    "trec": ["data.dataset=trec", "data.dataset_options={fine: false}"],
    "trec_fine": ["data.dataset=trec", "data.dataset_options={fine: true}"],
    "chinese_reviews": ["data.dataset=chinese_reviews"],
    "vader_binary": ["data.dataset=vader_binary"],
}
RECIPES = {"recipe": [], "demo": [str(ROOT / "examples" / "rotten_tomatoes.yaml")]}


def finegrain() -> list[str]:
    return [sys.executable, "-m", "finegrain.cli"]


def run(name: str, recipe: str, selection: list[str], args: argparse.Namespace) -> dict:
    """One training run; its metrics.json with the whole command's seconds and peak RSS added."""
    out = Path(args.output) / f"{name}-{recipe}"
    if out.exists():
        shutil.rmtree(out)
    sets = [*selection, f"data.split=[{args.split}]", "data.split_seed=0"]
    if args.max_train:
        sets.append(f"data.max_train_examples={args.max_train}")
    if args.max_eval:
        sets.append(f"data.max_eval_examples={args.max_eval}")
    sets += args.set
    command = [*finegrain(), "train", *RECIPES[recipe], "--output", str(out)]
    for option in sets:
        command += ["--set", option]
    rss_file = out.with_suffix(".rss")
    timer = ["/usr/bin/time", "-f", "%M", "-o", str(rss_file)] if Path("/usr/bin/time").exists() else []
    started = time.perf_counter()
    log = out.with_suffix(".log")
    with open(log, "w") as f:
        done = subprocess.run(timer + command, stdout=f, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        print(f"{name} {recipe}: failed, see {log}", file=sys.stderr)
        return {}
    metrics = json.loads((out / "metrics.json").read_text())
    metrics["command_seconds"] = seconds
    if rss_file.exists():
        metrics["peak_rss_mb"] = int(rss_file.read_text().split()[-1]) / 1024
    return metrics


def row(name: str, recipe: str, m: dict) -> str:
    if not m:
        return f"| {name} | {recipe} | failed | | | | | | |"
    test, base = m.get("test") or m["validation"], m.get("baselines", {})
    tfidf, majority = base.get("tfidf", {}), base.get("majority", {})
    wins = test["accuracy"] >= tfidf.get("accuracy", 0) and test["macro"]["f1"] >= tfidf.get("macro_f1", 0)
    rss = f"{m['peak_rss_mb']:,.0f} MB" if "peak_rss_mb" in m else "?"
    mix, alone = m.get("tfidf_mix") or {}, base.get("model_alone")
    if alone:  # the fine-tuned model without the TF-IDF probabilities mixed in, and their weight
        model_alone = f"{alone['accuracy']:.3f} / {alone['macro_f1']:.3f} (weight {mix['weight']}, C {mix['strength']:g})"
    else:
        model_alone = "same (weight 0)" if mix else "same (no mix)"
    return (f"| {name} | {recipe} | **{test['accuracy']:.3f}** / **{test['macro']['f1']:.3f}** | {model_alone} | "
            f"{tfidf.get('accuracy', float('nan')):.3f} / {tfidf.get('macro_f1', float('nan')):.3f} | "
            f"{majority.get('accuracy', float('nan')):.3f} | {'yes' if wins else 'no'} | "
            f"{m['command_seconds']:.0f} s | {rss} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default=",".join(DATASETS), help="comma-separated names from: " + ", ".join(DATASETS))
    parser.add_argument("--only", choices=list(RECIPES), help="run one recipe only")
    parser.add_argument("--files", nargs=2, metavar=("TRAIN", "TEST"), help="a held-out train/test pair instead")
    parser.add_argument("--name", default="held-out", help="the table's name for --files")
    parser.add_argument("--split", default="0.65,0.1,0.25", help="train/validation/test fractions (default: the main job's)")
    parser.add_argument("--max-train", type=int, default=2000, help="cap the training split (0: no cap)")
    parser.add_argument("--max-eval", type=int, default=1000, help="cap validation and test each (0: no cap)")
    parser.add_argument("--output", default="/tmp/finegrain-classification-results")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="passed on to every run (e.g. train.time_budget=null: the idle machine's plan on a busy one, "
                             "where that plan was not shrunk to the budget)")
    parser.add_argument("--table", metavar="RESULTS_JSON", help="print the table of an earlier run's results.json, run nothing")
    args = parser.parse_args()
    if args.table:
        results = json.loads(Path(args.table).read_text())
        for key, metrics in results.items():
            name, recipe = key.rsplit("-", 1)
            print(row(name, recipe, metrics))
        return
    Path(args.output).mkdir(parents=True, exist_ok=True)
    if args.files:
        train, test = (str(Path(p).resolve()) for p in args.files)
        selection = {args.name: ["data.dataset=null", f"data.train={train}", f"data.test={test}"]}
        args.split = "0.9,0.1,0.0"
    else:
        selection = {name: DATASETS[name] for name in args.datasets.split(",")}
    recipes = [args.only] if args.only else list(RECIPES)
    lines = ["| dataset | recipe | finegrain accuracy / macro-F1 | model alone (TF-IDF mixed in at) | "
             "TF-IDF accuracy / macro-F1 | majority accuracy | beats TF-IDF | whole run | peak RSS |",
             "|---|---|---|---|---|---|---|---|---|"]
    results = {}
    for name, options in selection.items():
        for recipe in recipes:
            results[f"{name}-{recipe}"] = metrics = run(name, recipe, options, args)
            lines.append(row(name, recipe, metrics))
            print(lines[-1], flush=True)
    table = "\n".join(lines)
    print("\n" + table)
    (Path(args.output) / "table.md").write_text(table + "\n")
    (Path(args.output) / "results.json").write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
