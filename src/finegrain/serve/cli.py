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
    p.add_argument("--threads", type=int, default=None, help="PyTorch threads (default: all cores)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.add_argument("--log-bodies", action="store_true", help="log request bodies, with e-mails, phones and ID numbers masked")
    p.set_defaults(func=cmd_serve)
    return p


def cmd_serve(args: argparse.Namespace) -> None:
    """Validate everything a user can get wrong, bind, then serve until SIGTERM/SIGINT."""
    from finegrain.serve.app import ServeSettings, create_app
    from finegrain.serve.logs import setup_logging
    from finegrain.serve.models import ModelRegistry, parse_run_arguments
    from finegrain.serve.security import check_bind, load_keys

    for flag in ("max_batch", "max_queue", "max_body_bytes", "max_texts", "max_tokens_per_text", "max_new_tokens"):
        if getattr(args, flag) < 1:
            raise FinegrainError(f"--{flag.replace('_', '-')}: must be at least 1")
    if args.timeout <= 0 or args.batch_wait_ms < 0 or (args.rate_limit is not None and args.rate_limit <= 0):
        raise FinegrainError("--timeout and --rate-limit must be positive, --batch-wait-ms not negative")
    keys = load_keys(args.api_key_file)
    check_bind(args.host, keys, args.insecure)
    registry = ModelRegistry(parse_run_arguments(args.runs), args.model or ([] if args.runs else [None]))
    settings = ServeSettings(
        max_body_bytes=args.max_body_bytes, max_texts=args.max_texts, max_tokens_per_text=args.max_tokens_per_text,
        max_new_tokens=args.max_new_tokens, max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms,
        max_queue=args.max_queue, timeout=args.timeout, rate_limit=args.rate_limit, log_bodies=args.log_bodies,
    )
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    setup_logging(args.log_level)
    sock = bind(args.host, args.port)
    runner = Runner()
    app = create_app(registry, settings, keys, on_fatal=runner.stop_failed)
    if not runner.run(app, sock, settings.timeout + 5):
        raise FinegrainError(f"serve: the models could not be loaded: {app.state.serve['error']}")


def bind(host: str, port: int) -> socket.socket:
    """A listening-ready socket on host:port; FinegrainError when the address cannot be had."""
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

        from finegrain.serve.logs import log

        state = app.state.serve

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
            timeout_graceful_shutdown=int(drain_seconds + 1), timeout_keep_alive=5, server_header=False,
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
