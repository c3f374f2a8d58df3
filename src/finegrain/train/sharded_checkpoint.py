"""Sharded checkpoints (torch.distributed.checkpoint, DCP): the format an FSDP run writes.

Under FSDP (`finegrain.train.fsdp`) no rank holds the whole model, so no rank can write it alone:
every rank writes its own shards of the weights and the optimizer state into `sharded/` inside
`checkpoint/` (or `best/`), and rank 0 writes the small rest (`state.json`, the scheduler, the RNG
states) beside it, as a one-process run does. The directory is written under a temporary name
and renamed by rank 0 once every rank has written its part (`shared_atomic_dir`), so a rank
killed half-way leaves the previous checkpoint whole.

DCP stores each tensor with its global shape and where each shard sits in it, so a checkpoint
written by N processes loads into M (it reshards), and into one process without any process
group (`read_whole`). The optimizer state is saved keyed by parameter name (as
`torch.distributed.checkpoint.state_dict.get_state_dict` gives it); `optimizer_by_index` and
`optimizer_by_name` turn it into `torch.optim.Optimizer.state_dict()`'s numbered form and back.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from finegrain.atomic import atomic_dir
from finegrain.errors import FinegrainError

SHARDED = "sharded"  # the DCP directory inside checkpoint/ or best/


def is_sharded(directory: Path) -> bool:
    """Whether `directory` (a checkpoint/ or best/) holds a sharded (DCP) state."""
    return (Path(directory) / SHARDED / ".metadata").is_file()


@contextlib.contextmanager
def shared_atomic_dir(path: Path) -> Iterator[Path]:
    """`finegrain.atomic.atomic_dir` for all ranks at once (a collective call): every rank gets the
    same temporary directory to write its part into; rank 0 renames it to `path` after a barrier,
    when every part is there. A rank that dies before then leaves `path` as it was (and the
    temporary directory, which `finegrain.atomic.recover_dir` removes on resume)."""
    rank = dist.get_rank()
    with atomic_dir(path) if rank == 0 else contextlib.nullcontext() as tmp:
        shared = [str(tmp) if rank == 0 else None]
        dist.broadcast_object_list(shared)
        yield Path(shared[0])
        dist.barrier()  # every rank's files are written (and closed) before rank 0 renames


def save(state: dict[str, Any], directory: Path) -> None:
    """Write `state` (nested dicts of tensors and DTensors) as DCP into `directory`/sharded: every
    rank its own shards (a collective call)."""
    import torch.distributed.checkpoint as dcp  # here: a second of start-up that one-process runs never need

    dcp.save(state, checkpoint_id=str(Path(directory) / SHARDED))


def load(state: dict[str, Any], directory: Path, fix: str) -> None:
    """Fill `state` (the shapes to load, as `save` was given them) in place from `directory`/sharded,
    whatever the number of processes that wrote it (a collective call under torchrun)."""
    import torch.distributed.checkpoint as dcp

    try:
        dcp.load(state, checkpoint_id=str(Path(directory) / SHARDED))
    except Exception as exc:  # a missing key or shard, a damaged file: DCP raises several types
        raise FinegrainError(f"{directory}: the sharded checkpoint cannot be read ({_first_line(exc)}); {fix}") from None


def read_whole(directory: Path, fix: str) -> dict[str, Any]:
    """The whole state saved in `directory`/sharded, every tensor whole, in this process alone
    (no process group needed): how one process resumes a run that several wrote."""
    # torch's own dcp_to_torch_save reads a checkpoint so: the planner builds `state` from the
    # metadata (the public `dcp.load` only fills the keys of a state it is given)
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    state: dict[str, Any] = {}
    try:
        _load_state_dict(state, storage_reader=FileSystemReader(str(Path(directory) / SHARDED)),
                         planner=_EmptyStateDictLoadPlanner(), no_dist=True)
    except Exception as exc:
        raise FinegrainError(f"{directory}: the sharded checkpoint cannot be read ({_first_line(exc)}); {fix}") from None
    return state


def optimizer_by_index(by_name: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """An optimizer state keyed by parameter name (DCP's) as `Optimizer.load_state_dict` takes it:
    parameters numbered in the order of `names` (the optimizer's parameters, group after group)."""
    index = {name: i for i, name in enumerate(names)}
    return {
        "state": {index[name]: value for name, value in by_name["state"].items()},
        "param_groups": [{**group, "params": [index[name] for name in group["params"]]}
                         for group in by_name["param_groups"]],
    }


def optimizer_by_name(by_index: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """`Optimizer.state_dict()` (parameters numbered in the order of `names`) keyed by parameter name."""
    return {
        "state": {names[i]: value for i, value in by_index["state"].items()},
        "param_groups": [{**group, "params": [names[i] for i in group["params"]]} for group in by_index["param_groups"]],
    }


def with_own_kernels(state: dict[str, Any], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """`state` (an optimizer state of either form) with `optimizer`'s own choice of update kernel in
    each group: a one-process run's fused AdamW does not take an FSDP run's DTensors, and an FSDP
    run's unfused choice would slow a one-process run down."""
    kernels = ("fused", "foreach", "capturable", "differentiable")
    groups = [{**group, **{k: own[k] for k in kernels if k in own}}
              for group, own in zip(state["param_groups"], optimizer.param_groups)]
    return {**state, "param_groups": groups}


def parameter_names(optimizer: torch.optim.Optimizer, trainable: Mapping[str, torch.Tensor]) -> list[str]:
    """The names of `optimizer`'s parameters in its numbering (group after group)."""
    names = {id(param): name for name, param in trainable.items()}
    return [names[id(param)] for group in optimizer.param_groups for param in group["params"]]


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
