"""Serving classification over HTTP: finegrain with dynamic batching, finegrain one text per batch,
and a plain `transformers` pipeline served the same way.

    python benchmarks/serve.py [--quick] [--requests 2000] [--concurrency 16]

One classification run is trained first (the default model, SmolLM2-135M dequantized to float32;
LoRA r=8 alpha=16 on q_proj/v_proj of all 30 layers; a linear head on the last token; Rotten
Tomatoes snippets, at most 64 tokens; 64 training texts, 16 with --quick). It is then served three
ways, each by real uvicorn on 127.0.0.1 in its own process with the same torch threads:

    finegrain (dynamic)    `finegrain serve RUN` with its defaults (--max-batch 32, --batch-wait-ms 5)
    finegrain (batch 1)    the same with --max-batch 1: every request is a forward pass of its own
    transformers pipeline  a minimal FastAPI app (this file, `--side transformers`): the same
                           GGUF through `AutoModelForSequenceClassification`, the run's adapter
                           through `PeftModel.from_pretrained` (unmerged, as finegrain keeps it),
                           `pipeline("text-classification")` called per request on one worker at a
                           time, as finegrain's batcher thread runs the model

The same client (`--concurrency` threads, each with its own keep-alive `http.client` connection,
one test-split text per request, requests spread evenly) sends `--requests` requests to each,
after a warm-up; the table gives requests/s, p50 and p99 latency, and the mean batch the server
ran (finegrain's /metrics). Before the load, 8 texts are classified by every server and the labels
compared with finegrain's, to check that the three serve the same model. Last line:
`serve throughput ratio: dynamic/batch-1 xA.AA, dynamic/transformers xB.BB`.

    python benchmarks/serve.py --competing-load [--quick]

serves the same run beside a busy neighbour instead: a second process whose 2 threads multiply
256x256 matrices without pause (PyTorch with libgomp's defaults, as an unrelated job on the same
machine would). `finegrain serve` runs three times, with its default threads:

    before       libgomp's own wait policy (`GOMP_SPINCOUNT=300000`, ~3 ms of spinning) and a
                 fixed thread count (`FINEGRAIN_ADAPT_THREADS=0`): finegrain before issue 23
    passive      `OMP_WAIT_POLICY=PASSIVE`, threads still fixed
    finegrain    its defaults: passive waits, and each batch on the cores nobody else runs on

For each, the median latency of `--requests` sequential one-text requests (default 20) alone
and beside the load, and the ratio. Last line:
`competing load: before xA.A slower, passive xB.B, finegrain xC.C`.

    python benchmarks/serve.py --workers 1,2 [--quick] [--texts-per-request 4]

serves the same run with `finegrain serve --workers N` for each N, the machine's cores split
between the workers (--threads cores/N each; one worker: all of them), and sends the same load
(`--requests` requests of `--texts-per-request` texts, `--concurrency` clients). The table gives
requests/s, texts/s, p50 and p99 latency, and the memory after the load from /proc/PID/smaps_rollup:
RSS, PSS (shared pages split between the processes that map them) and USS (private pages) of one
worker (the mean over the workers), and the PSS of the whole server (master and workers), beside
the bytes of base parameters each worker maps from the shared weights file. Last line:
`workers: 2 workers xA.AA the requests/s of 1, total PSS xB.BB`.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_facts, print_facts  # noqa: E402

LOOPBACK = "127.0.0.1"
MAX_LENGTH = 64
CHECK_TEXTS = 8


# ---------------------------------------------------------------------------------------------- the run


def train_run(directory: Path, n_train: int, n_test: int) -> tuple[Path, list[str], float]:
    """Train the classification run; returns its directory, the test texts and the training seconds."""
    from finegrain.config import RunConfig, from_dict
    from finegrain.data.readers import write_examples
    from finegrain.datasets import rotten_tomatoes_peer_split
    from finegrain.run import train

    train_examples, test_examples = rotten_tomatoes_peer_split(n_train, n_test)
    write_examples(directory / "train.jsonl", train_examples)
    config = from_dict(RunConfig, {
        "model": {"name": None},
        "data": {"train": str(directory / "train.jsonl"), "split": [1.0, 0.0, 0.0], "max_length": MAX_LENGTH},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.05, "targets": ["q_proj", "v_proj"]},
        "train": {"epochs": 1, "lr": 3e-4, "batch_size": 16, "seed": 0},
        "output": str(directory / "run"),
    }, "benchmark")
    results = train(config, progress=False)
    return directory / "run", [e.text for e in test_examples], results["train"]["total_seconds"]


# ---------------------------------------------------------------------------------------------- the transformers side


def transformers_side(args) -> None:
    """Serve the run with a transformers pipeline behind a minimal FastAPI app until SIGTERM."""
    import torch
    import uvicorn
    from fastapi import FastAPI
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    from finegrain.checkpoint.load import resolve_model

    torch.set_num_threads(args.threads)
    labels = json.loads(Path(args.run, "labels.json").read_text())
    gguf = resolve_model(None)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.pad_token_id = 2
    model = AutoModelForSequenceClassification.from_pretrained(
        gguf.parent, gguf_file=gguf.name, num_labels=len(labels), dtype=torch.float32,
        id2label=dict(enumerate(labels)), label2id={label: i for i, label in enumerate(labels)},
    )
    model.config.pad_token_id = 2
    model = PeftModel.from_pretrained(model, Path(args.run, "adapter")).eval()
    classify = pipeline("text-classification", model=model, tokenizer=tokenizer, top_k=None)
    lock = threading.Lock()  # one forward pass at a time, as finegrain's worker thread
    app = FastAPI()

    @app.get("/readyz")
    def ready() -> dict:
        return {"status": "ready"}

    @app.post("/v1/classify")
    def predict(body: dict) -> dict:
        with lock, torch.inference_mode():
            scored = classify(body["texts"], truncation=True, max_length=MAX_LENGTH)
        predictions = []
        for scores in scored:
            probabilities = {s["label"]: round(s["score"], 6) for s in scores}
            predictions.append({"label": max(probabilities, key=probabilities.get), "probabilities": probabilities})
        return {"predictions": predictions}

    uvicorn.run(app, host=LOOPBACK, port=args.port, log_level="warning", access_log=False)


# ---------------------------------------------------------------------------------------------- servers and load


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


class Server:
    """A server process on a free loopback port; `stop()` ends it with SIGTERM."""

    def __init__(self, name: str, command: list[str], log: Path, env: dict[str, str] | None = None):
        self.name, self.port = name, free_port()
        self.log = log
        with open(log, "w") as out:
            self.process = subprocess.Popen(
                [*command, "--port", str(self.port)], stdout=out, stderr=subprocess.STDOUT,
                env={**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})},
            )

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"{self.name} exited:\n{self.log.read_text()[-3000:]}")
            try:
                connection = http.client.HTTPConnection(LOOPBACK, self.port, timeout=5)
                connection.request("GET", "/readyz")
                if connection.getresponse().status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise SystemExit(f"{self.name} was not ready within {timeout:g} s")

    def get(self, path: str) -> str:
        connection = http.client.HTTPConnection(LOOPBACK, self.port, timeout=30)
        connection.request("GET", path)
        return connection.getresponse().read().decode()

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def classify_one(connection: http.client.HTTPConnection, text: str) -> dict | None:
    """The prediction for one text; None when the server answered anything but 200."""
    body = json.dumps({"texts": [text]})
    connection.request("POST", "/v1/classify", body, {"Content-Type": "application/json"})
    response = connection.getresponse()
    payload = response.read()
    return json.loads(payload)["predictions"][0] if response.status == 200 else None


def load(port: int, texts: list, requests: int, concurrency: int, send=None) -> dict:
    """Send `requests` one-text requests from `concurrency` threads: requests/s, latency
    percentiles (of answered requests) and the number of failed ones. `send(connection, item)`
    (default `classify_one`) sends one of `texts` and answers None on a failure."""
    send = send or classify_one
    latencies: list[float] = []
    failures: list[int] = []
    counter = iter(range(requests))
    lock = threading.Lock()

    def worker() -> None:
        connection = http.client.HTTPConnection(LOOPBACK, port, timeout=600)
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                break
            started = time.perf_counter()
            if send(connection, texts[i % len(texts)]) is None:
                failures.append(i)
            else:
                latencies.append(time.perf_counter() - started)
        connection.close()

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    latencies.sort()
    if not latencies:
        raise SystemExit(f"every request to port {port} failed")
    return {
        "rps": len(latencies) / seconds,
        "p50_ms": 1000 * latencies[len(latencies) // 2],
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
        "failed": len(failures),
    }


def batch_totals(server: Server) -> tuple[float, float]:
    """The sum and count of finegrain's `finegrain_batch_size` histogram: texts and batches run so far."""
    values = dict.fromkeys(("finegrain_batch_size_sum", "finegrain_batch_size_count"), 0.0)
    for line in server.get("/metrics").splitlines():
        name, _, value = line.partition(" ")
        if name in values:
            values[name] = float(value)
    return values["finegrain_batch_size_sum"], values["finegrain_batch_size_count"]


