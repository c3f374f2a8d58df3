"""A lexical model beside the language model: its probabilities mixed into the classifier's
(`LexicalModel`, TF-IDF) or the tagger's (`WordModel`, word features).

A small decoder fine-tuned on a few thousand examples reads meaning; a bag of n-grams reads
the words themselves. On topic-like labels and on text the decoder's pretraining barely saw
(Chinese for an English-first model) the words alone are strong — the TF-IDF baseline beat
the language model there — and the two err on different examples, so their mixture often
beats each of them (docs/RESULTS.md). `head.tfidf_mix: auto` fits TF-IDF + logistic regressions (three regularisation
strengths) on the training split and picks the strength and the mixing weight by validation
log-loss (`choose_weight`, `by_log_loss`); a weight of 0 keeps the language model alone, and nothing is saved.

A tagger's `head.word_mix: auto` (the default) does the same word by word: the tagging baseline's
logistic regression (`finegrain.evaluate.baselines.word_features`: the word, its neighbours, its
affixes and its shape) reads each word much as a dictionary would. On parts of speech in languages
the default model's pretraining barely saw it beat a short fine-tune (German: 0.873 accuracy
against 0.730, docs/RESULTS.md). It is fitted on the training sentences in the head's tags, and
its probabilities are mixed into the model's at each word's labelled token, before Viterbi decoding,
at the weight whose decoded validation tags score best by the run's metric (`by_score`); the words
past `data.max_length`, which the language model never read, take its probabilities alone.

The fitted model is saved as plain data in the run directory (`tfidf/` or `word_model/`: the
vocabulary or feature names as JSON, the idf, coefficients and intercepts as safetensors), never
as a pickle: a served run directory must not be able to run code. scikit-learn turns texts into
features at predict time with the saved vocabulary and idf, exactly as it did at training; the
word model's features are looked up in its names, without scikit-learn.
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
from finegrain.evaluate.baselines import fit_word_regression, tfidf_vectorizer, word_features

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
            models.append(cls(char_level, vectorizer, *softmax_weights(classifier, num_labels, features.shape[1]),
                              strength=strength))
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
        vocabulary = {term: int(index) for term, index in self.vectorizer.vocabulary_.items()}
        tensors = {"idf": self.vectorizer.idf_.astype(np.float32), "coef": self.coef, "intercept": self.intercept}
        _write(directory, vocabulary, tensors, {"char_level": self.char_level, "weight": self.weight,
                                                 "strength": self.strength})

    @classmethod
    def load(cls, directory: Path) -> LexicalModel:
        """Read a saved model back; the vectorizer gets the saved vocabulary and idf."""
        try:
            config, vocabulary, tensors = _read(directory)
            vectorizer = tfidf_vectorizer(config["char_level"], vocabulary, np.float32)
            vectorizer.idf_ = tensors["idf"]  # checks it against the vocabulary's size
            return cls(config["char_level"], vectorizer, tensors["coef"], tensors["intercept"], float(config["weight"]),
                       float(config["strength"]))
        except (OSError, ValueError, KeyError, SafetensorError) as exc:
            raise FinegrainError(f"{directory}: the run's TF-IDF model cannot be read ({exc}); train the run again") from exc


@dataclass
class WordModel:
    """Word features, a linear layer over them (softmax over the head's tags), and the weight of
    its probabilities."""

    vocabulary: dict[str, int]  # feature name (`word_features`) -> column
    coef: np.ndarray  # (C, V)
    intercept: np.ndarray  # (C,)
    weight: float = 0.0

    @classmethod
    def fit(cls, sentences: Sequence[Sequence[str]], targets: Sequence[Sequence[int]], num_tags: int) -> WordModel:
        """From the training sentences' words and their tags' indices in the head's tags (a tag
        missing from them never wins); they must hold two tags or more."""
        vectorizer, classifier = fit_word_regression(sentences, [t for tags in targets for t in tags])
        vocabulary = {name: int(column) for name, column in vectorizer.vocabulary_.items()}
        return cls(vocabulary, *softmax_weights(classifier, num_tags, len(vocabulary)))

    def probabilities(self, sentences: Sequence[Sequence[str]]) -> list[np.ndarray]:
        """Per sentence, (words, C) tag probabilities."""
        from scipy.sparse import csr_matrix

        columns, starts = [], [0]
        for words in sentences:
            for i in range(len(words)):
                columns += [self.vocabulary[name] for name in word_features(words, i) if name in self.vocabulary]
                starts.append(len(columns))
        features = csr_matrix((np.ones(len(columns), np.float32), columns, starts), shape=(len(starts) - 1, self.coef.shape[1]))
        logits = np.asarray(features @ self.coef.T) + self.intercept
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        return np.split(probs, np.cumsum([len(words) for words in sentences])[:-1])

    def mix(self, word_probs: list[np.ndarray], sentences: Sequence[Sequence[str]],
            kept: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """Every word's tag probabilities, per sentence: at its `kept` words (those within max_length)
        the tagger's `word_probs` with this model's mixed in at `weight`; at the words past
        max_length, which the tagger never read, this model's alone."""
        return [fill(mine, (1 - self.weight) * probs + self.weight * mine[indices], indices)
                for probs, mine, indices in zip(word_probs, self.probabilities(sentences), kept)]

    def save(self, directory: Path) -> None:
        """Write the model as plain data (no pickle), each file atomically."""
        _write(directory, self.vocabulary, {"coef": self.coef, "intercept": self.intercept}, {"weight": self.weight})

    @classmethod
    def load(cls, directory: Path) -> WordModel:
        try:
            config, vocabulary, tensors = _read(directory)
            if tensors["coef"].shape != (len(tensors["intercept"]), len(vocabulary)):
                raise ValueError(f"coefficients of shape {tensors['coef'].shape} for {len(vocabulary)} features")
            return cls(vocabulary, tensors["coef"], tensors["intercept"], float(config["weight"]))
        except (OSError, ValueError, KeyError, TypeError, SafetensorError) as exc:
            raise FinegrainError(f"{directory}: the run's word-feature model cannot be read ({exc}); "
                                 "train the run again") from exc


