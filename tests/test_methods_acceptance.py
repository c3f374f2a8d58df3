"""The acceptance command of every adaptation method on the real default model:
`finegrain train examples/rotten_tomatoes.yaml --set peft.method=M`, on a slice of the data
(16 training texts, 2 steps, 8 validation and 8 test texts, 8 layers), through the CLI's own `main`.

The model is read once for the module and each run gets a copy of it (`finegrain.run.load_model`
wrapped), so the ten runs cost ten trainings, not ten loads of the GGUF.
"""

import copy
import json
from pathlib import Path

import pytest

import finegrain.run
from finegrain.cli import main
from finegrain.peft import METHODS

CONFIG = Path(__file__).resolve().parent.parent / "examples" / "rotten_tomatoes.yaml"
# 16 training texts in 2 steps, 8 validation and 8 test texts, the 8 lowest of the config's 20 layers
# (its peft.layers, the top 6, still apply); no TF-IDF baselines.
SLICE = ["--set", "data.max_train_examples=16", "--set", "data.max_eval_examples=8", "--set", "train.batch_size=8",
         "--set", "model.num_layers=8", "--set", "data.baselines=false"]


@pytest.fixture(scope="module")
def shared_model():
    """`finegrain.run.load_model` reading the default model once; every call gets its own deep copy of
    the model (training changes it) and the one tokenizer (nothing changes it)."""
    loaded = {}
    real = finegrain.run.load_model

    def load_model(name, *args, **kwargs):
        key = (name, repr(args), repr(sorted(kwargs.items(), key=lambda item: item[0])))
        if kwargs.get("quantize") or name not in (None, "smollm2-135m"):
            return real(name, *args, **kwargs)
        if key not in loaded:
            loaded[key] = real(name, *args, **kwargs)
        model, tokenizer = loaded[key]
        return copy.deepcopy(model), tokenizer

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(finegrain.run, "load_model", load_model)
        yield


@pytest.mark.real_model
@pytest.mark.parametrize("method", list(METHODS))
def test_the_acceptance_command_trains_every_method(method, shared_model, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", str(CONFIG), "--set", f"peft.method={method}", *SLICE, "--output", str(run)]) == 0, \
        capsys.readouterr().err[-2000:]
    out = capsys.readouterr().out
    assert "trained 16 examples, 2 steps" in out and "accuracy" in out, out[-2000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0.0 <= metrics["test"]["accuracy"] <= 1.0 and metrics["test"]["num_examples"] == 8
    assert (run / "config.yaml").exists()
