"""Baselines beside every classification run: parity with scikit-learn pipelines built here,
the choice of character n-grams for text without spaces, and what a run writes (or not)."""

import json
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from sklearn.dummy import DummyClassifier
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.metrics import accuracy_score, f1_score
from sklearn.multiclass import OneVsRestClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import MultiLabelBinarizer
from sklearn.svm import LinearSVC

from finegrain.cli import main
from finegrain.config import DataConfig
from finegrain.evaluate import classification_metrics
from finegrain.evaluate.baselines import add_baselines, baseline_warning, classification_baselines, is_spaceless
from finegrain.evaluate.report import write_classification_report

TOPICS = {
    "sport": ["match", "goal", "team", "coach", "league", "score"],
    "tech": ["chip", "software", "laptop", "code", "server", "phone"],
    "food": ["recipe", "bread", "cheese", "soup", "oven", "spice"],
}
COMMON = ["the", "a", "new", "today", "report", "people", "city", "year"]
# Characters of three topics for text written without spaces (food, weather, money).
HANZI = {"food": "饭菜面汤肉鱼茶", "weather": "雨雪风云冷热晴", "money": "钱银价买卖税贷"}
HANZI_COMMON = "我们的是了在有这个很"


def _topic_texts(n: int, seed: int, noise: float = 0.4) -> tuple[list[str], list[str]]:
    """Texts of topic words mixed with shared words; `noise` of the topic words come from another
    topic, so the baseline is good but not perfect (a parity test then compares real mistakes)."""
    rng = random.Random(seed)
    texts, labels = [], []
    for _ in range(n):
        label = rng.choices(list(TOPICS), weights=[0.5, 0.3, 0.2])[0]
        words = rng.sample(COMMON, 3)
        for _ in range(3):
            topic = rng.choice(list(TOPICS)) if rng.random() < noise else label
            words.append(rng.choice(TOPICS[topic]))
        rng.shuffle(words)
        texts.append(" ".join(words))
        labels.append(label)
    return texts, labels


def _hanzi_texts(n: int, seed: int) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    texts, labels = [], []
    for _ in range(n):
        label = rng.choice(list(HANZI))
        chars = rng.sample(HANZI_COMMON, 4) + rng.sample(HANZI[label], 2)
        rng.shuffle(chars)
        texts.append("".join(chars) + "。")
        labels.append(label)
    return texts, labels


def _sklearn_scores(pipeline, train, test, labels: list[str]) -> dict:
    pipeline.fit(*train)
    predicted = pipeline.predict(test[0])
    per_class = f1_score(test[1], predicted, labels=labels, average=None, zero_division=0)
    return {
        "accuracy": accuracy_score(test[1], predicted),
        "macro_f1": f1_score(test[1], predicted, labels=labels, average="macro", zero_division=0),
        "per_class": dict(zip(labels, per_class.tolist())),
    }


def _assert_scores_equal(ours: dict, reference: dict) -> None:
    assert ours["accuracy"] == pytest.approx(reference["accuracy"], abs=1e-12)
    assert ours["macro_f1"] == pytest.approx(reference["macro_f1"], abs=1e-12)
    assert ours["per_class"] == pytest.approx(reference["per_class"], abs=1e-12)


def test_tfidf_and_majority_match_sklearn() -> None:
    train, test = _topic_texts(300, seed=0), _topic_texts(120, seed=1)
    labels = sorted(TOPICS)
    result = classification_baselines(*train, *test, labels)

    word_svm = make_pipeline(TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True), LinearSVC(C=1.0, random_state=0))
    reference = _sklearn_scores(word_svm, train, test, labels)
    assert 0.6 < reference["accuracy"] < 1.0  # the set makes real mistakes to compare
    _assert_scores_equal(result["tfidf"], reference)
    assert result["tfidf"]["features"] == "word 1-2-grams" and result["tfidf"]["seconds"] >= 0

    dummy = make_pipeline(TfidfVectorizer(), DummyClassifier(strategy="most_frequent"))
    _assert_scores_equal(result["majority"], _sklearn_scores(dummy, train, test, labels))
    assert result["majority"]["predicts"] == "sport"


