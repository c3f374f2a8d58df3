"""`finegrain serve`: the command, and the uvicorn runner with a draining shutdown.

`finegrain.cli` wires it in with `add_serve_parser(sub)`; `python -m finegrain.serve` runs it alone.
"""

from __future__ import annotations

import argparse
import signal
import socket
import sys

from finegrain.errors import FinegrainError

DEFAULT_PORT = 8000


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `serve` subcommand to `finegrain`'s subparsers; it runs `cmd_serve`."""
    from finegrain.serve.settings import ServeSettings

    defaults = ServeSettings()
    p = subparsers.add_parser("serve", help="serve trained runs (and a base model) over HTTP")
    p.add_argument("runs", nargs="*", metavar="RUN_DIR", help="run directories, or NAME=RUN_DIR to choose the model name")
    p.add_argument("--model", action="append", default=[], metavar="BASE",
                   help="also serve this base model for /v1/generate and chat (repeatable); runs' bases are always served")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0 picks a free one)")
    p.add_argument("--api-key-file", help="a file with one API key per line (FINEGRAIN_API_KEYS adds more)")
    p.add_argument("--insecure", action="store_true", help="allow a non-loopback --host without API keys")
    p.add_argument("--rate-limit", type=float, default=None, metavar="RPS", help="requests per second per API key")
    p.add_argument("--max-batch", type=int, default=defaults.max_batch, help="most texts in one model batch")
    p.add_argument("--batch-wait-ms", type=float, default=defaults.batch_wait_ms, help="how long a batch waits to fill")
    p.add_argument("--max-queue", type=int, default=defaults.max_queue, help="requests that may wait; more get 429")
    p.add_argument("--timeout", type=float, default=defaults.timeout, help="seconds per request before 504")
    p.add_argument("--max-body-bytes", type=int, default=defaults.max_body_bytes, help="larger bodies get 413")
    p.add_argument("--max-texts", type=int, default=defaults.max_texts, help="texts per classification request")
    p.add_argument("--max-tokens-per-text", type=int, default=defaults.max_tokens_per_text, help="tokens per text or prompt")
    p.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens, help="tokens one generation may produce")
    p.add_argument("--threads", type=int, default=None,
                   help="most threads of the model's work (default: the cores this process may use, from its CPU "
                        "affinity and cgroup quota); each batch takes only the cores nobody else is busy on "
                        "(FINEGRAIN_ADAPT_THREADS=0: always all of them); see docs/SERVING.md")
    p.add_argument("--read-timeout", type=float, default=defaults.read_timeout, metavar="SECONDS",
                   help=f"a request's head, and then its body, must each arrive within this (default {defaults.read_timeout:g}; else 408, closed)")
    p.add_argument("--keep-alive", type=float, default=defaults.keep_alive, metavar="SECONDS",
                   help=f"close a connection idle this long after a response (default {defaults.keep_alive:g})")
    p.add_argument("--max-connections", type=int, default=defaults.max_connections,
                   help=f"open connections at most; one more is answered 503 and closed (default {defaults.max_connections})")
    p.add_argument("--docs", action="store_true",
                   help="serve Swagger UI at /docs, to API key holders only (the page loads its JavaScript from a public CDN)")
    p.add_argument("--workers", type=int, default=1,
                   help="worker processes behind the one port, each batching on its own; the base weights are "
                        "mapped read-only from one file, shared by all (default 1: this process serves)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.add_argument("--log-bodies", action="store_true", help="log request bodies, with e-mails, phones and ID numbers masked")
    p.set_defaults(func=cmd_serve)
    return p


def cmd_serve(args: argparse.Namespace) -> None:
    """Validate everything a user can get wrong, bind, then serve until SIGTERM/SIGINT; with
    `--workers N`, N worker processes on the one port (`finegrain.serve.workers`)."""
    from finegrain.cpu import configure_openmp

    if args.threads is not None and args.threads < 1:
        raise FinegrainError("--threads: must be at least 1")
    if args.workers < 1:
        raise FinegrainError("--workers: must be at least 1")
    configure_openmp(args.threads)  # before torch is imported (by the app's modules below)
    registry, settings, keys = check_arguments(args)
    if args.workers > 1:
        from finegrain.serve.workers import serve_workers

        serve_workers(args, registry, bind(args.host, args.port))
        return
    serve(args, registry, settings, keys, bind(args.host, args.port))


def check_arguments(args: argparse.Namespace):
    """The registry, settings and API keys the command line gives, every error a user can make
    (a flag's value, a key file, a run directory) raised before a port is bound or a model loaded.

    Returns:
        (`ModelRegistry`, `ServeSettings`, `ApiKeys`).
    """
    from finegrain.serve.models import ModelRegistry, parse_run_arguments
    from finegrain.serve.security import check_bind, load_keys
    from finegrain.serve.settings import ServeSettings

    for flag in ("max_batch", "max_queue", "max_body_bytes", "max_texts", "max_tokens_per_text", "max_new_tokens", "max_connections"):
        if getattr(args, flag) < 1:
            raise FinegrainError(f"--{flag.replace('_', '-')}: must be at least 1")
    if args.timeout <= 0 or args.batch_wait_ms < 0 or (args.rate_limit is not None and args.rate_limit <= 0):
        raise FinegrainError("--timeout and --rate-limit must be positive, --batch-wait-ms not negative")
    if not (args.read_timeout > 0 and args.keep_alive > 0):  # also refuses nan
        raise FinegrainError("--read-timeout and --keep-alive must be positive numbers of seconds")
    keys = load_keys(args.api_key_file)
    check_bind(args.host, keys, args.insecure)
    registry = ModelRegistry(parse_run_arguments(args.runs), args.model or ([] if args.runs else [None]))
    settings = ServeSettings(
        max_body_bytes=args.max_body_bytes, max_texts=args.max_texts, max_tokens_per_text=args.max_tokens_per_text,
        max_new_tokens=args.max_new_tokens, max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms,
        max_queue=args.max_queue, timeout=args.timeout, rate_limit=args.rate_limit, log_bodies=args.log_bodies,
        docs=args.docs, read_timeout=args.read_timeout, keep_alive=args.keep_alive, max_connections=args.max_connections,
    )
    return registry, settings, keys


def serve(args: argparse.Namespace, registry, settings, keys, sock: socket.socket) -> None:
    """Serve `registry` on the bound `sock` until SIGTERM/SIGINT (one process: the server, or one worker)."""
    from finegrain.serve.app import create_app
    from finegrain.serve.logs import setup_logging

    if args.threads:  # else torch's default: OMP_NUM_THREADS, as configure_openmp set it
        import torch

        torch.set_num_threads(args.threads)
    setup_logging(args.log_level)
    runner = Runner()
    app = create_app(registry, settings, keys, on_fatal=runner.stop_failed)
    if not runner.run(app, sock, settings.timeout + 5):
        raise FinegrainError(f"serve: the models could not be loaded: {app.state.serve['error']}")


def bind(host: str, port: int) -> socket.socket:
    """A listening-ready socket on host:port; FinegrainError when the address cannot be had."""
    if not 0 <= port <= 65535:  # getaddrinfo would take 99999 as 99999 % 65536 and listen there
        raise FinegrainError(f"--port {port}: ports run from 1 to 65535 (0 picks a free one); choose one of those")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        raise FinegrainError(f"--host {host} --port {port}: cannot listen there ({exc.strerror or exc}); choose another port") from None
    return sock


class Runner:
    """Runs uvicorn on a bound socket. SIGTERM or SIGINT: stop accepting, mark the app draining
    (new /v1 requests get 503), let requests in flight finish, then exit 0."""

    def __init__(self) -> None:
        self.server = None
        self.failed = False

    def stop_failed(self) -> None:
        self.failed = True
        if self.server is not None:
            self.server.should_exit = True

    def run(self, app, sock: socket.socket, drain_seconds: float) -> bool:
        """Serve until stopped; False when the models failed to load."""
        import uvicorn

        from finegrain.serve.connections import default_protocol, guarded
        from finegrain.serve.logs import log

        state, settings = app.state.serve, app.state.settings

        class Server(uvicorn.Server):
            def handle_exit(self, sig: int, frame) -> None:
                # Not uvicorn's: it re-raises the signal after the drain, which ends the process
                # with -SIGTERM; a finished drain is a clean exit.
                state["draining"] = True
                log("draining", signal=signal.Signals(sig).name)
                if self.should_exit and sig == signal.SIGINT:
                    self.force_exit = True
                self.should_exit = True

        config = uvicorn.Config(
            app, log_config=None, access_log=False, proxy_headers=False, lifespan="on",
            timeout_graceful_shutdown=int(drain_seconds + 1), timeout_keep_alive=settings.keep_alive, server_header=False,
            http=guarded(default_protocol(), settings.read_timeout, settings.max_connections, settings.max_header_bytes),
        )
        self.server = Server(config)
        host, port = sock.getsockname()[:2]
        log("listening", host=host, port=port, url=f"http://{host if ':' not in host else f'[{host}]'}:{port}")
        self.server.run(sockets=[sock])
        log("stopped")
        return not self.failed


def main(argv: list[str] | None = None) -> int:
    """`python -m finegrain.serve ...`: the same command without the rest of the CLI."""
    parser = argparse.ArgumentParser(prog="finegrain")
    add_serve_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    try:
        args.func(args)
    except FinegrainError as exc:
        print(f"finegrain serve: error: {exc}", file=sys.stderr)
        return 1
    return 0
