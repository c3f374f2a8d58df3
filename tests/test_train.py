"""Fine-tuning end to end on the tiny model: CLI train/evaluate/predict, resume after SIGKILL, errors."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import finegrain
from finegrain.cli import main
from finegrain.config import TrainConfig, load_config
from finegrain.peft import LoraConfig, apply_lora
from finegrain.run import build
from finegrain.tasks.classification import ClassificationTask, Encoded
from finegrain.train.checkpointing import process_rank
from finegrain.train.objectives import TaskObjective
from finegrain.train.precision import bf16_copies, forward
from finegrain.train.sampler import Draw
from finegrain.train.trainer import Trainer, backbone

POSITIVE = ["great fun film", "a gripping story", "good cast and a fine script", "the actors were great"]
NEGATIVE = ["dull and slow", "badly acted", "a bad story told slowly", "two hours I will never get back"]


def write_data(path: Path, n: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            positive = rng.random() < 0.5
            text = " and ".join(rng.sample(POSITIVE if positive else NEGATIVE, 2))
            f.write(json.dumps({"text": text, "label": "fresh" if positive else "rotten"}) + "\n")
    return path


def write_config(path: Path, model_dir: Path, data: Path, **train) -> Path:
    config = {
        "model": {"name": str(model_dir)},
        "data": {"train": str(data), "max_length": 16},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.1, "targets": "all-linear", "layers": [-1]},
        "head": {"init": "random"},  # not the recipe's LP-FT, which may keep its step-0 head on these tiny runs
        "train": {"epochs": 2, "lr": 5e-3, "batch_size": 8, "threads": 1, "eval_every": 5, "checkpoint_every": 2, **train},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "finegrain.cli", *args], capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def train_cli(*args: str, timeout: int = 300, **env: str) -> subprocess.CompletedProcess:
    """`finegrain train ARGS` in a fresh one-thread process, with `env` added (FINEGRAIN_FAULT=...)."""
    return subprocess.run([sys.executable, "-m", "finegrain.cli", "train", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1", **env})


def kill_and_resume(config: Path, run_dir: Path, fault: str, timeout: int = 300) -> None:
    """Train `config` into `run_dir`, killed at FINEGRAIN_FAULT=`fault` before it finishes, then `--resume` it."""
    killed = train_cli(str(config), "--output", str(run_dir), timeout=timeout, FINEGRAIN_FAULT=fault)
    assert killed.returncode != 0 and not (run_dir / "metrics.json").exists()
    resumed = train_cli("--resume", str(run_dir), timeout=timeout)
    assert resumed.returncode == 0, resumed.stderr[-2000:]


def assert_same_adapter(a_dir: Path, b_dir: Path) -> None:
    """The two runs' saved adapters hold the same tensors (within 1e-6)."""
    a = load_file(a_dir / "adapter" / "adapter_model.safetensors")
    b = load_file(b_dir / "adapter" / "adapter_model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)


def test_cli_train_evaluate_predict(tiny_model_dir, tmp_path, capsys):
    data = write_data(tmp_path / "data.jsonl", 120)
    config = write_config(tmp_path / "run.yaml", tiny_model_dir, data, epochs=3)
    run_dir = tmp_path / "run"
    assert main(["train", str(config), "--output", str(run_dir), "--lr", "0.01"]) == 0
    out = capsys.readouterr().out
    assert "precision" in out and "accuracy" in out
    for name in ("config.yaml", "labels.json", "metrics.json", "metrics.jsonl", "report.md", "report.html",
                 "confusion_matrix.png", "learning_curve.png", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors"):
        assert (run_dir / name).exists(), name
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["test"]["num_examples"] == 12 and 0 <= metrics["test"]["accuracy"] <= 1
    assert metrics["test"]["accuracy"] >= 0.75  # the words separate the classes; a broken loop stays near 0.5
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["lr"] == 0.01

    assert main(["evaluate", str(run_dir), "--data", str(data)]) == 0
    assert "weighted avg" in capsys.readouterr().out

    texts = tmp_path / "texts.jsonl"
    texts.write_text(json.dumps({"text": POSITIVE[0]}) + "\n" + json.dumps({"text": NEGATIVE[1]}) + "\n")
    predictions = tmp_path / "predictions.jsonl"
    assert main(["predict", str(run_dir), "--input", str(texts), "--output", str(predictions)]) == 0
    rows = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert [r["text"] for r in rows] == [POSITIVE[0], NEGATIVE[1]]
    assert all(abs(sum(r["probabilities"].values()) - 1) < 1e-4 for r in rows)

    # The Python API gives the same answers as the CLI.
    api = finegrain.load(run_dir).predict([POSITIVE[0], NEGATIVE[1]])
    assert [p["label"] for p in api] == [r["label"] for r in rows]


def test_only_adapter_and_head_train(tiny_model_dir, tmp_path):
    config = load_config(None, [f"model.name={tiny_model_dir}", "data.train=x.jsonl", "lora.layers=[-1]"])
    model, _, _, _ = build(config, ["a", "b"], progress=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        "score.weight",
        "model.layers.1.self_attn.q_proj.lora_A.weight", "model.layers.1.self_attn.q_proj.lora_B.weight",
        "model.layers.1.self_attn.v_proj.lora_A.weight", "model.layers.1.self_attn.v_proj.lora_B.weight",
    }


def test_bf16_autocast_only_where_the_cpu_has_it(tiny_model_dir, tmp_path, monkeypatch):
    """train.bf16 trains in bf16 on a CPU with native bf16; elsewhere it warns and stays float32."""
    import finegrain.cpu
    import finegrain.train.trainer

    data = write_data(tmp_path / "data.jsonl", 40)
    config = write_config(tmp_path / "run.yaml", tiny_model_dir, data, epochs=1, bf16=True)

    def cpu_has_bf16(value: bool) -> None:  # whatever this machine's CPU has
        for module in (finegrain.cpu, finegrain.train.trainer):
            monkeypatch.setattr(module, "native_bf16", lambda cpuinfo=None: value)

    cpu_has_bf16(False)
    with pytest.warns(UserWarning, match="no native bf16"):
        assert main(["train", str(config), "--output", str(tmp_path / "float32")]) == 0

    cpu_has_bf16(True)
    dtypes = set()
    forward = torch.nn.Linear.forward
    monkeypatch.setattr(torch.nn.Linear, "forward", lambda self, x: dtypes.add(forward(self, x).dtype) or forward(self, x))
    assert main(["train", str(config), "--output", str(tmp_path / "bf16")]) == 0
    assert torch.bfloat16 in dtypes  # the training steps ran in bf16 ...
    adapter = load_file(tmp_path / "bf16" / "adapter" / "adapter_model.safetensors")
    assert {t.dtype for t in adapter.values()} == {torch.float32}  # ... on float32 weights


@pytest.mark.parametrize("num_layers", [None, 1], ids=["whole-model", "cut-to-1-layer"])
def test_adapter_loads_into_transformers_and_peft(tiny_model_dir, tmp_path, num_layers):
    """The run's adapter directory is a PEFT SEQ_CLS adapter: peft reproduces our class logits."""
    import peft
    import transformers

    data = write_data(tmp_path / "data.jsonl", 60)
    run_dir = tmp_path / "run"
    assert main(["train", str(write_config(tmp_path / "c.yaml", tiny_model_dir, data, epochs=1)),
                 "--output", str(run_dir), "--set", "lora.layers=null", "--set", f"model.num_layers={num_layers or 'null'}",
                 # the adapter alone: a TF-IDF model mixed in (the recipe's head.tfidf_mix) is not PEFT's to reproduce,
                 # nor mean pooling (the recipe's probe may choose it): PEFT's classifier reads the last token
                 "--set", "head.tfidf_mix=0", "--set", "head.pooling=last"]) == 0
    ours = finegrain.load(run_dir)
    texts = [POSITIVE[0], NEGATIVE[2] + " " + NEGATIVE[3]]
    expected = torch.tensor([[p["probabilities"][label] for label in ours.task.labels] for p in ours.predict(texts)])

    cut = {"num_hidden_layers": num_layers} if num_layers else {}
    base = transformers.AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2, **cut)
    base.config.pad_token_id = ours.tokenizer.pad_token_id
    theirs = peft.PeftModel.from_pretrained(base, run_dir / "adapter").eval()
    with torch.no_grad():
        for text, probs in zip(texts, expected):
            ids = ours.tokenizer.encode(text)[: ours.config.data.max_length]  # the run truncates too
            logits = theirs(torch.tensor([ids])).logits
            torch.testing.assert_close(logits.softmax(-1)[0], probs, atol=1e-4, rtol=0)


def test_sigkill_and_resume_end_like_an_uninterrupted_run(tiny_model_dir, tmp_path):
    data = write_data(tmp_path / "data.jsonl", 400)
    config = write_config(tmp_path / "run.yaml", tiny_model_dir, data, batch_size=4, eval_every=10)

    straight = run_cli("train", str(config), "--output", str(tmp_path / "straight"))
    assert straight.returncode == 0, straight.stderr[-2000:]

    interrupted = tmp_path / "interrupted"
    process = subprocess.Popen(
        [sys.executable, "-m", "finegrain.cli", "train", str(config), "--output", str(interrupted)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    state = interrupted / "checkpoint" / "state.json"
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        try:
            if json.loads(state.read_text())["step"] >= 13:  # mid-epoch: 80 steps an epoch
                break
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            pass
        time.sleep(0.02)
    assert process.poll() is None, "the run ended before it could be interrupted"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (interrupted / "metrics.json").exists()

    resumed = run_cli("train", "--resume", str(interrupted))
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    a = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    b = json.loads((interrupted / "metrics.json").read_text())
    for split in ("validation", "test"):
        assert a[split]["accuracy"] == b[split]["accuracy"]
        assert a[split]["per_class"] == b[split]["per_class"]
    assert a["train"]["steps"] == b["train"]["steps"] and a["train"]["best_step"] == b["train"]["best_step"]
    wa = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    wb = load_file(interrupted / "adapter" / "adapter_model.safetensors")
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], atol=1e-6, rtol=0)
    steps = [json.loads(line)["step"] for line in (interrupted / "metrics.jsonl").read_text().splitlines()]
    straight_steps = [json.loads(line)["step"] for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert steps == straight_steps  # no record lost or repeated


@pytest.mark.parametrize(
    "rows, message",
    [
        ([{"text": "fine", "label": "a"}, {"txt": "oops", "label": "b"}], r"data.jsonl:2: missing field 'text'"),
        ([{"text": "fine", "label": "a"}, {"text": "", "label": "b"}], r"data.jsonl:2: .*empty"),
    ],
)
def test_bad_rows_name_file_and_line(tiny_model_dir, tmp_path, capsys, rows, message):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows * 10))
    assert main(["train", "--model", str(tiny_model_dir), "--data", str(data), "--output", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert __import__("re").search(message, err), err


def test_skip_bad_rows_counts_them(tiny_model_dir, tmp_path, capsys):
    data = write_data(tmp_path / "data.jsonl", 60)
    with open(data, "a") as f:
        f.write('{"text": "", "label": "fresh"}\nnot json at all\n')
    config = write_config(tmp_path / "c.yaml", tiny_model_dir, data, epochs=1)
    assert main(["train", str(config), "--output", str(tmp_path / "r"), "--skip-bad-rows"]) == 0
    assert "skipped 2 bad rows" in capsys.readouterr().out
    assert json.loads((tmp_path / "r" / "metrics.json").read_text())["train"]["skipped_rows"] == 2


def test_unknown_label_in_test_file(tiny_model_dir, tmp_path, capsys):
    train = write_data(tmp_path / "train.jsonl", 40)
    test = tmp_path / "test.jsonl"
    test.write_text(json.dumps({"text": "meh", "label": "fresh"}) + "\n" + json.dumps({"text": "so-so", "label": "meh"}) + "\n")
    config = write_config(tmp_path / "c.yaml", tiny_model_dir, train, epochs=1)
    assert main(["train", str(config), "--set", f"data.test={test}", "--output", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err
    assert "test.jsonl:2" in err and "meh" in err


def test_existing_run_dir_is_not_overwritten(tiny_model_dir, tmp_path, capsys):
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("precious: true\n")
    data = write_data(tmp_path / "data.jsonl", 20)
    assert main(["train", "--model", str(tiny_model_dir), "--data", str(data), "--output", str(run_dir)]) == 1
    assert "--resume" in capsys.readouterr().err
    assert (run_dir / "config.yaml").read_text() == "precious: true\n"


# ----- the trainer's parts: objectives, sampler, the rank-aware writer, bf16 -------------------


def classifier(tiny_model, targets: str = "all-linear"):
    """A two-class task model on the tiny random LLaMA, LoRA on every layer, and 24 encoded items."""
    task = ClassificationTask(["a", "b"])
    model = task.build_model(tiny_model)
    apply_lora(model, LoraConfig(r=2, alpha=4, targets=targets))
    model.score.requires_grad_(True)
    generator = torch.Generator().manual_seed(0)
    items = [Encoded(torch.randint(3, 128, (4 + i % 7,), generator=generator).tolist(), i % 2) for i in range(24)]
    return task, model, items


def step_gradients(trainer: Trainer, group: list[Draw]) -> dict[str, torch.Tensor]:
    """The gradients one optimizer step of `trainer` would apply for `group` (the step itself is skipped)."""
    grads = {}
    trainer.optimizer.step = lambda: grads.update({n: p.grad.clone() for n, p in trainer.trainable.items()})
    trainer._step(group)
    return grads


def test_each_objective_weighs_in_with_its_own_mean_loss(tiny_model, tmp_path):
    """A second objective (here the same task and items, weight 0.5) in the same step adds half of
    the first one's gradient: each objective's loss is its own mean over the step, times its weight."""
    task, model, items = classifier(tiny_model)
    config = TrainConfig(batch_size=8, threads=1, max_grad_norm=0.0)
    batch = list(range(8))
    one = Trainer(model, task, items, config, tmp_path / "one", pad_id=0, progress=False)
    alone = step_gradients(one, [Draw(0, batch)])
    two = Trainer(model, task, items, config, tmp_path / "two", pad_id=0, progress=False,
                  objectives=[TaskObjective(task, items, weight=0.5)])
    both = step_gradients(two, [Draw(0, batch[:5]), Draw(1, batch), Draw(0, batch[5:])])
    for name, grad in alone.items():
        torch.testing.assert_close(both[name], 1.5 * grad, atol=1e-6, rtol=1e-5, msg=name)


def test_the_sampler_decides_the_batches(tiny_model, tmp_path):
    """A sampler of one's own (here: every batch from the second objective) is what the loop trains on."""
    task, model, items = classifier(tiny_model)

    class SecondOnly:
        def __len__(self) -> int:
            return 3

        def epoch(self, epoch: int) -> list[Draw]:
            return [Draw(1, [i, i + 1]) for i in range(0, 6, 2)]

    seen = []

    class Recorded(TaskObjective):
        def pieces(self, indices, pad_id, max_tokens):
            seen.append(list(indices))
            return super().pieces(indices, pad_id, max_tokens)

    config = TrainConfig(epochs=2, batch_size=8, threads=1)
    trainer = Trainer(model, task, items, config, tmp_path, pad_id=0, progress=False,
                      objectives=[Recorded(task, items[:6])], sampler=SecondOnly())
    assert trainer.fit().step == 6 and seen == [[0, 1], [2, 3], [4, 5]] * 2


def test_only_rank_0_writes_the_run_files(tiny_model, tmp_path, monkeypatch):
    """Under torchrun every rank trains, only rank 0 writes metrics, checkpoints and best weights."""
    task, model, items = classifier(tiny_model)
    config = TrainConfig(epochs=1, batch_size=8, threads=1, checkpoint_every=1)
    assert process_rank() == 0  # torch.distributed not initialised
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 1)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 1)  # the writing rule alone: no collectives
    assert process_rank() == 1
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for rank in ("rank0", "rank1"):
        (tmp_path / rank).mkdir()
    Trainer(model, task, items, config, tmp_path / "rank1", pad_id=0, progress=False).fit()
    assert not any((tmp_path / "rank1").iterdir())
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)  # it trained
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 0)
    Trainer(model, task, items, config, tmp_path / "rank0", pad_id=0, progress=False).fit()
    assert {p.name for p in (tmp_path / "rank0").iterdir()} >= {"metrics.jsonl", "checkpoint", "best"}