def measure(server: Server, texts: list[str], args) -> tuple[dict, list[str]]:
    """Labels of the check texts, a warm-up, then the load (with finegrain's mean batch during it)."""
    server.wait_ready()
    connection = http.client.HTTPConnection(LOOPBACK, server.port, timeout=120)
    labels = [(classify_one(connection, text) or {}).get("label") for text in texts[:CHECK_TEXTS]]
    connection.close()
    load(server.port, texts, args.concurrency, args.concurrency)  # warm-up: every connection once
    finegrain = server.name.startswith("finegrain")
    before = batch_totals(server) if finegrain else None
    result = load(server.port, texts, args.requests, args.concurrency)
    if before is not None:
        after = batch_totals(server)
        result["batch"] = (after[0] - before[0]) / max(after[1] - before[1], 1)
    return result, labels


# ---------------------------------------------------------------------------------------------- a busy neighbour

# The neighbour: 2 threads of back-to-back matmuls, with libgomp's default (spinning) waits.
NEIGHBOUR = "import torch\ntorch.set_num_threads(2)\na = torch.randn(256, 256)\nwhile True:\n    a @ a\n"
WAIT_POLICIES = {
    "before": {"GOMP_SPINCOUNT": "300000", "FINEGRAIN_ADAPT_THREADS": "0"},
    "passive": {"OMP_WAIT_POLICY": "PASSIVE", "FINEGRAIN_ADAPT_THREADS": "0"},
    "finegrain": {},
}


