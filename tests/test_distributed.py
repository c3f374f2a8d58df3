"""Training in two processes (torch.distributed, gloo, as torchrun runs it) on the tiny model: each
rank's share of a global batch gives, summed over the ranks, the one-process gradient of that batch,
and a two-process run ends with the one-process run's weights."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import random_llama
from finegrain.cli import main
from finegrain.config import TrainConfig
from finegrain.model.config import LlamaConfig
from finegrain.train.distributed import ShardedSampler, shutdown
from finegrain.train.sampler import LengthBuckets
from finegrain.train.trainer import Trainer
from launch_helpers import finegrain, in_job, join_job, spawn
from test_train import classifier, write_config, write_data

CONFIG = TrainConfig(epochs=1, batch_size=8, grad_accum=2, threads=1, max_grad_norm=1.0, micro_batch_tokens=24,
                     checkpoint_every=1000)


def tiny_llama():
    return random_llama(LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
        rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=256, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2,
    ))


def first_step(trainer: Trainer) -> tuple[dict[str, torch.Tensor], float]:
    """The gradients of the first optimizer step (the first `grad_accum` batches), as the optimizer
    would read them (after the all-reduce and clipping), and the step's logged loss."""
    grads = {}
    trainer.optimizer.step = lambda: grads.update({n: p.grad.clone() for n, p in trainer.trainable.items()})
    loss, _, _ = trainer._step(trainer.sampler.epoch(0)[: CONFIG.grad_accum])
    return grads, loss


def run(run_dir: Path) -> dict:
    """One rank's (or the only process's) first-step gradients and loss, and the weights after one epoch."""
    for name in ("step", "fit"):
        (run_dir / name).mkdir(parents=True)
    task, model, items = classifier(tiny_llama())
    grads, loss = first_step(Trainer(model, task, items, CONFIG, run_dir / "step", pad_id=0, progress=False))
    task, model, items = classifier(tiny_llama())
    trainer = Trainer(model, task, items, CONFIG, run_dir / "fit", pad_id=0, progress=False)
    trainer.fit()
    return {"grads": grads, "loss": loss, "weights": {n: p.detach().clone() for n, p in trainer.trainable.items()},
            "steps": trainer.state.step, "world_size": trainer.world_size,
            "shares": [len(d.indices) for d in trainer.sampler.epoch(0)]}


def worker(rank: int, world_size: int, port: int, out: str) -> None:
    with in_job(rank, world_size, port):
        result = run(Path(out) / f"rank{rank}")
    torch.save(result, Path(out) / f"rank{rank}.pt")


def leaving_worker(rank: int, world_size: int, port: int, out: str) -> None:
    """Rank 1 leaves the job at once, as a rank that failed does (at its exit); rank 0, done, then
    leaves together with the others: its barrier meets a closed peer, which is no error of its own."""
    import time

    join_job(rank, world_size, port)
    if rank == 1:
        return
    time.sleep(1)
    shutdown(together=True)
    Path(out, "left").write_text("ok")


def test_a_rank_leaving_together_after_another_failed_ends_cleanly(tmp_path):
    spawn(leaving_worker, str(tmp_path))
    assert (tmp_path / "left").read_text() == "ok"


def test_each_rank_gets_its_share_of_every_batch():
    sampler = LengthBuckets([4 + i % 7 for i in range(21)], batch_size=8, seed=0)
    shards = [ShardedSampler(sampler, rank, 2) for rank in range(2)]
    assert len(shards[0]) == len(shards[1]) == len(sampler) == 3
    for whole, *parts in zip(sampler.epoch(1), *(shard.epoch(1) for shard in shards)):
        assert sorted(i for part in parts for i in part.indices) == sorted(whole.indices)
        assert abs(len(parts[0].indices) - len(parts[1].indices)) <= 1


