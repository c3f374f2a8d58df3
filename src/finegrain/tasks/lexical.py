"""A TF-IDF model beside the language model: its probabilities mixed into the classifier's.

A small decoder fine-tuned on a few thousand examples reads meaning; a bag of n-grams reads
the words themselves. On topic-like labels and on text the decoder's pretraining barely saw
(Chinese for an English-first model) the words alone are strong — the TF-IDF baseline beat
the language model there — and the two err on different examples, so their mixture often
beats each of them (docs/RESULTS.md). `head.tfidf_mix: auto` fits TF-IDF + logistic regressions (three regularisation
strengths) on the training split and picks the strength and the mixing weight on validation
(`choose_weight`); a weight of 0 keeps the language model alone, and nothing is saved.

The fitted model is saved as plain data in the run directory (`tfidf/`: the vocabulary as
JSON, the idf, coefficients and intercepts as safetensors), never as a pickle: a served run
directory must not be able to run code. scikit-learn turns texts into features at predict time
with the saved vocabulary and idf, exactly as it did at training.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from finegrain import rundir
from finegrain.atomic import atomic_path, atomic_write_json, atomic_write_text
from finegrain.errors import FinegrainError
from finegrain.evaluate.baselines import tfidf_vectorizer

WEIGHTS = tuple(round(0.1 * k, 1) for k in range(10))  # 0 (the language model alone) to 0.9
# Inverse regularisation strengths (scikit-learn's C) tried, one decade apart: many sparse n-grams
# want little regularisation, and how little depends on the data (chosen on validation with the weight).
STRENGTHS = (3.0, 30.0, 300.0)
CONFIG_FILE, VOCABULARY_FILE, WEIGHTS_FILE = "config.json", "vocabulary.json", "weights.safetensors"


@dataclass
class LexicalModel:
    """TF-IDF features, a linear layer over them (softmax), and the weight of its probabilities."""

    char_level: bool
    vectorizer: Any
    coef: np.ndarray  # (C, V)
    intercept: np.ndarray  # (C,)
    weight: float = 0.0
    strength: float = STRENGTHS[0]  # scikit-learn's C it was fitted with

    @classmethod
    def fit(
        cls, texts: Sequence[str], targets: Sequence[int], num_labels: int, char_level: bool,
        strengths: Sequence[float] = STRENGTHS,
    ) -> list[LexicalModel]:
        """One model per inverse regularisation strength `C` in `strengths`, on shared features,
        from the training texts and their class indices (a class missing from them never wins)."""
        from sklearn.linear_model import LogisticRegression

        vectorizer = tfidf_vectorizer(char_level, dtype=np.float32)
        features = vectorizer.fit_transform(list(texts))
        models = []
        for strength in strengths:
            classifier = LogisticRegression(C=strength, max_iter=1000).fit(features, list(targets))
            coef = np.zeros((num_labels, features.shape[1]), dtype=np.float32)
            intercept = np.full(num_labels, -1e4, dtype=np.float32)
            if len(classifier.classes_) > 2:
                coef[classifier.classes_], intercept[classifier.classes_] = classifier.coef_, classifier.intercept_
            else:  # one logit for the second class: as two softmax logits, half of it each way
                coef[classifier.classes_] = np.stack([-classifier.coef_[0], classifier.coef_[0]]) / 2
                intercept[classifier.classes_] = np.array([-1, 1]) * classifier.intercept_[0] / 2
            models.append(cls(char_level, vectorizer, coef, intercept, strength=strength))
        return models

    def probabilities(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, C) class probabilities of the texts."""
        logits = self.vectorizer.transform(list(texts)) @ self.coef.T + self.intercept
        return torch.from_numpy(np.asarray(logits, dtype=np.float32)).softmax(-1)

    def mix(self, probs: torch.Tensor, texts: Sequence[str | None]) -> torch.Tensor:
        """The language model's probabilities with this model's mixed in at `weight`."""
        if not self.weight:
            return probs
        if any(text is None for text in texts):
            raise FinegrainError("the run mixes TF-IDF probabilities in (head.tfidf_mix) but an item has no text")
        return (1 - self.weight) * probs.float() + self.weight * self.probabilities(texts)  # type: ignore[arg-type]

    def save(self, directory: Path) -> None:
        """Write the model as plain data (no pickle), each file atomically."""
        directory.mkdir(parents=True, exist_ok=True)
        vocabulary = {term: int(index) for term, index in self.vectorizer.vocabulary_.items()}
        atomic_write_json(directory / VOCABULARY_FILE, vocabulary)
        tensors = {"idf": self.vectorizer.idf_.astype(np.float32), "coef": self.coef, "intercept": self.intercept}
        with atomic_path(directory / WEIGHTS_FILE) as temporary:
            save_file(tensors, str(temporary))
        config = {"char_level": self.char_level, "weight": self.weight, "strength": self.strength}
        atomic_write_text(directory / CONFIG_FILE, json.dumps(config, indent=2) + "\n")  # last: marks it complete

    @classmethod
    def load(cls, directory: Path) -> LexicalModel:
        """Read a saved model back; the vectorizer gets the saved vocabulary and idf."""
        try:
            config = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))
            vocabulary = json.loads((directory / VOCABULARY_FILE).read_text(encoding="utf-8"))
            tensors = load_file(str(directory / WEIGHTS_FILE))
            vectorizer = tfidf_vectorizer(config["char_level"], vocabulary, np.float32)
            vectorizer.idf_ = tensors["idf"]  # checks it against the vocabulary's size
            return cls(config["char_level"], vectorizer, tensors["coef"], tensors["intercept"], float(config["weight"]),
                       float(config["strength"]))
        except (OSError, ValueError, KeyError, SafetensorError) as exc:
            raise FinegrainError(f"{directory}: the run's TF-IDF model cannot be read ({exc}); train the run again") from exc


def choose_weight(
    model_probs: torch.Tensor, lexical_probs: torch.Tensor, gold: torch.Tensor, score: Callable[[torch.Tensor], float],
) -> tuple[float, list[dict[str, float]]]:
    """The mixing weight (0 to 0.9) whose validation predictions score best.

    Args:
        model_probs, lexical_probs: (N, C) validation probabilities of each model.
        gold: (N,) the validation class indices.
        score: the run's selection metric (higher is better) of mixed probabilities.

    Returns:
        The weight and, per weight tried, its score and validation log-loss. Ties in the metric
        (common on small validation sets) go to the lower log-loss, which every example moves,
        then to the lower weight.
    """
    table = []
    for weight in WEIGHTS:
        mixed = (1 - weight) * model_probs.float() + weight * lexical_probs
        table.append({"weight": weight, "score": round(float(score(mixed)), 6), "log_loss": round(log_loss(mixed, gold), 6)})
    return max(table, key=ranking)["weight"], table


def ranking(row: dict[str, float]) -> tuple[float, float, float]:
    """How `choose_weight` orders its rows: the score, then the lower log-loss, then the lower weight."""
    return row["score"], -row["log_loss"], -row["weight"]


def log_loss(probs: torch.Tensor, gold: torch.Tensor) -> float:
    """Mean negative log-probability of the gold classes."""
    return float(-probs.gather(1, gold[:, None]).clamp_min(1e-12).log().mean())


def attach(task: Any, run_dir: str | Path) -> None:
    """Give a trained run's task its TF-IDF model, when the run mixes one in (a classification
    run with `head.tfidf_mix`): `task.decode` then mixes its probabilities in."""
    directory = rundir.tfidf_dir(run_dir)
    if (directory / CONFIG_FILE).is_file():
        task.lexical = LexicalModel.load(directory)
