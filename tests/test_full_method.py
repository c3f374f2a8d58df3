"""peft.method: full on the tiny model: which weights train (and the prefix cache below them), the
model directory a run leaves (transformers loads it), finegrain.load, the server, NER, exact resume."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import finegrain
from finegrain.cli import main
from finegrain.checkpoint.load import load_model
from finegrain.config import RunConfig
from finegrain.errors import FinegrainError
from finegrain.model.llama import Llama
from finegrain.peft import METHODS, method_config
from finegrain.peft.full import FullConfig
from finegrain.peft.full_files import HEAD_WEIGHTS
from finegrain.tasks.classification import SequenceClassifier


def write_texts(path, n: int = 48):
    rows = [{"text": f"{'good' if i % 2 else 'bad'} film {i % 5}", "label": "fresh" if i % 2 else "rotten"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def full_args(model_dir, data, output, *extra: str) -> list[str]:
    return ["train", "--model", str(model_dir), "--data", str(data), "--output", str(output), "--set", "train.epochs=2",
            "--batch-size", "8", "--set", "data.max_length=12", "--set", "train.threads=1", "--set", "train.lr=1e-3",
            "--set", "peft.method=full", "--set", "head.tfidf_mix=0",
            "--set", "head.init=random",  # LP-FT may keep its step-0 head: these tests check the trained layers
            "--set", "head.pooling=last", *extra]  # transformers' classifiers read the last token


@pytest.fixture(scope="module")
def full_run(tiny_model_dir, tmp_path_factory):
    """A full run that trains only the last of the two layers: layer 0 is cached, never changed."""
    root = tmp_path_factory.mktemp("full")
    assert main(full_args(tiny_model_dir, write_texts(root / "data.jsonl"), root / "run", "--set", "peft.layers=[-1]")) == 0
    return root / "run"


def test_full_is_a_method_of_the_table_and_picks_its_layers(tiny_config):
    assert METHODS["full"] is FullConfig
    config = RunConfig()
    config.peft.method, config.peft.options = "full", {"layers": [-1]}
    full = method_config(config, num_layers=2, modules_to_save=["score"])
    assert full == FullConfig(layers=[1], modules_to_save=["score"])
    model = SequenceClassifier(Llama(tiny_config).model, 2)
    full.select(model)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {n for n, _ in model.named_parameters() if n.startswith(("model.layers.1.", "model.norm.", "score."))}
    FullConfig(layers=None, modules_to_save=["score"]).select(model)
    assert all(p.requires_grad for p in model.parameters())  # embeddings too
    config.peft.options = {"layers": [5]}
    with pytest.raises(FinegrainError, match=r"peft.layers: \[5\] is outside the model's 2 layers"):
        method_config(config, num_layers=2, modules_to_save=["score"])
    config.peft.options = {"rank": 4}
    with pytest.raises(FinegrainError, match="peft.rank"):
        method_config(config, num_layers=2, modules_to_save=["score"])


def test_a_full_run_trains_the_upper_layer_over_the_cached_lower_one(full_run, tiny_model_dir):
    results = json.loads((full_run / "metrics.json").read_text())
    assert results["train"]["frozen_prefix_layers"] == 1
    assert not (full_run / "adapter").exists()
    base = load_file(tiny_model_dir / "model.safetensors")
    tuned = load_file(full_run / "model" / "model.safetensors")
    assert set(tuned) == set(base)  # LlamaForCausalLM's names, tied embeddings saved once
    for key in base:
        same = torch.equal(base[key], tuned[key])
        assert same == (not key.startswith(("model.layers.1.", "model.norm."))), key
    assert set(load_file(full_run / "model" / HEAD_WEIGHTS)) == {"score.weight"}


def test_the_model_directory_loads_in_transformers_and_finegrain_load_predicts(full_run):
    import transformers

    ours = finegrain.load(full_run)
    texts = ["good film 3", "bad film 1 bad"]
    expected = torch.tensor([[p["probabilities"][label] for label in ours.task.labels] for p in ours.predict(texts)])
    hf = transformers.AutoModel.from_pretrained(full_run / "model").eval()  # the trained decoder as a LlamaModel
    score = load_file(full_run / "model" / HEAD_WEIGHTS)["score.weight"]
    with torch.no_grad():
        for text, probs in zip(texts, expected):
            ids = ours.tokenizer.encode(text)[: ours.config.data.max_length]
            last = hf(torch.tensor([ids])).last_hidden_state[0, -1]
            torch.testing.assert_close((last @ score.t()).softmax(-1), probs, atol=1e-4, rtol=0)
    assert main(["predict", str(full_run), "--input", str(full_run.parent / "data.jsonl"),
                 "--output", str(full_run.parent / "p.jsonl")]) == 0
    assert len((full_run.parent / "p.jsonl").read_text().splitlines()) == 48


def test_the_server_holds_a_full_run_beside_a_lora_run(full_run, tiny_model_dir, tmp_path):
    from finegrain.serve.engine import Engine  # noqa: F401  (the server's modules import)
    from finegrain.serve.models import ModelRegistry

    lora = tmp_path / "lora"
    assert main(["train", "--model", str(tiny_model_dir), "--data", str(full_run.parent / "data.jsonl"), "--output", str(lora),
                 "--set", "train.epochs=1", "--batch-size", "8", "--set", "train.threads=1", "--set", "head.tfidf_mix=0"]) == 0
    registry = ModelRegistry([("full", full_run), ("lora", lora)])
    registry.load()
    full = registry.runs["full"]
    assert full.base is not registry.runs["lora"].base  # its own model is its base
    assert full.adapter_bytes == 2 * 64 * 4  # the head alone
    texts = ["good film 3", "bad film 1 bad"]
    items = full.task.encode(full.tokenizer, full.task.examples_from_inputs(texts, full.config.data), 12)
    with full.base.use("full"), torch.inference_mode():
        served = full.task.predict(full.model, items, full.tokenizer.pad_token_id, 8)
    assert served == finegrain.load(full_run).predict(texts)


def test_full_ner_trains_every_weight_and_predicts(tiny_model_dir, tmp_path):
    words = ["Paris", "Berlin", "Anna", "Tom", "the", "went", "to", "saw"]
    rows = []
    for i in range(40):
        city, name = words[i % 2], words[2 + i % 2]
        rows.append({"tokens": [name, "went", "to", city], "tags": ["B-PER", "O", "O", "B-LOC"]})
    data = tmp_path / "ner.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "ner"
    assert main(["train", "--model", str(tiny_model_dir), "--data", str(data), "--output", str(run), "--set", "task=ner",
                 "--set", "train.epochs=1", "--batch-size", "8", "--set", "train.threads=1", "--set", "peft.method=full",
                 "--set", "model.num_layers=2"]) == 0
    results = json.loads((run / "metrics.json").read_text())
    assert results["train"]["frozen_prefix_layers"] == 0  # the embeddings train
    base = load_file(tiny_model_dir / "model.safetensors")
    tuned = load_file(run / "model" / "model.safetensors")
    assert not torch.equal(base["model.embed_tokens.weight"], tuned["model.embed_tokens.weight"])
    assert set(load_file(run / "model" / HEAD_WEIGHTS)) == {"score.weight", "score.bias"}
    predicted = finegrain.load(run).predict([["Anna", "went", "to", "Paris"]])[0]
    assert predicted["words"] == ["Anna", "went", "to", "Paris"] and len(predicted["tags"]) == 4


def test_a_killed_full_run_resumes_exactly(tiny_model_dir, tmp_path):
    data = write_texts(tmp_path / "data.jsonl", 64)
    extra = ("--set", "train.checkpoint_every=2", "--set", "train.eval_every=3", "--set", "peft.layers=[-1]")
    assert main(full_args(tiny_model_dir, data, tmp_path / "straight", *extra)) == 0
    killed = tmp_path / "killed"
    env = {**os.environ, "FINEGRAIN_FAULT": "train_step:5", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "finegrain.cli", *full_args(tiny_model_dir, data, killed, *extra)],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    assert json.loads((killed / "checkpoint" / "state.json").read_text())["step"] == 4
    assert main(["train", "--resume", str(killed)]) == 0
    for name in ("model.safetensors", HEAD_WEIGHTS):
        assert (killed / "model" / name).read_bytes() == (tmp_path / "straight" / "model" / name).read_bytes(), name
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (tmp_path / "straight", killed))
    assert a["test"]["accuracy"] == b["test"]["accuracy"] and a["train"]["best_step"] == b["train"]["best_step"]


def test_a_full_instruct_run_generates_from_its_own_model_and_exports_to_gguf(tiny_model_dir, tmp_path):
    from finegrain.export import export_run
    from finegrain.serve.models import ModelRegistry

    chat = Path(__file__).resolve().parent.parent / "examples" / "data" / "instruct" / "train.jsonl"
    run = tmp_path / "assistant"
    assert main(["train", "--model", str(tiny_model_dir), "--data", str(chat), "--output", str(run), "--set", "task=instruct",
                 "--set", "train.epochs=1", "--batch-size", "8", "--set", "data.max_length=96", "--set", "train.threads=1",
                 "--set", "peft.method=full", "--set", "train.lr=1e-3", "--set", "instruct.max_new_tokens=2"]) == 0
    ours = finegrain.load(run).model.llama
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        expected = ours(ids)
        assert not torch.allclose(load_model(tiny_model_dir, progress=False)[0](ids), expected, atol=1e-4)  # it trained
    registry = ModelRegistry([("assistant", run)])
    registry.load()
    served = registry.runs["assistant"]
    assert served.model is None and served.base.name == "assistant-model"  # generation runs the run's own model
    with served.base.use("assistant"), torch.no_grad():
        torch.testing.assert_close(served.base.llama(ids), expected)
    path = export_run(run, "gguf", tmp_path / "assistant.gguf", "f16")
    with torch.no_grad():
        back = load_model(path, progress=False)[0](ids)
    torch.testing.assert_close(back, expected, atol=1e-3 * expected.abs().max().item(), rtol=0)


def test_a_quantised_base_is_refused_in_one_line_and_leaves_no_run(tiny_model_dir, tmp_path, capsys):
    data = write_texts(tmp_path / "data.jsonl")
    assert main(full_args(tiny_model_dir, data, tmp_path / "q", "--set", "model.quantize=int8", "--set", "train.recipe=false")) == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "peft.method: full trains every weight" in lines[0] and "model.quantize" in lines[0], lines
    assert not (tmp_path / "q").exists()
