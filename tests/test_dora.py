"""peft.method: dora: the layer against PEFT's LoRA with `use_dora: true` (files both ways, named
adapters, gradients, merge), training through the CLI (classification and NER) and exact resume.
A server holding a DoRA run beside LoRA and IA3 runs: tests/test_ia3.py."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file
from torch.testing import assert_close

import finegrain
from finegrain.cli import main
from finegrain.config import load_config
from finegrain.errors import FinegrainError
from finegrain.peft import (
    LoraConfig,
    adapter_layers,
    inject,
    load_adapter,
    merge_adapters,
    method_config,
    save_adapter,
    set_adapter,
    unmerge_adapters,
)
from finegrain.peft.dora import DoraConfig, DoraLinear
from test_ia3 import NEGATIVE, POSITIVE, hf_model, input_ids, ours_of, train_ner_run_with, write_config, write_data  # noqa: F401

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


@pytest.fixture(scope="module")
def peft_dirs(hf_model, tmp_path_factory):
    """Two PEFT DoRA adapters with random A, B and magnitudes away from the weight norms."""
    root = tmp_path_factory.mktemp("dora")
    options = {
        "a": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        "b": dict(r=2, lora_alpha=4, target_modules=["v_proj", "down_proj"], layers_to_transform=[1], use_rslora=True),
    }
    for seed, (name, kwargs) in enumerate(options.items()):
        torch.manual_seed(30 + seed)
        model = peft.get_peft_model(copy.deepcopy(hf_model), peft.LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, use_dora=True, **kwargs))
        with torch.no_grad():
            for name_, param in model.named_parameters():
                if "lora_magnitude_vector" in name_:
                    param.mul_(1 + 0.3 * torch.randn_like(param))
        model.save_pretrained(root / name)
    return {name: root / name for name in options}


def test_peft_dora_adapters_load_as_dora_and_switch_like_peft(hf_model, peft_dirs, input_ids):
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(hf_model), peft_dirs["a"], adapter_name="a").eval()
    peft_model.load_adapter(peft_dirs["b"], adapter_name="b")
    ours = ours_of(hf_model)
    assert isinstance(load_adapter(ours, peft_dirs["a"], adapter_name="a"), DoraConfig)  # LORA + use_dora: DoRA
    load_adapter(ours, peft_dirs["b"], adapter_name="b")
    assert isinstance(ours.model.layers[0].self_attn.q_proj, DoraLinear)
    layers = adapter_layers(ours).values()
    with torch.no_grad():
        bare = hf_model(input_ids).logits
        for name in ("a", "b", "a"):
            peft_model.set_adapter(name)
            set_adapter(layers, name)
            expected = peft_model(input_ids).logits
            assert not torch.allclose(expected, bare, atol=1e-3)
            assert_close(ours(input_ids), expected, atol=1e-5, rtol=1e-5)
        set_adapter(layers, None)
        assert_close(ours(input_ids), bare, atol=1e-5, rtol=1e-5)


def perturbed(model: torch.nn.Module, seed: int) -> None:
    """Move every trainable tensor, as training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.1 * torch.randn(param.shape, generator=generator))


