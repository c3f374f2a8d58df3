"""Replay finished runs' mixes: which rule for choosing the mixing weight on validation holds up on test.

    python benchmarks/mix_choice.py RUN [RUN ...] [--output FILE.json]

For each run that mixes a lexical model in (`head.tfidf_mix: auto` for a classifier, `head.word_mix:
auto` for a tagger), the run's trained model and its splits are read again, the lexical candidates
fitted again (deterministic: the same ones the run fitted), and every (strength,) weight is scored
on validation and on test, as the run's own `fit_tfidf_mix` / `fit_word_mix` score them. Printed
per run: the test score of the weight each rule picks from the validation rows, beside the model
alone and the best weight in hindsight. The rules:

- `metric`: the validation metric, ties to the lower log-loss (`by_score`: the tagger's word mix,
  and the TF-IDF mix before 2026-12-07);
- `log_loss`: the validation log-loss, ties to the lower weight (`by_log_loss`: the TF-IDF mix since).

The replay reads the run's trained weights, so it shows what each rule would have given that very
run: training does not depend on the mix, which is fitted after it. A run whose validation split
held fewer than 100 texts chose on its training texts as well (`tfidf_mix.cross_validated` in its
metrics.json, finegrain.train.tfidf_mix); "the run's weight" is that choice, and the two rules
here read its validation texts alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path

import torch

from finegrain import rundir
from finegrain.run import build_trained
from finegrain.tasks import task_class
from finegrain.tasks.lexical import by_log_loss, by_score
from finegrain.train.tfidf_mix import fit_tfidf_mix, fit_word_mix


def tables(run: Path) -> tuple[dict, int, list[dict], list[dict]]:
    """The run's recorded mix, its validation examples, and the replayed rows of every candidate
    on validation and on test."""
    config = rundir.read_config(run)
    torch.set_num_threads(config.train.threads or 2)
    key = "word_mix" if config.task == "ner" else "tfidf_mix"
    setattr(config.head, key, "auto")
    fit = fit_word_mix if config.task == "ner" else fit_tfidf_mix
    splits = task_class(config.task).load_splits(config.data)
    model, tokenizer, task = build_trained(config, run)
    model.eval()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for part in (splits.validation, splits.test):
            task.lexical = None
            items = task.encode(tokenizer, part, config.data.max_length)
            summary = fit(config, task, model, dataclasses.replace(splits, validation=part), items,
                          tokenizer.pad_token_id, Path(scratch))
            rows.append(summary["validation"])
    recorded = json.loads((run / rundir.METRICS).read_text())[key]
    return recorded, len(splits.validation), rows[0], rows[1]


def cell(score: float, row: dict) -> str:
    """A test score and the weight (and strength) that gave it."""
    strength = f", C {row['strength']:g}" if "strength" in row else ""
    return f"{score:.4f} ({row['weight']}{strength})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--output", type=Path, help="a JSON file of every run's rows")
    args = parser.parse_args()
    results = {}
    rules = {"metric": by_score, "log_loss": by_log_loss}
    print("| run | validation examples | the run's weight | model alone | " + " | ".join(rules) + " | best in hindsight |")
    print("|---|---:|---|---:|" + "---:|" * (len(rules) + 1))
    for run in args.runs:
        recorded, examples, validation, test = tables(run)
        at = {(r.get("strength"), r["weight"]): r["score"] for r in test}
        picks = {name: max(validation, key=rule) for name, rule in rules.items()}
        alone = abs(test[0]["score"])
        cells = [cell(abs(at[(p.get("strength"), p["weight"])]), p) for p in picks.values()]
        best = max(test, key=lambda r: r["score"])
        print(f"| {run} | {examples} | {recorded['weight']} | {alone:.4f} | " + " | ".join(cells)
              + f" | {cell(abs(best['score']), best)} |", flush=True)
        results[str(run)] = {"recorded": recorded, "validation": validation, "test": test,
                             "picks": {name: p["weight"] for name, p in picks.items()}}
    if args.output:
        args.output.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