def test_two_processes_train_as_one(tmp_path):
    """gloo, 2 processes: the summed gradient of a global batch (two accumulated batches, in
    micro-batches) is the one-process gradient, the logged loss is the same, and after an epoch the
    weights are the one-process run's, to float32 rounding; only rank 0 wrote run files."""
    single = run(tmp_path / "single")
    spawn(worker, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    assert single["world_size"] == 1 and single["shares"] == [8, 8, 8]
    for result in ranks:
        assert result["world_size"] == 2 and result["shares"] == [4, 4, 4]  # half of each global batch
        assert result["steps"] == single["steps"]
        assert result["loss"] == pytest.approx(single["loss"], rel=1e-5)
        for name, grad in single["grads"].items():
            torch.testing.assert_close(result["grads"][name], grad, atol=1e-6, rtol=1e-5, msg=name)
        for name, weight in single["weights"].items():
            torch.testing.assert_close(result["weights"][name], weight, atol=1e-5, rtol=1e-4, msg=name)
    assert any((tmp_path / "rank0" / "fit").iterdir()) and not any((tmp_path / "rank1" / "fit").iterdir())


def test_torchrun_train_writes_one_run_equal_to_one_process(tiny_model_dir, tmp_path):
    """`torchrun --nproc-per-node 2 -m finegrain train CONFIG`: rank 0 writes the run directory and
    the report; the adapter is the one-process run's."""
    data = write_data(tmp_path / "data.jsonl", 64)
    config = write_config(tmp_path / "run.yaml", tiny_model_dir, data, epochs=1)
    options = ["--set", "lora.dropout=0", "--set", "head.tfidf_mix=0"]  # dropout: each rank draws its own masks
    assert main(["train", str(config), "--output", str(tmp_path / "one"), *options]) == 0
    done = finegrain("train", str(config), "--output", str(tmp_path / "two"), *options, processes=2)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("weighted avg") == 1  # one report, from rank 0
    one = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    two = load_file(tmp_path / "two" / "adapter" / "adapter_model.safetensors")
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], atol=1e-5, rtol=1e-4, msg=name)
    results = [json.loads((tmp_path / run / "metrics.json").read_text()) for run in ("one", "two")]
    assert results[0]["train"]["steps"] == results[1]["train"]["steps"]
    assert results[0]["test"]["accuracy"] == results[1]["test"]["accuracy"]


def test_resume_one_then_two_then_one_process(tiny_model_dir, tmp_path):
    """A run killed in one process, resumed by two (torchrun; a killed rank ends the job, non-zero)
    and finished by one ends with the adapter of an uninterrupted one-process run."""
    data = write_data(tmp_path / "data.jsonl", 96)
    config = write_config(tmp_path / "run.yaml", tiny_model_dir, data, epochs=2)
    options = ["--set", "lora.dropout=0", "--set", "head.tfidf_mix=0"]
    assert main(["train", str(config), "--output", str(tmp_path / "whole"), *options]) == 0
    run_dir = str(tmp_path / "interrupted")

    def checkpoint_step() -> int:
        return json.loads((tmp_path / "interrupted" / "checkpoint" / "state.json").read_text())["step"]

    assert finegrain("train", str(config), "--output", run_dir, *options, fault="train_step:7").returncode != 0
    assert checkpoint_step() == 6  # checkpoint_every 2
    killed = finegrain("train", "--resume", run_dir, processes=2, fault="train_step:4")  # each rank at its 4th step
    assert killed.returncode != 0
    assert checkpoint_step() == 8  # the two processes trained steps 7 and 8 (killed at 10, after 9)
    assert not (tmp_path / "interrupted" / "metrics.json").exists()
    done = finegrain("train", "--resume", run_dir)
    assert done.returncode == 0, done.stderr[-2000:]
    whole = load_file(tmp_path / "whole" / "adapter" / "adapter_model.safetensors")
    resumed = load_file(tmp_path / "interrupted" / "adapter" / "adapter_model.safetensors")
    for name in whole:
        torch.testing.assert_close(resumed[name], whole[name], atol=1e-5, rtol=1e-4, msg=name)
    steps = [json.loads(line)["step"] for line in (tmp_path / "interrupted" / "metrics.jsonl").read_text().splitlines()
             if "train_loss" in line]
    total = json.loads((tmp_path / "whole" / "metrics.json").read_text())["train"]["steps"]  # 20, or fewer where
    assert steps == list(range(1, total + 1))  # the recipe stops early; each step logged once: the killed steps
    # were trimmed and done again


def test_more_processes_than_a_batch_is_one_line():
    from finegrain.errors import FinegrainError
    from finegrain.train.distributed import check_world

    check_world(8, 24, 2)
    with pytest.raises(FinegrainError, match="^torchrun: 4 processes, but train.batch_size is 2: .* run at most 2 "):
        check_world(2, 24, 4)
    with pytest.raises(FinegrainError, match="^torchrun: 4 processes, but the training data has 3 rows"):
        check_world(8, 3, 4)
