"""Helpers for tests/test_serve.py: tiny trained runs, and `finegrain serve` in a subprocess on 127.0.0.1.

Run as a script (`python tests/serve_helpers.py slow ARGS...`) it starts the same server with an
engine that sleeps on texts like "sleep:1.5", which makes queueing, timeouts and draining testable
without timing guesses about a real model's speed.
"""

from __future__ import annotations

import json
import os
import random
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
OPENMP_VARIABLES = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
HERE = Path(__file__).resolve().parent


EXAMPLE_DATA = HERE.parent / "examples" / "data"


def train_task_run(
    model_dir: Path, directory: Path, task: str, train_file: Path, seed: int = 0, sections: dict | None = None, **data
) -> Path:
    """Train a tiny run of `task` on `train_file` through `finegrain train`; returns its directory.

    `sections` updates config sections (`{"train": {"epochs": 3}, "qa": {...}}`); `data` adds keys to `data:`.
    """
    from finegrain.cli import main

    config = {
        "task": task,
        "model": {"name": str(model_dir)},
        "data": {"train": str(train_file), "max_length": 16, **data},
        "lora": {"r": 4, "alpha": 8, "targets": "all-linear", "layers": [-1]},
        "head": {"init": "random"},  # not the recipe's LP-FT, which may keep its step-0 head on these tiny runs
        "train": {"epochs": 1, "lr": 5e-3, "batch_size": 8, "threads": 1, "eval_every": 100, "seed": seed},
    }
    for section, values in (sections or {}).items():
        config[section] = {**config.get(section, {}), **values}
    config_file = directory.with_suffix(".yaml")
    config_file.write_text(yaml.safe_dump(config))
    assert main(["train", str(config_file), "--output", str(directory)]) == 0
    return directory


def train_run(
    model_dir: Path, directory: Path, labels: dict[str, list[str]], seed: int = 0, sections: dict | None = None, **data
) -> Path:
    """Train a tiny classification run whose labels are told apart by their words."""
    rng = random.Random(seed)
    rows = []
    for _ in range(60):
        label = rng.choice(sorted(labels))
        rows.append({"text": " and ".join(rng.sample(labels[label], 2)), "label": label})
    return train_task_run(model_dir, directory, "classification", write_jsonl(directory, rows), seed, sections, **data)


def train_regression_run(model_dir: Path, directory: Path, words: dict[str, float]) -> Path:
    """Train a tiny regression run: a text's target is the sum of its words' values."""
    rng = random.Random(0)
    rows = []
    for _ in range(60):
        chosen = rng.sample(sorted(words), 2)
        rows.append({"text": " ".join(chosen), "label": sum(words[w] for w in chosen)})
    return train_task_run(model_dir, directory, "regression", write_jsonl(directory, rows))


def train_ner_run(model_dir: Path, directory: Path, entities: dict[str, list[str]], filler: list[str]) -> Path:
    """Train a tiny NER run on sentences of filler words and entities of the given types."""
    rng = random.Random(0)
    lines = []
    for _ in range(80):
        for _ in range(rng.randint(2, 6)):
            kind = rng.choice([*sorted(entities), None, None])
            words = rng.choice(entities[kind]).split() if kind else [rng.choice(filler)]
            tags = [f"B-{kind}"] + [f"I-{kind}"] * (len(words) - 1) if kind else ["O"]
            lines += [f"{w}\t{t}\n" for w, t in zip(words, tags)]
        lines.append("\n")
    train_file = directory.with_suffix(".conll")
    train_file.write_text("".join(lines))
    return train_task_run(model_dir, directory, "ner", train_file, sections={"train": {"epochs": 3, "lr": 1e-2}}, max_length=24)


def train_relation_run(model_dir: Path, directory: Path) -> Path:
    """Train a tiny relation run on the SemEval-format fixture of examples/data/semeval."""
    semeval = EXAMPLE_DATA / "semeval"
    return train_task_run(
        model_dir, directory, "relation", semeval / "train.txt", sections={"train": {"epochs": 2}},
        validation=str(semeval / "validation.txt"), test=str(semeval / "test.txt"), max_length=48,
    )


def train_qa_run(model_dir: Path, directory: Path) -> Path:
    """Train a tiny extractive QA run on the SQuAD-format fixture of examples/data/squad; contexts
    take several 128-token windows."""
    squad = EXAMPLE_DATA / "squad"
    return train_task_run(
        model_dir, directory, "qa", squad / "train.json", sections={"qa": {"stride": 16, "max_answer_length": 12}},
        validation=str(squad / "dev.json"), test=str(squad / "test.json"), max_length=128,
    )


def train_instruct_run(model_dir: Path, directory: Path) -> Path:
    """Train a tiny instruct run (LoRA only, no head) on the chat fixture of examples/data/instruct."""
    chat = EXAMPLE_DATA / "instruct"
    return train_task_run(
        model_dir, directory, "instruct", chat / "train.jsonl", sections={"instruct": {"max_new_tokens": 8}},
        validation=str(chat / "validation.jsonl"), test=str(chat / "test.jsonl"), max_length=64,
    )


def write_jsonl(directory: Path, rows: list[dict]) -> Path:
    path = directory.with_suffix(".jsonl")
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


class Server:
    """`python -m finegrain.serve ...` on 127.0.0.1 with a free port; `url`, `client`, `stop()`."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None, slow: bool = False, timeout: float = 60,
                 threads: int | None = 1):
        """`threads=None`: the server's own thread count and OpenMP settings (none inherited from the tests)."""
        command = [sys.executable, str(HERE / "serve_helpers.py"), "slow"] if slow else [sys.executable, "-m", "finegrain.serve"]
        inherited = {k: v for k, v in os.environ.items() if threads is not None or k not in OPENMP_VARIABLES}
        self.process = subprocess.Popen(
            [*command, *args, "--host", LOOPBACK, "--port", "0", *(["--threads", str(threads)] if threads else [])],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**inherited, **({"OMP_NUM_THREADS": str(threads)} if threads else {}), **(env or {})},
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
    """The real server, but each classification batch first sleeps the seconds named in a "sleep:N"
    text, and a batch with a "nan:" text answers NaN probabilities (as a damaged adapter does)."""
    import finegrain.serve.app as app_module
    from finegrain.serve import cli
    from finegrain.serve.engine import Engine

    class SlowEngine(Engine):
        def run(self, key, jobs):
            texts = []
            if key[0] == "task":
                texts = [self.registry.runs[key[1]].tokenizer.decode(item.input_ids) for job in jobs for item in job.payload]
                for text in texts:
                    match = re.search(r"sleep:([\d.]+)", text)
                    if match:
                        time.sleep(float(match.group(1)))
            results = super().run(key, jobs)
            if any("nan:" in text for text in texts):
                for prediction in (p for predictions in results for p in predictions):
                    prediction["probabilities"] = dict.fromkeys(prediction["probabilities"], float("nan"))
            return results

    original = app_module.create_app
    app_module.create_app = lambda *args, **kwargs: original(*args, **kwargs, engine=SlowEngine)
    return cli.main(argv)


if __name__ == "__main__" and sys.argv[1:2] == ["slow"]:
    sys.exit(_slow_main(sys.argv[2:]))