def test_bf16_steps_read_bf16_copies_and_leave_the_parameters_alone(tiny_model):
    """The bf16 copies give the matmuls autocast would give (it casts the same float32 weights),
    while every parameter keeps its float32 storage: nothing is swapped under a wrapper's feet."""
    task, model, items = classifier(tiny_model, targets=["q_proj", "v_proj"])
    model.eval()  # no dropout
    storage = {n: (p.data_ptr(), p.dtype) for n, p in model.named_parameters()}
    copies = bf16_copies(model, skip=backbone(model).layers[:1])
    assert copies["model.layers.1.mlp.up_proj.weight"].dtype == torch.bfloat16
    assert copies["model.layers.1.self_attn.q_proj.weight"].dtype == torch.bfloat16  # frozen base of a LoRA layer
    assert "model.layers.0.mlp.up_proj.weight" not in copies  # below the start layer: never runs in a step
    assert "model.embed_tokens.weight" not in copies  # a lookup table, shared with a tied head
    assert not any("lora_" in name or "norm" in name or name.startswith("score") for name in copies)  # trained or 1-D
    batch = task.collate(items[:6], 0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = model(batch, start_layer=0)
        ours = forward(model, batch, 0, copies)
        ours.sum().backward()
    assert torch.equal(ours, plain)
    assert {n: (p.data_ptr(), p.dtype) for n, p in model.named_parameters()} == storage
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