def competing_load() -> subprocess.Popen:
    """Start the neighbour: a process that keeps 2 cores busy until killed."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")}
    return subprocess.Popen([sys.executable, "-c", NEIGHBOUR], env=env)


def sequential_p50(port: int, texts: list[str], requests: int) -> float:
    """The median milliseconds of `requests` one-text requests sent one after another."""
    connection = http.client.HTTPConnection(LOOPBACK, port, timeout=600)
    latencies = []
    for i in range(requests):
        started = time.perf_counter()
        if classify_one(connection, texts[i % len(texts)]) is None:
            raise SystemExit(f"a request to port {port} failed")
        latencies.append(time.perf_counter() - started)
    connection.close()
    return 1000 * sorted(latencies)[len(latencies) // 2]


def run_competing_load(run_dir: Path, texts: list[str], tmp_path: Path, requests: int) -> None:
    """Single-request latency alone and beside a 2-thread neighbour, for each server variant."""
    serve = [sys.executable, "-m", "finegrain.serve", f"bench={run_dir}", "--host", LOOPBACK, "--timeout", "600",
             "--log-level", "warning"]
    print(f"{'server':>12} {'alone p50 ms':>13} {'loaded p50 ms':>14} {'slower':>7}")
    ratios = {}
    for name, env in WAIT_POLICIES.items():
        server = Server(name, serve, tmp_path / f"{name}.log", env=env)
        try:
            server.wait_ready()
            sequential_p50(server.port, texts, 5)  # warm-up
            alone = sequential_p50(server.port, texts, requests)
            neighbour = competing_load()
            try:
                time.sleep(1)
                loaded = sequential_p50(server.port, texts, requests)
            finally:
                neighbour.kill()
                neighbour.wait()
        finally:
            server.stop()
        ratios[name] = loaded / alone
        print(f"{name:>12} {alone:>13.1f} {loaded:>14.1f} {ratios[name]:>6.1f}x", flush=True)
    print(f"competing load: before x{ratios['before']:.1f} slower, passive x{ratios['passive']:.1f}, finegrain x{ratios['finegrain']:.1f}")


# ---------------------------------------------------------------------------------------------- worker processes


def worker_events(log: Path, name: str) -> list[dict]:
    """The JSON log lines of event `name` in a server's log."""
    lines = [line for line in log.read_text().splitlines() if line.startswith("{")]
    return [entry for entry in map(json.loads, lines) if entry.get("event") == name]


