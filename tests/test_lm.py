"""`task: lm`: domain-adaptive pretraining on plain text, then a labelled task from that run."""

from __future__ import annotations

import json
import random

import torch
import yaml

from finegrain.cli import main
from finegrain.config import load_config
from finegrain.peft import read_adapter
from finegrain.rundir import adapter_dir
from finegrain.run import build
from finegrain.tasks.lm import LanguageModelTask, read_text
from conftest import tiny_tokenizer
from test_train import write_config, write_data


def write_corpus(path, n=60, seed=0):
    rng = random.Random(seed)
    words = "the pump valve opens when the pressure drops below the set point".split()
    paragraphs = [" ".join(rng.choice(words) for _ in range(rng.randint(6, 30))) for _ in range(n)]
    path.write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    return path


def test_paragraphs_are_documents_with_their_first_line(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("first doc\nstill first\n\n\nsecond doc\n\nthird\n", encoding="utf-8")
    examples = read_text(load_config(None, ["data.train=x.txt", "task=lm"]).data, str(path)).examples
    assert [e.text for e in examples] == ["first doc\nstill first", "second doc", "third"]
    assert [e.source for e in examples] == [f"{path}:1", f"{path}:5", f"{path}:7"]


def test_long_documents_are_cut_into_pieces_and_packed(tmp_path):
    tokenizer = tiny_tokenizer()
    examples = read_text(load_config(None, ["data.train=x.txt"]).data, str(write_corpus(tmp_path / "c.txt", 5))).examples
    rows = LanguageModelTask().encode(tokenizer, examples, 16)
    assert all(len(r.input_ids) <= 16 and len(r.targets) == len(r.input_ids) for r in rows)
    lengths = [len(tokenizer.encode(e.text, add_special_tokens=False)) + 1 for e in examples]  # with end-of-text
    assert sum(len(r.input_ids) for r in rows) == sum(n - 1 for n in lengths)  # every token but the last predicts one


def test_lm_run_lowers_perplexity_and_starts_a_classifier(tiny_model_dir, tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt")
    config = {"task": "lm", "model": {"name": str(tiny_model_dir)}, "data": {"train": str(corpus), "max_length": 32},
              "lora": {"r": 4, "alpha": 8, "targets": "all-linear"},
              "train": {"epochs": 3, "lr": 1e-2, "batch_size": 8, "threads": 1, "recipe": "off",
                        "metric": "perplexity"}}  # a metric named: checked before training
    (tmp_path / "lm.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", str(tmp_path / "lm.yaml"), "--output", str(tmp_path / "lm")]) == 0
    test = json.loads((tmp_path / "lm" / "metrics.json").read_text())["test"]
    assert test["perplexity"] < 0.5 * test["base_model"]["perplexity"], test
    assert "perplexity of the base model" in (tmp_path / "lm" / "report.md").read_text()

    classifier = load_config(write_config(tmp_path / "c.yaml", tiny_model_dir, write_data(tmp_path / "d.jsonl", 16)),
                             [f"init_from={tmp_path / 'lm'}"])
    model, _, _, _ = build(classifier, ["fresh", "rotten"], progress=False)
    _, tensors = read_adapter(adapter_dir(tmp_path / "lm"))
    own = model.state_dict()
    assert tensors and all(torch.equal(own[k], v) for k, v in tensors.items())  # the adapter carried over
    assert model.get_submodule("score").weight.requires_grad
