"""peft.method: adalora against PEFT 0.21.2's AdaLoRA: the layer's logits, the training step (the
orthogonality regulariser and the rank allocator), the files both ways, and a run end to end
(CLI training for classification and NER, exact resume, `finegrain.load`, serving beside LoRA)."""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import peft
import pytest
import torch
import torch.nn.functional as F
import transformers
import yaml
from torch.testing import assert_close

import finegrain
from finegrain.cli import main
from finegrain.errors import FinegrainError
from finegrain.peft import AdaLoraConfig, AdaLoraLinear, adapter_layers, inject, load_adapter, save_adapter
from finegrain.peft.adalora import Orthogonality, adalora_rank
from finegrain.peft.base import WEIGHTS_NAME, read_adapter

pytestmark = pytest.mark.filterwarnings(
    "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning",
    # PEFT checks AdaLoRA's rank_pattern as if it were LoRA's (module name -> rank) and warns on its own files too
    "ignore:The following rank_pattern keys did not match:RuntimeWarning",
    # and takes a matrix the allocation left with no rank for an unsharded DeepSpeed tensor
    "ignore:Adapter 'default'.*invalid shape",
)
from peft_fixtures import hf_model, ours_of  # noqa: F401 (fixtures)

TEXTS = ["good film 3", "bad film 5", "a good story", "bad"]
ENTITIES = {"LOC": ["Paris", "London", "New York"], "PER": ["Anna Smith", "John"]}
FILLER = ["the", "film", "was", "good", "in", "and", "story", "."]


IDS = torch.randint(1, 128, (2, 7), generator=torch.Generator().manual_seed(1))


def peft_name(ours: str) -> str:
    """`model.layers.0.self_attn.q_proj.lora_A` -> PEFT's parameter name in a PeftModel."""
    return f"base_model.model.{ours}.default"


def randomise(model: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            for key in ("lora_A", "lora_E", "lora_B"):
                p = getattr(layer, key)
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)


# ---------------------------------------------------------------------------------------------- the layer and the files


def test_the_layer_starts_as_a_no_op_and_computes_the_svd_form(hf_model):
    ours = ours_of(hf_model)
    with torch.no_grad():
        bare = ours(IDS)
    inject(ours, AdaLoraConfig(init_r=6, target_r=2, alpha=12))
    layer = ours.model.layers[1].self_attn.v_proj
    assert isinstance(layer, AdaLoraLinear)
    assert layer.lora_A.shape == (6, 64) and layer.lora_E.shape == (6, 1) and layer.lora_B.shape == (32, 6)
    with torch.no_grad():
        assert_close(ours(IDS), bare, atol=0, rtol=0)  # E = 0: exactly the base model
    randomise(ours, 3)
    x = torch.randn(5, 64)
    expected = x @ layer.weight.T + (x @ (layer.lora_A * layer.lora_E).T @ layer.lora_B.T) * 12 / (6 + 1e-5)
    with torch.no_grad():
        assert_close(layer(x), expected)
        merged = layer(x)
        layer.merge()
        assert_close(layer(x), merged, atol=1e-5, rtol=0)
        layer.unmerge()
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable == {f"model.layers.{i}.self_attn.{m}.{k}" for i in range(2) for m in ("q_proj", "v_proj")
                         for k in ("lora_A", "lora_E", "lora_B")}


