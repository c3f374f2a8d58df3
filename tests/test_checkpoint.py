"""Hugging Face directories: loading (single, sharded), saving, and the errors a user can cause."""

import json
import shutil

import huggingface_hub
import pytest
import torch
import transformers
from safetensors.torch import save_file
from torch.testing import assert_close

from finegrain.checkpoint.hf import load_hf_dir
from finegrain.checkpoint.load import build_model, load_model, resolve_model
from finegrain.checkpoint.save import save_pretrained
from finegrain.errors import FinegrainError


def test_save_load_round_trip_ours_and_transformers(tiny_model_dir, tmp_path):
    model, tokenizer = load_model(tiny_model_dir, progress=False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)  # not the all-default norms
    out = save_pretrained(model, tokenizer, tmp_path / "saved")
    ids = torch.tensor([tokenizer.encode("The capital of France is Paris.")])

    ours_again, tokenizer_again = load_model(out, progress=False)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = model(ids)
        assert_close(ours_again(ids), expected, atol=1e-5, rtol=0)
        assert_close(theirs(ids).logits, expected, atol=1e-4, rtol=0)
    assert tokenizer_again.encode("The capital of France is Paris.") == ids[0].tolist()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tokenizer("The capital of France is Paris.")["input_ids"] == ids[0].tolist()


def test_sharded_checkpoint_with_index(tiny_model_dir, tmp_path):
    model, _ = load_model(tiny_model_dir, progress=False)
    reference = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    reference.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    checkpoint = load_hf_dir(tmp_path, progress=False)
    sharded = build_model(checkpoint.config, checkpoint.state_dict)
    ids = torch.randint(0, 200, (1, 12))
    with torch.no_grad():
        assert_close(sharded(ids), model(ids), atol=1e-5, rtol=0)


def test_missing_shard_named(tiny_model_dir, tmp_path):
    reference = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    reference.save_pretrained(tmp_path, max_shard_size="100KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(FinegrainError, match=shard.name):
        load_hf_dir(tmp_path, progress=False)


def test_truncated_safetensors(tiny_model_dir, tmp_path):
    for f in tiny_model_dir.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(FinegrainError, match=r"model\.safetensors: corrupt or truncated"):
        load_hf_dir(tmp_path, progress=False)


def test_missing_config_and_weights(tmp_path):
    with pytest.raises(FinegrainError, match="config.json: not found"):
        load_hf_dir(tmp_path, progress=False)
    (tmp_path / "config.json").write_text(json.dumps(transformers.LlamaConfig(num_hidden_layers=1).to_dict()))
    with pytest.raises(FinegrainError, match="no \\*.safetensors"):
        load_hf_dir(tmp_path, progress=False)


def test_a_run_directory_is_not_a_model(tmp_path):
    (tmp_path / "config.yaml").write_text("task: classification\n")
    with pytest.raises(FinegrainError, match=r"a finegrain run, not a model; .* `finegrain export .* --format hf"):
        load_hf_dir(tmp_path, progress=False)


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 10}))
    save_file({"x": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(FinegrainError, match="model_type 'gpt2' is not supported"):
        load_hf_dir(tmp_path, progress=False)


def test_missing_path_and_unknown_names(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FinegrainError, match="no such file or directory"):
        resolve_model(str(tmp_path / "nothing.gguf"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(FinegrainError, match="some-org/some-model: not a local path and not in the Hugging Face cache; download it first"):
        resolve_model("some-org/some-model")


def test_hub_id_loads_from_the_local_cache_only(tiny_model_dir, tmp_path, monkeypatch):
    # The layout `hf download` leaves: refs/main names the snapshot holding the files.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    repo = tmp_path / "models--some-org--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    shutil.copytree(tiny_model_dir, repo / "snapshots" / ("0" * 40))

    calls = []
    snapshot_download = huggingface_hub.snapshot_download

    def no_network(repo_id, **kwargs):
        calls.append(kwargs["local_files_only"])
        return snapshot_download(repo_id, **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    assert resolve_model("some-org/tiny") == repo / "snapshots" / ("0" * 40)
    model, tokenizer = load_model("some-org/tiny", progress=False)
    reference, _ = load_model(tiny_model_dir, progress=False)
    ids = torch.tensor([tokenizer.encode("cached")])
    with torch.no_grad():
        assert_close(model(ids), reference(ids), atol=0, rtol=0)
    assert calls == [True, True]  # never a download
