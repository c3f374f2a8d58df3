"""Baselines beside every classification and tagging run: the majority class and TF-IDF + a
linear SVM for classification; each word's most frequent tag and a logistic regression on word
features for tagging (NER, parts of speech).

A fine-tuned model that loses to a one-second bag-of-words classifier is not worth its
thirty minutes, and nobody notices unless the report says so. So every classification run
also fits two baselines on the SAME training split and scores them on the SAME evaluation
split (test, or validation when there is no test), with finegrain's own metric functions,
so that the numbers sit beside the model's and compare exactly.

A tagger's baselines read the words as the files split them and score their tags with the run's
own metrics: entities in conlleval's default mode, or plain tags word by word.

The classification baselines read the raw texts: `data.template` (a prompt for the language model) is not
applied, since its words are the same in every example and carry no signal for TF-IDF.

scikit-learn is imported inside the functions that fit: it takes about a second to import,
and `finegrain predict` or `serve`, which import the run module, never need it.
"""

from __future__ import annotations

import importlib
import sys
import time
import warnings
from collections import Counter
from collections.abc import Sequence
from typing import Any

from finegrain.evaluate.entities import entity_metrics
from finegrain.evaluate.metrics import classification_metrics, multilabel_metrics
from finegrain.tags import PLAIN, normalize_scheme

__all__ = [
    "add_baselines", "baseline_warning", "classification_baselines", "comparable_scores", "fit_word_regression",
    "headline_scores", "is_spaceless", "tagging_baselines", "tfidf_pipeline", "tfidf_vectorizer", "word_features",
]

# What the tagging baseline's logistic regression reads of each word (`word_features`).
WORD_FEATURES = "the word, its neighbours, 2-3-letter affixes and shape"

# Scripts written without spaces between words: CJK ideographs, kana, Thai, Lao, Myanmar, Khmer.
_SPACELESS_RANGES = (
    (0x0E00, 0x0EFF),
    (0x1000, 0x109F),
    (0x1780, 0x17FF),
    (0x3040, 0x30FF),
    (0x3400, 0x4DBF),
    (0x4E00, 0x9FFF),
    (0xF900, 0xFAFF),
    (0x20000, 0x2FFFF),
)
# Above this share of letters in those scripts, words are not separated by spaces.
_SPACELESS_SHARE = 0.3
# Enough texts to tell the script apart; the rest would only cost time.
_SAMPLE_TEXTS = 2000


def is_spaceless(texts: Sequence[str]) -> bool:
    """Whether the texts are written without spaces between words (Chinese, Japanese, Thai...).

    Word n-grams of such text are whole sentences, which never repeat, so the TF-IDF baseline
    needs character n-grams there. Decided by the share of letters (not digits, spaces or
    punctuation) in scripts written without spaces, over the first 2,000 texts.
    """
    letters = spaceless = 0
    for text in texts[:_SAMPLE_TEXTS]:
        for char in text:
            if char.isalpha():
                letters += 1
                code = ord(char)
                spaceless += any(low <= code <= high for low, high in _SPACELESS_RANGES)
    return letters > 0 and spaceless / letters > _SPACELESS_SHARE


def tfidf_pipeline(char_level: bool, multi_label: bool = False) -> Any:
    """The TF-IDF + linear SVM pipeline (unfitted) that the baseline fits.

    A linear SVM (`LinearSVC`, C=1) on sublinear-tf TF-IDF is what practitioners reach for
    first: on sparse n-gram features it is as accurate as logistic regression, trains in
    seconds even on 10,000 long documents (liblinear's dual solver, no iteration limit to
    tune) and needs no probabilities for an accuracy and F1 baseline. Sublinear tf (1 + log tf)
    keeps a word repeated in a long document from dominating it. Words: unigrams and bigrams.
    Text without spaces (`char_level`): character 1-3-grams, which cover Chinese words
    (mostly one or two characters) without a segmenter. Multi-label: one SVM per label.
    """
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.svm import LinearSVC

    vectorizer = tfidf_vectorizer(char_level)
    # A fixed seed for liblinear's shuffling: the same baseline on every rerun, and numpy's
    # global random state (which an unseeded LinearSVC draws from) left alone.
    classifier = LinearSVC(C=1.0, random_state=0)
    return make_pipeline(vectorizer, OneVsRestClassifier(classifier) if multi_label else classifier)


