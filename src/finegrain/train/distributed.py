"""Training in several processes under torchrun: `torchrun --nproc-per-node N -m finegrain train CONFIG`.

Each rank trains on its share of every batch. `ShardedSampler` splits each batch of the run's
sampler across the ranks (every `world_size`-th item of a length bucket, so the shares hold
alike lengths), so the global batch is the configured `train.batch_size` and every rank takes the
same number of steps. Within a step each objective's mean loss is taken over the global batch:
the ranks first add up their loss weights (`all_sum`), then, after their backward passes, their
trainable gradients (`sum_gradients`: one all-reduce of one flat buffer per optimizer step, as
DDP's buckets under `no_sync` for accumulation; only the trainable parameters, the adapter and
head, take part). Every rank then holds the one-process gradient of the global batch, and the
same optimizer step keeps their weights equal. Only rank 0 writes (`checkpointing.RunWriter`).

The backend is PyTorch's own: gloo on the CPU, nccl on CUDA.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from finegrain.errors import FinegrainError
from finegrain.train.sampler import Draw, Sampler


def world_size() -> int:
    """Processes in this torchrun job (torch.distributed initialised), else 1."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def launched() -> bool:
    """Whether torchrun started this process as one of several (its WORLD_SIZE above 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def cpus_per_rank(cpus: int) -> int:
    """This rank's share of the machine's `cpus`: torchrun's ranks on one machine split its cores."""
    return max(1, cpus // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def init_from_env(device: torch.device) -> bool:
    """Join the job torchrun describes in the environment: gloo on the CPU, nccl on CUDA (each
    rank on its LOCAL_RANK's GPU). Returns False, doing nothing, outside torchrun or when joined."""
    if not launched() or (dist.is_available() and dist.is_initialized()):
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    available = dist.is_available() and (dist.is_nccl_available() if backend == "nccl" else dist.is_gloo_available())
    if not available:
        raise FinegrainError(f"torchrun: this torch build has no {backend} backend for train.device {device.type}; "
                             "run one process (plain `finegrain train`) or install a torch build with it")
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    # A command that succeeds leaves with the other ranks (`finegrain.cli.leave_job`); after a
    # failure, leave at this process's exit, while the interpreter still runs: one still joined at
    # its exit can abort in gloo's threads ("terminate called without an active exception"). Not
    # sooner: a run of several stages (continual, sweep) trains in the one job it joined, as joining
    # again under torchrun can hang.
    atexit.register(shutdown)
    return True


def shutdown(together: bool = False) -> None:
    """Leave the job (after the run's last collective call).

    Args:
        together: first wait until every rank is leaving (a barrier), so that none closes its
            connections while another still works with them; only after a command succeeded on
            this rank, since after a failure the others may never come.
    """
    if dist.is_available() and dist.is_initialized():
        if together:
            try:
                dist.barrier()
            except RuntimeError as e:  # another rank failed and is gone: it reports that itself
                if not peer_lost(e):
                    raise
        dist.destroy_process_group()


def check_world(batch_size: int, rows: int, processes: int) -> None:
    """Refuse a job with more processes than a global batch (or the training data) has rows:
    a rank with nothing to train on every step is a mistake to name, not to run."""
    if processes > min(batch_size, rows):
        what = f"train.batch_size is {batch_size}" if batch_size <= rows else f"the training data has {rows} rows"
        raise FinegrainError(f"torchrun: {processes} processes, but {what}: each global batch is split across the "
                             f"processes; run at most {min(batch_size, rows)} (--nproc-per-node) or raise train.batch_size")


@dataclass(frozen=True)
class ShardedSampler:
    """This rank's share of each batch of `sampler`: items `rank`, `rank + world_size`, ...

    Args:
        sampler: the run's sampler (its batches are the global batches).
        rank: this process's rank.
        world_size: processes in the job.
    """

    sampler: Sampler
    rank: int
    world_size: int

    def __len__(self) -> int:
        return len(self.sampler)

    def epoch(self, epoch: int) -> list[Draw]:
        return [Draw(draw.objective, draw.indices[self.rank :: self.world_size]) for draw in self.sampler.epoch(epoch)]


def broadcast_from_rank0(tensors: Iterable[torch.Tensor]) -> None:
    """Overwrite `tensors` with rank 0's, as DDP does when it wraps a model: every rank then starts
    from the same weights, whatever random draws (an adapter's init, the recipe's probe) each made."""
    with torch.no_grad():
        for tensor in tensors:
            dist.broadcast(tensor, 0)


def all_sum(values: list[float], device: torch.device = torch.device("cpu")) -> list[float]:
    """`values` summed over the ranks (in float64: loss weights and token counts stay exact)."""
    summed = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(summed)
    return summed.tolist()


def sum_gradients(params: Iterable[torch.Tensor]) -> None:
    """Replace each parameter's gradient by its sum over the ranks, in one all-reduce of one flat
    buffer; a parameter without a gradient here (an empty share of the batch) adds zeros."""
    params = list(params)
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).to(torch.float32) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for param in params:
        count = param.numel()
        param.grad = flat[offset : offset + count].view_as(param).to(param.dtype)
        offset += count


_PEER_GONE = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "NCCL communicator was aborted")


def peer_lost(exc: BaseException) -> bool:
    """Whether `exc` is a collective call that failed because another process of the job is gone
    (killed or crashed): gloo and nccl raise a RuntimeError that says so only in its text."""
    return isinstance(exc, RuntimeError) and any(sign in str(exc) for sign in _PEER_GONE)


def lost_peer_error(run_dir: Path) -> FinegrainError:
    """The one line each surviving rank ends with when another rank of the job died."""
    return FinegrainError(f"torchrun: another process of this job ended during training, so this one stops too; "
                          f"`finegrain train --resume {run_dir}` continues from the last complete checkpoint")
