"""The frozen-prefix cache: exact in float32, in RAM or memory-mapped; bfloat16 storage as an approximation."""

import json

import torch
import yaml

from finegrain.cli import main
from finegrain.config import load_config
from finegrain.data.readers import Example
from finegrain.run import build
from finegrain.train.prefix_cache import compute_prefix

TEXTS = ["a gripping story", "dull and slow, badly acted", "great fun", "two hours I will never get back again"]


def tiny_classifier(model_dir):
    config = load_config(None, [f"model.name={model_dir}", "data.train=x.jsonl", "lora.layers=[-1]"])
    model, tokenizer, task, _ = build(config, ["fresh", "rotten"], progress=False)
    items = task.encode(tokenizer, [Example(t, "fresh", f"x:{i}") for i, t in enumerate(TEXTS)], 16)
    return model.eval(), task, items, tokenizer.pad_token_id


def test_cached_states_give_the_model_s_own_outputs(tiny_model_dir):
    model, task, items, pad_id = tiny_classifier(tiny_model_dir)
    with torch.no_grad():
        hidden = compute_prefix(model.model, task, items, 1, pad_id, progress=False)
        cached = model(task.collate(items, pad_id, hidden), start_layer=1)
        torch.testing.assert_close(cached, model(task.collate(items, pad_id)), rtol=1e-5, atol=1e-5)
    assert [h.shape[0] for h in hidden] == [len(item.input_ids) for item in items]


def test_a_cache_over_the_limit_is_memory_mapped_and_leaves_no_file(tiny_model_dir, tmp_path):
    model, task, items, pad_id = tiny_classifier(tiny_model_dir)
    with torch.no_grad():
        in_ram = compute_prefix(model.model, task, items, 1, pad_id, progress=False, spill_dir=tmp_path, ram_limit_bytes=10**9)
        mapped = compute_prefix(model.model, task, items, 1, pad_id, progress=False, spill_dir=tmp_path, ram_limit_bytes=0)
    for a, b in zip(in_ram, mapped):
        assert torch.equal(a, b)
    assert list(tmp_path.iterdir()) == []  # unlinked at once, still readable through the mapping
    mappings = [line for line in open("/proc/self/maps") if str(tmp_path) in line]
    assert len(mappings) == 1 and "(deleted)" in mappings[0]  # only the spilled cache is a file
    del mapped


def test_bfloat16_storage_is_close_and_half_the_size(tiny_model_dir, tmp_path):
    model, task, items, pad_id = tiny_classifier(tiny_model_dir)
    with torch.no_grad():
        exact = compute_prefix(model.model, task, items, 1, pad_id, progress=False)
        for limit in (10**9, 0):  # in RAM, and mapped as 2-byte elements
            rounded = compute_prefix(model.model, task, items, 1, pad_id, progress=False, dtype=torch.bfloat16,
                                     spill_dir=tmp_path, ram_limit_bytes=limit)
            assert rounded[0].dtype == torch.bfloat16
            for a, b in zip(exact, rounded):
                assert (b.float() - a).abs().max() <= 2**-7 * a.abs().max()


def test_training_with_a_bfloat16_memory_mapped_cache(tiny_model_dir, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": "ab"[i % 2]}) + "\n" for i, t in enumerate(TEXTS * 10)))
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"name": str(tiny_model_dir)}, "data": {"train": str(data), "max_length": 16},
        "lora": {"r": 2, "layers": [-1]},
        "train": {"epochs": 1, "batch_size": 8, "threads": 1, "prefix_cache_dtype": "bfloat16", "prefix_cache_ram_mb": 0,
                  "recipe": "off"},  # the data recipe would cut the tiny model to one layer: no frozen prefix left
    }))
    run_dir = tmp_path / "run"
    assert main(["train", str(config), "--output", str(run_dir)]) == 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["train"]["frozen_prefix_layers"] == 1 and 0 <= metrics["test"]["accuracy"] <= 1
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".prefix-cache")]
