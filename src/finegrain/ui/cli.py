"""`finegrain ui`: the dashboard's command. `finegrain.cli` wires it in with `add_ui_parser(sub)`."""

from __future__ import annotations

import argparse

from finegrain.errors import FinegrainError

DEFAULT_PORT = 7860


def add_ui_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `ui` subcommand to `finegrain`'s subparsers; it runs `cmd_ui`."""
    p = subparsers.add_parser("ui", help="a dashboard in the browser: runs, live curves, reports, compare, playground, launch")
    p.add_argument("runs", nargs="?", default="runs", metavar="RUNS_DIR", help="the directory holding the runs (default runs)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0 picks a free one)")
    p.add_argument("--api-key-file", help="a file with one API key per line (FINEGRAIN_API_KEYS adds more); "
                                          "needed to listen beyond this machine")
    p.add_argument("--insecure", action="store_true", help="allow a non-loopback --host without API keys")
    p.set_defaults(func=cmd_ui)
    return p


def cmd_ui(args: argparse.Namespace) -> None:
    """Check the directory and the address, bind, then serve until Ctrl-C."""
    from pathlib import Path

    from finegrain.cpu import configure_openmp

    configure_openmp()
    import uvicorn

    from finegrain.serve.cli import bind
    from finegrain.serve.security import check_bind, is_loopback, load_keys
    from finegrain.ui.app import create_app

    root = Path(args.runs)
    if not root.is_dir():
        raise FinegrainError(f"{root}: no such directory; give the directory your runs are in (the parent of each --output)")
    keys = load_keys(args.api_key_file)
    check_bind(args.host, keys, args.insecure)
    sock = bind(args.host, args.port)
    sock.listen(128)  # a browser opened at the printed address waits in the backlog until uvicorn is up
    host, port = sock.getsockname()[:2]
    hosts = None if not is_loopback(args.host) else [f"{name}:{port}" for name in ("127.0.0.1", "localhost", "[::1]", args.host)]
    app = create_app(root, keys, hosts)
    shown = host if ":" not in host else f"[{host}]"
    print(f"finegrain ui: http://{shown}:{port} (runs in {root.resolve()}; Ctrl-C stops)", flush=True)
    config = uvicorn.Config(app, log_level="warning", lifespan="on", server_header=False, timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])