def test_saved_adapter_with_pruned_ranks_loads_in_peft_with_the_same_logits(hf_model, tmp_path):
    ours = ours_of(hf_model)
    config = AdaLoraConfig(init_r=6, target_r=2, alpha=12, targets=("q_proj", "v_proj", "down_proj"))
    inject(ours, config)
    randomise(ours, 4)
    with torch.no_grad():
        ours.model.layers[0].self_attn.q_proj.lora_E[[1, 3]] = 0.0  # two ranks pruned
        ours.model.layers[1].mlp.down_proj.lora_E.zero_()  # a matrix left with no rank at all
        expected = ours(IDS)
    save_adapter(ours, config, tmp_path, base_model_name_or_path="tiny", task_type="CAUSAL_LM")
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["peft_type"] == "ADALORA" and written["init_r"] == 6 and written["target_r"] == 2
    assert written["rank_pattern"]["model.layers.0.self_attn.q_proj.lora_E"] == [True, False, True, False, True, True]
    assert sum(written["rank_pattern"]["model.layers.1.mlp.down_proj.lora_E"]) == 0
    _, tensors = read_adapter(tmp_path)  # read back at init_r, the pruned ranks zero
    assert tensors["model.layers.0.self_attn.q_proj.lora_A"].shape == (6, 64)

    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(hf_model), tmp_path).eval()
    assert theirs.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].shape == (4, 64)
    with torch.no_grad():
        assert_close(theirs(IDS).logits, expected, atol=1e-5, rtol=0)

    again = ours_of(hf_model)
    load_adapter(again, tmp_path)
    with torch.no_grad():
        assert_close(again(IDS), expected, atol=0, rtol=0)
    assert adalora_rank(again)["model.layers.0.self_attn.q_proj"] == 4


def peft_adalora(hf_model, total_step: int, **options) -> peft.PeftModel:
    config = peft.AdaLoraConfig(task_type="CAUSAL_LM", lora_dropout=0.0, total_step=total_step, **options)
    torch.manual_seed(5)
    return peft.get_peft_model(copy.deepcopy(hf_model), config)


def causal_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


OPTIONS = dict(init_r=4, target_r=2, tinit=2, tfinal=2, deltaT=2, lora_alpha=8, orth_reg_weight=0.3,
               target_modules=["q_proj", "v_proj"])


def test_training_steps_regulariser_and_allocation_match_peft(hf_model):
    """The same weights and batches through PEFT's loop (regulariser in `forward`, `update_and_allocate`
    after each step) and through ours (an `Orthogonality` term, the `RankAllocator` hook) end equal."""
    total = 10
    theirs = peft_adalora(hf_model, total, **OPTIONS)
    theirs.train()
    ours = ours_of(hf_model)
    options = {k: v for k, v in OPTIONS.items() if k not in ("lora_alpha", "target_modules")}
    config = AdaLoraConfig(alpha=8, targets=("q_proj", "v_proj"), **options)
    inject(ours, config)
    ours.train()
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if p.requires_grad:
                p.copy_(dict(theirs.named_parameters())[peft_name(name)])
    (term,) = config.loss_terms()
    (allocator,) = config.step_hooks(total)
    ours_params = [p for p in ours.parameters() if p.requires_grad]
    their_params = [p for p in theirs.parameters() if p.requires_grad]
    ours_opt, their_opt = torch.optim.AdamW(ours_params, lr=0.02), torch.optim.AdamW(their_params, lr=0.02)
    generator = torch.Generator().manual_seed(7)
    for step in range(1, total + 1):
        ids = torch.randint(1, 128, (2, 9), generator=generator)
        their_loss = theirs(input_ids=ids, labels=ids).loss  # PEFT adds weight * regulariser here
        our_loss = causal_loss(ours(ids), ids) + term.weight * term.loss(ours)
        assert_close(our_loss, their_loss, atol=1e-5, rtol=1e-5)
        their_loss.backward()
        our_loss.backward()
        their_opt.step()
        ours_opt.step()
        theirs.base_model.update_and_allocate(step)
        allocator.after_step(ours, step, total)
        their_opt.zero_grad()
        ours_opt.zero_grad()
    their_pattern = theirs.peft_config["default"].rank_pattern
    assert {k.removesuffix(".default"): v for k, v in their_pattern.items()} == {
        f"{k}.lora_E": v for k, v in allocator.rank_pattern.items()}
    assert sum(sum(v) for v in allocator.rank_pattern.values()) == 2 * 4  # target_r per matrix on average
    their_params = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        if p.requires_grad:
            assert_close(p, their_params[peft_name(name)], atol=2e-5, rtol=1e-4)


