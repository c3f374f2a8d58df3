"""`finegrain train|predict|evaluate --nproc N`: the same command under torchrun, N processes on
this machine, launched by PyTorch's own launcher (`torch.distributed.run`, in this process).

What a user can get wrong is refused in one line before any process starts: N below 1, N larger
than the data (a predicted file's examples, a global batch), a torch build without the backend.
A rank that fails ends the job (torchrun stops the others); its own error line is printed by
the rank, and the launcher adds one line naming it, instead of torchrun's report.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

from finegrain.errors import FinegrainError


def without_flag(argv: Sequence[str], flag: str) -> list[str]:
    """`argv` without `flag VALUE` or `flag=VALUE` (the launcher's own option, not the ranks')."""
    kept, skip = [], False
    for argument in argv:
        if skip:
            skip = False
        elif argument == flag:
            skip = True
        elif not argument.startswith(f"{flag}="):
            kept.append(argument)
    return kept


def check_backend() -> None:
    """torch.distributed with gloo, the CPU backend every rank joins with on this machine."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_gloo_available()):
        raise FinegrainError("--nproc: this torch build has no torch.distributed gloo backend; "
                             "drop --nproc (one process) or install a torch build with it")


def check_processes(processes: int, command: str, args, train_flags: Mapping[str, str]) -> None:
    """Refuse a process count the command cannot use, from what can be read cheaply: the examples
    of a file to predict or evaluate, a training run's `train.batch_size` (each global batch is
    split across the ranks; the trainer checks the training rows itself)."""
    if processes < 1:
        raise FinegrainError(f"--nproc: {processes}; give at least 1 process")
    if command in ("predict", "evaluate"):
        path = args.input if command == "predict" else args.data
        if path == "-":
            raise FinegrainError("--input -: with --nproc every process reads the input; give a file")
        count = count_examples(args.run_dir, path, labelled=command == "evaluate")
        if count is not None:
            from finegrain.sharded import check_processes as check_examples

            check_examples(processes, count, path)
        return
    from finegrain.train.distributed import check_world

    batch_size = training_batch_size(args, train_flags)
    check_world(batch_size, batch_size, processes)


def count_examples(run_dir: str, path: str, labelled: bool) -> int | None:
    """The examples the run's task reads from `path` (None for an ensemble, whose ranks check)."""
    from finegrain import rundir
    from finegrain.tasks import task_class

    if rundir.is_ensemble(run_dir):
        return None
    config = rundir.read_config(run_dir)
    task = task_class(config.task).from_config(config, rundir.read_labels(run_dir))
    return len(task.read_file(config.data, path, require_label=labelled))


def training_batch_size(args, train_flags: Mapping[str, str]) -> int:
    """`train.batch_size` of the run `finegrain train` would start (or resume); `train_flags`:
    the command's flags that set config keys (`finegrain.cli.TRAIN_FLAGS`)."""
    from finegrain import rundir
    from finegrain.config import load_config

    if args.resume:
        return rundir.read_config(args.resume).train.batch_size
    overrides = list(args.set or [])
    overrides += [f"{key}={getattr(args, flag)}" for flag, key in train_flags.items() if getattr(args, flag) is not None]
    return load_config(args.config, overrides).train.batch_size


@contextmanager
def quiet_agent() -> Iterator[None]:
    """torchrun's agent logs each rank's failure with a traceback; the launcher says it in one line."""
    logger = logging.getLogger("torch.distributed.elastic")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def launch(command: str, argv: Sequence[str], processes: int, args, train_flags: Mapping[str, str]) -> None:
    """Run `finegrain ARGV` (without --nproc) in `processes` processes under torchrun on this machine.

    Args:
        command: train, predict or evaluate.
        argv: the command line after `finegrain`, as typed.
        processes: the ranks to start (`--nproc`).
        args: the parsed command line, for the checks.
        train_flags: `finegrain train`'s flags that set config keys (`finegrain.cli.TRAIN_FLAGS`).

    Raises:
        FinegrainError: a check failed, or a rank exited non-zero (naming it and its exit code).
    """
    check_backend()
    check_processes(processes, command, args, train_flags)
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    from finegrain.cpu import available_cpus

    # Each rank takes its share of the cores (OMP_NUM_THREADS: what this process would have used).
    os.environ["OMP_NUM_THREADS"] = str(max(1, int(os.environ.get("OMP_NUM_THREADS") or available_cpus()) // processes))
    launcher = ["--standalone", "--nproc-per-node", str(processes), "-m", "finegrain", *without_flag(argv, "--nproc")]
    try:
        with quiet_agent():
            run(parse_args(launcher))
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        code = failure.exitcode
        how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
        raise FinegrainError(f"--nproc {processes}: process {rank} {how} (its error is above); torchrun stopped the others") from None

