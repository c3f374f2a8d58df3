"""Distillation of NER runs (word-level KL at the words both models kept) and relation runs with
distill.hidden, on the tiny model; NER with unlabelled sentences; a teacher of another tag scheme."""

import json

import pytest
import torch
import yaml

from finegrain.config import load_config
from finegrain.data.conll import write_token_examples
from finegrain.errors import FinegrainError
from finegrain.run import train
from finegrain.tasks.tokens import TokenClassificationTask, TokenEncoded
from finegrain.train.distill import DistillObjective, TeacherOutputs, soft_loss, word_logits, word_soft_loss

from test_ner import sentences


def test_the_teachers_logits_are_read_at_its_word_positions():
    logits = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)  # (N, T, C)
    example = sentences(1)[0]
    items = [TokenEncoded([0] * 5, [0, 2, -1], None, example), TokenEncoded([0] * 5, [1, 4], None, example)]
    words, kept = word_logits(logits, items)
    assert words.shape == (2, 3, 3)
    torch.testing.assert_close(words[0, :2], logits[0, [0, 2]])
    torch.testing.assert_close(words[1, :2], logits[1, [1, 4]])
    assert kept.tolist() == [[True, True, False], [True, True, False]]
    assert words[0, 2].abs().sum() == 0 and words[1, 2].abs().sum() == 0


def test_word_soft_loss_is_the_kl_over_the_words_both_kept():
    torch.manual_seed(0)
    student = torch.randn(2, 6, 3)  # (B, T, C) token logits
    teacher = torch.randn(2, 3, 3)  # (B, W, C) word logits
    batch = {
        "word_positions": torch.tensor([[1, 3, -1], [0, 2, 5]]),  # the student cut word 3 of sentence 1
        "teacher_words": torch.tensor([[True, True, True], [True, False, True]]),  # the teacher cut word 2 of sentence 2
        "teacher_logits": teacher,
    }
    rows = torch.stack([student[0, 1], student[0, 3], student[1, 0], student[1, 5]])
    want = soft_loss(rows, torch.stack([teacher[0, 0], teacher[0, 1], teacher[1, 0], teacher[1, 2]]), 2.0)
    torch.testing.assert_close(word_soft_loss(student, batch, 2.0), want)


def test_a_distill_objective_of_unlabelled_sentences_is_soft_only_and_weighs_its_words():
    task = TokenClassificationTask(["LOC", "PER"])
    example = sentences(1)[0]
    items = [TokenEncoded([5, 6, 7], [0, 2], None, example), TokenEncoded([5, 6], [0, -1], None, example)]
    teacher = TeacherOutputs(torch.randn(2, 2, len(task.tags)), torch.tensor([[True, True], [True, True]]))
    objective = DistillObjective(task, items, teacher=teacher, alpha=0.5, soft_only=True)
    [(batch, weight)] = objective.pieces([0, 1], pad_id=0, max_tokens=None)
    assert weight == 3.0  # the words both kept; no targets needed
    outputs = torch.randn(2, 3, len(task.tags))
    torch.testing.assert_close(objective.loss(lambda b: outputs, batch), word_soft_loss(outputs, batch, 2.0))


def ner_config(tmp_path, tiny_model_dir, **sections):
    data = tmp_path / "train.jsonl"
    write_token_examples(data, sentences(80, seed=3))
    config = {
        "task": "ner",
        "model": {"name": str(tiny_model_dir), "bidirectional": True},
        "data": {"train": str(data), "max_length": 24},
        "lora": {"r": 4, "alpha": 8, "targets": "all-linear", "layers": [-1]},
        "train": {"epochs": 1, "lr": 1e-2, "batch_size": 16, "threads": 1, "checkpoint_every": 1000},
        **sections,
    }
    path = tmp_path / "ner.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_an_ner_student_distils_words_hidden_states_and_unlabelled_sentences(tiny_model_dir, tmp_path):
    path = ner_config(tmp_path, tiny_model_dir)
    train(load_config(str(path), [f"output={tmp_path / 'teacher'}"]), progress=False)
    unlabelled = tmp_path / "more.jsonl"
    unlabelled.write_text("".join(json.dumps({"tokens": e.words}) + "\n" for e in sentences(20, seed=9)))
    results = train(load_config(str(path), [
        f"output={tmp_path / 'student'}", "model.num_layers=1", f"distill.teacher={tmp_path / 'teacher'}",
        "distill.hidden=true", f"distill.unlabelled={unlabelled}", "distill.alpha=0.8",
    ]), progress=False)
    assert results["train"]["unlabelled"] == 20
    assert 0.0 <= results["test"]["f1"] <= 1.0

    other = tmp_path / "bioes"
    spec = yaml.safe_load(path.read_text())
    spec["head"] = {"scheme": "BIOES"}
    (tmp_path / "bioes.yaml").write_text(yaml.safe_dump(spec))
    config = load_config(str(tmp_path / "bioes.yaml"), [f"output={other}", "model.num_layers=1",
                                                         f"distill.teacher={tmp_path / 'teacher'}"])
    with pytest.raises(FinegrainError, match=r"distill.teacher: .* predicts BIO tags and this run BIOES; set head.scheme: BIO"):
        train(config, progress=False)
    assert not other.exists()


def test_a_relation_student_matches_hidden_states(tiny_model_dir, tmp_path):
    from test_relation import run_config

    path = run_config(tmp_path, tiny_model_dir)
    train(load_config(str(path), [f"output={tmp_path / 'teacher'}", "train.epochs=1"]), progress=False)
    results = train(load_config(str(path), [f"output={tmp_path / 'student'}", "model.num_layers=1", "train.epochs=1",
                                             f"distill.teacher={tmp_path / 'teacher'}", "distill.hidden=true"]),
                    progress=False)
    assert 0.0 <= results["test"]["f1"] <= 1.0
    losses = [json.loads(line)["train_loss"] for line in (tmp_path / "student" / "metrics.jsonl").read_text().splitlines()
              if "train_loss" in line]
    assert all(loss == loss for loss in losses)  # finite: the hidden term at the marker model's layers
