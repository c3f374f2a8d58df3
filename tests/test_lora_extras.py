"""LoRA's extras: LoRA+ (`lr_ratio`: lora_B's learning rate), and `init: gaussian | pissa`, PiSSA's
adapter checked against PEFT's initialisation and PEFT's converted save, and trained through the CLI."""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file
from torch.testing import assert_close

import finegrain
from finegrain.cli import main
from finegrain.config import TrainConfig, load_config
from finegrain.errors import FinegrainError
from finegrain.peft import LoraConfig, inject, load_adapter, method_config, save_adapter
from finegrain.tasks.classification import ClassificationTask, Encoded
from finegrain.train.trainer import Trainer
from test_ia3 import NEGATIVE, POSITIVE, hf_model, input_ids, ours_of, write_data  # noqa: F401

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


# ---------------------------------------------------------------------------------------------- LoRA+


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_lr_ratio_gives_lora_b_its_own_learning_rate(tiny_model, tmp_path, method):
    from finegrain.peft.dora import DoraConfig

    task = ClassificationTask(["a", "b"])
    model = task.build_model(tiny_model)
    lora = LoraConfig(r=2, alpha=4, targets=("q_proj", "v_proj"), lr_ratio=16, modules_to_save=["score"])
    inject(model, lora if method == "lora" else DoraConfig(lora))
    generator = torch.Generator().manual_seed(0)
    items = [Encoded(torch.randint(3, 128, (5,), generator=generator).tolist(), i % 2) for i in range(8)]
    config = TrainConfig(lr=1e-3, head_lr=5e-3, batch_size=4, threads=1, warmup_ratio=0.0, schedule="constant")
    trainer = Trainer(model, task, items, config, tmp_path, pad_id=0, progress=False)
    rate = {id(p): group["lr"] for group in trainer.optimizer.param_groups for p in group["params"]}
    for name, param in trainer.trainable.items():
        expected = 5e-3 if name.startswith("score") else 16e-3 if name.endswith("lora_B.weight") else 1e-3
        assert rate[id(param)] == pytest.approx(expected), name
    assert sum(name.endswith("lora_B.weight") for name in trainer.trainable) == 4


