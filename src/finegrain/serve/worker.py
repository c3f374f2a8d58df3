"""One worker of `finegrain serve --workers N` (`python -m finegrain.serve.worker`, started by
`finegrain.serve.workers.Supervisor`): the command line from the master, the base models mapped from
the shared weights file, then the one-process server (`serve.cli.serve`) on the inherited socket."""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
from pathlib import Path

from finegrain.errors import FinegrainError
from finegrain.serve.workers import LOAD_FAILED, WORKER_ARGS, SharedWeights, mapped_bytes, memory_figures


class WorkerField(logging.Filter):
    """Adds `"worker": N` to every log line of a worker."""

    def __init__(self, index: int):
        super().__init__()
        self.index = index

    def filter(self, record: logging.LogRecord) -> bool:
        record.fields = {"worker": self.index, **getattr(record, "fields", {})}
        return True


def main() -> int:
    """One worker: the command line from the master, the models from the shared file, then the
    one-process server on the inherited socket. Exit code `LOAD_FAILED` when the models cannot load."""
    from finegrain.cpu import configure_openmp

    args = argparse.Namespace(**json.loads(os.environ.pop(WORKER_ARGS)))
    configure_openmp(args.threads)
    from finegrain.serve.cli import check_arguments, serve
    from finegrain.serve.logs import LOGGER, log, setup_logging

    setup_logging(args.log_level)
    for name in (LOGGER, "uvicorn", "uvicorn.error"):  # on the loggers: `serve` sets the handlers again
        logging.getLogger(name).addFilter(WorkerField(args.worker))
    sock = socket.socket(fileno=args.socket_fd)
    try:
        registry, settings, keys = check_arguments(args)
        weights = SharedWeights(Path(args.weights))
        registry.load(weights.load)
    except Exception as exc:
        log("load_failed", logging.ERROR, error=str(exc), exc_info=not isinstance(exc, FinegrainError))
        return LOAD_FAILED
    parameters = {id(p): p for base in registry.bases.values() for p in base.llama.parameters()}.values()
    shared = sum(mapped_bytes(parameters, weights.path(base.source)) for base in registry.bases.values())
    log("loaded", pid=os.getpid(), parameter_bytes=sum(p.nbytes for p in parameters), mapped_bytes=shared,
        **{f"{key}_mb": round(value, 1) for key, value in memory_figures().items()})
    try:
        serve(args, registry, settings, keys, sock)
    except FinegrainError as exc:
        print(f"finegrain serve: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
