"""`finegrain serve --workers N`: N worker processes behind one port, sharing the base weights.

The master process checks the command line as `finegrain serve` does, binds the port and starts
one short-lived process that loads each base model once (a GGUF dequantised to float32, as the
server always holds it) and writes its tensors with `torch.save` into a private temporary folder,
its config and tokenizer beside them. Each worker then maps that file (`torch.load(mmap=True)`):
its parameters are pages of the file in the kernel's page cache, held once however many workers
map them (a private mapping that nothing writes: served models are frozen), so N workers cost one
copy of the base, plus each worker's own adapters, heads, activations and interpreter.
`memory_figures` reads each process's RSS, PSS and USS from /proc/PID/smaps_rollup; each worker
logs them, with the bytes of its parameters that lie in the shared file, once it has loaded.

Workers (`finegrain.serve.worker`) are new processes (not forks: no OpenMP pool or thread crosses
a fork) that inherit the listening socket; the kernel hands each new connection to one of them. A worker loads its models
before it accepts, then runs the one-process server (`serve.cli.serve`): its own batching thread,
limits, /readyz and /metrics. Its threads: `--threads`, else its share of the cores.

SIGTERM or SIGINT to the master: it passes SIGTERM on to every worker, each drains as one server
does (/readyz 503, requests in flight answered), and the master exits 0 once all have. A worker
that dies is started again; one that cannot load the models stops the server (exit 1).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from finegrain.errors import FinegrainError

WORKER_ARGS = "FINEGRAIN_SERVE_WORKER"  # the worker's command line, as JSON, in its environment
LOAD_FAILED = 3  # a worker's exit code when its models could not be loaded
BASES = "bases.json"  # in the weights folder: base source -> file stem
DRAIN_MARGIN = 10  # seconds the master waits for its workers beyond their own drain (--timeout + 5)


# ---------------------------------------------------------------------------------------------- memory


def memory_figures(pid: int | str = "self") -> dict[str, float]:
    """A process's resident memory in MiB from /proc/PID/smaps_rollup: `rss`; `pss`, where each
    shared page counts a share (its size over the processes mapping it); `uss`, its private pages
    alone (what ending the process would free). Empty where the file does not exist (not Linux)."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return {}
    kib = {}
    for line in text.splitlines()[1:]:
        name, _, value = line.partition(":")
        if value.strip().endswith("kB"):
            kib[name] = int(value.split()[0])
    return {"rss": kib.get("Rss", 0) / 1024, "pss": kib.get("Pss", 0) / 1024,
            "uss": (kib.get("Private_Clean", 0) + kib.get("Private_Dirty", 0)) / 1024}


def mapped_bytes(tensors, path: Path) -> int:
    """The bytes of `tensors` whose data lies in a mapping of the file `path` (/proc/self/maps)."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == str(path):
            start, end = (int(bound, 16) for bound in fields[0].split("-"))
            ranges.append((start, end))
    return sum(t.nbytes for t in tensors if any(start <= t.data_ptr() < end for start, end in ranges))


# ---------------------------------------------------------------------------------------------- the shared weights


def write_weights(sources: list[str | None], directory: Path) -> None:
    """Load each base model once and write it into `directory`: `{i}.pt` (the tensors,
    `torch.save`), `{i}-tokenizer/`, `{i}.pickle` (config and source), and `bases.json` naming them.
    Runs in a process of its own, which then ends: the master never holds a model."""
    import torch

    from finegrain.atomic import atomic_path, atomic_write_text
    from finegrain.checkpoint.load import load_model

    for index, source in enumerate(sources):
        llama, tokenizer = load_model(source, progress=False)
        with atomic_path(directory / f"{index}.pt") as path:
            torch.save(llama.state_dict(), path)
        tokenizer.save(directory / f"{index}-tokenizer")  # `Tokenizer.from_dir` reads the same ids back
        meta = {"config": llama.config, "source": getattr(llama, "source", None)}
        with atomic_path(directory / f"{index}.pickle") as path:
            Path(path).write_bytes(pickle.dumps(meta))
        del llama
    atomic_write_text(directory / BASES, json.dumps({str(source): str(index) for index, source in enumerate(sources)}))


def prepare_weights(sources: list[str | None], directory: Path) -> None:
    """`write_weights` in a child process; its error, if any, as a one-line FinegrainError."""
    done = subprocess.run(
        [sys.executable, "-m", "finegrain.serve.workers", "weights", str(directory), json.dumps(sources)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or [f"exit code {done.returncode}"]
        raise FinegrainError(f"serve: the models could not be loaded: {lines[-1]}")


class SharedWeights:
    """Reads the base models `write_weights` wrote, their tensors mapped from the file (no copy)."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.files = json.loads((directory / BASES).read_text(encoding="utf-8"))

    def path(self, source: str | None) -> Path:
        return self.directory / f"{self.files[str(source)]}.pt"

    def load(self, source: str | None):
        """(model, tokenizer) as `load_model(source)` gives them, the parameters mapped read-only."""
        import torch

        from finegrain.checkpoint.load import build_model
        from finegrain.tokenizer import Tokenizer

        stem = self.files[str(source)]
        meta = pickle.loads((self.directory / f"{stem}.pickle").read_bytes())  # written by this server's own process
        state = torch.load(self.path(source), mmap=True, weights_only=True, map_location="cpu")
        model = build_model(meta["config"], state)  # assigns the mapped tensors, copies none (float32 already)
        if meta["source"] is not None:
            model.source = meta["source"]
        return model, Tokenizer.from_dir(self.directory / f"{stem}-tokenizer")


