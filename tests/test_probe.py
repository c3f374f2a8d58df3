"""The layer probe: a linear classifier per layer of the frozen model, and what it proposes."""

import json

import torch
import yaml

from finegrain.cli import main
from finegrain.train.probe import FOLDS, cross_validated, folds, ridge_accuracy, ridge_predict


def test_ridge_accuracy_separates_what_is_linearly_separable():
    torch.manual_seed(0)
    y = torch.randint(0, 2, (200,))
    x = torch.randn(200, 8)
    x[:, 3] += 3 * (2 * y - 1)  # one feature with a clear margin between the classes
    assert ridge_accuracy(x[:100], y[:100], x[100:], y[100:], 2) > 0.95
    noise = torch.randint(0, 2, (200,))
    assert ridge_accuracy(x[:100], noise[:100], x[100:], noise[100:], 2) < 0.75  # no signal, no score


def test_probe_cli_writes_a_table_and_a_proposal(tiny_model_dir, tmp_path, capsys):
    # Two classes told apart by their first token: an embedding-level signal every layer keeps.
    rows = [{"text": f"{'good' if i % 2 else 'bad'} film number {i}", "label": "ab"[i % 2]} for i in range(80)]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = tmp_path / "probe.yaml"
    config.write_text(yaml.safe_dump({"model": {"name": str(tiny_model_dir)}, "data": {"train": str(data), "max_length": 16}}))
    out = tmp_path / "probe.json"
    assert main(["probe", str(config), "--examples", "40", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert len(result["accuracy"]) == 3  # embeddings and the tiny model's 2 layers
    assert all(0 <= a <= 1 for a in result["accuracy"]) and max(result["accuracy"]) >= 0.75
    best, pooling = result["best_layer"], result["best_pooling"]
    f1 = result["mean_macro_f1" if pooling == "mean" else "macro_f1"]
    assert f1[best] == max(max(result["macro_f1"][1:]), max(result["mean_macro_f1"][1:]))
    assert result["proposal"] == {"model.num_layers": best, "lora.layers": list(range(-best, 0)), "head.pooling": pooling}
    assert result["seconds_per_layer_token"] > 0
    printed = capsys.readouterr().out
    assert f"model.num_layers={best}" in printed
    # 80 rows split 80/10/10: 8 validation texts, too few to score layers on; cross-validated instead
    assert result["folds"] == FOLDS and f"({FOLDS}-fold cross-validation over 40 train, 8 validation examples)" in printed
    assert main(["probe", str(config), "--examples", "1"]) == 1  # was a torch error at 0
    assert "--examples: 1 cannot hold each of the 2 labels once; give at least 2" in capsys.readouterr().err


def test_probe_refuses_other_tasks(tiny_model_dir, tmp_path, capsys):
    config = tmp_path / "probe.yaml"
    config.write_text(yaml.safe_dump({"task": "ner", "model": {"name": str(tiny_model_dir)}, "data": {"dataset": "wnut16"}}))
    assert main(["probe", str(config)]) != 0
    assert "probe reads single-label classification data" in capsys.readouterr().err


def test_folds_deal_each_class_evenly_and_repeat_with_the_seed():
    labels = torch.tensor([0] * 12 + [1] * 7 + [2] * 3)
    fold = folds(labels, 5, seed=0)
    assert torch.equal(fold, folds(labels, 5, seed=0)) and not torch.equal(fold, folds(labels, 5, seed=1))
    for label in range(3):
        sizes = torch.bincount(fold[labels == label], minlength=5)
        assert sizes.max() - sizes.min() <= 1  # each class spread over the folds
    assert torch.bincount(fold, minlength=5).tolist() == [5, 5, 4, 4, 4]  # 22 examples, the classes dealt on


def test_cross_validation_predicts_each_example_from_the_other_folds():
    torch.manual_seed(0)
    y = torch.randint(0, 3, (30,))
    x = torch.randn(30, 4)
    fold = folds(y, 3, seed=0)
    predicted = cross_validated(x, y, fold, 3)
    for k in range(3):
        held = fold == k
        assert torch.equal(predicted[held], ridge_predict(x[~held], y[~held], x[held], 3))


def test_a_large_validation_split_scores_the_layers_alone(tiny_model_dir, tmp_path):
    rows = [{"text": f"{'good' if i % 2 else 'bad'} film number {i}", "label": "ab"[i % 2]} for i in range(220)]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = tmp_path / "probe.yaml"
    config.write_text(yaml.safe_dump({"model": {"name": str(tiny_model_dir)},
                                      "data": {"train": str(data), "max_length": 16, "split": [0.5, 0.5, 0.0]}}))
    out = tmp_path / "probe.json"
    assert main(["probe", str(config), "--examples", "40", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["folds"] is None and result["validation_examples"] == 40  # 110 in the split: scored on its sample
