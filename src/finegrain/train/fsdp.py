"""FSDP2 (`torch.distributed.fsdp.fully_shard`) under torchrun: a model sharded across the ranks.

Data-parallel training of an adapter (`finegrain.train.distributed`) keeps the whole model on
every rank and all-reduces the few trainable tensors. A full fine-tune (`peft.method: full`), or
any run with `train.fsdp: true` (a model that does not fit one device), is sharded instead: each
decoder layer, the embedding table and the task model's root each become one FSDP unit, whose
weights, gradients and optimizer state every rank holds one 1/N slice of. A unit's weights are
all-gathered for its forward and its backward and freed after; its gradients are
reduce-scattered back to the slices. The backend is PyTorch's own: gloo on the CPU, nccl on CUDA.

How the trainer uses it (`finegrain.train.trainer.Trainer`):
- `shard(model)` gives a sharded twin of the task model that trains in its place; the model
  itself keeps its structure, but its weights are freed (each rank then holds its slices only).
  `gather` gives rank 0 the trained weights back in the model itself, so that what follows the
  training (the test, the saved model directory) runs in one process, as without FSDP.
- Every rank must run the same collective calls in the same order: each forward all-gathers.
  `even_pieces` gives every rank the same number of micro-batches per step (a rank with fewer
  runs copies of its last one at loss weight 0). Gradients are summed, not averaged, over the
  ranks (the trainer already divides each rank's loss by the global batch's loss weight), and
  with plain sums only: gloo has neither the average nor the pre-multiplied sum FSDP2 would
  otherwise use.
- Checkpoints and `best/` are sharded (`ShardedRunWriter`, `finegrain.train.sharded_checkpoint`).
- A weight written in place while gathered (LP-FT's head, fitted after a forward) is carried into
  the slices (`keep_gathered_writes`); FSDP would drop it when it frees the gathered copy.

What runs otherwise than without FSDP, each said in one line (`note`): bf16 training runs under
autocast alone (the trainer's bf16 copies of the frozen matrices would be copies of one rank's
slices); an output head tied to the embedding table keeps the table in the root unit, and the
prefix cache is then off. The model is still read whole on every rank before it is sliced: the
set-up peaks at one whole copy per rank; the gradients and the optimizer state (twice the
weights, for AdamW) are sliced from the start.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_state_dict, set_model_state_dict, set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from finegrain import rundir
from finegrain.atomic import fault_point, recover_dir
from finegrain.errors import FinegrainError
from finegrain.peft.base import load_weights
from finegrain.train import sharded_checkpoint as sharded
from finegrain.train.checkpointing import RunWriter, check_trainable, rng_states
from finegrain.train.distributed import broadcast_from_rank0


def shard(model: nn.Module, device: torch.device, sample: dict[str, Any]) -> tuple[nn.Module, bool]:
    """A sharded twin of the task `model` (a collective call), and whether its embedding table is a
    unit of its own (the prefix cache runs the table outside the root's forward; a table tied to an
    output head stays in the root).

    The twin is a copy of the module tree that starts from the same parameter objects (rank 0's
    values, broadcast first); `fully_shard` replaces them in the twin by its slices. The model's own
    weights are then freed, so a rank holds the model once (sliced), not once whole and once sliced.
    One forward of the batch `sample` through the twin's root sets FSDP up from the root down: the
    prefix cache calls the embedding first, which would otherwise make it a root of its own.
    """
    broadcast_from_rank0(model.parameters())  # every rank slices the same weights, whatever each drew
    shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
    twin = copy.deepcopy(model, shared)  # the same tensors in a new module tree: no copy of a weight
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    decoder = twin.model
    for layer in decoder.layers:
        fully_shard(layer, mesh=mesh)
    embedding = decoder.embed_tokens
    own_unit = not any(p is embedding.weight for m in twin.modules() if m is not embedding
                       for p in m.parameters(recurse=False))
    if own_unit:
        fully_shard(embedding, mesh=mesh)
    fully_shard(twin, mesh=mesh)
    for module in twin.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)  # summed: each rank's loss is already over the global batch
            module.set_force_sum_reduction_for_comms(True)  # gloo has no AVG or PREMUL_SUM
    with torch.no_grad():
        for param in model.parameters():  # the twin holds this rank's slices now
            param.data = torch.empty(0, dtype=param.dtype, device=param.device)
        training = twin.training
        twin.eval()  # no dropout: the run's random draws stay those of a run without FSDP
        twin(sample)
        twin.train(training)
    twin.reshard()  # the root keeps its weights gathered after a forward, for the backward that follows
    return twin, own_unit


def note(text: str) -> None:
    """Say `text` once for the job (rank 0), as a warning: what runs otherwise under FSDP than without."""
    if dist.get_rank() == 0:
        warnings.warn(text, stacklevel=3)


def gather(twin: nn.Module, model: nn.Module) -> None:
    """Rank 0's `model` gets the twin's trained weights, whole (a collective call); the other ranks'
    model stays without weights (they test and write nothing)."""
    whole = get_model_state_dict(twin, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.data = whole[name].to(device=param.device, dtype=param.dtype)


def keep_gathered_writes(twin: nn.Module) -> None:
    """What was written into the root unit's gathered weights (LP-FT fits the head in place after a
    forward, which leaves them gathered) becomes the ranks' slices; FSDP would drop it when it next
    frees the gathered copy. A collective call."""
    gathered = {name: p.detach().clone() for name, p in twin.named_parameters() if not isinstance(p, DTensor)}
    twin.reshard()
    if gathered:
        set_model_state_dict(twin, gathered, options=StateDictOptions(full_state_dict=True, strict=False))


def even_pieces(pieces: list[tuple[int, Any, float]], fill: Callable[[], tuple[int, Any, float]],
                device: torch.device) -> tuple[list[tuple[int, Any, float]], int]:
    """This rank's micro-batches of a step, made as many as the rank with the most has (a collective
    call), and how many of them are real. A rank with fewer repeats its last one at loss weight 0
    (`fill`: a zero-weight piece for a rank with none): FSDP all-gathers in every forward, and a
    rank that skipped one would leave the others waiting. A repeat's batch says `filler: True`, so
    that an objective that counts what it sees (`finegrain.train.agreement`) leaves it out."""
    counts = torch.tensor([len(pieces)], device=device)  # nccl reduces CUDA tensors only
    dist.all_reduce(counts, op=dist.ReduceOp.MAX)
    real = len(pieces)
    if real < int(counts):
        index, batch, _ = pieces[-1] if pieces else fill()
        pieces = [*pieces, *[(index, {**batch, "filler": True}, 0.0)] * (int(counts) - real)]
    return pieces, real


class ShardedRunWriter(RunWriter):
    """`RunWriter` for a sharded model: `checkpoint/` and `best/` hold its weights and optimizer
    state as DCP shards, written by every rank (`finegrain.train.sharded_checkpoint`); rank 0 writes
    the rest, as for one process. Reads either format: a checkpoint one process wrote resumes here.

    Args:
        run_dir: the run directory.
        model: the sharded twin (`shard`).
    """

    def __init__(self, run_dir: Path, model: nn.Module):
        super().__init__(run_dir)
        self.model = model
        self.only_trained = StateDictOptions(ignore_frozen_params=True, strict=False)  # the frozen weights are the base's

    def save_best(self, trainable: Mapping[str, torch.Tensor]) -> None:
        weights = get_model_state_dict(self.model, options=self.only_trained)
        with sharded.shared_atomic_dir(self.run_dir / rundir.BEST) as tmp:
            sharded.save({"model": weights}, tmp)

    def restore_best(self, trainable: Mapping[str, torch.Tensor]) -> None:
        directory = self.run_dir / rundir.BEST
        found = [(directory / rundir.TRAINABLE).exists() or sharded.is_sharded(directory)]
        dist.broadcast_object_list(found)  # rank 0's answer: every rank loads, or none
        if found[0]:
            self._load_weights(directory, trainable, None)

    def save_checkpoint(self, trainable: Mapping[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                        scheduler: Any, state: dict[str, Any], hooks: Sequence[Any] = ()) -> None:
        weights, moments = get_state_dict(self.model, optimizer, options=self.only_trained)
        rng = rng_states()
        with sharded.shared_atomic_dir(self.run_dir / rundir.CHECKPOINT) as tmp:
            sharded.save({"model": weights, "optimizer": moments}, tmp)
            fault_point(f"sharded_checkpoint_rank{self.rank}")  # test-only (tests/test_fsdp.py): one rank killed
            if self.writes:  # the same on every rank: rank 0's
                torch.save({"scheduler": scheduler.state_dict(), "rng": rng, "hooks": [h.state_dict() for h in hooks]},
                           os.path.join(tmp, rundir.OPTIMIZER))
                Path(tmp, rundir.STATE).write_text(json.dumps(state, indent=2), encoding="utf-8")

    def load_checkpoint(self, trainable: Mapping[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                        scheduler: Any, hooks: Sequence[Any] = ()) -> dict[str, Any]:
        directory = self.run_dir / rundir.CHECKPOINT
        if self.writes:  # what a killed rank left half-written goes, once
            recover_dir(directory)
            recover_dir(self.run_dir / rundir.BEST)
        dist.barrier()
        if not (directory / rundir.STATE).exists():
            raise FinegrainError(f"{directory}: no checkpoint to resume from; start the run again without --resume")
        saved = self._read_saved(directory)
        self._load_weights(directory, trainable, optimizer, saved.pop("optimizer", None))
        return self._restore(directory, saved, optimizer, None, scheduler, hooks)  # the optimizer is loaded

    def _load_weights(self, directory: Path, trainable: Mapping[str, torch.Tensor],
                      optimizer: torch.optim.Optimizer | None, numbered: dict[str, Any] | None = None) -> None:
        """Load the trained weights (and the optimizer state) of `directory` into the sharded model:
        DCP reshards a sharded state to this job's ranks; a one-process state is sliced here."""
        fix = self._fix()
        if sharded.is_sharded(directory):
            if optimizer is None:
                weights = get_model_state_dict(self.model, options=self.only_trained)
                sharded.load({"model": weights}, directory, fix)
                set_model_state_dict(self.model, weights, options=self.only_trained)
                return
            weights, moments = get_state_dict(self.model, optimizer, options=self.only_trained)
            sharded.load({"model": weights, "optimizer": moments}, directory, fix)
            set_state_dict(self.model, optimizer, model_state_dict=weights, optim_state_dict=moments,
                           options=self.only_trained)
            return
        path = directory / rundir.TRAINABLE
        tensors = load_weights(path, fix)
        check_trainable(path, tensors, trainable, fix)
        whole = StateDictOptions(full_state_dict=True, ignore_frozen_params=True, strict=False)
        weights = {name: tensors[name] for name in trainable}
        if optimizer is None:
            set_model_state_dict(self.model, weights, options=whole)
            return
        if numbered is None:
            raise FinegrainError(f"{directory}: holds no optimizer state; {fix}")
        moments = sharded.optimizer_by_name(numbered, sharded.parameter_names(optimizer, trainable))
        moments = sharded.with_own_kernels(moments, optimizer)
        set_state_dict(self.model, optimizer, model_state_dict=weights, optim_state_dict=moments, options=whole)