def tfidf_vectorizer(char_level: bool, vocabulary: dict[str, int] | None = None, dtype: Any = None) -> Any:
    """The baseline's features (unfitted, or fixed to a saved `vocabulary`): word 1-2-grams, or
    character 1-3-grams for text without spaces, sublinear tf. The TF-IDF model a run mixes in
    (finegrain.tasks.lexical) reads the same features, in float32 (`dtype`)."""
    import numpy as np
    from sklearn.feature_extraction.text import TfidfVectorizer

    return TfidfVectorizer(
        analyzer="char" if char_level else "word", ngram_range=(1, 3) if char_level else (1, 2), sublinear_tf=True,
        vocabulary=vocabulary, dtype=dtype or np.float64,
    )


def classification_baselines(
    train_texts: Sequence[str],
    train_labels: Sequence[Any],
    eval_texts: Sequence[str],
    eval_labels: Sequence[Any],
    labels: Sequence[str],
    multi_label: bool = False,
    char_level: bool | None = None,
) -> dict[str, Any]:
    """Fit the majority-class and TF-IDF baselines on one split and score them on another.

    Args:
        train_texts, train_labels: the training split (raw texts; a label, or a list of labels
            when `multi_label`).
        eval_texts, eval_labels: the split to score on.
        labels: the classes, in report order.
        multi_label: each example has a set of labels.
        char_level: use character n-grams; default: decided from the texts (`is_spaceless`).

    Returns:
        `{"majority": {...}, "tfidf": {...}}`. Each holds `macro_f1`, `per_class` (label -> F1)
        and `seconds`, and `accuracy` (single-label) or `subset_accuracy` and `micro_f1`
        (multi-label). `majority` also holds what it `predicts` (a class, or a list of labels);
        `tfidf` names its `features`; when it cannot be fitted (one class
        in the training split, no words) it holds only `skipped`, the reason.
    """
    if char_level is None:
        char_level = is_spaceless(list(train_texts))
    score = _multilabel_scores if multi_label else _single_label_scores
    started = time.perf_counter()
    majority = _majority(train_labels, labels, multi_label)
    majority_scores = score(eval_labels, [majority] * len(eval_labels), labels)
    majority_scores["seconds"] = round(time.perf_counter() - started, 3)
    majority_scores["predicts"] = majority

    pipeline = tfidf_pipeline(char_level, multi_label)  # before the clock: importing scikit-learn takes seconds
    started = time.perf_counter()
    try:
        predicted = _fit_predict_tfidf(pipeline, train_texts, train_labels, eval_texts, labels, multi_label)
    except ValueError as exc:  # one class, or no token in any text: nothing to fit
        tfidf: dict[str, Any] = {"skipped": str(exc).splitlines()[0]}
    else:
        tfidf = score(eval_labels, predicted, labels)
        tfidf["seconds"] = round(time.perf_counter() - started, 3)
    tfidf["features"] = "character 1-3-grams" if char_level else "word 1-2-grams"
    return {"majority": majority_scores, "tfidf": tfidf}


def headline_scores(metrics: dict[str, Any]) -> dict[str, tuple[float, str]]:
    """The scores a run is set beside its baselines by: name -> (finegrain's value, the baselines' key).

    Accuracy and macro-F1; multi-label runs micro-F1 for accuracy, entity tagging (NER) micro-F1
    of entities."""
    if metrics.get("task") == "multilabel":
        ours = {"micro-F1": (metrics["micro"]["f1"], "micro_f1")}
    elif metrics.get("task") == "ner":
        ours = {"F1": (metrics["f1"], "f1")}
    else:
        ours = {"accuracy": (metrics["accuracy"], "accuracy")}
    return {**ours, "macro-F1": (metrics["macro"]["f1"], "macro_f1")}


