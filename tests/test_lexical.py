"""The TF-IDF model mixed into the classifier (finegrain.tasks.lexical, head.tfidf_mix)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression

from finegrain.errors import FinegrainError
from finegrain.tasks.lexical import STRENGTHS, LexicalModel, by_log_loss, choose_weight, log_loss

TEXTS = ["the match ended in a draw", "the striker scored twice", "shares fell on the market",
         "the bank raised its rates", "a late goal won the cup", "profits rose this quarter"]
TARGETS = [0, 0, 1, 1, 0, 1]


@pytest.mark.parametrize("targets,num_labels", [(TARGETS, 2), ([0, 2, 1, 1, 0, 2], 3)])
def test_probabilities_match_sklearn(targets, num_labels):
    """The saved form (coefficients per class, softmax) predicts what scikit-learn's model does."""
    models = LexicalModel.fit(TEXTS, targets, num_labels, char_level=False)
    assert [m.strength for m in models] == list(STRENGTHS)
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
    features = vectorizer.fit_transform(TEXTS)
    queries = ["a goal in the cup final", "the market and the bank"]
    for model in models:
        reference = LogisticRegression(C=model.strength, max_iter=1000).fit(features, targets)
        expected = reference.predict_proba(vectorizer.transform(queries))
        np.testing.assert_allclose(model.probabilities(queries).numpy(), expected, rtol=1e-4, atol=1e-5)


def test_a_class_missing_from_training_gets_no_probability():
    model = LexicalModel.fit(TEXTS, TARGETS, 3, char_level=False)[0]
    probs = model.probabilities(["the striker scored"])
    assert probs.shape == (1, 3) and probs[0, 2] < 1e-6 and torch.isclose(probs.sum(), torch.tensor(1.0))


def test_save_and_load_give_the_same_probabilities(tmp_path):
    model = LexicalModel.fit(["今天天气很好", "服务太差了", "房间很干净", "早餐难吃"], [1, 0, 1, 0], 2, char_level=True)[-1]
    model.weight = 0.3
    model.save(tmp_path / "tfidf")
    loaded = LexicalModel.load(tmp_path / "tfidf")
    queries = ["房间很好", "服务差"]
    assert loaded.char_level and loaded.weight == 0.3 and loaded.strength == STRENGTHS[-1]
    torch.testing.assert_close(loaded.probabilities(queries), model.probabilities(queries))
    assert not list((tmp_path / "tfidf").glob("*.tmp"))


def test_a_damaged_model_is_a_one_line_error(tmp_path):
    model = LexicalModel.fit(TEXTS, TARGETS, 2, char_level=False)[0]
    model.save(tmp_path / "tfidf")
    (tmp_path / "tfidf" / "vocabulary.json").write_text("{not json")
    with pytest.raises(FinegrainError, match="vocabulary|tfidf"):
        LexicalModel.load(tmp_path / "tfidf")


def test_mix_weighs_the_two_models():
    model = LexicalModel.fit(TEXTS, TARGETS, 2, char_level=False)[0]
    lm = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
    texts = ["a goal", "the bank"]
    model.weight = 0.0
    assert torch.equal(model.mix(lm, texts), lm)
    model.weight = 0.25
    torch.testing.assert_close(model.mix(lm, texts), 0.75 * lm + 0.25 * model.probabilities(texts))


def test_choose_weight_takes_the_best_score_then_the_lowest_log_loss():
    gold = torch.tensor([0, 1, 1, 0])
    lm = torch.tensor([[0.6, 0.4], [0.6, 0.4], [0.3, 0.7], [0.7, 0.3]])  # one error (row 1)
    lexical = torch.tensor([[0.8, 0.2], [0.1, 0.9], [0.2, 0.8], [0.6, 0.4]])  # none

    def accuracy(probs):
        return float((probs.argmax(-1) == gold).float().mean())

    weight, table = choose_weight(lm, lexical, gold, accuracy)
    assert [row["weight"] for row in table] == [round(0.1 * k, 1) for k in range(10)]
    perfect = [row for row in table if row["score"] == 1.0]
    assert perfect and weight == min(perfect, key=lambda row: row["log_loss"])["weight"]
    assert table[0]["score"] == 0.75 and weight > 0
    mixed = (1 - weight) * lm + weight * lexical
    assert next(row for row in table if row["weight"] == weight)["log_loss"] == pytest.approx(log_loss(mixed, gold), abs=1e-6)


def test_by_log_loss_passes_over_a_lucky_score():
    """Mixing in the lexical model flips the model's one (narrow) error at weights of 0.4 and up, and
    by as much makes it less sure of the other example, which it had right: accuracy is best from
    0.4 on, the log-loss at 0. by_log_loss keeps the model alone; the default takes 0.4."""
    gold = torch.tensor([0, 0])
    lm = torch.tensor([[0.45, 0.55], [0.99, 0.01]])
    lexical = torch.tensor([[0.6, 0.4], [0.4, 0.6]])

    def accuracy(probs):
        return float((probs.argmax(-1) == gold).float().mean())

    by_metric, table = choose_weight(lm, lexical, gold, accuracy)
    by_loss, same = choose_weight(lm, lexical, gold, accuracy, by_log_loss)
    assert same == table
    assert by_loss == min(table, key=lambda row: (row["log_loss"], row["weight"]))["weight"]
    assert by_metric == max(table, key=lambda row: (row["score"], -row["log_loss"]))["weight"]
    assert (by_metric, by_loss) == (0.4, 0.0)


def test_choose_weight_keeps_the_model_alone_when_mixing_only_hurts():
    gold = torch.tensor([0, 1])
    lm = torch.tensor([[0.99, 0.01], [0.01, 0.99]])
    lexical = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    weight, _ = choose_weight(lm, lexical, gold, lambda p: float((p.argmax(-1) == gold).float().mean()))
    assert weight == 0.0


def test_a_damaged_weights_file_is_a_one_line_error(tmp_path):
    model = LexicalModel.fit(TEXTS, TARGETS, 2, char_level=False)[0]
    model.save(tmp_path / "tfidf")
    (tmp_path / "tfidf" / "weights.safetensors").write_bytes(b"\x00" * 12)
    with pytest.raises(FinegrainError, match="TF-IDF model cannot be read"):
        LexicalModel.load(tmp_path / "tfidf")
