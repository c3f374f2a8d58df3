"""The classification head and loss options, and the loop's early stopping, on the tiny model."""

import json
import random

import pytest
import torch
import torch.nn.functional as F
import yaml

from finegrain.checkpoint.load import load_model
from finegrain.cli import main
from finegrain.config import HeadConfig
from finegrain.data.readers import Example
from finegrain.errors import FinegrainError
from finegrain.peft import LoraConfig, apply_lora, lora_layers
from finegrain.tasks.classification import ClassificationTask, encode_texts


def test_last_token_and_mean_pooling_ignore_padding(tiny_model_dir):
    llama, tokenizer = load_model(tiny_model_dir, progress=False)
    for pooling in ("last", "mean"):
        task = ClassificationTask(["a", "b"], head=HeadConfig(pooling=pooling))
        model = task.build_model(llama).eval()
        items = task.encode(tokenizer, [Example("a short one", "a", "x:1"), Example("a much longer text than that", "b", "x:2")], 32)
        with torch.no_grad():
            together = model(task.collate(items, tokenizer.pad_token_id))
            alone = torch.cat([model(task.collate([item], tokenizer.pad_token_id)) for item in items])
        torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)


def test_bidirectional_classifier_ignores_padding(tiny_model_dir):
    llama, tokenizer = load_model(tiny_model_dir, progress=False)
    llama.model.config.causal = False
    task = ClassificationTask(["a", "b"])
    model = task.build_model(llama).eval()
    items = task.encode(tokenizer, [Example("short", "a", "x:1"), Example("a much longer text than that", "b", "x:2")], 32)
    with torch.no_grad():
        together = model(task.collate(items, tokenizer.pad_token_id))
        alone = torch.cat([model(task.collate([item], tokenizer.pad_token_id)) for item in items])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("causal", [True, False])
def test_the_last_layer_for_one_row_equals_the_full_layer(tiny_model_dir, causal):
    # A classifier reads one position per sequence, so its last layer computes that one alone.
    llama, _ = load_model(tiny_model_dir, progress=False)
    llama.double()  # float64, so that only a real difference shows
    backbone = llama.model
    backbone.config.causal = causal
    apply_lora(llama, LoraConfig(r=2, targets="all-linear"))
    with torch.no_grad():
        for layer in lora_layers(llama).values():
            layer.lora_B.weight.normal_(std=0.1)  # an update of the size training makes
    lengths = torch.tensor([3, 7, 5])
    x = backbone.embed_tokens(torch.randint(0, 100, (3, 7)))
    real = torch.arange(7)[None, :] < lengths[:, None]
    mask = None if causal else real
    full = backbone.run_layers(x, attention_mask=mask)[torch.arange(3), lengths - 1]
    one = backbone.run_layers(x, attention_mask=mask, rows=lengths - 1)[:, 0]
    torch.testing.assert_close(one, full, atol=1e-8, rtol=1e-8)
    params = [p for p in llama.parameters() if p.requires_grad]
    grads = [torch.autograd.grad(out.square().sum(), params) for out in (full, one)]
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, atol=1e-8, rtol=1e-8)


def test_losses_match_torch_definitions():
    logits = torch.randn(4, 3)
    batch = {"targets": torch.tensor([0, 2, 1, 2])}
    weighted = ClassificationTask(["a", "b", "c"], head=HeadConfig(label_smoothing=0.1, class_weights={"c": 3.0}))
    weighted.set_class_weights([])
    expected = F.cross_entropy(logits, batch["targets"], weight=torch.tensor([1.0, 1.0, 3.0]), label_smoothing=0.1)
    torch.testing.assert_close(weighted.loss(logits, batch), expected)

    multi = ClassificationTask(["a", "b", "c"], multi_label=True, head=HeadConfig(threshold=0.3))
    targets = torch.tensor([[1.0, 0, 1], [0, 1, 0], [0, 0, 0], [1, 1, 1]])
    torch.testing.assert_close(multi.loss(logits, {"targets": targets}), F.binary_cross_entropy_with_logits(logits, targets))
    decoded = multi.decode(torch.tensor([[0.9, 0.2, 0.35]]))
    assert decoded[0]["label"] == ["a", "c"]


