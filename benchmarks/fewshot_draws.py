"""Few-shot variance: the recipe on several draws of a few labelled rows, beside its baselines.

    python benchmarks/fewshot_draws.py OUTPUT NAME=TRAIN.jsonl,TEST.jsonl [NAME=...] [--rows 100] [--draws 3] \\
        [--models smollm2-135m,minilm-l6] [--set KEY=VALUE]

Which 100 rows a user happens to have labelled moves a score by more than most changes to a recipe
do, so one draw says little. For each NAME and draw D = 0 .. N-1, the TRAIN file is cut to `--rows`
rows, stratified by label with seed D (benchmarks/small_files.py: draw 0 is the cut docs/RESULTS.md's
"With 100 labels in all" sections ran), and for each of `--models` the recipe runs on it with no
config, 10 of the rows for validation and TEST as the test split (benchmarks/classification_results.py's
`run`). Then, per draw:

- the first model's run replayed under the TF-IDF mix's earlier rule, its weight and C chosen by
  validation log-loss alone (benchmarks/mix_choice.py), beside the rule the run used;
- with two or more models, `finegrain ensemble` of their runs (the mean of their probabilities,
  each with its own TF-IDF mix).

The table gives each column's test macro-F1 per set as the mean ± standard deviation over the draws,
the mean over sets, and per column its mean difference from the first model's run with the number
of draws it scored above and below it. A finished run, replay or ensemble is kept, so a stopped
benchmark goes on where it stopped. Written as OUTPUT/table.md and OUTPUT/table.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from classification_results import run  # noqa: E402
from mix_choice import tables  # noqa: E402
from small_files import cut  # noqa: E402

from finegrain import rundir  # noqa: E402
from finegrain.atomic import atomic_write_json, atomic_write_text  # noqa: E402
from finegrain.ensemble import create_ensemble  # noqa: E402
from finegrain.tasks.lexical import by_log_loss  # noqa: E402


def recipe_run(folder: Path, model: str, test: Path, settings: list[str]) -> Path:
    """The recipe's run of `model` on folder/train.jsonl (kept where it finished before)."""
    name = Path(model).name
    out = folder / f"{name}-recipe"
    if not (out / rundir.METRICS).exists():
        selection = ["data.dataset=null", f"data.train={(folder / 'train.jsonl').resolve()}", f"data.test={test.resolve()}"]
        options = argparse.Namespace(output=folder, split="0.9,0.1,0.0", max_train=0, max_eval=0,
                                     set=[*settings, f"model.name={model}"])
        if not run(name, "recipe", selection, options):
            raise SystemExit(f"{out}: the run failed; see {out.with_suffix('.log')}")
    return out


def earlier_rule(run_dir: Path) -> float:
    """Test macro-F1 of the run's TF-IDF mix with its weight and C chosen by validation log-loss alone."""
    cache = run_dir.parent / "replay.json"
    if not cache.exists():
        recorded, _, validation, test = tables(run_dir)
        if recorded["metric"] != "macro_f1":  # the replayed rows score the run's train.metric
            raise SystemExit(f"{run_dir}: train.metric is {recorded['metric']}; the table compares macro-F1, so leave "
                             "train.metric to the recipe")
        pick = max(validation, key=by_log_loss)
        score = next(abs(r["score"]) for r in test if (r.get("strength"), r["weight"]) == (pick.get("strength"), pick["weight"]))
        atomic_write_json(cache, {"run": str(run_dir), "weight": pick["weight"], "strength": pick.get("strength"),
                                  "test_macro_f1": score})
    return json.loads(cache.read_text())["test_macro_f1"]


def ensemble(folder: Path, runs: list[Path]) -> float:
    """Test macro-F1 of `finegrain ensemble` of the draw's runs."""
    out = folder / "ensemble"
    if not (out / rundir.ENSEMBLE).exists():  # written last
        create_ensemble(runs, out)
    return json.loads((out / rundir.METRICS).read_text())["test"]["macro"]["f1"]


