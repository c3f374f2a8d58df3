"""Helpers for tests/test_serve.py: tiny trained runs, and `finegrain serve` in a subprocess on 127.0.0.1.

Run as a script (`python tests/serve_helpers.py slow ARGS...`) it starts the same server with an
engine that sleeps on texts like "sleep:1.5", which makes queueing, timeouts and draining testable
without timing guesses about a real model's speed.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import yaml

LOOPBACK = "127.0.0.1"
HERE = Path(__file__).resolve().parent


def train_run(model_dir: Path, directory: Path, labels: dict[str, list[str]], seed: int = 0, **data) -> Path:
    """Train a tiny classification run whose labels are told apart by their words."""
    import random

    from finegrain.cli import main

    rng = random.Random(seed)
    rows = []
    for _ in range(60):
        label = rng.choice(sorted(labels))
        rows.append({"text": " and ".join(rng.sample(labels[label], 2)), "label": label})
    data_file = directory.with_suffix(".jsonl")
    data_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {
        "model": {"name": str(model_dir)},
        "data": {"train": str(data_file), "max_length": 16, **data},
        "lora": {"r": 4, "alpha": 8, "targets": "all-linear", "layers": [-1]},
        "train": {"epochs": 1, "lr": 5e-3, "batch_size": 8, "threads": 1, "eval_every": 100, "seed": seed},
    }
    config_file = directory.with_suffix(".yaml")
    config_file.write_text(yaml.safe_dump(config))
    assert main(["train", str(config_file), "--output", str(directory)]) == 0
    return directory


class Server:
    """`python -m finegrain.serve ...` on 127.0.0.1 with a free port; `url`, `client`, `stop()`."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None, slow: bool = False, timeout: float = 60):
        command = [sys.executable, str(HERE / "serve_helpers.py"), "slow"] if slow else [sys.executable, "-m", "finegrain.serve"]
        self.process = subprocess.Popen(
            [*command, *args, "--host", LOOPBACK, "--port", "0", "--threads", "1"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
        )
        self.lines: list[str] = []
        self.port = self._wait_for_port(timeout)
        self.url = f"http://{LOOPBACK}:{self.port}"
        # Keep reading the log, or a full pipe would stall the server mid-request.
        self._reader = threading.Thread(target=lambda: self.lines.extend(iter(self.process.stdout.readline, "")), daemon=True)
        self._reader.start()

    def _wait_for_port(self, timeout: float) -> int:
        deadline = time.time() + timeout
        while time.time() < deadline:
            line = self.process.stdout.readline()
            if not line:
                raise RuntimeError("the server exited:\n" + "".join(self.lines))
            self.lines.append(line)
            match = re.search(r'"event": "listening".*"port": (\d+)', line)
            if match:
                return int(match.group(1))
        raise RuntimeError("the server did not start:\n" + "".join(self.lines))

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                if httpx.get(f"{self.url}/readyz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.process.poll() is not None:
                raise RuntimeError("the server exited:\n" + self.read_rest())
            time.sleep(0.05)
        raise RuntimeError("the server never became ready")

    def read_rest(self) -> str:
        """The log so far (all of it once the process ended)."""
        if self.process.poll() is not None and hasattr(self, "_reader"):
            self._reader.join(5)
        return "".join(self.lines)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.read_rest()
        return self.process.returncode


def _slow_main(argv: list[str]) -> int:
    """The real server, but each classification batch first sleeps the seconds named in a "sleep:N" text."""
    import finegrain.serve.app as app_module
    from finegrain.serve import cli
    from finegrain.serve.engine import Engine

    class SlowEngine(Engine):
        def run(self, key, jobs):
            if key[0] == "classify":
                for job in jobs:
                    for item in job.payload:
                        text = self.registry.runs[key[1]].tokenizer.decode(item.input_ids)
                        match = re.search(r"sleep:([\d.]+)", text)
                        if match:
                            time.sleep(float(match.group(1)))
            return super().run(key, jobs)

    original = app_module.create_app
    app_module.create_app = lambda *args, **kwargs: original(*args, **kwargs, engine=SlowEngine)
    return cli.main(argv)


if __name__ == "__main__" and sys.argv[1:2] == ["slow"]:
    sys.exit(_slow_main(sys.argv[2:]))