def test_lr_ratio_and_init_are_lora_options(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  dataset: sms_spam\npeft:\n  lr_ratio: 16\n  init: pissa\n")
    adapter = method_config(load_config(path), num_layers=2, modules_to_save=[])
    assert (adapter.lr_ratio, adapter.init) == (16, "pissa")
    path.write_text("data:\n  dataset: sms_spam\n")
    with pytest.raises(FinegrainError, match=r"lora.lr_ratio: must be a positive number \(LoRA\+ suggests 16\) or null, got -2"):
        method_config(load_config(path, ["lora.lr_ratio=-2"]), num_layers=2, modules_to_save=[])
    with pytest.raises(FinegrainError, match="lora.init: 'olora' is unknown; use one of default, gaussian, pissa"):
        method_config(load_config(path, ["peft.init=olora"]), num_layers=2, modules_to_save=[])


def test_gaussian_init_is_written_as_peft_writes_it(hf_model, tmp_path):
    ours = ours_of(hf_model)
    config = LoraConfig(r=4, targets=("q_proj",), init="gaussian")
    torch.manual_seed(0)
    inject(ours, config)
    A = ours.model.layers[0].self_attn.q_proj.lora_A.weight
    assert abs(float(A.std()) - 1 / 4) < 0.03 and not ours.model.layers[0].self_attn.q_proj.lora_B.weight.any()
    save_adapter(ours, config, tmp_path, base_model_name_or_path="tiny")
    assert json.loads((tmp_path / "adapter_config.json").read_text())["init_lora_weights"] == "gaussian"


# ---------------------------------------------------------------------------------------------- PiSSA


def moved(ours: torch.nn.Module, theirs: torch.nn.Module, seed: int) -> None:
    """Move every trainable tensor of both models by the same amounts, as training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in ours.named_parameters():
            if param.requires_grad:
                delta = 0.05 * torch.randn(param.shape, generator=generator)
                param.add_(delta)
                theirs.get_parameter("base_model.model." + name.replace(".weight", ".default.weight")).add_(delta)


@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
def test_pissa_starts_as_peft_and_saves_as_peft_converts(hf_model, input_ids, tmp_path, rslora):
    theirs = peft.get_peft_model(copy.deepcopy(hf_model), peft.LoraConfig(
        task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights="pissa", use_rslora=rslora,
    )).eval()
    theirs.save_pretrained(tmp_path / "initial")
    ours = ours_of(hf_model)
    config = LoraConfig(r=4, alpha=8, targets=("q_proj", "v_proj"), init="pissa", use_rslora=rslora)
    inject(ours, config)
    state = {k.removeprefix("base_model.model.").replace(".default", "").replace(".base_layer", ""): v for k, v in theirs.state_dict().items()}
    for key, value in ours.state_dict().items():  # A, B from the top singular vectors; W the residual
        assert_close(value, state[key], atol=1e-5, rtol=1e-4, msg=key)
    with torch.no_grad():
        assert_close(ours(input_ids), hf_model(input_ids).logits, atol=1e-4, rtol=1e-4)  # it starts as the base

    moved(ours, theirs, seed=1)
    save_adapter(ours, config, tmp_path / "ours", base_model_name_or_path="tiny", task_type="CAUSAL_LM")
    theirs.save_pretrained(tmp_path / "peft", path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    ours_raw, peft_raw = (json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("ours", "peft"))
    for key in ("r", "lora_alpha", "init_lora_weights", "use_rslora"):
        assert ours_raw[key] == pytest.approx(peft_raw[key]), key
    ours_tensors, peft_tensors = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("ours", "peft"))
    assert set(ours_tensors) == set(peft_tensors)
    for key, value in peft_tensors.items():
        assert_close(ours_tensors[key], value, atol=1e-5, rtol=1e-4, msg=key)

    # The converted adapter on the unchanged base computes what the run computed on its residual base.
    with torch.no_grad():
        trained = ours(input_ids)
        unchanged = peft.PeftModel.from_pretrained(copy.deepcopy(hf_model), tmp_path / "ours").eval()
        assert_close(unchanged(input_ids).logits, trained, atol=1e-4, rtol=1e-4)
        back = ours_of(hf_model)
        load_adapter(back, tmp_path / "ours")
        assert_close(back(input_ids), trained, atol=1e-4, rtol=1e-4)


def test_an_unconverted_pissa_file_is_refused(hf_model, tmp_path):
    theirs = peft.get_peft_model(copy.deepcopy(hf_model), peft.LoraConfig(
        task_type="CAUSAL_LM", r=2, target_modules=["q_proj"], init_lora_weights="pissa"))
    theirs.save_pretrained(tmp_path)
    with pytest.raises(FinegrainError, match="init_lora_weights='pissa': this PiSSA adapter needs the residual base"):
        load_adapter(ours_of(hf_model), tmp_path)


def test_cli_trains_pissa_with_lora_plus_and_peft_reproduces_it_on_the_unchanged_base(tiny_model_dir, tmp_path):
    data = write_data(tmp_path / "data.jsonl", 80)
    run_dir = tmp_path / "run"
    args = ["train", "--model", str(tiny_model_dir), "--data", str(data), "--output", str(run_dir),
            "--set", "lora.init=pissa", "--set", "lora.lr_ratio=4", "--set", "lora.r=4", "--set", "lora.layers=[-1]",
            "--set", "data.max_length=16", "--set", "train.epochs=2", "--set", "train.threads=1", "--set", "train.batch_size=8",
            "--set", "head.tfidf_mix=0", "--set", "head.pooling=last"]
    assert main(args) == 0
    raw = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert (raw["r"], raw["init_lora_weights"]) == (8, True)  # rank 2r: the run's update minus PiSSA's start
    ours = finegrain.load(run_dir)
    texts = [POSITIVE[0], NEGATIVE[2] + " " + NEGATIVE[3]]
    expected = torch.tensor([[p["probabilities"][label] for label in ours.task.labels] for p in ours.predict(texts)])
    base = transformers.AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    base.config.pad_token_id = ours.tokenizer.pad_token_id
    theirs = peft.PeftModel.from_pretrained(base, run_dir / "adapter").eval()
    with torch.no_grad():
        for text, probs in zip(texts, expected):
            ids = ours.tokenizer.encode(text)[: ours.config.data.max_length]
            assert_close(theirs(torch.tensor([ids])).logits.softmax(-1)[0], probs, atol=1e-4, rtol=0)


def test_a_killed_pissa_run_resumes_to_the_uninterrupted_result(tiny_model_dir, tmp_path):
    """Resuming rebuilds PiSSA's start from the base weight (the same SVD) under the checkpoint's A and B."""
    import os
    import signal
    import subprocess
    import sys

    import yaml

    from test_ia3 import write_config

    config = write_config(tmp_path / "c.yaml", tiny_model_dir, write_data(tmp_path / "data.jsonl", 64), "lora")
    values = yaml.safe_load(config.read_text())
    values["peft"].update(init="pissa", lr_ratio=4, r=4)
    config.write_text(yaml.safe_dump(values))
    assert main(["train", str(config), "--output", str(tmp_path / "straight")]) == 0
    env = {**os.environ, "FINEGRAIN_FAULT": "checkpoint_write:3", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    killed = subprocess.run([sys.executable, "-m", "finegrain.cli", "train", str(config), "--output", str(tmp_path / "run")],
                            capture_output=True, text=True, timeout=300, env=env)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert main(["train", "--resume", str(tmp_path / "run")]) == 0
    adapter = "adapter/adapter_model.safetensors"
    assert (tmp_path / "run" / adapter).read_bytes() == (tmp_path / "straight" / adapter).read_bytes()


def test_pissa_on_a_quantized_base_is_refused_in_one_line():
    from finegrain.model.qlinear import QuantLinear, quantize_weight
    from finegrain.peft import LoraLinear

    base = QuantLinear(quantize_weight(torch.randn(16, 64), "int8"))
    with pytest.raises(FinegrainError, match="lora.init: 'pissa' replaces the base weight by its residual, which int8/4-bit"):
        LoraLinear.from_linear(base, r=2, init="pissa")