def draw_scores(folder: Path, test: Path, models: list[str], settings: list[str]) -> dict[str, float]:
    """Every column's test macro-F1 for one draw."""
    runs = [recipe_run(folder, model, test, settings) for model in models]
    first = json.loads((runs[0] / rundir.METRICS).read_text())
    base = first["baselines"]
    scores = {"finegrain": first["test"]["macro"]["f1"],
              "model alone": base.get("model_alone", {}).get("macro_f1", first["test"]["macro"]["f1"])}
    if first.get("tfidf_mix"):
        scores["earlier mix rule"] = earlier_rule(runs[0])
    for model, other in zip(models[1:], runs[1:]):
        scores[Path(model).name] = json.loads((other / rundir.METRICS).read_text())["test"]["macro"]["f1"]
    if len(runs) > 1:
        scores["ensemble"] = ensemble(folder, runs)
    scores["TF-IDF"] = base["tfidf"]["macro_f1"]
    return scores


def table(results: dict[str, list[dict[str, float]]], models: list[str]) -> str:
    """Mean ± standard deviation per set and column; the mean over sets; each column against finegrain."""
    columns = list(next(iter(results.values()))[0])
    head = [f"finegrain ({Path(models[0]).name})" if c == "finegrain" else c for c in columns]
    lines = ["| set | " + " | ".join(head) + " |", "|---|" + "---:|" * len(columns)]
    means = {c: [] for c in columns}
    for name, draws in results.items():
        cells = []
        for c in columns:
            values = [d[c] for d in draws]
            means[c].append(statistics.mean(values))
            spread = f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else ""
            cells.append(f"{statistics.mean(values):.3f}{spread}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("| mean of the sets | " + " | ".join(f"**{statistics.mean(means[c]):.3f}**" for c in columns) + " |")
    pairs = [d for draws in results.values() for d in draws]
    cells = []
    for c in columns:
        gaps = [d[c] - d["finegrain"] for d in pairs]
        above, below = sum(g > 0 for g in gaps), sum(g < 0 for g in gaps)
        cells.append("" if c == "finegrain" else f"{100 * statistics.mean(gaps):+.1f} ({above} up, {below} down)")
    lines.append(f"| against finegrain, {len(pairs)} draws | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", type=Path)
    parser.add_argument("files", nargs="+", metavar="NAME=TRAIN.jsonl,TEST.jsonl")
    parser.add_argument("--rows", type=int, default=100, help="labelled rows per draw (default 100)")
    parser.add_argument("--draws", type=int, default=3, help="draws 0..N-1 of the rows (default 3)")
    parser.add_argument("--models", default="smollm2-135m,minilm-l6",
                        help="models the recipe runs, the first the one compared against (default smollm2-135m,minilm-l6)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="passed on to every run")
    args = parser.parse_args()
    models = [m for m in args.models.split(",") if m]
    if len({Path(m).name for m in models}) < len(models):
        parser.error(f"--models {args.models}: each model's runs are named after it; give models of different names")
    sets = {}
    for spec in args.files:
        name, sep, paths = spec.partition("=")
        train, comma, test = paths.partition(",")
        if not (sep and comma):
            parser.error(f"{spec}: give NAME=TRAIN.jsonl,TEST.jsonl")
        sets[name] = (Path(train), Path(test))
    results = {}
    for name, (train, test) in sets.items():
        results[name] = []
        for draw in range(args.draws):
            folder = args.output / name / f"d{draw}"
            if not (folder / "train.jsonl").exists():
                cut(train, args.rows, draw, folder)
            results[name].append(draw_scores(folder, test, models, args.set))
            print(f"{name} draw {draw}: " + ", ".join(f"{c} {v:.3f}" for c, v in results[name][-1].items()), flush=True)
    text = table(results, models)
    print("\n" + text)
    atomic_write_text(args.output / "table.md", text + "\n")
    atomic_write_json(args.output / "table.json", results)


if __name__ == "__main__":
    main()