def strong_baseline(baselines: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The stronger of a run's two baselines (TF-IDF, or the tagger's logistic regression) and its name."""
    if "linear" in baselines:
        return baselines["linear"], "logistic regression on word features"
    return baselines["tfidf"], "TF-IDF + linear SVM"


def baseline_warning(metrics: dict[str, Any], baselines: dict[str, Any]) -> str | None:
    """One line when the TF-IDF baseline (a tagger's: the logistic regression) beats finegrain on
    its headline score or macro-F1 (`headline_scores`), else None."""
    strong, name = strong_baseline(baselines)
    if "skipped" in strong:
        return None
    scores = headline_scores(metrics)
    lost = [score for score, (ours, key) in scores.items() if strong[key] > ours]
    if not lost:
        return None
    figures = ", ".join(f"{score} {strong[scores[score][1]]:.4f} vs {scores[score][0]:.4f}" for score in lost)
    return (
        f"warning: the {name} baseline beats finegrain on the {baselines['split']} split "
        f"({figures}); more epochs, a longer max_length or more adapted layers may help"
    )


def tagging_baselines(
    train_words: Sequence[Sequence[str]],
    train_tags: Sequence[Sequence[str]],
    eval_words: Sequence[Sequence[str]],
    eval_tags: Sequence[Sequence[str]],
    scheme: str = "BIO",
) -> dict[str, Any]:
    """Fit two taggers on the training sentences and score them on another split as the run is scored.

    `majority`: each word its most frequent training tag (a word training never had: the most frequent
    tag). `linear`: a logistic regression on each word's `word_features`, word by word. Entity
    tags are scored as entities (conlleval's default mode: micro `f1`, `macro_f1`, `per_class` F1 by
    type), plain tags word by word (`accuracy`, `macro_f1`, `per_class` F1 by tag); each also has
    `seconds`, and `linear` is `skipped` (the reason) where the training data has one tag only.
    """
    plain = normalize_scheme(scheme) == PLAIN
    trained = sorted({tag for tags in train_tags for tag in tags})

    def score(predicted: list[list[str]]) -> dict[str, Any]:
        if plain:  # the tags in the run's report order: the training tags, then those only the split has
            gold = [t for tags in eval_tags for t in tags]
            flat = [t for tags in predicted for t in tags]
            return _single_label_scores(gold, flat, trained + sorted(set(gold) - set(trained)))
        return comparable_scores(entity_metrics([list(t) for t in eval_tags], predicted))

    started = time.perf_counter()
    counts: dict[str, Counter] = {}
    for words, tags in zip(train_words, train_tags):
        for word, tag in zip(words, tags):
            counts.setdefault(word, Counter())[tag] += 1
    commonest = Counter(tag for tags in train_tags for tag in tags).most_common(1)[0][0]
    guesses = [[counts[w].most_common(1)[0][0] if w in counts else commonest for w in words] for words in eval_words]
    majority = {**score(guesses), "seconds": round(time.perf_counter() - started, 3)}

    importlib.import_module("sklearn.linear_model")  # before the clock: importing scikit-learn takes seconds

    started = time.perf_counter()
    labels = [tag for tags in train_tags for tag in tags]
    if len(set(labels)) < 2:
        return {"majority": majority, "linear": {"skipped": "the training split holds one tag only"}}
    vectorizer, model = fit_word_regression(train_words, labels)
    flat = iter(model.predict(vectorizer.transform(_feature_rows(eval_words))).tolist())
    predicted = [[str(next(flat)) for _ in words] for words in eval_words]
    return {"majority": majority, "linear": {**score(predicted), "seconds": round(time.perf_counter() - started, 3)}}


def fit_word_regression(sentences: Sequence[Sequence[str]], targets: Sequence[Any]) -> tuple[Any, Any]:
    """The tagging baseline's model: a logistic regression (C 10) on the `word_features` of every word
    of `sentences`, with `targets` one per word in their order; returns the fitted DictVectorizer and
    LogisticRegression. A tagger's `head.word_mix` fits the same (finegrain.tasks.lexical.WordModel)."""
    from sklearn.feature_extraction import DictVectorizer
    from sklearn.linear_model import LogisticRegression

    vectorizer = DictVectorizer()
    model = LogisticRegression(C=10.0, max_iter=1000)
    return vectorizer, model.fit(vectorizer.fit_transform(_feature_rows(sentences)), list(targets))


def comparable_scores(metrics: dict[str, Any]) -> dict[str, Any]:
    """A run's metrics in its baselines' form, which the report's table reads: `accuracy`, `macro_f1`,
    F1 by class (`per_class`), and the entities' micro `f1` where the metrics have one."""
    scores = {"accuracy": metrics["accuracy"], "macro_f1": metrics["macro"]["f1"],
              "per_class": {label: values["f1"] for label, values in metrics["per_class"].items()}}
    return {"f1": metrics["f1"], **scores} if "f1" in metrics else scores


def word_features(words: Sequence[str], i: int) -> dict[str, float]:
    """What the tagging baseline reads of word `i`: the word, its neighbours, its first two and last
    two and three letters (lowercased), and its shape (`Xxxx9`, the first six characters)."""
    word = words[i]
    names = [f"w={word.lower()}", f"suffix3={word[-3:].lower()}", f"suffix2={word[-2:].lower()}",
             f"prefix2={word[:2].lower()}", f"shape={_shape(word)}", f"prev={words[i - 1].lower() if i else '<s>'}",
             f"next={words[i + 1].lower() if i + 1 < len(words) else '</s>'}"]
    return dict.fromkeys(names, 1.0)


def _shape(word: str) -> str:
    return "".join("X" if c.isupper() else "x" if c.islower() else "9" if c.isdigit() else c for c in word)[:6]


def _feature_rows(sentences: Sequence[Sequence[str]]) -> list[dict[str, float]]:
    return [word_features(words, i) for words in sentences for i in range(len(words))]


def add_baselines(results: dict[str, Any], data: Any, splits: Any) -> None:
    """Add `results["baselines"]` for a classification or tagging (NER) run, and warn on stderr when
    the stronger baseline wins.

    Does nothing for other tasks, with `data.baselines: false`, or when the run has neither
    test nor validation metrics. Scored on the split the report shows: test, else validation.

    Args:
        results: the run's results (`metrics.json`'s content), with its test/validation metrics.
        data: the run's `DataConfig`.
        splits: the run's `Splits` (the examples of each split, as trained and evaluated).
    """
    split = "test" if "test" in results else "validation"
    task = results.get("task")
    if task not in ("classification", "ner") or not getattr(data, "baselines", True) or split not in results:
        return
    examples = splits.test if split == "test" else splits.validation
    if task == "ner":
        measured = tagging_baselines([e.words for e in splits.train], [e.tags for e in splits.train],
                                     [e.words for e in examples], [e.tags for e in examples], data.scheme)
        texts = "words as the files split them"
    else:
        measured = classification_baselines(
            [e.text for e in splits.train], [e.label for e in splits.train],
            [e.text for e in examples], [e.label for e in examples], splits.labels,
            multi_label=data.multi_label, char_level=data.char_level or None,
        )
        texts = "raw (data.template not applied)"
    baselines: dict[str, Any] = {
        "split": split, "texts": texts, "train_examples": len(splits.train), **measured,
        "finegrain_seconds": results.get("train", {}).get("total_seconds"),
    }
    for key in ("tfidf_mix", "word_mix"):  # the fine-tuned model without the TF-IDF or word model mixed in
        mix = results.get(key) or {}
        if split == "test" and "test_model_alone" in mix:
            baselines["model_alone"] = {**mix["test_model_alone"], f"{key}_weight": mix["weight"]}
    warning = baseline_warning(results[split], baselines)
    if warning:
        baselines["warning"] = warning
        print(f"finegrain train: {warning}", file=sys.stderr)
    results["baselines"] = baselines


# --- the pieces -----------------------------------------------------------------------------


def _majority(train_labels: Sequence[Any], labels: Sequence[str], multi_label: bool) -> Any:
    """The most frequent training class (ties: the first in `labels`); multi-label: every
    label present in more than half of the training examples (usually none)."""
    if multi_label:
        counts = Counter(label for example in train_labels for label in set(example))
        return [label for label in labels if counts[label] * 2 > len(train_labels)]
    counts = Counter(train_labels)
    return max(labels, key=lambda label: (counts[label], -list(labels).index(label)))


def _fit_predict_tfidf(
    pipeline: Any, train_texts: Sequence[str], train_labels: Sequence[Any], eval_texts: Sequence[str],
    labels: Sequence[str], multi_label: bool,
) -> list[Any]:
    """Fit `pipeline` (`tfidf_pipeline`) and predict `eval_texts`, as labels (or lists of labels)."""
    if not multi_label:
        if len(set(train_labels)) < 2:
            raise ValueError("the training split holds one class only")
        pipeline.fit(list(train_texts), list(train_labels))
        return [str(label) for label in pipeline.predict(list(eval_texts))]
    from sklearn.preprocessing import MultiLabelBinarizer

    binarizer = MultiLabelBinarizer(classes=list(labels))
    targets = binarizer.fit_transform([set(example) for example in train_labels])
    with warnings.catch_warnings():
        # A label in every training example or in none gets a constant prediction; that is
        # the right baseline for it, not something to warn about.
        warnings.filterwarnings("ignore", message="Label .* is present in all training examples")
        pipeline.fit(list(train_texts), targets)
    return [list(row) for row in binarizer.inverse_transform(pipeline.predict(list(eval_texts)))]


def _single_label_scores(gold: Sequence[str], predicted: Sequence[str], labels: Sequence[str]) -> dict[str, Any]:
    return comparable_scores(classification_metrics(gold, predicted, labels))


def _multilabel_scores(gold: Sequence[Any], predicted: Sequence[Any], labels: Sequence[str]) -> dict[str, Any]:
    metrics = multilabel_metrics(gold, predicted, labels)
    return {
        "subset_accuracy": metrics["subset_accuracy"],
        "micro_f1": metrics["micro"]["f1"],
        "macro_f1": metrics["macro"]["f1"],
        "per_class": {label: scores["f1"] for label, scores in metrics["per_class"].items()},
    }
