"""`finegrain serve --workers 2` on the tiny model: two worker processes answer on one port, each
maps the base weights from the one shared file (none holds a copy of its own), /readyz answers, and
SIGTERM drains both; the answers are the one-process server's."""

import json
import os
import signal
import threading
import time

import httpx
import pytest
import torch

from finegrain.serve.workers import SharedWeights, mapped_bytes, memory_figures, write_weights
from serve_helpers import Server, train_run

LABELS = {"pos": ["great", "good", "fine", "lovely"], "neg": ["bad", "awful", "poor", "dull"]}
TEXTS = ["great and good", "bad and awful", "fine film", "dull plot", "lovely and fine", "poor acting"]


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, tmp_path_factory):
    return train_run(tiny_model_dir, tmp_path_factory.mktemp("workers") / "run", LABELS)


def events(server: Server, name: str) -> list[dict]:
    lines = [json.loads(line) for line in server.read_rest().splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("event") == name]


def classify(url: str, texts: list[str]) -> list[dict]:
    response = httpx.post(f"{url}/v1/classify", json={"texts": texts}, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()["predictions"]


def test_the_shared_file_gives_the_loaded_model_without_a_copy(tiny_model_dir, tmp_path):
    from finegrain.checkpoint.load import load_model

    write_weights([str(tiny_model_dir)], tmp_path)
    weights = SharedWeights(tmp_path)
    model, tokenizer = weights.load(str(tiny_model_dir))
    reference, reference_tokenizer = load_model(str(tiny_model_dir), progress=False)
    assert tokenizer.encode("great and good") == reference_tokenizer.encode("great and good")
    ids = torch.tensor([tokenizer.encode("great and good")])
    torch.testing.assert_close(model(ids), reference(ids), atol=0, rtol=0)
    parameters = list({id(p): p for p in model.parameters()}.values())
    assert mapped_bytes(parameters, weights.path(str(tiny_model_dir))) == sum(p.nbytes for p in parameters) > 0
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    assert memory_figures()["pss"] <= memory_figures()["rss"]


def test_a_worker_is_ready_before_it_accepts_a_connection(run_dir, monkeypatch):
    """A worker loads its models before serving, so its app is ready once its start-up is over: a
    request the kernel hands it at once is answered, not refused as "still loading"."""
    from fastapi.testclient import TestClient

    from finegrain.serve.app import create_app
    from finegrain.serve.models import ModelRegistry

    registry = ModelRegistry([("run", run_dir)])
    registry.load()
    loaded = registry.load
    monkeypatch.setattr(registry, "load", lambda: (time.sleep(0.5), loaded()))  # a slow no-op
    with TestClient(create_app(registry)) as client:  # the lifespan's start-up has run
        assert client.get("/readyz").json()["status"] == "ready"
        assert client.post("/v1/classify", json={"texts": TEXTS[:2]}).status_code == 200


def test_two_workers_answer_on_one_port_and_drain_on_sigterm(run_dir):
    single = Server([str(run_dir)])
    try:
        single.wait_ready()
        expected = classify(single.url, TEXTS)
    finally:
        assert single.stop() == 0
    server = Server([str(run_dir), "--workers", "2"], timeout=120)
    try:
        server.wait_ready(120)
        deadline = time.time() + 60
        while len(events(server, "loaded")) < 2 and time.time() < deadline:
            time.sleep(0.1)
        loaded = events(server, "loaded")
        assert sorted(line["worker"] for line in loaded) == [0, 1]
        for line in loaded:  # every parameter of the base is a page of the shared file
            assert line["mapped_bytes"] == line["parameter_bytes"] > 0
            assert 0 < line["pss_mb"] <= line["rss_mb"]
        assert httpx.get(f"{server.url}/readyz").json()["status"] == "ready"

        answers, errors = [], []

        def client() -> None:
            try:
                for _ in range(6):  # a new connection each time: the kernel hands it to either worker
                    answers.append(classify(server.url, TEXTS))
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=client) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors
        for found in answers:
            assert [p["label"] for p in found] == [p["label"] for p in expected]
            for a, b in zip(found, expected):
                assert a["probabilities"] == pytest.approx(b["probabilities"], abs=1e-5)
        served = {line["worker"] for line in events(server, "request") if line["path"] == "/v1/classify"}
        assert served == {0, 1}
        pids = [line["pid"] for line in loaded]
    finally:
        code = server.stop()
    assert code == 0
    assert sorted(line["worker"] for line in events(server, "stopped") if "worker" in line) == [0, 1]
    for pid in pids:  # no worker outlives the master
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_a_worker_that_dies_is_started_again(run_dir):
    server = Server([str(run_dir), "--workers", "2"], timeout=120)
    try:
        server.wait_ready(120)
        deadline = time.time() + 60
        while len(events(server, "loaded")) < 2 and time.time() < deadline:
            time.sleep(0.1)
        victim = events(server, "loaded")[0]
        os.kill(victim["pid"], signal.SIGKILL)
        deadline = time.time() + 60
        while len(events(server, "loaded")) < 3 and time.time() < deadline:
            time.sleep(0.1)
        assert [line["worker"] for line in events(server, "worker_exited")] == [victim["worker"]]
        assert events(server, "loaded")[2]["worker"] == victim["worker"]
        for _ in range(6):
            classify(server.url, TEXTS[:2])
    finally:
        assert server.stop() == 0


def test_bad_worker_counts_are_one_line(run_dir):
    from finegrain.cli import main

    assert main(["serve", str(run_dir), "--workers", "0"]) == 1
