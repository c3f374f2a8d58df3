"""FSDP2 under torchrun (gloo, 2 processes, the tiny model): a full fine-tune sharded across the
ranks computes the one-process gradient of a global batch and ends with the one-process weights;
its checkpoints are sharded (DCP), resume with another number of processes (1 -> 2 -> 1), and a
rank killed while one is written leaves the previous checkpoint whole."""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from finegrain.cli import main
from finegrain.config import TrainConfig
from finegrain.peft.full import FullConfig
from finegrain.tasks.classification import ClassificationTask, Encoded
from finegrain.train.sharded_checkpoint import is_sharded, optimizer_by_index, optimizer_by_name
from finegrain.train.trainer import Trainer
from launch_helpers import finegrain, in_job, spawn
from test_distributed import tiny_llama
from test_train import write_config, write_data

CONFIG = TrainConfig(epochs=1, batch_size=8, grad_accum=2, threads=1, max_grad_norm=1.0, micro_batch_tokens=24,
                     checkpoint_every=2, lr=1e-3)


def full_classifier():
    """The tiny classifier with every weight trainable, as `peft.method: full` leaves it."""
    task = ClassificationTask(["a", "b"])
    model = task.build_model(tiny_llama())
    FullConfig(modules_to_save=["score"]).select(model)
    generator = torch.Generator().manual_seed(0)
    items = [Encoded(torch.randint(3, 128, (4 + i % 7,), generator=generator).tolist(), i % 2) for i in range(24)]
    return task, model, items


def run(run_dir: Path) -> dict:
    """One rank's (or the only process's) first-step gradients, whole, and the weights after one epoch.
    The ranks of a job share `run_dir` (as torchrun's do): rank 0 writes the run, each rank its shards."""
    for name in ("step", "fit"):
        (run_dir / name).mkdir(parents=True, exist_ok=True)
    task, model, items = full_classifier()
    trainer = Trainer(model, task, items, CONFIG, run_dir / "step", pad_id=0, progress=False, method=FullConfig())
    grads = {}

    def record():  # a DTensor's gradient is this rank's slice: gathered whole (on every rank at once)
        grads.update({n: getattr(p.grad, "full_tensor", lambda g=p.grad: g)() for n, p in trainer.trainable.items()})

    trainer.optimizer.step = record
    trainer._step(trainer.sampler.epoch(0)[: CONFIG.grad_accum])
    task, model, items = full_classifier()
    trainer = Trainer(model, task, items, CONFIG, run_dir / "fit", pad_id=0, progress=False, method=FullConfig())
    sharded = trainer.sharded
    trainer.fit()
    return {"grads": grads, "sharded": sharded, "steps": trainer.state.step,
            "weights": {n: p.detach().clone() for n, p in trainer.model.named_parameters()},
            "checkpoint_sharded": is_sharded(run_dir / "fit" / "checkpoint")}


def worker(rank: int, world_size: int, port: int, out: str) -> None:
    with in_job(rank, world_size, port):
        result = run(Path(out) / "two")
    torch.save(result, Path(out) / f"rank{rank}.pt")


def test_two_sharded_processes_train_as_one(tmp_path):
    """gloo, 2 processes, every weight sharded (FSDP2 per decoder layer, the embedding and the root):
    the gradient of a global batch (two accumulated batches in micro-batches of unequal count on the
    two ranks) is the one-process gradient, and after an epoch rank 0 holds the one-process weights."""
    single = run(tmp_path / "single")
    spawn(worker, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(2)]
    assert not single["sharded"] and not single["checkpoint_sharded"]
    assert all(r["sharded"] and r["steps"] == single["steps"] for r in ranks)
    for result in ranks:
        assert result["grads"].keys() == single["grads"].keys()
        for name, grad in single["grads"].items():
            torch.testing.assert_close(result["grads"][name], grad, atol=1e-6, rtol=1e-5, msg=name)
    for name, weight in single["weights"].items():
        torch.testing.assert_close(ranks[0]["weights"][name], weight, atol=1e-5, rtol=1e-4, msg=name)
    assert ranks[0]["checkpoint_sharded"]  # every rank wrote its part (DCP), rank 0 renamed it into place
    shards = sorted(p.name for p in (tmp_path / "two" / "fit" / "checkpoint" / "sharded").iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert not [p for p in (tmp_path / "two" / "fit").iterdir() if p.name.startswith(".")]  # no temporary left


def test_optimizer_state_by_name_and_back():
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW([{"params": [model.weight]}, {"params": [model.bias], "lr": 0.5}])
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    numbered = optimizer.state_dict()
    by_name = optimizer_by_name(numbered, ["weight", "bias"])
    assert set(by_name["state"]) == {"weight", "bias"} and by_name["param_groups"][1]["params"] == ["bias"]
    assert optimizer_by_index(by_name, ["weight", "bias"]) == numbered


def test_full_fine_tune_resumes_one_then_two_then_one_process(tiny_model_dir, tmp_path):
    """peft.method full: a run killed in one process, resumed by two (torchrun: FSDP, sharded
    checkpoints) until rank 1 alone is killed while it writes its part of a checkpoint, and
    finished by one, ends with the model of an uninterrupted one-process run. The killed job exits
    non-zero, each surviving rank says so in one line, and its last complete checkpoint stays whole."""
    data = write_data(tmp_path / "data.jsonl", 96)
    config = write_config(tmp_path / "run.yaml", tiny_model_dir, data, epochs=2, lr=1e-3)
    options = ["--set", "peft.method=full", "--set", "head.tfidf_mix=0"]
    assert main(["train", str(config), "--output", str(tmp_path / "whole"), *options]) == 0
    run_dir = tmp_path / "interrupted"

    def checkpoint_step() -> int:
        return json.loads((run_dir / "checkpoint" / "state.json").read_text())["step"]

    assert finegrain("train", str(config), "--output", str(run_dir), *options, fault="train_step:5").returncode != 0
    assert checkpoint_step() == 4 and not is_sharded(run_dir / "checkpoint")  # checkpoint_every 2
    killed = finegrain("train", "--resume", str(run_dir), processes=2, fault="sharded_checkpoint_rank1:2")
    assert killed.returncode != 0
    said = [line for line in killed.stderr.splitlines() if line.startswith("finegrain train:")]
    assert len(said) <= 1 and all("another process of this job ended" in line for line in said), said  # rank 0, unless
    # torchrun stopped it first; rank 1 was killed without a word
    assert checkpoint_step() == 6 and is_sharded(run_dir / "checkpoint")  # steps 5-6 saved; killed writing step 8's
    assert not (run_dir / "metrics.json").exists()
    finished = finegrain("train", "--resume", str(run_dir))
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert not [p.name for p in run_dir.iterdir() if ".tmp" in p.name or p.name.endswith(".old")]  # no temporary left
    whole = load_file(tmp_path / "whole" / "model" / "model.safetensors")
    resumed = load_file(run_dir / "model" / "model.safetensors")
    assert whole.keys() == resumed.keys()
    for name in whole:
        torch.testing.assert_close(resumed[name], whole[name], atol=1e-5, rtol=1e-4, msg=name)
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if "train_loss" in line]
    total = json.loads((tmp_path / "whole" / "metrics.json").read_text())["train"]["steps"]
    assert steps == list(range(1, total + 1))  # each step logged once: the killed steps were done again


