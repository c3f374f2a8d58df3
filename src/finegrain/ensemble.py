"""`finegrain ensemble`: the averaged class probabilities of several classification runs.

Runs of one label set (seeds, PEFT methods, backbones) err on different examples; the mean of
their probabilities is usually more accurate and better calibrated than each of them. An ensemble
directory holds `ensemble.json` (the member runs, by absolute path, the task and the labels), the
ensemble's and each member's test metrics in `metrics.json`, and the ensemble's reports (with the
reliability diagram). `finegrain.load(ENS)` returns an `EnsemblePredictor`, which predicts and
evaluates like one run, so `finegrain evaluate ENS --data FILE` and `finegrain predict ENS` work.

Each member predicts with everything its run applies (its calibration temperature, a TF-IDF mix);
the average is decoded with the first member's labels. The test split is the first member's
(`data` of its config), scored for every member alike. `finegrain serve ENS` (or `NAME=ENS`) serves
it like one run on its task's endpoint (`serve.models.ModelRegistry`: each member's adapter on the
shared base, their probabilities averaged per request), when its runs share a base model and the
keys that encode a text (`data.max_length`, `template`, `long_texts`, ...).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from finegrain import rundir
from finegrain.atomic import atomic_write_json, exclusive_lock, output_directory
from finegrain.errors import FinegrainError
from finegrain.run import Predictor, input_list, report_long_texts
from finegrain.tasks import score_file, task_class


def check_members(runs: list[str | Path]) -> list[str]:
    """The labels the runs share (the first run's order); a one-line error for a missing run, an
    unfinished one, one that is not single-label classification, or a different label set."""
    if len(runs) < 2:
        raise FinegrainError(f"an ensemble needs at least two runs, got {len(runs)}; name them: finegrain ensemble RUN1 RUN2 ... --output ENS")
    labels: list[str] | None = None
    seen: set[Path] = set()
    for run in runs:
        run, resolved = Path(run), Path(run).resolve()
        if resolved in seen:
            raise FinegrainError(f"{run}: named twice; an ensemble averages different runs (other seeds, methods or backbones)")
        seen.add(resolved)
        if not run.is_dir():
            raise FinegrainError(f"{run}: no such run directory; pass finished runs (the --output of `finegrain train`)")
        if rundir.is_ensemble(run):
            raise FinegrainError(f"{run}: is an ensemble; name its member runs instead")
        config = rundir.read_config(run)
        if config.task != "classification" or config.data.multi_label:
            kind = "multi-label classification" if config.task == "classification" else config.task
            raise FinegrainError(f"{run}: a {kind} run; an ensemble averages single-label classification runs' probabilities")
        rundir.require_adapter(run)
        own = [str(label) for label in rundir.read_labels(run)]
        if labels is None:
            labels = own
        elif set(own) != set(labels):
            raise FinegrainError(f"{run}: labels {sorted(own)} differ from {runs[0]}'s {sorted(labels)}; "
                                 "an ensemble's runs must share one label set")
    return labels  # type: ignore[return-value]


def average(member_predictions: list[list[dict[str, Any]]], labels: list[str]) -> torch.Tensor:
    """(N, C) mean over members of each example's probabilities, in `labels` order."""
    stacked = torch.tensor([[[p["probabilities"][label] for label in labels] for p in predictions]
                            for predictions in member_predictions], dtype=torch.float64)  # (M, N, C)
    return stacked.mean(0)


class EnsemblePredictor:
    """An ensemble directory, ready to label texts like one run: `finegrain.load(ENS).predict([...])`."""

    def __init__(self, ensemble_dir: str | Path, progress: bool = False):
        self.ensemble_dir = Path(ensemble_dir)
        spec = rundir.read_ensemble(self.ensemble_dir)
        self.labels = check_members(spec["members"])
        self.members = [Predictor(run, progress) for run in spec["members"]]
        self.config, self.tokenizer = self.members[0].config, self.members[0].tokenizer
        self.task = averaging_task(self.config, self.labels)
        self.long_texts: dict[str, Any] | None = None

    def predict(self, inputs: list, batch_size: int = 64) -> list[dict[str, Any]]:
        """The label and averaged probabilities of each text (as `Predictor.predict`)."""
        inputs = input_list(inputs)
        return self.predict_examples(self.task.examples_from_inputs(inputs, self.config.data), batch_size) if inputs else []

    def predict_examples(self, examples: list, batch_size: int = 64, report: bool = True) -> list[dict[str, Any]]:
        """Predictions for examples in the task's own type: the members' probabilities averaged
        (`report`: say once how many texts did not fit, as `Predictor.predict_examples`)."""
        predictions = self.combine([member.predict_examples(examples, batch_size, report=False) for member in self.members])
        if report:
            report_long_texts(self.long_texts)
        return predictions

    def combine(self, member_predictions: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
        """The ensemble's predictions from its members' (each member's list in the same example order)."""
        self.long_texts = self.members[0].long_texts
        return self.task.decode(average(member_predictions, self.labels))

    def evaluate(self, path: str | Path) -> dict[str, Any]:
        """Metrics of the ensemble on a labelled file (same format as the members' training data)."""
        return score_file(self.task, self.config.data, path, self.predict_examples)


def averaging_task(config, labels: list[str]):
    """The task that decodes and scores the averaged probabilities: the first member's, without
    what a member applies to its own (its temperature, its TF-IDF model), in `labels` order."""
    return task_class(config.task).from_config(config, labels)


# What `create_ensemble` writes: a directory holding only these (an ensemble, or one whose writing
# stopped before ensemble.json) may be written again.
_OUTPUTS = {rundir.ENSEMBLE, rundir.METRICS, rundir.REPORT_MD, rundir.REPORT_HTML, rundir.CONFUSION_MATRIX,
            rundir.RELIABILITY_DIAGRAM, rundir.LOCK}


def _check_output(output: Path) -> None:
    """An ensemble directory replaces only an earlier ensemble's files, in a new or empty directory."""
    if output_directory(output).is_dir() and any(p.name not in _OUTPUTS for p in output.iterdir()):
        raise FinegrainError(f"{output}: exists and is not an ensemble directory; choose a new or empty --output")


def create_ensemble(runs: list[str | Path], output: str | Path, progress: bool = False) -> dict[str, Any]:
    """Write the ensemble directory of `runs` and score it and each run on the first run's test split.

    Returns:
        metrics.json's content: `task`, `labels`, `members` (each `run` and its metrics on the
        split) and the ensemble's metrics under the split's name (`test`, or `validation` when the
        data has no test split).
    """
    output = Path(output)
    labels = check_members(runs)
    _check_output(output)
    members = [str(Path(run).resolve()) for run in runs]
    with exclusive_lock(output, "finegrain ensemble"):
        predictors = [Predictor(run, progress) for run in members]
        first = predictors[0]
        task = averaging_task(first.config, labels)
        splits = task.load_splits(first.config.data)
        split = "test" if splits.test else "validation"
        examples = splits.test or splits.validation
        gold = task.gold(examples)
        batch_size = first.config.train.eval_batch_size
        member_predictions = [predictor.predict_examples(examples, batch_size, report=i == 0) for i, predictor in enumerate(predictors)]
        predictions = task.decode(average(member_predictions, labels))
        results: dict[str, Any] = {
            "task": "classification", "labels": labels,
            "members": [{"run": run, split: task.metrics(p, gold)} for run, p in zip(members, member_predictions)],
            split: task.metrics(predictions, gold),
        }
        results[split]["source"] = splits.origin[split]
        atomic_write_json(output / rundir.METRICS, results)
        task.write_report(output, results[split], split, f"ensemble of {len(members)} runs: {split}")
        atomic_write_json(output / rundir.ENSEMBLE, {"task": "classification", "labels": labels, "members": members})  # last
    return results


def summary_lines(results: dict[str, Any]) -> list[str]:
    """`finegrain ensemble`'s report: each member's accuracy and ECE, then the ensemble's beside the best member's."""
    split = "test" if "test" in results else "validation"
    lines = []
    for member in results["members"]:
        scores = member[split]
        lines.append(f"{member['run']}: {split} accuracy {scores['accuracy']:.4f}, ECE {scores['calibration']['ece']:.4f}")
    best = max(member[split]["accuracy"] for member in results["members"])
    scores = results[split]
    lines.append(f"ensemble of {len(results['members'])}: {split} accuracy {scores['accuracy']:.4f} "
                 f"({100 * (scores['accuracy'] - best):+.2f} points over the best run), ECE {scores['calibration']['ece']:.4f}")
    return lines
