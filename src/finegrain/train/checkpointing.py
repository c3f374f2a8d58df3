"""What a training run writes to its directory and reads back: `metrics.jsonl` (and the trackers
of `train.report_to`: TensorBoard, MLflow; finegrain.train.tracking),
`checkpoint/` (resumes exactly: weights, optimizer, scheduler, RNG states, position) and `best/`.

One object, `RunWriter`, owns all of it and knows its process rank: under torchrun every rank
trains, but only rank 0 writes, so that N processes do not race on the same files; every rank
reads a checkpoint back when resuming. File names come from `finegrain.rundir`.
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed

from finegrain import rundir
from finegrain.atomic import atomic_dir, atomic_write_text, fault_point, recover_dir
from finegrain.errors import FinegrainError
from finegrain.peft.base import load_weights, save_weights
from finegrain.train import sharded_checkpoint as sharded
from finegrain.train.tracking import Sink, open_sinks


def process_rank() -> int:
    """This process's rank in a torchrun job (torch.distributed initialised), else 0."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


def rng_states() -> dict[str, Any]:
    """This process's random streams (Python's, NumPy's, torch's CPU generator), as a checkpoint keeps them."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_states(states: dict[str, Any]) -> None:
    """Put back the streams `rng_states` took."""
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])


class RunWriter:
    """The run directory's training files, written by rank 0 only.

    Args:
        run_dir: the run directory.
        rank: this process's rank; default `process_rank()`.
        sinks: where metrics also go (`tracking.Sink`); default: the trackers `train.report_to` of the
            run's config.yaml names (rank 0 only).
    """

    def __init__(self, run_dir: Path, rank: int | None = None, sinks: list[Sink] | None = None):
        self.run_dir = Path(run_dir)
        self.rank = process_rank() if rank is None else rank
        self.writes = self.rank == 0
        self.metrics_path = self.run_dir / rundir.METRICS_LOG
        self.sinks = (open_sinks(self.run_dir) if sinks is None else sinks) if self.writes else []
        self.last_step = 0

    # -- metrics.jsonl ---------------------------------------------------------------------

    def start_log(self) -> None:
        """A fresh run's log: a previous start's records (a restart) are not this run's."""
        if self.writes and self.metrics_path.exists():
            self.metrics_path.unlink()

    def log(self, record: dict[str, Any]) -> None:
        """Append one record (it has a `step`) to metrics.jsonl, and give it to the sinks."""
        if not self.writes:
            return
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        self.last_step = record["step"]
        for sink in self.sinks:
            sink.log(record)

    def close(self) -> None:
        """Training ended (or stopped): the sinks write out what they hold."""
        for sink in self.sinks:
            sink.flush()

    def finish(self) -> None:
        """The run is finished, its reports written: the sinks log them and end."""
        for sink in self.sinks:
            sink.finish(self.run_dir, self.last_step)
            sink.close(finished=True)

    # -- best/ -----------------------------------------------------------------------------

    def save_best(self, trainable: Mapping[str, torch.Tensor]) -> None:
        """Replace `best/` with the trainable weights."""
        if self.writes:
            with atomic_dir(self.run_dir / rundir.BEST) as tmp:
                save_weights(_copies(trainable), os.path.join(tmp, rundir.TRAINABLE))

    def restore_best(self, trainable: Mapping[str, torch.Tensor]) -> None:
        """Load `best/` into the trainable parameters, when there is one."""
        path = self.run_dir / rundir.BEST / rundir.TRAINABLE
        if path.exists():
            self._load_trainable(path, trainable)
        elif sharded.is_sharded(path.parent):  # an FSDP run's (finegrain.train.fsdp), whole here
            self._copy_trainable(path.parent / sharded.SHARDED, sharded.read_whole(path.parent, self._fix())["model"],
                                 trainable)

    # -- checkpoint/ -----------------------------------------------------------------------

    def save_checkpoint(self, trainable: Mapping[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                        scheduler: Any, state: dict[str, Any], hooks: Sequence[Any] = ()) -> None:
        """Replace `checkpoint/` with everything a resume needs, this process's RNG states and the
        state of the method's step hooks (`train.objectives.StepHook`: AdaLoRA's allocator) included."""
        if not self.writes:
            return
        with atomic_dir(self.run_dir / rundir.CHECKPOINT) as tmp:
            save_weights(_copies(trainable), os.path.join(tmp, rundir.TRAINABLE))
            fault_point("checkpoint_write")  # test-only (tests/test_faults.py)
            torch.save(
                {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_states(),
                 "hooks": [hook.state_dict() for hook in hooks]},
                os.path.join(tmp, rundir.OPTIMIZER),
            )
            Path(tmp, rundir.STATE).write_text(json.dumps(state, indent=2), encoding="utf-8")

    def load_checkpoint(self, trainable: Mapping[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                        scheduler: Any, hooks: Sequence[Any] = ()) -> dict[str, Any]:
        """Load `checkpoint/` into the weights, optimizer, scheduler, RNGs and step hooks; returns
        the saved training state. Records logged after it are dropped from metrics.jsonl. A sharded
        checkpoint (the ranks of an FSDP run wrote it: finegrain.train.fsdp) is read whole here."""
        directory = recover_dir(self.run_dir / rundir.CHECKPOINT)
        recover_dir(self.run_dir / rundir.BEST)
        if not (directory / rundir.STATE).exists():
            raise FinegrainError(f"{directory}: no checkpoint to resume from; start the run again without --resume")
        moments = None
        if sharded.is_sharded(directory):
            whole = sharded.read_whole(directory, self._fix())
            self._copy_trainable(directory / sharded.SHARDED, whole["model"], trainable)
            moments = sharded.optimizer_by_index(whole["optimizer"], sharded.parameter_names(optimizer, trainable))
            moments = sharded.with_own_kernels(moments, optimizer)
        else:
            self._load_trainable(directory / rundir.TRAINABLE, trainable)
        return self._restore(directory, self._read_saved(directory), optimizer, moments, scheduler, hooks)

    def _read_saved(self, directory: Path) -> dict[str, Any]:
        """`checkpoint/`'s optimizer.pt: the optimizer (one process's), scheduler, RNG and step hook states."""
        try:
            return torch.load(directory / rundir.OPTIMIZER, weights_only=False)
        except Exception as exc:  # a damaged pickle raises any of a dozen types
            raise FinegrainError(f"{directory}: cannot be read ({type(exc).__name__}: {exc}); {self._fix()}") from None

    def _restore(self, directory: Path, saved: dict[str, Any], optimizer: torch.optim.Optimizer,
                 moments: dict[str, Any] | None, scheduler: Any, hooks: Sequence[Any]) -> dict[str, Any]:
        """What a checkpoint holds beside the weights: the step hooks, the optimizer (`moments`, or
        the one-process state in `saved`; None: loaded already), the scheduler, the RNG states and the
        training state (returned); the log is cut back to its step."""
        try:
            state = json.loads((directory / rundir.STATE).read_text(encoding="utf-8"))
        except Exception as exc:
            raise FinegrainError(f"{directory}: cannot be read ({type(exc).__name__}: {exc}); {self._fix()}") from None
        hook_states = saved.get("hooks", [])
        if len(hook_states) != len(hooks):
            raise FinegrainError(f"{directory}: holds the state of {len(hook_states)} step hooks, the run's adapter "
                                 f"method has {len(hooks)}; {self._fix()}")
        for hook, hook_state in zip(hooks, hook_states):
            hook.load_state_dict(hook_state)
        if moments is not None or "optimizer" in saved:
            optimizer.load_state_dict(moments or saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        set_rng_states(saved["rng"])
        self._trim_log(state["step"])
        return state

    def _trim_log(self, step: int) -> None:
        """Keep the records up to `step`: later ones belong to work that will be done again, and a
        kill may also have cut the last line short. The validation of the averaged weights
        (`train.average_last`, marked `averaged`) is logged after the last checkpoint, at its step,
        and done again too."""
        if not self.writes or not self.metrics_path.exists():
            return
        kept = []
        for line in self.metrics_path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
                if record["step"] <= step and "averaged" not in record:
                    kept.append(line)
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
        atomic_write_text(self.metrics_path, "".join(line + "\n" for line in kept))

    def _load_trainable(self, path: Path, trainable: Mapping[str, torch.Tensor]) -> None:
        """Load saved trainable weights, refusing a damaged file or one of another config."""
        self._copy_trainable(path, load_weights(path, self._fix()), trainable)

    def _copy_trainable(self, path: Path, tensors: Mapping[str, torch.Tensor], trainable: Mapping[str, torch.Tensor]) -> None:
        """Copy `tensors` (read from `path`) into the trainable parameters, refusing those of another config."""
        check_trainable(path, tensors, trainable, self._fix())
        with torch.no_grad():
            for name, param in trainable.items():
                param.copy_(tensors[name])

    def _fix(self) -> str:
        """What to do about a damaged checkpoint: without it an unfinished run restarts from its
        start, and a finished one (whose adapter is what counts) can only be trained again elsewhere."""
        if rundir.is_finished(self.run_dir):
            return "the finished run's adapter does not need it; to train on, train the run again into another --output"
        return (f"delete {self.run_dir / rundir.CHECKPOINT} and {self.run_dir / rundir.BEST}, then "
                f"`finegrain train --resume {self.run_dir}` restarts the run from its start")


def check_trainable(path: Path, tensors: Mapping[str, torch.Tensor], trainable: Mapping[str, torch.Tensor],
                    fix: str) -> None:
    """Refuse saved weights (read from `path`) that lack one of the trainable parameters or shape it otherwise."""
    for name, param in trainable.items():
        if name not in tensors or tensors[name].shape != param.shape:
            found = tuple(tensors[name].shape) if name in tensors else "nothing"
            raise FinegrainError(f"{path}: '{name}' is {found}, the model needs {tuple(param.shape)}; {fix}")


def _copies(trainable: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors to save, detached from autograd. Only those that share their storage with
    another (views of one flat buffer, as a wrapper such as FSDP keeps them; safetensors refuses
    shared storage) or are not contiguous are copied: a full fine-tune (peft.method: full) saves
    every weight, and a copy of them all cost 513 MiB more peak memory on the default model."""
    storages = Counter(p.untyped_storage().data_ptr() for p in trainable.values())
    return {
        name: p.detach() if storages[p.untyped_storage().data_ptr()] == 1 and p.is_contiguous() else p.detach().clone().contiguous()
        for name, p in trainable.items()
    }