def test_adapter_run_with_train_fsdp_equals_one_process(tiny_model_dir, tmp_path):
    """train.fsdp: true shards an adapter run too (LoRA on the top layer: the layer below and the
    embedding run once, sharded, for the prefix cache; LP-FT fits the head on the gathered weights):
    the adapter equals the one-process run's, and the run reports the same steps and test accuracy."""
    data = write_data(tmp_path / "data.jsonl", 64)
    config = write_config(tmp_path / "run.yaml", tiny_model_dir, data, epochs=1)
    options = ["--set", "lora.dropout=0", "--set", "head.tfidf_mix=0", "--set", "head.init=probe"]
    assert main(["train", str(config), "--output", str(tmp_path / "one"), *options]) == 0
    done = finegrain("train", str(config), "--output", str(tmp_path / "two"), *options, "--set", "train.fsdp=true",
                     processes=2)
    assert done.returncode == 0, done.stderr[-2000:]
    assert is_sharded(tmp_path / "two" / "best")
    one = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    two = load_file(tmp_path / "two" / "adapter" / "adapter_model.safetensors")
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], atol=1e-5, rtol=1e-4, msg=name)
    results = [json.loads((tmp_path / run / "metrics.json").read_text()) for run in ("one", "two")]
    assert results[0]["train"]["frozen_prefix_layers"] == results[1]["train"]["frozen_prefix_layers"] == 1
    assert results[0]["train"]["steps"] == results[1]["train"]["steps"]
    assert results[0]["test"]["accuracy"] == results[1]["test"]["accuracy"]


def tied_worker(rank: int, world_size: int, port: int, out: str) -> None:
    with in_job(rank, world_size, port):
        from finegrain.train.fsdp import shard

        llama = tiny_llama()
        ids = torch.randint(3, 128, (2, 5), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            expected = llama(ids)
        twin, own_unit = shard(llama, torch.device("cpu"), ids)
        with torch.no_grad():
            logits = twin(ids)
        assert all(p.numel() == 0 for p in llama.parameters())  # the model's own weights were freed
    torch.save({"own_unit": own_unit, "expected": expected, "logits": logits}, Path(out) / f"tied{rank}.pt")


def test_an_embedding_tied_to_the_output_head_stays_in_the_root_unit(tmp_path):
    """A causal LM whose output head is the embedding table: the table is not a unit of its own (the
    head in the root reads it), and the sharded model computes the whole model's logits."""
    spawn(tied_worker, str(tmp_path))
    for rank in range(2):
        result = torch.load(tmp_path / f"tied{rank}.pt", weights_only=False)
        assert not result["own_unit"]
        torch.testing.assert_close(result["logits"], result["expected"], atol=1e-5, rtol=1e-4)


def pieces_worker(rank: int, world_size: int, port: int, out: str) -> None:
    from finegrain.train.fsdp import even_pieces

    with in_job(rank, world_size, port):  # rank 0 has three pieces, rank 1 one, rank 2 none
        pieces = [(0, {"piece": n}, 1.0) for n in range((3, 1, 0)[rank])]
        result = even_pieces(pieces, lambda: (0, {"piece": "first"}, 1.0), torch.device("cpu"))
    torch.save(result, Path(out) / f"pieces{rank}.pt")


def test_a_rank_with_fewer_pieces_repeats_its_last_at_weight_0_marked_as_filler(tmp_path):
    """Every rank runs as many forwards; the repeats, and a rank's stand-in piece where it has none,
    say so (an objective that counts what it sees leaves them out)."""
    spawn(pieces_worker, str(tmp_path), world_size=3)
    most, fewer, none = (torch.load(tmp_path / f"pieces{rank}.pt", weights_only=False) for rank in range(3))
    assert most == ([(0, {"piece": n}, 1.0) for n in range(3)], 3)
    assert fewer == ([(0, {"piece": 0}, 1.0), *[(0, {"piece": 0, "filler": True}, 0.0)] * 2], 1)
    assert none == ([(0, {"piece": "first", "filler": True}, 0.0)] * 3, 0)
