"""`finegrain calibrate`: temperature scaling of a classification run's probabilities.

A fine-tuned classifier is often over-confident: its largest probability is higher than how often
it is right. Temperature scaling (Guo et al. 2017) divides the logits by one number T, fitted on
the validation split by minimising the negative log-likelihood; the argmax, so every label and the
accuracy, is unchanged, only the probabilities move. T is stored with the run
(`rundir.TEMPERATURE`), atomically, and `finegrain.load(run)` and the server apply it
(`tasks.classification.attach_temperature`). The expected calibration error before and after is
measured on validation (where T was fitted) and on the test split (which it never saw).

T scales the probabilities a prediction carries, softmax(log p / T): without a TF-IDF mix
(`head.tfidf_mix`) that is softmax(logits / T); with one, the mixed probabilities are scaled, so
the argmax stays the run's either way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from finegrain import rundir
from finegrain.atomic import atomic_write_json, exclusive_lock
from finegrain.errors import FinegrainError
from finegrain.inference import predict_outputs
from finegrain.run import Predictor

# T is kept inside this range: a validation split the model gets all right drives the NLL's
# minimum towards T -> 0 (ever sharper probabilities), which no unseen text justifies.
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.05, 20.0


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor, max_iter: int = 100) -> float:
    """The T > 0 minimising the mean cross-entropy of `logits / T` (N, C) against `targets` (N,);
    log-probabilities serve as logits (softmax(log p / T) = softmax(z / T)).

    LBFGS on log T (unconstrained, and the NLL is smooth in it), from T = 1, then clamped to
    [MIN_TEMPERATURE, MAX_TEMPERATURE].
    """
    logits = logits.detach().float()
    log_t = torch.zeros((), requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), targets)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(min(max(log_t.exp().item(), MIN_TEMPERATURE), MAX_TEMPERATURE))


def nll(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> float:
    """Mean negative log-likelihood of the targets under softmax(logits / temperature)."""
    return float(F.cross_entropy(logits.float() / temperature, targets))


def _check_calibratable(run_dir: Path) -> None:
    config = rundir.read_config(run_dir)
    if config.task != "classification":
        raise FinegrainError(f"{run_dir}: a task: {config.task} run; `finegrain calibrate` fits a temperature "
                             "to a classification run's probabilities, calibrate one of those")
    if config.data.multi_label:
        raise FinegrainError(f"{run_dir}: a multi-label run (data.multi_label: true) has a threshold per label, "
                             "not one softmax to scale; `finegrain calibrate` takes single-label classification runs")
    rundir.require_adapter(run_dir)


class _Scorer:
    """One split's log-probabilities (as the run predicts them, uncalibrated) and gold classes,
    scored at any temperature."""

    def __init__(self, predictor: Predictor, examples: list, batch_size: int):
        task = predictor.task
        self.task, self.examples = task, examples
        items = task.encode(predictor.tokenizer, examples, predictor.config.data.max_length)
        logits = predict_outputs(predictor.model, task, items, predictor.tokenizer.pad_token_id, batch_size)
        task.temperature = 1.0
        probs = task.final_probabilities(task.probabilities(logits), items)  # a TF-IDF mix included
        self.log_probs = probs.double().clamp_min(1e-300).log().float()  # the logits up to a constant per row
        self.targets = torch.tensor([task.index[label] for label in task.gold(examples)])

    def score(self, temperature: float) -> dict[str, Any]:
        """ECE, NLL and accuracy of the split's predictions at `temperature`."""
        self.task.temperature = 1.0
        predictions = self.task.decode((self.log_probs.double() / temperature).softmax(-1).float())
        metrics = self.task.metrics(predictions, self.task.gold(self.examples))
        return {"ece": metrics["calibration"]["ece"], "nll": nll(self.log_probs, self.targets, temperature),
                "accuracy": metrics["accuracy"]}


def calibrate_run(run_dir: str | Path, progress: bool = False) -> dict[str, Any]:
    """Fit the run's temperature on its validation split and store it in the run (temperature.json).

    Returns:
        temperature.json's content: `temperature`, and for `validation` (and `test`, when the run
        has one) the number of examples and `before` / `after` ECE, NLL and accuracy.
    """
    run_dir = Path(run_dir)
    _check_calibratable(run_dir)
    with exclusive_lock(run_dir, "finegrain calibrate"):
        predictor = Predictor(run_dir, progress)
        splits = predictor.task.load_splits(predictor.config.data)
        if not splits.validation:
            raise FinegrainError(f"{run_dir}: the run's data has no validation examples to fit a temperature on; "
                                 "set data.validation (or a validation share in data.split) and train again")
        batch_size = predictor.config.train.eval_batch_size
        sets = {"validation": splits.validation, **({"test": splits.test} if splits.test else {})}
        scorers = {name: _Scorer(predictor, examples, batch_size) for name, examples in sets.items()}
        validation = scorers["validation"]
        temperature = fit_temperature(validation.log_probs, validation.targets)
        result: dict[str, Any] = {"temperature": temperature, "fitted_on": "validation"}
        for name, scorer in scorers.items():
            result[name] = {"examples": len(scorer.examples), "before": scorer.score(1.0), "after": scorer.score(temperature)}
        atomic_write_json(run_dir / rundir.TEMPERATURE, result)
    return result


def summary_line(result: dict[str, Any]) -> str:
    """`finegrain calibrate`'s report: T and the ECE before -> after on each split."""
    parts = [f"temperature {result['temperature']:.4f} (fitted on {result['validation']['examples']} validation examples)"]
    for name in ("validation", "test"):
        if name in result:
            before, after = result[name]["before"], result[name]["after"]
            parts.append(f"{name} ECE {before['ece']:.4f} -> {after['ece']:.4f}, NLL {before['nll']:.4f} -> {after['nll']:.4f}")
    return "; ".join(parts)