def test_a_peft_trained_adalora_adapter_loads_into_finegrain(hf_model, tmp_path):
    total = 6
    theirs = peft_adalora(hf_model, total, **{**OPTIONS, "tinit": 1, "tfinal": 1, "deltaT": 1})
    optimizer = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=0.05)
    generator = torch.Generator().manual_seed(8)
    for step in range(1, total + 1):
        ids = torch.randint(1, 128, (2, 9), generator=generator)
        theirs(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        theirs.base_model.update_and_allocate(step)
        optimizer.zero_grad()
    theirs.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["rank_pattern"]
    theirs.eval()
    ours = ours_of(hf_model)
    config = load_adapter(ours, tmp_path)
    assert isinstance(config, AdaLoraConfig) and config.total_step == total
    with torch.no_grad():
        assert_close(ours(IDS), theirs(IDS).logits, atol=1e-5, rtol=0)
    # and back: our file of it loads in PEFT again with the same logits
    save_adapter(ours, config, tmp_path / "again", base_model_name_or_path="tiny", task_type="CAUSAL_LM")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(hf_model), tmp_path / "again").eval()
    with torch.no_grad():
        assert_close(back(IDS).logits, theirs(IDS).logits, atol=1e-5, rtol=0)


def test_orthogonality_is_zero_for_orthonormal_factors(hf_model):
    ours = ours_of(hf_model)
    inject(ours, AdaLoraConfig(init_r=4, target_r=2))
    with torch.no_grad():
        for layer in adapter_layers(ours).values():
            layer.lora_A.copy_(torch.linalg.qr(torch.randn(64, 4))[0].T)
            layer.lora_B.copy_(torch.linalg.qr(torch.randn(layer.out_features, 4))[0])
        assert Orthogonality(0.5).loss(ours).item() < 1e-5
        ours.model.layers[0].self_attn.q_proj.lora_A.mul_(2)  # ||4I - I|| = 6 for one of 8 matrices
        assert_close(Orthogonality(0.5).loss(ours), torch.tensor(6.0 / 8), atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"target_r": 16}, r"peft.target_r: must be at most peft.init_r \(12\)"),
        ({"tinit": -1}, r"peft.tinit: must be an integer >= 0"),
        ({"beta1": 1.0}, r"peft.beta1: must be in \(0, 1\)"),
        ({"targets": "nope("}, r"peft.targets: 'nope\(' is not a valid regular expression"),
    ],
)
def test_bad_options_name_the_key(options, message):
    with pytest.raises(FinegrainError, match=message):
        AdaLoraConfig(**options)


def test_a_schedule_with_no_step_to_allocate_in_is_refused_before_training():
    with pytest.raises(FinegrainError, match=r"peft.tinit \(5\) \+ peft.tfinal \(5\) leave none of the run's 10"):
        AdaLoraConfig(tinit=5, tfinal=5).step_hooks(10)


# ---------------------------------------------------------------------------------------------- runs end to end


