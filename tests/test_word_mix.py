"""A tagger's word-feature model (`head.word_mix`): the tagging baseline's logistic regression, fitted
on the training sentences in the head's tags, its probabilities mixed into the tagger's at the weight
validation chooses; saved as plain data, and used by every path that predicts with the run."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
import yaml
from sklearn.feature_extraction import DictVectorizer
from sklearn.linear_model import LogisticRegression

import finegrain
from finegrain.cli import main
from finegrain.errors import FinegrainError
from finegrain.evaluate.baselines import word_features
from finegrain.tasks.lexical import WordModel, choose_weight, log_loss

NAMES = {"PER": ["Anna", "Tom", "Maria", "Jan"], "LOC": ["Paris", "Berlin", "Rome", "Oslo"]}
FILLER = ["went", "to", "saw", "met", "in", "and", "the", "city"]


def ner_file(path, n: int, seed: int):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = [rng.choice(NAMES["PER"]), rng.choice(FILLER), rng.choice(FILLER), rng.choice(NAMES["LOC"])]
        rows.append({"tokens": words, "tags": ["B-PER", "O", "O", "B-LOC"]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_the_word_model_is_the_baselines_regression_over_the_heads_tags(tmp_path):
    sentences = [["Anna", "went", "home"], ["Tom", "saw", "Paris"], ["the", "city", "of", "Rome"]] * 3
    targets = [[1, 0, 0], [1, 0, 3], [0, 0, 0, 3]] * 3  # tag 2 never trains: it never wins
    model = WordModel.fit(sentences, targets, num_tags=4)
    rows = [word_features(words, i) for words in sentences for i in range(len(words))]
    vectorizer = DictVectorizer()
    expected = LogisticRegression(C=10.0, max_iter=1000).fit(vectorizer.fit_transform(rows), sum(targets, []))
    new = [["Maria", "saw", "Rome"], ["Oslo"]]  # unseen words: their shape and affixes still count
    probs = np.concatenate(model.probabilities(new))
    wanted = expected.predict_proba(vectorizer.transform([word_features(w, i) for w in new for i in range(len(w))]))
    np.testing.assert_allclose(probs[:, [0, 1, 3]], wanted, atol=1e-5)
    assert probs[:, 2].max() < 1e-6 and [len(p) for p in model.probabilities(new)] == [3, 1]

    model.weight = 0.25
    model.save(tmp_path / "word_model")
    assert sorted(p.name for p in (tmp_path / "word_model").iterdir()) == ["config.json", "vocabulary.json",
                                                                          "weights.safetensors"]  # no pickle
    loaded = WordModel.load(tmp_path / "word_model")
    assert loaded.weight == 0.25
    np.testing.assert_array_equal(np.concatenate(loaded.probabilities(new)), probs)
    mixed = loaded.mix([np.full((2, 4), 0.25)], [["Maria", "x", "Rome"]], [[0, 2]])  # "x" cut off by max_length
    alone = loaded.probabilities([["Maria", "x", "Rome"]])[0]
    np.testing.assert_allclose(mixed[0][[0, 2]], 0.75 * 0.25 + 0.25 * alone[[0, 2]], rtol=1e-6)
    np.testing.assert_allclose(mixed[0][1], alone[1], rtol=1e-6)  # the word the tagger never read: the word model's

    (tmp_path / "word_model" / "weights.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(FinegrainError, match=r"word_model: the run's word-feature model cannot be read .*train the run again"):
        WordModel.load(tmp_path / "word_model")


def test_a_gold_tag_the_head_lacks_is_left_out_of_the_log_loss():
    probs = torch.tensor([[0.5, 0.5], [0.9, 0.1]])
    assert log_loss(probs, torch.tensor([0, -1])) == pytest.approx(-np.log(0.5))
    assert log_loss(probs, torch.tensor([-1, -1])) == 0.0
    weight, table = choose_weight(probs, torch.tensor([[0.1, 0.9], [0.1, 0.9]]), torch.tensor([1, -1]),
                                  lambda p: float(p[0, 1]))
    assert weight == 0.9 and len(table) == 10


def ner_config(tmp_path, tiny_model_dir, **head) -> str:
    config = {
        "task": "ner",
        "model": {"name": str(tiny_model_dir)},
        "data": {"train": str(ner_file(tmp_path / "train.jsonl", 60, 0)), "test": str(ner_file(tmp_path / "test.jsonl", 20, 1)),
                 "max_length": 24, "split": [0.75, 0.25, 0.0]},
        "lora": {"r": 4, "alpha": 8, "targets": "all-linear", "layers": [1]},
        "head": head,
        "train": {"epochs": 1, "lr": 1e-3, "batch_size": 16, "threads": 1, "checkpoint_every": 1000},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_a_tagger_mixes_in_its_word_model_at_the_weight_validation_chooses(tiny_model_dir, tmp_path, capsys):
    """One epoch of a random tiny model cannot tell names from places; the words alone can. The
    default (auto) tries weights 0 to 0.9 on validation, keeps the best, and every path that
    predicts with the run (test, evaluate, finegrain.load) mixes it in the same way."""
    run_dir = tmp_path / "run"
    assert main(["train", ner_config(tmp_path, tiny_model_dir), "--output", str(run_dir)]) == 0
    out = capsys.readouterr().out
    results = json.loads((run_dir / "metrics.json").read_text())
    mix = results["word_mix"]
    assert [row["weight"] for row in mix["validation"]] == [round(0.1 * k, 1) for k in range(10)]
    best = max(row["score"] for row in mix["validation"])
    assert mix["weight"] > 0 and mix["metric"] == "f1"
    assert next(row for row in mix["validation"] if row["weight"] == mix["weight"])["score"] == best
    assert f"word mix: weight {mix['weight']} (" in out
    alone = results["baselines"]["model_alone"]
    assert alone["word_mix_weight"] == mix["weight"] and alone == {**mix["test_model_alone"], "word_mix_weight": mix["weight"]}
    assert results["test"]["f1"] == 1.0 > alone["f1"]  # the words alone tag this grammar perfectly
    assert "head.word_mix, chosen on validation" in (run_dir / "report.md").read_text()
    assert json.loads((run_dir / "word_model" / "config.json").read_text())["weight"] == mix["weight"]

    records = [json.loads(line) for line in (run_dir / "test_predictions.jsonl").read_text().splitlines()]
    assert len(records) == 20 and all(r["correct"] for r in records)  # the mixed predictions, written
    sentences = [json.loads(line)["tokens"] for line in (tmp_path / "test.jsonl").read_text().splitlines()]
    predictions = finegrain.load(run_dir).predict(sentences)
    assert [[e["text"] for e in p["entities"]] for p in predictions] == [[e["text"] for e in r["predicted"]] for r in records]
    assert main(["evaluate", str(run_dir), "--data", str(tmp_path / "test.jsonl"), "--output", str(tmp_path / "eval.json")]) == 0
    assert json.loads((tmp_path / "eval.json").read_text())["f1"] == 1.0


def test_a_fixed_weight_or_none(tiny_model_dir, tmp_path, capsys):
    """A number fixes the weight (nothing tried on validation); 0 fits nothing and saves nothing;
    a weight outside [0, 1) is a one-line error naming the key."""
    assert main(["train", ner_config(tmp_path, tiny_model_dir, word_mix=0.3), "--output", str(tmp_path / "fixed")]) == 0
    assert json.loads((tmp_path / "fixed" / "metrics.json").read_text())["word_mix"]["validation"] == []
    assert "word mix: weight 0.3 (head.word_mix)" in capsys.readouterr().out
    assert main(["train", ner_config(tmp_path, tiny_model_dir, word_mix=0), "--output", str(tmp_path / "off")]) == 0
    results = json.loads((tmp_path / "off" / "metrics.json").read_text())
    assert "word_mix" not in results and "model_alone" not in results["baselines"]
    assert not (tmp_path / "off" / "word_model").exists()
    capsys.readouterr()
    assert main(["train", ner_config(tmp_path, tiny_model_dir, word_mix=1.5), "--output", str(tmp_path / "bad")]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "head.word_mix" in err and "auto or a weight in [0, 1)" in err
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("scheme", ["plain", "BIO"])
def test_words_past_max_length_take_the_word_models_tags(tiny_model_dir, scheme):
    """The tagger never read the words past data.max_length; with a word model mixed in, they take
    its tags (Viterbi runs over the whole sentence), where without one they are O."""
    from finegrain.checkpoint.load import load_model
    from finegrain.data.conll import TokenExample
    from finegrain.tasks.tokens import TokenClassificationTask, labelled_words

    _, tokenizer = load_model(str(tiny_model_dir), progress=False)
    types = ["LOC", "PER"]
    words = ["Anna", "went", "to", "Paris"] * 6
    tags = ["B-PER", "O", "O", "B-LOC"] * 6
    if scheme == "plain":
        types, tags = ["NNP", "TO", "VBD"], ["NNP", "VBD", "TO", "NNP"] * 6
    task = TokenClassificationTask(types, scheme=scheme)
    item = task.encode(tokenizer, [TokenExample.from_words(words, tags, "x:1")], 16)[0]
    kept = labelled_words(item)
    assert 0 < len(kept) < len(words) and item.truncated_words == len(words) - len(kept)
    probs = torch.full((1, 16, len(task.tags)), 1 / len(task.tags))
    assert task.decode(probs, [item])[0]["tags"][len(kept):] == ["O"] * item.truncated_words

    task.lexical = WordModel.fit([words], [[task.index[t] for t in tags]], len(task.tags))
    task.lexical.weight = 0.5
    predicted = task.decode(probs, [item])[0]
    assert predicted["tags"] == tags and predicted["truncated_words"] == item.truncated_words
    assert task.decode(probs, [item], mixed=False)[0]["tags"][len(kept):] == ["O"] * item.truncated_words