# ---------------------------------------------------------------------------------------------- the master


class Supervisor:
    """Starts the workers, restarts one that dies, and on SIGTERM/SIGINT drains them all.

    Args:
        args: the `finegrain serve` command line (its `threads` already this worker's share).
        sock: the bound, listening socket every worker inherits.
        weights: the folder of the shared weights.
        drain_seconds: how long a worker may take to drain.
    """

    def __init__(self, args: argparse.Namespace, sock: socket.socket, weights: Path, drain_seconds: float):
        self.args, self.sock, self.weights, self.drain_seconds = args, sock, weights, drain_seconds
        self.workers: dict[int, subprocess.Popen] = {}
        self.stopping = False

    def start(self, index: int) -> None:
        """Start worker `index` (a new process, the listening socket passed down as an open descriptor)."""
        command = {key: value for key, value in vars(self.args).items() if key != "func"}
        command.update(socket_fd=self.sock.fileno(), weights=str(self.weights), worker=index)
        self.workers[index] = subprocess.Popen(
            [sys.executable, "-m", "finegrain.serve.worker"], pass_fds=[self.sock.fileno()],
            env={**os.environ, WORKER_ARGS: json.dumps(command), "OMP_NUM_THREADS": str(self.args.threads)},
        )

    def stop(self, signum: int = signal.SIGTERM, frame: Any = None) -> None:
        """Pass the signal on as SIGTERM: every worker stops accepting and drains."""
        from finegrain.serve.logs import log

        if not self.stopping:
            log("draining", signal=signal.Signals(signum).name, workers=len(self.workers))
        self.stopping = True
        for process in self.workers.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)

    def run(self) -> None:
        """Serve until SIGTERM/SIGINT; FinegrainError when a worker cannot load the models."""
        from finegrain.serve.logs import log

        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        for index in range(self.args.workers):
            self.start(index)
        failed = None
        while not self.stopping:
            time.sleep(0.2)
            for index, process in list(self.workers.items()):
                code = process.poll()
                if code is None or self.stopping:
                    continue
                if code == LOAD_FAILED:
                    failed = index
                    self.stop()
                    break
                log("worker_exited", logging.WARNING, worker=index, pid=process.pid, code=code, action="restarted")
                self.start(index)
        self.sock.close()  # connections no worker accepted yet are refused, not left waiting
        deadline = time.monotonic() + self.drain_seconds + DRAIN_MARGIN
        for process in self.workers.values():
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        log("stopped", workers=len(self.workers))
        if failed is not None:
            raise FinegrainError(f"serve: worker {failed} could not load the models (its load_failed line above)")


def serve_workers(args: argparse.Namespace, registry, sock: socket.socket) -> None:
    """`finegrain serve --workers N` once the command line is checked: write the shared weights,
    start the workers on `sock` and supervise them until SIGTERM/SIGINT.

    Args:
        args: the command line.
        registry: the checked `ModelRegistry` (not loaded): the base models to write.
        sock: the bound socket (`serve.cli.bind`); it listens here, and every worker accepts on it.
    """
    from finegrain.cpu import available_cpus
    from finegrain.serve.logs import log, setup_logging

    setup_logging(args.log_level)
    sock.listen(2048)
    args.threads = args.threads or max(1, available_cpus() // args.workers)
    weights = Path(tempfile.mkdtemp(prefix="finegrain-weights-"))
    try:
        started = time.perf_counter()
        prepare_weights(registry.base_sources, weights)
        log("weights", folder=str(weights), seconds=round(time.perf_counter() - started, 2),
            megabytes=round(sum(p.stat().st_size for p in weights.glob("*.pt")) / 2**20, 1))
        host, port = sock.getsockname()[:2]
        log("listening", host=host, port=port, workers=args.workers, threads_per_worker=args.threads,
            url=f"http://{host if ':' not in host else f'[{host}]'}:{port}")
        Supervisor(args, sock, weights, args.timeout + 5).run()
    finally:
        sock.close()
        shutil.rmtree(weights, ignore_errors=True)


def main(argv: list[str]) -> int:
    """`python -m finegrain.serve.workers weights DIR SOURCES_JSON`: `write_weights`, for `prepare_weights`."""
    if argv[:1] == ["weights"] and len(argv) == 3:
        from finegrain.cpu import configure_openmp

        configure_openmp()
        try:
            write_weights(json.loads(argv[2]), Path(argv[1]))
        except FinegrainError as exc:
            print(exc, file=sys.stderr)
            return 1
        return 0
    print("usage: python -m finegrain.serve.workers weights DIR SOURCES_JSON (started by finegrain serve --workers)",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