def write_classification(path: Path) -> Path:
    rows = [{"text": f"{'good' if i % 2 else 'bad'} film {i % 7}", "label": "fresh" if i % 2 else "rotten"} for i in range(64)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_ner(path: Path) -> Path:
    lines = []
    for i in range(48):
        kind = sorted(ENTITIES)[i % 2]
        words = ENTITIES[kind][i % len(ENTITIES[kind])].split()
        lines += [f"{FILLER[i % len(FILLER)]}\tO\n", *(f"{w}\t{'B' if j == 0 else 'I'}-{kind}\n" for j, w in enumerate(words)),
                  "in\tO\n", "\n"]
    path.write_text("".join(lines))
    return path


PEFT_KEYS = {"method": "adalora", "init_r": 4, "target_r": 2, "tinit": 2, "tfinal": 2, "deltaT": 2, "dropout": 0.0}


def config_file(root: Path, model_dir: Path, task: str = "classification", **peft_keys) -> Path:
    """A tiny run: 2 epochs of 7 steps (the allocation runs from step 3 to 12), a checkpoint every 2 steps."""
    data = write_classification(root / "data.jsonl") if task == "classification" else write_ner(root / "data.conll")
    config = {
        "task": task,
        "model": {"name": str(model_dir)},
        "data": {"train": str(data), "max_length": 16},
        "peft": {**PEFT_KEYS, **peft_keys},
        "train": {"epochs": 2, "batch_size": 8, "lr": 0.02, "threads": 1, "eval_every": 3, "checkpoint_every": 2,
                  "recipe": False},
    }
    path = root / f"{task}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("task", ["classification", "ner"])
def test_train_through_the_cli_and_predict(tiny_model_dir, tmp_path, task):
    run_dir = tmp_path / "run"
    assert main(["train", str(config_file(tmp_path, tiny_model_dir, task)), "--output", str(run_dir)]) == 0
    results = json.loads((run_dir / "metrics.json").read_text())
    assert results["train"]["peft_method"] == "adalora"
    written = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert written["peft_type"] == "ADALORA" and written["modules_to_save"] == ["score"]
    assert written["total_step"] == results["train"]["steps"] > PEFT_KEYS["tinit"] + PEFT_KEYS["tfinal"]
    predictor = finegrain.load(run_dir)
    ranks = adalora_rank(predictor.model)
    assert len(ranks) == 4 and all(0 <= r <= 4 for r in ranks.values())
    if written["rank_pattern"] is not None:  # the best step came after an allocation
        assert ranks == {k.removesuffix(".lora_E"): sum(v) for k, v in written["rank_pattern"].items()}
    inputs = TEXTS if task == "classification" else [["John", "was", "in", "Paris"]]
    predictions = predictor.predict(inputs)
    if task == "classification":
        assert {p["label"] for p in predictions} <= {"fresh", "rotten"}
    else:
        assert predictions[0]["words"] == inputs[0] and len(predictions[0]["tags"]) == 4


def test_the_last_step_leaves_the_target_budget_and_peft_loads_the_run(tiny_model_dir, tmp_path):
    """Without validation data the last weights are saved: after the final allocation, target_r per
    matrix on average, and PEFT's SEQ_CLS model reproduces the run's probabilities."""
    config = config_file(tmp_path, tiny_model_dir)
    run_dir = tmp_path / "run"
    assert main(["train", str(config), "--output", str(run_dir), "--set", "data.split=[0.9,0.0,0.1]",
                 "--set", "train.eval_every=0"]) == 0
    written = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert sum(sum(v) for v in written["rank_pattern"].values()) == 2 * 4
    ours = finegrain.load(run_dir)
    expected = torch.tensor([[p["probabilities"][label] for label in ours.task.labels] for p in ours.predict(TEXTS)])
    base = transformers.AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    base.config.pad_token_id = ours.tokenizer.pad_token_id
    theirs = peft.PeftModel.from_pretrained(base, run_dir / "adapter").eval()
    with torch.no_grad():
        for text, probs in zip(TEXTS, expected):
            logits = theirs(torch.tensor([ours.tokenizer.encode(text)])).logits
            assert_close(logits.softmax(-1)[0], probs, atol=1e-4, rtol=0)


def test_a_killed_run_resumes_to_the_same_adapter(tiny_model_dir, tmp_path):
    """Killed after step 7 (checkpoint at 6, mid-allocation): the resumed run needs the allocator's
    smoothed scores from the checkpoint to end with the same adapter as the uninterrupted one."""
    config = config_file(tmp_path, tiny_model_dir)
    raw = yaml.safe_load(config.read_text())
    raw["data"]["split"] = [0.9, 0.0, 0.1]  # no validation: the last weights are the adapter, not an early best
    raw["peft"].update(beta1=0.95, beta2=0.95)  # long memories: scores rebuilt from the resume on would differ
    config.write_text(yaml.safe_dump(raw))
    straight = tmp_path / "straight"
    assert main(["train", str(config), "--output", str(straight)]) == 0
    killed = tmp_path / "killed"
    env = {**os.environ, "FINEGRAIN_FAULT": "train_step:7", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-m", "finegrain.cli", "train", str(config), "--output", str(killed)],
                         capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == -signal.SIGKILL, run.stderr[-2000:]
    assert json.loads((killed / "checkpoint" / "state.json").read_text())["step"] == 6
    assert main(["train", "--resume", str(killed)]) == 0
    for name in ("adapter_config.json", WEIGHTS_NAME):
        assert (killed / "adapter" / name).read_bytes() == (straight / "adapter" / name).read_bytes(), name


def test_served_beside_a_lora_run_on_one_base_like_their_predictors(tiny_model_dir, tmp_path):
    from finegrain.serve.batching import Job
    from finegrain.serve.engine import Engine
    from finegrain.serve.metrics import Metrics
    from finegrain.serve.models import ModelRegistry

    runs = {}
    for method, keys in (("lora", {"method": "lora", "r": 4}), ("adalora", {})):
        (tmp_path / method).mkdir()
        runs[method] = tmp_path / method / "run"
        config = config_file(tmp_path / method, tiny_model_dir, **keys)
        if method == "lora":
            raw = yaml.safe_load(config.read_text())
            raw["peft"] = keys
            config.write_text(yaml.safe_dump(raw))
        assert main(["train", str(config), "--output", str(runs[method])]) == 0
    registry = ModelRegistry(list(runs.items()))
    registry.load()
    (base,) = registry.bases.values()
    shared = base.llama.model.layers[0].self_attn.q_proj  # both runs adapt it
    assert set(shared.adapters) == {"lora", "adalora"}
    engine = Engine(registry, Metrics())
    for _ in range(2):  # switching back and forth between the two runs' adapters
        for name, run_dir in runs.items():
            expected = finegrain.load(run_dir).predict(TEXTS)
            served = registry.runs[name]
            items = served.task.encode(served.tokenizer, served.task.examples_from_inputs(TEXTS, served.config.data),
                                       served.config.data.max_length)
            (answers,) = engine.run(("task", name), [Job(("task", name), items, size=len(items))])
            assert [a["label"] for a in answers] == [e["label"] for e in expected]
            for a, e in zip(answers, expected):
                for label in e["probabilities"]:
                    assert abs(a["probabilities"][label] - e["probabilities"][label]) < 1e-5


def test_switching_a_lora_config_to_adalora_keeps_the_keys_it_shares(tiny_model_dir, tmp_path, capsys):
    data = write_classification(tmp_path / "data.jsonl")
    config = tmp_path / "lora.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"name": str(tiny_model_dir)}, "data": {"train": str(data), "max_length": 16},
        "lora": {"r": 4, "alpha": 8, "targets": ["q_proj", "o_proj"], "layers": [-1]},
        "train": {"epochs": 1, "batch_size": 8, "threads": 1, "recipe": False},
    }))
    run_dir = tmp_path / "run"
    with pytest.warns(UserWarning, match=r"adalora does not take lora.r; it is left out"):
        assert main(["train", str(config), "--output", str(run_dir), "--set", "peft.method=adalora",
                     "--set", "peft.init_r=3", "--set", "peft.target_r=1"]) == 0
    written = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert written["peft_type"] == "ADALORA" and written["lora_alpha"] == 8 and written["init_r"] == 3
    assert sorted(written["target_modules"]) == ["o_proj", "q_proj"] and written["layers_to_transform"] == [1]


@pytest.mark.parametrize(
    "sets, message",
    [
        (["peft.num_virtual_tokens=4"], r"unknown key 'peft.num_virtual_tokens'"),
        (["peft.tinit=100"], r"peft.tinit \(100\) \+ peft.tfinal \(2\) leave none of the run's 14 optimizer steps"),
    ],
)
def test_bad_run_options_are_one_line_errors_and_leave_nothing(tiny_model_dir, tmp_path, capsys, sets, message):
    config = config_file(tmp_path, tiny_model_dir)
    run_dir = tmp_path / "run"
    assert main(["train", str(config), "--output", str(run_dir), *(a for s in sets for a in ("--set", s))]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(message, err), err
    assert not run_dir.exists()
