"""`finegrain interpolate` on the tiny model: θ(α) = θ_base + α (θ_tuned − θ_base) is the run's
adapter scaled by α (LoRA: B times α) or the mix of a full run's and its base's weights; the
scores, interpolation.json and the plot; --save writes a run that finegrain.load reads; errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import finegrain
from finegrain.cli import main
from finegrain.errors import FinegrainError
from finegrain.interpolate import Interpolation, parse_alphas
from finegrain.peft import lora_layers
from finegrain.peft.lora import LoraConfig

TEXTS = ["good film 3", "bad film 1 bad", "good", "bad film"]


def write_texts(path, n: int = 64):
    rows = [{"text": f"{'good' if i % 2 else 'bad'} film {i % 5}", "label": "fresh" if i % 2 else "rotten"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def train(model_dir, data, output, *extra: str) -> Path:
    assert main(["train", "--model", str(model_dir), "--data", str(data), "--output", str(output), "--set", "train.epochs=2",
                 "--batch-size", "8", "--set", "data.max_length=12", "--set", "train.threads=1", "--set", "train.lr=1e-2",
                 "--set", "lora.layers=null", "--set", "head.tfidf_mix=0", "--set", "head.init=random", *extra]) == 0
    return Path(output)


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("interpolate-runs")
    data = write_texts(root / "data.jsonl")
    return {"lora": train(tiny_model_dir, data, root / "lora"),
            "full": train(tiny_model_dir, data, root / "full", "--set", "peft.method=full", "--set", "train.lr=1e-3")}


def logits(model, task, tokenizer, data_config, texts=TEXTS):
    items = task.encode(tokenizer, task.examples_from_inputs(texts, data_config), 12)
    with torch.no_grad():
        return model(task.collate(items, tokenizer.pad_token_id))


def test_parse_alphas():
    assert parse_alphas("0,0.5,1") == [0.0, 0.5, 1.0]
    assert parse_alphas("0,0.1,...,1") == [round(0.1 * i, 10) for i in range(11)]
    assert parse_alphas("1.5, 1, ..., 0") == [1.5, 1.0, 0.5, 0.0]
    for bad, message in [("0,x", "'x' .* is not a number"), ("0,1,...", "start,second,...,end"), ("0,0,...,1", "never reaches"),
                         ("", "no value"), ("0,nan", "not a finite number")]:
        with pytest.raises(FinegrainError, match=f"--alphas: .*{message}"):
            parse_alphas(bad)


def test_lora_alpha_scales_the_adapter(runs):
    interpolation = Interpolation(runs["lora"])
    predictor = finegrain.load(runs["lora"])
    task, tokenizer, data = predictor.task, predictor.tokenizer, predictor.config.data
    assert sorted(interpolation.pairs) == sorted(f"{name}.weight" for name in lora_layers(predictor.model))  # only these differ
    scalings = {name: layer.active.scaling for name, layer in lora_layers(predictor.model).items()}
    for alpha in (1.0, 0.5, 0.0, 1.5):
        interpolation.set_alpha(alpha)
        for name, layer in lora_layers(predictor.model).items():
            layer.active.scaling = scalings[name] * alpha  # the adapter's change of each weight, times alpha
        expected = logits(predictor.model, task, tokenizer, data)
        torch.testing.assert_close(logits(interpolation.model, task, tokenizer, data), expected, atol=1e-5, rtol=1e-5)


def test_cli_scores_writes_json_and_plot_and_saves_the_best_lora_run(runs, tmp_path, capsys):
    run = runs["lora"]
    saved = tmp_path / "best"
    assert main(["interpolate", str(run), "--alphas", "0,0.5", "--save", str(saved)]) == 0
    assert "best alpha" in capsys.readouterr().out
    results = json.loads((run / "interpolation.json").read_text())
    assert [p["alpha"] for p in results["points"]] == [0.0, 0.5] and results["metric"] == "macro_f1"
    assert set(results["points"][0]) == {"alpha", "validation", "test"}
    assert (run / "interpolation.png").read_bytes()[:4] == b"\x89PNG"
    best = results["best_alpha"]
    assert results["points"][[0.0, 0.5].index(best)]["validation"]["macro_f1"] == max(p["validation"]["macro_f1"] for p in results["points"])
    # The saved run: the same adapter with B times the best alpha, the same head; finegrain.load reads it.
    a = load_file(run / "adapter" / "adapter_model.safetensors")
    b = load_file(saved / "adapter" / "adapter_model.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key] * best if "lora_B" in key else a[key])
    interpolation = Interpolation(run)
    interpolation.set_alpha(best)
    loaded = finegrain.load(saved)
    torch.testing.assert_close(logits(loaded.model, loaded.task, loaded.tokenizer, loaded.config.data),
                               logits(interpolation.model, loaded.task, loaded.tokenizer, loaded.config.data), atol=1e-5, rtol=1e-5)
    # alpha 1 is the run as trained: its validation score is the run's own.
    assert main(["interpolate", str(run), "--alphas", "1"]) == 0
    trained = json.loads((run / "metrics.json").read_text())["validation"]["macro"]["f1"]
    assert json.loads((run / "interpolation.json").read_text())["points"][0]["validation"]["macro_f1"] == pytest.approx(trained)


def test_full_alpha_mixes_the_weights_and_saves_a_full_run(runs, tiny_model_dir, tmp_path):
    interpolation = Interpolation(runs["full"])
    base = load_file(tiny_model_dir / "model.safetensors")
    tuned = load_file(runs["full"] / "model" / "model.safetensors")
    key = "model.layers.1.mlp.down_proj.weight"
    assert set(interpolation.pairs) == {k for k in base if not torch.equal(base[k], tuned[k])} and key in interpolation.pairs
    interpolation.set_alpha(0.3)
    torch.testing.assert_close(interpolation.model.get_parameter(key), base[key] + 0.3 * (tuned[key] - base[key]))
    saved = tmp_path / "full-best"
    assert main(["interpolate", str(runs["full"]), "--alphas", "0.3", "--save", str(saved)]) == 0
    assert (saved / "model" / "config.json").is_file() and not (saved / "adapter").exists()
    loaded = finegrain.load(saved)
    assert loaded.config.peft.method == "full"
    torch.testing.assert_close(logits(loaded.model, loaded.task, loaded.tokenizer, loaded.config.data),
                               logits(interpolation.model, loaded.task, loaded.tokenizer, loaded.config.data), atol=1e-5, rtol=1e-5)


def test_user_errors_are_one_line(runs, tmp_path, capsys, monkeypatch):
    def error(*args, fragments=()):
        assert main(["interpolate", *args]) == 1
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(lines) == 1 and "internal error" not in lines[0], lines
        for fragment in fragments:
            assert fragment in lines[0], lines[0]

    error(str(tmp_path), fragments=["not a finegrain run directory"])
    error(str(runs["lora"]), "--alphas", "0,half", fragments=["--alphas: 'half'"])
    error(str(runs["lora"]), "--save", str(runs["full"]), fragments=["already exists", "--save"])
    monkeypatch.setattr(LoraConfig, "mergeable", False, raising=False)  # as prompt and prefix tuning say
    error(str(runs["lora"]), fragments=["peft.method lora cannot be merged"])


def test_help():
    result = subprocess.run([sys.executable, "-m", "finegrain.cli", "interpolate", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--alphas" in result.stdout and "--save" in result.stdout


def test_bitfit_added_biases_start_from_zero(tiny_model_dir, tmp_path):
    """A bias the method added has no base value: θ_base holds zero there, so α = 0 drops it."""
    run = train(tiny_model_dir, write_texts(tmp_path / "data.jsonl"), tmp_path / "bitfit", "--set", "peft.method=bitfit",
                "--set", "train.recipe=false")
    interpolation = Interpolation(run)
    key = "model.layers.1.mlp.up_proj.bias"
    assert key in interpolation.pairs and not interpolation.pairs[key][1].any()
    predictor = finegrain.load(run)
    task, tokenizer, data = predictor.task, predictor.tokenizer, predictor.config.data
    torch.testing.assert_close(logits(interpolation.model, task, tokenizer, data), logits(predictor.model, task, tokenizer, data),
                               atol=1e-5, rtol=1e-5)
    interpolation.set_alpha(0.5)
    torch.testing.assert_close(interpolation.model.get_parameter(key), interpolation.pairs[key][2] / 2)