def _write(directory: Path, vocabulary: dict[str, int], tensors: dict[str, np.ndarray], config: dict[str, Any]) -> None:
    """A lexical model's three files, each atomically: the config last, which marks the model complete."""
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_json(directory / VOCABULARY_FILE, vocabulary)
    with atomic_path(directory / WEIGHTS_FILE) as temporary:
        save_file(tensors, str(temporary))
    atomic_write_text(directory / CONFIG_FILE, json.dumps(config, indent=2) + "\n")


def _read(directory: Path) -> tuple[dict[str, Any], dict[str, int], dict[str, np.ndarray]]:
    """What `_write` wrote: the config, the vocabulary, the tensors."""
    config = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))
    vocabulary = json.loads((directory / VOCABULARY_FILE).read_text(encoding="utf-8"))
    return config, vocabulary, load_file(str(directory / WEIGHTS_FILE))


def fill(probs: np.ndarray, rows: np.ndarray, indices: Sequence[int]) -> np.ndarray:
    """A sentence's word-model `probs` (words, C), in float64, with `rows` in place at word `indices`."""
    filled = probs.astype(np.float64)
    filled[list(indices)] = rows
    return filled


def softmax_weights(classifier: Any, num_labels: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """A fitted scikit-learn LogisticRegression over class indices as the (C, width) coefficients and
    (C,) intercepts of a softmax over all `num_labels` classes (one it never saw never wins)."""
    coef = np.zeros((num_labels, width), dtype=np.float32)
    intercept = np.full(num_labels, -1e4, dtype=np.float32)
    if len(classifier.classes_) > 2:
        coef[classifier.classes_], intercept[classifier.classes_] = classifier.coef_, classifier.intercept_
    else:  # one logit for the second class: as two softmax logits, half of it each way
        coef[classifier.classes_] = np.stack([-classifier.coef_[0], classifier.coef_[0]]) / 2
        intercept[classifier.classes_] = np.array([-1, 1]) * classifier.intercept_[0] / 2
    return coef, intercept


def choose_weight(
    model_probs: torch.Tensor, lexical_probs: torch.Tensor, gold: torch.Tensor, score: Callable[[torch.Tensor], float],
    by: Callable[[dict[str, float]], tuple] | None = None,
) -> tuple[float, list[dict[str, float]]]:
    """The mixing weight (0 to 0.9) whose validation predictions rank first by `by` (`by_score`
    unless given).

    Args:
        model_probs, lexical_probs: (N, C) validation probabilities of each model.
        gold: (N,) the validation class indices (-1: a class the model lacks, left out of the log-loss).
        score: the run's selection metric (higher is better) of mixed probabilities.

    Returns:
        The weight and, per weight tried, its score and validation log-loss.
    """
    table = []
    for weight in WEIGHTS:
        mixed = (1 - weight) * model_probs.float() + weight * lexical_probs
        table.append({"weight": weight, "score": round(float(score(mixed)), 6), "log_loss": round(log_loss(mixed, gold), 6)})
    return max(table, key=by or by_score)["weight"], table


def by_score(row: dict[str, float]) -> tuple[float, float, float]:
    """The tagger's word mix ranks weights by the run's metric; ties (common on small validation
    sets) go to the lower log-loss, then to the lower weight. The metric is scored on the decoded
    tags (Viterbi over the mixed probabilities), which the per-word log-loss does not see."""
    return row["score"], -row["log_loss"], -row["weight"]


def by_log_loss(row: dict[str, float]) -> tuple[float, float]:
    """The classifier's TF-IDF mix ranks its weights and strengths by validation log-loss, then the
    lower weight. Every example moves the log-loss a little; a few hundred examples move accuracy
    or macro-F1 in steps, and the best of 30 such noisy scores is often a lucky one: on held-out
    runs the log-loss choice scored higher on test far more often than lower (docs/RESULTS.md,
    "Choosing the TF-IDF mix by log-loss")."""
    return -row["log_loss"], -row["weight"]


def log_loss(probs: torch.Tensor, gold: torch.Tensor) -> float:
    """Mean negative log-probability of the gold classes (those at -1 left out)."""
    known = gold >= 0
    if not known.any():
        return 0.0
    return float(-probs[known].gather(1, gold[known][:, None]).clamp_min(1e-12).log().mean())


# The config key of each lexical model a run may mix in -> its folder in the run, and what it is.
MIXES = {"tfidf_mix": (rundir.tfidf_dir, "TF-IDF model"), "word_mix": (rundir.word_model_dir, "word-feature model")}


def mixed_in(run_dir: str | Path) -> tuple[str, Path] | None:
    """The key (`tfidf_mix`, `word_mix`) and folder of the lexical model a run mixes in; None without one."""
    for key, (folder, _) in MIXES.items():
        if (folder(run_dir) / CONFIG_FILE).is_file():
            return key, folder(run_dir)
    return None


def attach(task: Any, run_dir: str | Path) -> None:
    """Give a trained run's task the lexical model it mixes in, when it has one (a classification
    run's TF-IDF model, `head.tfidf_mix`; a tagger's word model, `head.word_mix`): `task.decode`
    then mixes its probabilities in."""
    found = mixed_in(run_dir)
    if found:
        task.lexical = (LexicalModel if found[0] == "tfidf_mix" else WordModel).load(found[1])
