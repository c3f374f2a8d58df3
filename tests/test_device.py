"""Devices (`train.device`, `--device`): the CPU path as before, one-line errors for a device torch
does not see, and (marked `cuda`, run where a GPU is present) a CUDA run equal to the CPU run."""

import json

import pytest
import torch

import finegrain
import finegrain.device
from finegrain.cli import main
from finegrain.config import load_config
from finegrain.device import place, resolve_device, to_device
from finegrain.errors import FinegrainError
from finegrain.run import run_device
from test_train import NEGATIVE, POSITIVE, write_config, write_data

CUDA = torch.cuda.is_available()
NO_CUDA_MESSAGE = "train.device: cuda, but torch sees no CUDA device; use cpu or auto"


@pytest.fixture
def no_cuda(monkeypatch):
    """This machine as one without CUDA, whatever it has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_auto_is_the_cpu_without_cuda(no_cuda):
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")


def test_a_device_torch_does_not_see_is_one_line(no_cuda):
    with pytest.raises(FinegrainError, match="^" + NO_CUDA_MESSAGE + "$"):
        resolve_device("cuda")
    with pytest.raises(FinegrainError, match="^--device: cuda, but torch sees no CUDA device"):
        resolve_device("cuda", "--device")
    with pytest.raises(FinegrainError, match="^train.device: 'gpu' is not a device; use auto, cpu, cuda or mps$"):
        resolve_device("gpu")


def test_train_device_is_validated_with_the_config():
    with pytest.raises(FinegrainError, match="train.device"):
        load_config(None, ["data.train=x.jsonl", "train.device=gpu"])
    assert load_config(None, ["data.train=x.jsonl"]).train.device == "auto"


def test_train_refuses_an_unseen_device_before_the_model_loads(no_cuda, tmp_path, monkeypatch):
    import finegrain.run

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(finegrain.run, "load_model", never)
    config = write_config(tmp_path / "c.yaml", tmp_path / "no-model", write_data(tmp_path / "d.jsonl", 8), device="cuda")
    with pytest.raises(FinegrainError, match="^" + NO_CUDA_MESSAGE + "$"):
        finegrain.run.train(load_config(str(config), [f"output={tmp_path / 'run'}"]), progress=False)
    assert not (tmp_path / "run").exists()


def test_a_quantised_base_stays_on_the_cpu(no_cuda):
    config = load_config(None, ["data.train=x.jsonl", "model.quantize=int8"])
    assert run_device(config) == torch.device("cpu")  # auto: the int8 kernels are CPU kernels
    config.train.device = "cuda"
    with pytest.raises(FinegrainError, match="^train.device: cuda, but model.quantize: int8 runs on finegrain's CPU"):
        run_device(config)


def test_on_the_cpu_nothing_is_copied_or_hooked(tiny_model):
    batch = {"input_ids": torch.ones(2, 3, dtype=torch.long), "lengths": torch.tensor([3, 3]), "names": ["a", "b"]}
    assert to_device(batch, torch.device("cpu")) is batch  # the same dict, the same tensors
    assert place(tiny_model, torch.device("cpu")) is tiny_model
    assert not tiny_model._forward_pre_hooks


def test_cli_cuda_without_cuda_is_one_line(tiny_model_dir, tmp_path, capsys, no_cuda):
    data = write_data(tmp_path / "data.jsonl", 24)
    config = write_config(tmp_path / "run.yaml", tiny_model_dir, data, epochs=1)
    assert main(["train", str(config), "--output", str(tmp_path / "run"), "--device", "cuda"]) != 0
    err = capsys.readouterr().err.strip()
    assert err.endswith(NO_CUDA_MESSAGE) and "\n" not in err
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_cpu_and_auto_without_cuda_train_the_same_run(tiny_model_dir, tmp_path, capsys, no_cuda):
    """`device: cpu` and `auto` on a machine without CUDA are the CPU run, to the bit; `--device`
    on predict and evaluate reads the same run."""
    data = write_data(tmp_path / "data.jsonl", 48)
    results = {}
    for device in ("cpu", "auto"):
        config = write_config(tmp_path / f"{device}.yaml", tiny_model_dir, data, epochs=1, device=device)
        assert main(["train", str(config), "--output", str(tmp_path / device)]) == 0
        results[device] = json.loads((tmp_path / device / "metrics.json").read_text())
        assert results[device]["train"]["device"] == "cpu" and "peak_memory_mb" not in results[device]["train"]
    assert results["cpu"]["test"] == results["auto"]["test"]
    texts = [POSITIVE[0], NEGATIVE[1]]
    assert finegrain.load(tmp_path / "cpu").predict(texts) == finegrain.load(tmp_path / "auto").predict(texts)
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "cpu"), "--data", str(data), "--device", "cpu"]) == 0
    assert main(["predict", str(tmp_path / "cpu"), "--input", str(data), "--device", "cuda"]) != 0
    assert capsys.readouterr().err.strip().endswith("--device: cuda, but torch sees no CUDA device; use cpu or auto")


# -- on a CUDA device (pytest -m cuda; skipped without one) ---------------------------------------


def _train(tiny_model_dir, tmp_path, device: str, data, *overrides: str) -> dict:
    # No dropout: CUDA and the CPU draw different masks. No TF-IDF mix: the model's own probabilities
    # are compared. lora.layers [-1]: the prefix cache runs too.
    config = write_config(tmp_path / f"{device}.yaml", tiny_model_dir, data, epochs=2, device=device)
    assert main(["train", str(config), "--output", str(tmp_path / device), "--set", "lora.dropout=0", "--set", "head.tfidf_mix=0",
                 *(a for o in overrides for a in ("--set", o))]) == 0
    return json.loads((tmp_path / device / "metrics.json").read_text())


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_cuda_run_matches_the_cpu_run(tiny_model_dir, tmp_path):
    """Training on CUDA (PyTorch's ops, SDPA) ends where the CPU run (C kernels, oneDNN) ends: the
    same test predictions to float tolerance; CUDA's peak memory is recorded."""
    data = write_data(tmp_path / "data.jsonl", 96)
    cpu = _train(tiny_model_dir, tmp_path, "cpu", data)
    cuda = _train(tiny_model_dir, tmp_path, "cuda", data)
    assert cuda["train"]["device"] == "cuda" and cuda["train"]["peak_memory_mb"] > 0
    assert cuda["train"]["frozen_prefix_layers"] == cpu["train"]["frozen_prefix_layers"] == 1
    assert cuda["test"]["accuracy"] == cpu["test"]["accuracy"]

    texts = [POSITIVE[0], NEGATIVE[1], "good and dull", "a fine story told badly"]
    on_cpu = finegrain.run.Predictor(tmp_path / "cpu", device="cpu").predict(texts)
    on_cuda = finegrain.run.Predictor(tmp_path / "cuda", device="cuda").predict(texts)
    cuda_read_on_cpu = finegrain.run.Predictor(tmp_path / "cuda", device="cpu").predict(texts)
    for a, b, c in zip(on_cpu, on_cuda, cuda_read_on_cpu):
        assert a["label"] == b["label"] == c["label"]
        for label in a["probabilities"]:
            assert b["probabilities"][label] == pytest.approx(a["probabilities"][label], abs=2e-3)  # trained apart
            assert b["probabilities"][label] == pytest.approx(c["probabilities"][label], abs=1e-5)  # one adapter


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_no_cuda_tensor_reaches_a_c_kernel(tiny_model_dir, tmp_path, monkeypatch):
    """The fused kernels and oneDNN decline CUDA tensors: a training run on CUDA never loads the C library."""
    from finegrain.model import native

    calls = []
    library = native.library
    monkeypatch.setattr(native, "library", lambda *a, **k: calls.append(1) or library(*a, **k))
    data = write_data(tmp_path / "data.jsonl", 32)
    _train(tiny_model_dir, tmp_path, "cuda", data, "train.recipe=off")  # the recipe's probe runs on the CPU
    assert not calls
    assert finegrain.device.peak_memory_mb(torch.device("cuda")) > 0
