"""Start finegrain as a distributed job does, for the tests of torchrun, FSDP and sharded prediction:
`finegrain ARGS` as a subprocess (under torchrun for more than one process), and spawned workers
that join one gloo job the way torchrun's environment makes them."""

import contextlib
import multiprocessing
import os
import socket
import subprocess
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from finegrain.train.distributed import init_from_env, shutdown

# Two processes on two cores; a rank that crashes (a signal, not an exception) prints its Python stack.
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}


def finegrain(*args: str, processes: int = 1, fault: str | None = None) -> subprocess.CompletedProcess:
    """`python -m finegrain ARGS`, or `torchrun --nproc-per-node N -m finegrain ARGS` where `processes`
    is above 1, with FINEGRAIN_FAULT set to `fault` (finegrain.atomic.fault_point) if given."""
    launcher = [str(Path(sys.executable).with_name("torchrun")), "--nproc-per-node", str(processes)] \
        if processes > 1 else [sys.executable]
    env = {**ONE_THREAD, "FINEGRAIN_FAULT": fault} if fault else ONE_THREAD
    done = subprocess.run([*launcher, "-m", "finegrain", *args], capture_output=True, text=True, timeout=300, env=env)
    if done.returncode:  # the whole of it, where a test's message shows the end (torchrun's summary ends a failed job)
        print(done.stderr, file=sys.stderr)
    return done


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join_job(rank: int, world_size: int, port: int) -> None:
    """Make this spawned process rank `rank` of a gloo job, as torchrun's environment would."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    assert init_from_env(torch.device("cpu"))


@contextlib.contextmanager
def in_job(rank: int, world_size: int, port: int) -> Iterator[None]:
    """Rank `rank` of a gloo job for the body. After it the ranks leave together, as `finegrain`
    does after a command succeeded, so that none closes its connections while another still uses
    them; where the body failed, this rank leaves at once."""
    join_job(rank, world_size, port)
    try:
        yield
    except BaseException:
        shutdown()
        raise
    shutdown(together=True)


def spawn(worker: Callable[..., None], *args: object, world_size: int = 2) -> None:
    """Run `worker(rank, world_size, port, *args)` in `world_size` spawned processes; each must exit 0."""
    context, port = multiprocessing.get_context("spawn"), free_port()
    processes = [context.Process(target=_rank, args=(worker, rank, world_size, port, *args)) for rank in range(world_size)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=300)
    exit_codes = [p.exitcode for p in processes]
    assert exit_codes == [0] * world_size, f"the ranks' exit codes: {exit_codes}"


def _rank(worker: Callable[..., None], *args: object) -> None:
    """One spawned rank: the worker, then out of the job (where the worker did not leave it) and
    out of the process at once, as `finegrain` ends a rank (`finegrain.cli.leave_job`): the
    interpreter's teardown after a gloo job sometimes aborts ("terminate called without an active
    exception")."""
    try:
        worker(*args)
        shutdown()
    except BaseException:
        traceback.print_exc()
        code = 1
    else:
        code = 0
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