def test_our_dora_adapter_loads_into_peft(hf_model, input_ids, tmp_path):
    ours = ours_of(hf_model)
    config = DoraConfig(LoraConfig(r=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"), layers=[1], init="gaussian"))
    torch.manual_seed(6)
    inject(ours, config)
    with torch.no_grad():
        start = ours(input_ids)
    assert_close(start, hf_model(input_ids).logits, atol=1e-5, rtol=1e-5)  # the magnitudes start at the weight norms
    perturbed(ours, 7)
    save_adapter(ours, config, tmp_path, base_model_name_or_path="tiny", task_type="CAUSAL_LM")
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    assert raw["peft_type"] == "LORA" and raw["use_dora"] is True and raw["layers_to_transform"] == [1]
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert tensors["base_model.model.model.layers.1.mlp.down_proj.lora_magnitude_vector"].shape == (64,)
    assert len(tensors) == 3 * 3
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(hf_model), tmp_path).eval()
    with torch.no_grad():
        assert_close(ours(input_ids), theirs(input_ids).logits, atol=1e-5, rtol=1e-5)
        back = ours_of(hf_model)
        load_adapter(back, tmp_path)
        assert_close(back(input_ids), ours(input_ids), atol=1e-6, rtol=1e-6)


def test_gradients_match_peft(hf_model, peft_dirs, input_ids):
    """Without dropout a training step sees PEFT's gradients for A, B and the magnitudes (the norm a constant)."""
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(hf_model), peft_dirs["a"], is_trainable=True).train()
    ours = ours_of(hf_model)
    load_adapter(ours, peft_dirs["a"])
    ours.train()
    ours(input_ids).logsumexp(-1).mean().backward()
    theirs(input_ids).logits.logsumexp(-1).mean().backward()
    grads = {n.removeprefix("base_model.model.").replace(".default", ""): p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    ours_grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert set(ours_grads) == {n.replace("lora_magnitude_vector.weight", "lora_magnitude_vector") for n in grads}
    for name, grad in grads.items():
        assert_close(ours_grads[name.replace("lora_magnitude_vector.weight", "lora_magnitude_vector")], grad, atol=1e-5, rtol=1e-4)


def test_merge_and_unmerge(hf_model, peft_dirs, input_ids):
    ours = ours_of(hf_model)
    load_adapter(ours, peft_dirs["a"])
    weights = {k: v.clone() for k, v in ours.state_dict().items() if k.endswith("proj.weight")}
    with torch.no_grad():
        adapted = ours(input_ids)
        merge_adapters(ours)
        assert_close(ours(input_ids), adapted, atol=1e-5, rtol=1e-5)
        with pytest.raises(FinegrainError, match="dora: the active adapter is merged"):
            set_adapter(adapter_layers(ours).values(), None)
        unmerge_adapters(ours)
        assert_close(ours(input_ids), adapted, atol=1e-5, rtol=1e-5)
    for key, weight in weights.items():
        assert_close(ours.state_dict()[key], weight, atol=1e-5, rtol=1e-5)


def test_options_are_loras(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  dataset: sms_spam\nlora:\n  r: 4\n  layers: [-1]\npeft:\n  method: dora\n  alpha: 8\n")
    assert method_config(load_config(path), num_layers=2, modules_to_save=["score"]) == DoraConfig(
        LoraConfig(r=4, alpha=8, dropout=0.05, layers=[1], modules_to_save=["score"])
    )
    with pytest.raises(FinegrainError, match="dora: init 'pissa' does not apply"):
        method_config(load_config(path, ["peft.init=pissa"]), num_layers=2, modules_to_save=[])
    with pytest.raises(FinegrainError, match="lora.r: must be a positive integer"):
        method_config(load_config(path, ["peft.r=0"]), num_layers=2, modules_to_save=[])


def test_cli_trains_classification_that_peft_reproduces(tiny_model_dir, tmp_path):
    data = write_data(tmp_path / "data.jsonl", 80)
    run_dir = tmp_path / "run"
    assert main(["train", str(write_config(tmp_path / "c.yaml", tiny_model_dir, data, "dora")), "--output", str(run_dir)]) == 0
    tensors = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert sum(k.endswith("lora_magnitude_vector") for k in tensors) == 2  # q_proj and v_proj of the last layer
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


def test_cli_trains_ner_and_predicts(tiny_model_dir, tmp_path):
    from serve_helpers import train_ner_run

    entities = {"LOC": ["Paris", "London"], "PER": ["Anna Smith", "John"]}
    run_dir = train_ner_run_with(tiny_model_dir, tmp_path / "ner", entities, "dora", train_ner_run)
    assert any(k.endswith("lora_magnitude_vector") for k in load_file(run_dir / "adapter" / "adapter_model.safetensors"))
    predictions = finegrain.load(run_dir).predict(["Anna Smith was in Paris .", "John"])
    assert [len(p["tags"]) for p in predictions] == [6, 1]


def test_a_killed_run_resumes_to_the_uninterrupted_result(tiny_model_dir, tmp_path):
    data = write_data(tmp_path / "data.jsonl", 64)
    config = write_config(tmp_path / "c.yaml", tiny_model_dir, data, "dora")
    assert main(["train", str(config), "--output", str(tmp_path / "straight")]) == 0
    env = {**os.environ, "FINEGRAIN_FAULT": "checkpoint_write:3", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    killed = subprocess.run([sys.executable, "-m", "finegrain.cli", "train", str(config), "--output", str(tmp_path / "run")],
                            capture_output=True, text=True, timeout=300, env=env)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert main(["train", "--resume", str(tmp_path / "run")]) == 0
    adapter = "adapter/adapter_model.safetensors"
    assert (tmp_path / "run" / adapter).read_bytes() == (tmp_path / "straight" / adapter).read_bytes()


@pytest.mark.parametrize("method", ["dora", "ia3"])
def test_bf16_steps_on_bf16_copies(tiny_model, method):
    """A bf16 training step (autocast, the frozen matrices as bf16 copies put in their place by
    `train.precision.forward`) reaches the adapter of either method and gives every trainable
    tensor a gradient; the float32 parameters stay where they were."""
    from finegrain.peft.ia3 import Ia3Config
    from finegrain.tasks.classification import ClassificationTask, Encoded
    from finegrain.train.precision import bf16_copies, forward

    task = ClassificationTask(["a", "b"])
    model = task.build_model(tiny_model)
    lora = LoraConfig(r=2, alpha=4, targets=("q_proj", "v_proj", "down_proj"), init="gaussian", modules_to_save=["score"])
    inject(model, DoraConfig(lora) if method == "dora" else Ia3Config(init="random", modules_to_save=["score"]))
    perturbed(model, 3)
    model.eval()
    storage = {n: (p.data_ptr(), p.dtype) for n, p in model.named_parameters()}
    generator = torch.Generator().manual_seed(0)
    batch = task.collate([Encoded(torch.randint(3, 128, (6,), generator=generator).tolist(), i % 2) for i in range(4)], 0)
    copies = bf16_copies(model)
    assert copies["model.layers.1.self_attn.q_proj.weight"].dtype == torch.bfloat16
    with torch.no_grad():
        exact = model(batch, start_layer=0)
        set_adapter(adapter_layers(model).values(), None)
        bare = model(batch, start_layer=0)
        set_adapter(adapter_layers(model).values(), "default")
    assert (exact - bare).abs().max() > 0.2  # the adapter matters: the check below can fail
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = forward(model, batch, 0, copies)
        ours.float().sum().backward()
    assert_close(ours.float(), exact, atol=0.05, rtol=0.05)
    assert {n: (p.data_ptr(), p.dtype) for n, p in model.named_parameters()} == storage
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters() if p.requires_grad)


def test_dora_over_a_quantized_base_is_dora_over_its_dequantized_weight():
    """On a QuantLinear (model.quantize) the magnitudes, outputs and gradients are those over a float
    layer holding the dequantised weight, with no float copy of the weight kept."""
    from finegrain.model.qlinear import QuantLinear, quantize_weight

    torch.manual_seed(0)
    base = QuantLinear(quantize_weight(torch.randn(300, 256), "q4"), torch.randn(300))
    float_base = torch.nn.Linear(256, 300)
    with torch.no_grad():
        float_base.weight.copy_(base.dequantize())
        float_base.bias.copy_(base.bias)
    layers = []
    for linear in (base, float_base):
        torch.manual_seed(1)
        layer = DoraLinear.from_linear(linear, r=4, alpha=8, init="gaussian")
        with torch.no_grad():
            layer.lora.active.lora_B.weight.normal_(0, 0.1)
            layer.lora_magnitude_vector.mul_(1.2)
        layers.append(layer)
    assert layers[0].lora.weight is None and "_squares" in layers[0].__dict__
    assert_close(layers[0].weight_norm(), layers[1].weight_norm(), atol=1e-4, rtol=1e-4)
    x = torch.randn(3, 7, 256)
    grads = []
    for layer in layers:
        x_ = x.clone().requires_grad_(True)
        y = layer(x_)
        y.square().sum().backward()
        grads.append((y, x_.grad, layer.lora_magnitude_vector.grad, layer.lora.active.lora_B.weight.grad))
    for ours, reference in zip(*grads):
        assert_close(ours, reference, atol=1e-4 * float(reference.abs().max()), rtol=0)
    with pytest.raises(FinegrainError, match="model.quantize"):
        layers[0].merge()


def test_cli_trains_dora_on_a_quantized_base(tiny_model_dir, tmp_path):
    import yaml

    from finegrain.model.qlinear import QuantLinear

    config = write_config(tmp_path / "c.yaml", tiny_model_dir, write_data(tmp_path / "data.jsonl", 64), "dora")
    values = yaml.safe_load(config.read_text())
    values["model"]["quantize"] = "int8"
    config.write_text(yaml.safe_dump(values))
    assert main(["train", str(config), "--output", str(tmp_path / "run")]) == 0
    tensors = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    assert sum(k.endswith("lora_magnitude_vector") for k in tensors) == 2 and {t.dtype for t in tensors.values()} == {torch.float32}
    ours = finegrain.load(tmp_path / "run")
    assert any(isinstance(m, QuantLinear) for m in ours.model.modules())
    assert [p["label"] in ("fresh", "rotten") for p in ours.predict([POSITIVE[0], NEGATIVE[1]])] == [True, True]