def test_char_ngrams_for_text_without_spaces() -> None:
    train, test = _hanzi_texts(200, seed=0), _hanzi_texts(60, seed=1)
    labels = sorted(HANZI)
    assert is_spaceless(train[0]) and not is_spaceless(_topic_texts(20, seed=0)[0])
    assert not is_spaceless(["价格 2024: $19.99 (NEW!) 一个 product name here for everyone"])  # a few CJK letters

    result = classification_baselines(*train, *test, labels)
    assert result["tfidf"]["features"] == "character 1-3-grams"
    char_tfidf = TfidfVectorizer(analyzer="char", ngram_range=(1, 3), sublinear_tf=True)
    char_svm = make_pipeline(char_tfidf, LinearSVC(random_state=0))
    _assert_scores_equal(result["tfidf"], _sklearn_scores(char_svm, train, test, labels))
    # Word n-grams see each sentence as one unseen token: what the detection avoids.
    words = classification_baselines(*train, *test, labels, char_level=False)["tfidf"]
    assert words["features"] == "word 1-2-grams" and words["accuracy"] < result["tfidf"]["accuracy"]
    # data.char_level forces characters on text with spaces.
    forced = classification_baselines(*_topic_texts(60, 0), *_topic_texts(20, 1), sorted(TOPICS), char_level=True)
    assert forced["tfidf"]["features"] == "character 1-3-grams"


def test_multilabel_baseline_matches_sklearn() -> None:
    texts, single = _topic_texts(200, seed=2, noise=0.0)
    rng = random.Random(3)
    label_sets = [sorted({label, *(["tech"] if rng.random() < 0.3 else [])}) for label in single]
    labels = sorted(TOPICS)
    result = classification_baselines(texts[:150], label_sets[:150], texts[150:], label_sets[150:], labels, True)

    binarizer = MultiLabelBinarizer(classes=labels)
    tfidf = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
    svm = make_pipeline(tfidf, OneVsRestClassifier(LinearSVC(random_state=0)))
    svm.fit(texts[:150], binarizer.fit_transform(label_sets[:150]))
    truth, guess = binarizer.transform(label_sets[150:]), svm.predict(texts[150:])
    assert result["tfidf"]["micro_f1"] == pytest.approx(f1_score(truth, guess, average="micro", zero_division=0))
    assert result["tfidf"]["macro_f1"] == pytest.approx(f1_score(truth, guess, average="macro", zero_division=0))
    assert result["tfidf"]["subset_accuracy"] == pytest.approx(accuracy_score(truth, guess))
    assert result["majority"]["predicts"] == []  # no label is in most examples


def test_tfidf_skipped_when_nothing_to_fit() -> None:
    result = classification_baselines(["a b", "c d"], ["x", "x"], ["a b"], ["x"], ["x", "y"])
    assert "skipped" in result["tfidf"] and result["majority"]["accuracy"] == 1.0
    assert baseline_warning(classification_metrics(["x"], ["y"], ["x", "y"]), {"split": "test", **result}) is None


def test_warning_only_when_tfidf_wins(tmp_path: Path) -> None:
    labels = ["neg", "pos"]
    gold = ["neg", "pos"] * 10
    baselines = {"split": "test", **classification_baselines(
        ["bad film", "good film"] * 10, gold, ["bad film", "good film"] * 10, gold, labels,
    ), "finegrain_seconds": 3.0}
    perfect = classification_metrics(gold, gold, labels)
    assert baseline_warning(perfect, baselines) is None  # a tie is no loss
    poor = classification_metrics(gold, ["pos"] * 20, labels)
    warning = baseline_warning(poor, baselines)
    assert "accuracy 1.0000 vs 0.5000" in warning and "macro-F1 1.0000 vs 0.3333" in warning

    written = write_classification_report(tmp_path, {**poor, "baselines": {**baselines, "warning": warning}})
    markdown = written["markdown"].read_text()
    assert warning in markdown and "## Against baselines" in markdown
    assert "| accuracy | 0.5000 | 1.0000 | 0.5000 |" in markdown and "| F1 pos |" in markdown
    assert "majority (neg)" in markdown and warning in written["html"].read_text()
    assert "no test split" not in markdown
    on_validation = {**baselines, "split": "validation"}
    markdown = write_classification_report(tmp_path, {**poor, "baselines": on_validation})["markdown"].read_text()
    assert "same validation split" in markdown and "its figures are optimistic" in markdown