def test_balanced_class_weights():
    task = ClassificationTask(["a", "b"], head=HeadConfig(class_weights="balanced"))
    items = task.encode(_FakeTokenizer(), [Example("x", "a", "f:1")] * 3 + [Example("y", "b", "f:4")], 8)
    task.set_class_weights(items)
    torch.testing.assert_close(task.class_weights, torch.tensor([4 / (2 * 3), 4 / (2 * 1)]))


def test_template_keeps_its_words_when_the_text_is_cut(tiny_model_dir):
    _, tokenizer = load_model(tiny_model_dir, progress=False)
    ids = encode_texts(tokenizer, ["the movie was good " * 20], 30, "Review: {text}\nSentiment:")[0]
    suffix = tokenizer.encode("\nSentiment:", add_special_tokens=False)
    assert len(ids) == 30 and ids[-len(suffix):] == suffix
    with pytest.raises(FinegrainError, match="data.template: takes"):
        encode_texts(tokenizer, ["x"], 8, "Review: {text}\nSentiment:")


def test_multi_label_training_end_to_end(tiny_model_dir, tmp_path):
    rng = random.Random(0)
    rows = []
    for _ in range(80):
        labels = sorted(rng.sample(["film", "music", "food"], rng.randint(1, 2)))
        rows.append({"text": " and ".join(f"the {label} was great" for label in labels), "label": labels})
    data = tmp_path / "multi.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"name": str(tiny_model_dir)}, "data": {"train": str(data), "multi_label": True},
        "lora": {"targets": "all-linear"}, "train": {"epochs": 3, "lr": 0.01, "batch_size": 8, "threads": 1},
    }))
    assert main(["train", str(config), "--output", str(tmp_path / "run")]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())["test"]
    assert {"subset_accuracy", "hamming_loss", "samples"} <= metrics.keys()


def test_early_stopping_with_patience(tiny_model_dir, tmp_path):
    rows = [{"text": f"text number {i}", "label": random.Random(i).choice("ab")} for i in range(120)]  # no signal
    data = tmp_path / "noise.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"name": str(tiny_model_dir)}, "data": {"train": str(data)},
        "train": {"epochs": 20, "lr": 1e-5, "batch_size": 16, "patience": 2, "threads": 1, "metric": "macro_f1"},
    }))
    assert main(["train", str(config), "--output", str(tmp_path / "run")]) == 0
    summary = json.loads((tmp_path / "run" / "metrics.json").read_text())["train"]
    assert summary["stopped_early"] and summary["steps"] < 20 * 6
    evaluations = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
                   if '"validation"' in line]
    best = max(e["macro_f1"] for e in evaluations)
    assert all(e["macro_f1"] <= best for e in evaluations[-2:]) and len(evaluations) >= 3


class _FakeTokenizer:
    add_bos = False

    def encode_batch(self, texts, add_special_tokens=True):
        return [[ord(c) for c in t] for t in texts]


def test_heads_start_as_transformers_heads_do(tiny_config):
    """Every task's linear head starts at normal(0, 0.02), as transformers' `score` layers: the
    hidden^-0.5 draw of before gave confident random logits that cost AdaLoRA ~7 points (docs/METHODS.md)."""
    from dataclasses import replace

    from transformers import LlamaConfig as HFConfig
    from transformers import LlamaForSequenceClassification

    from finegrain.model.llama import LlamaModel
    from finegrain.tasks.classification import SequenceClassifier
    from finegrain.tasks.relation import RelationClassifier
    from finegrain.tasks.tokens import TokenClassifier

    torch.manual_seed(0)
    backbone = LlamaModel(replace(tiny_config, hidden_size=1024, num_layers=1))
    theirs = LlamaForSequenceClassification(HFConfig(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                                                     num_attention_heads=4, num_labels=8)).score.weight
    for head in (SequenceClassifier(backbone, 8).score, TokenClassifier(backbone, 8).score,
                 RelationClassifier(backbone, [1, 2, 3, 4], 8).score):
        weight = head.weight.detach()
        assert abs(float(weight.mean())) < 0.002
        assert float(weight.std()) == pytest.approx(0.02, rel=0.05)  # 8,192 or more draws: a 1% spread
    assert float(theirs.detach().std()) == pytest.approx(0.02, rel=0.1)  # 512 draws