def classify_texts(connection: http.client.HTTPConnection, texts: list[str]) -> list | None:
    """The predictions for several texts in one request; None when the server answered anything but 200."""
    connection.request("POST", "/v1/classify", json.dumps({"texts": texts}), {"Content-Type": "application/json"})
    response = connection.getresponse()
    payload = response.read()
    return json.loads(payload)["predictions"] if response.status == 200 else None


def batch_load(port: int, texts: list[str], requests: int, per_request: int, concurrency: int) -> dict:
    """`load` with `per_request` texts in each request: requests/s, texts/s and latency percentiles."""
    groups = [texts[i : i + per_request] for i in range(0, len(texts) - per_request + 1, per_request)]
    result = load(port, groups, requests, concurrency, send=classify_texts)
    result["texts_per_s"] = result["rps"] * per_request
    return result


def run_workers(run_dir: Path, texts: list[str], tmp_path: Path, counts: list[int], args) -> None:
    """Throughput and memory of `finegrain serve --workers N` for each N, the cores split between the workers."""
    from finegrain.serve.workers import memory_figures

    cores = os.cpu_count() or 1
    print(f"load: {args.requests} requests of {args.texts_per_request} Rotten Tomatoes texts each (at most {MAX_LENGTH} "
          f"tokens), {args.concurrency} concurrent clients; {cores} cores split between the workers", flush=True)
    print(f"{'workers':>7} {'threads':>7} {'req/s':>7} {'texts/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'failed':>6} "
          f"{'worker RSS':>10} {'PSS':>7} {'USS':>7} {'server PSS':>10} {'mapped MB':>9}")
    results = {}
    for count in counts:
        threads = max(1, cores // count)
        command = [sys.executable, "-m", "finegrain.serve", f"bench={run_dir}", "--host", LOOPBACK, "--timeout", "600",
                   "--threads", str(threads), "--max-queue", "4096", "--log-level", "info"]
        if count > 1:
            command += ["--workers", str(count)]
        log = tmp_path / f"workers-{count}.log"
        server = Server(f"finegrain --workers {count}", command, log)
        try:
            server.wait_ready()
            deadline = time.time() + 300
            while count > 1 and len(worker_events(log, "loaded")) < count and time.time() < deadline:
                time.sleep(0.2)
            batch_load(server.port, texts, args.concurrency, args.texts_per_request, args.concurrency)  # warm-up
            result = batch_load(server.port, texts, args.requests, args.texts_per_request, args.concurrency)
            loaded = worker_events(log, "loaded")
            pids = [entry["pid"] for entry in loaded] if count > 1 else [server.process.pid]
            workers = [memory_figures(pid) for pid in pids]
            master = memory_figures(server.process.pid) if count > 1 else {"pss": 0.0}
            result["worker"] = {key: sum(w[key] for w in workers) / len(workers) for key in ("rss", "pss", "uss")}
            result["server_pss"] = master["pss"] + sum(w["pss"] for w in workers)
            result["mapped_mb"] = loaded[0]["mapped_bytes"] / 2**20 if count > 1 else 0.0
        finally:
            server.stop()
        results[count] = result
        w = result["worker"]
        print(f"{count:>7} {threads:>7} {result['rps']:>7.1f} {result['texts_per_s']:>8.1f} {result['p50_ms']:>8.1f} "
              f"{result['p99_ms']:>8.1f} {result['failed']:>6} {w['rss']:>8.0f}MB {w['pss']:>5.0f}MB {w['uss']:>5.0f}MB "
              f"{result['server_pss']:>8.0f}MB {result['mapped_mb']:>9.0f}", flush=True)
    if 1 in results and len(results) > 1:
        most = max(results)
        print(f"workers: {most} workers x{results[most]['rps'] / results[1]['rps']:.2f} the requests/s of 1, "
              f"total PSS x{results[most]['server_pss'] / results[1]['server_pss']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="16 training texts, 32 requests per server: about 2 minutes")
    parser.add_argument("--requests", type=int, default=None, help="requests per server (default 1000; 32 with --quick)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads of each server")
    parser.add_argument("--competing-load", action="store_true",
                        help="single-request latency alone and beside a busy 2-thread process, spinning vs passive OpenMP waits")
    parser.add_argument("--workers", metavar="N,N,...",
                        help="throughput and memory of `finegrain serve --workers N` for each N, e.g. 1,2")
    parser.add_argument("--texts-per-request", type=int, default=4, help="texts in each request of --workers (default 4)")
    parser.add_argument("--side", choices=["transformers"], help=argparse.SUPPRESS)
    parser.add_argument("--run", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side == "transformers":
        transformers_side(args)
        return
    if args.competing_load:
        print_facts(machine_facts())
        with tempfile.TemporaryDirectory() as tmp:
            run_dir, texts, train_s = train_run(Path(tmp), 16 if args.quick else 64, 100)
            print(f"run: SmolLM2-135M float32, LoRA r=8 on q_proj/v_proj, trained in {train_s:.1f} s; "
                  f"neighbour: 2 threads of 256x256 matmuls", flush=True)
            run_competing_load(run_dir, texts, Path(tmp), args.requests or 20)
        return
    args.requests = args.requests or (32 if args.quick else 1000)
    if args.workers:
        print_facts(machine_facts())
        with tempfile.TemporaryDirectory() as tmp:
            run_dir, texts, train_s = train_run(Path(tmp), 16 if args.quick else 64, 500)
            print(f"run: SmolLM2-135M float32, LoRA r=8 on q_proj/v_proj of 30 layers, 2 labels, trained in {train_s:.1f} s",
                  flush=True)
            run_workers(run_dir, texts, Path(tmp), [int(n) for n in args.workers.split(",")], args)
        return

    import torch

    torch.set_num_threads(args.threads)
    print_facts(machine_facts())
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        run_dir, texts, train_s = train_run(tmp_path, 16 if args.quick else 64, 500)
        print(f"run: SmolLM2-135M float32, LoRA r=8 on q_proj/v_proj of 30 layers, 2 labels, trained in {train_s:.1f} s", flush=True)
        print(f"load: {args.requests} requests of one Rotten Tomatoes text each (at most {MAX_LENGTH} tokens), "
              f"{args.concurrency} concurrent clients; servers use {args.threads} torch threads", flush=True)
        # A long --timeout: an overloaded machine shows as latency, not as 504s.
        serve = [sys.executable, "-m", "finegrain.serve", f"bench={run_dir}", "--host", LOOPBACK, "--timeout", "600",
                 "--threads", str(args.threads), "--max-queue", "4096", "--log-level", "warning"]
        servers = {
            "finegrain (dynamic)": serve,
            "finegrain (batch 1)": [*serve, "--max-batch", "1"],
            "transformers pipeline": [sys.executable, __file__, "--side", "transformers", "--run", str(run_dir),
                                      "--threads", str(args.threads)],
        }
        results, labels = {}, {}
        for name, command in servers.items():
            server = Server(name, command, tmp_path / f"{name.split()[0]}-{len(results)}.log")
            try:
                results[name], labels[name] = measure(server, texts, args)
            finally:
                server.stop()

    print(f"{'':>22} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'mean batch':>11} {'failed':>7}")
    for name, r in results.items():
        batch = f"{r['batch']:.1f}" if "batch" in r else "1"
        print(f"{name:>22} {r['rps']:>8.1f} {r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f} {batch:>11} {r['failed']:>7}")
    reference = labels["finegrain (dynamic)"]
    agree = ", ".join(
        f"{name} {sum(a == b for a, b in zip(reference, found))}/{len(reference)}"
        for name, found in labels.items() if name != "finegrain (dynamic)"
    )
    print(f"labels agree with finegrain (dynamic) on {CHECK_TEXTS} texts: {agree}")
    dynamic = results["finegrain (dynamic)"]["rps"]
    print(f"serve throughput ratio: dynamic/batch-1 x{dynamic / results['finegrain (batch 1)']['rps']:.2f}, "
          f"dynamic/transformers x{dynamic / results['transformers pipeline']['rps']:.2f}")


if __name__ == "__main__":
    main()