def test_add_baselines_scores_the_reported_split_of_classification_runs_only() -> None:
    texts, labels = _topic_texts(90, seed=4)
    examples = [SimpleNamespace(text=t, label=label) for t, label in zip(texts, labels)]
    splits = SimpleNamespace(train=examples[:60], validation=examples[60:], test=[], labels=sorted(TOPICS))
    data = DataConfig(train="x.jsonl")
    validation = classification_metrics(labels[60:], labels[60:], sorted(TOPICS))  # a perfect model: no warning
    results = {"task": "classification", "validation": validation, "train": {"total_seconds": 5.0}}
    add_baselines(results, data, splits)
    expected = classification_baselines(texts[:60], labels[:60], texts[60:], labels[60:], sorted(TOPICS))
    assert results["baselines"]["split"] == "validation" and "warning" not in results["baselines"]
    assert results["baselines"]["tfidf"]["per_class"] == expected["tfidf"]["per_class"]
    assert results["baselines"]["finegrain_seconds"] == 5.0

    for task in ("regression", "relation"):
        other = {"task": task, "validation": validation}
        add_baselines(other, data, splits)
        assert "baselines" not in other


# --- whole runs on the tiny model -------------------------------------------------------------


def _write_run(tmp_path: Path, model_dir: Path, rows: int = 60, **data) -> Path:
    """Data that TF-IDF separates perfectly, and a config whose learning rate is too small to learn."""
    rng = random.Random(0)
    with open(tmp_path / "data.jsonl", "w", encoding="utf-8") as f:
        for _ in range(rows):
            label = rng.choice(["fresh", "rotten"])
            words = ["great", "fun", "gripping"] if label == "fresh" else ["dull", "slow", "bad"]
            f.write(json.dumps({"text": " ".join(rng.sample(words, 2)) + " film", "label": label}) + "\n")
    config = {
        "model": {"name": str(model_dir)},
        "data": {"train": str(tmp_path / "data.jsonl"), "max_length": 8, "split": [0.6, 0.2, 0.2], **data},
        "lora": {"r": 2, "alpha": 4, "targets": ["q_proj"], "layers": [-1]},
        # recipe off: its probe would fit the head before training, and this model must not learn
        "train": {"epochs": 1, "lr": 1e-9, "batch_size": 16, "threads": 1, "warmup_ratio": 0.0, "eval_every": 0,
                  "recipe": "off"},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_run_writes_baselines_and_warns(tiny_model_dir, tmp_path, capsys) -> None:
    assert main(["train", str(_write_run(tmp_path, tiny_model_dir)), "--output", str(tmp_path / "run")]) == 0
    err = capsys.readouterr().err
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    baselines = metrics["baselines"]
    assert baselines["split"] == "test" and baselines["tfidf"]["accuracy"] == 1.0
    assert set(baselines["tfidf"]["per_class"]) == {"fresh", "rotten"}
    assert 0 <= baselines["majority"]["accuracy"] <= 1 and 0 <= baselines["majority"]["macro_f1"] <= 1
    assert baselines["tfidf"]["macro_f1"] > metrics["test"]["macro"]["f1"]  # the model could not learn
    assert baselines["warning"] in err and "baseline beats finegrain" in err
    report = (tmp_path / "run" / "report.md").read_text()
    assert baselines["warning"] in report and "## Against baselines" in report


def test_run_without_baselines(tiny_model_dir, tmp_path, capsys) -> None:
    config = _write_run(tmp_path, tiny_model_dir, baselines=False)
    assert main(["train", str(config), "--output", str(tmp_path / "run")]) == 0
    assert "baseline" not in capsys.readouterr().err
    assert "baselines" not in json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert "Against baselines" not in (tmp_path / "run" / "report.md").read_text()

    assert main(["train", str(config), "--output", str(tmp_path / "other"), "--set", "data.baselines=maybe"]) != 0
    assert "'data.baselines' must be bool" in capsys.readouterr().err
