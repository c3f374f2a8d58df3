"""`finegrain serve`: real uvicorn on 127.0.0.1 in a subprocess, a tiny model, real HTTP clients.

Two classification runs share one base in the main server; a second server whose engine sleeps
on "sleep:N" texts makes queueing (429), timeouts (504), rate limits and the SIGTERM drain
deterministic. Answers are checked against `finegrain.load(run).predict` and `generate`.
"""

import http.client
import json
import statistics
import threading
import time

import httpx
import pytest

import finegrain
from finegrain.errors import FinegrainError
from serve_helpers import LOOPBACK, Server, train_run

KEY = "test-key-0123456789abcdef"
OTHER_KEY = "other-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}
SENTIMENT = {"fresh": ["great fun film", "a gripping story", "good cast"], "rotten": ["dull and slow", "badly acted", "a bad story"]}
TOPIC = {"film": ["the movie", "the actors", "the cast"], "food": ["the soup", "a fine bread", "good cheese"],
         "sport": ["the match", "a great goal", "the team"]}
TEXTS = ["great fun film and good cast", "dull and slow", "the soup and a fine bread", "the match"]


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    return {
        "sentiment": train_run(tiny_model_dir, root / "sentiment", SENTIMENT),
        "topic": train_run(tiny_model_dir, root / "topic", TOPIC, seed=1),
    }


@pytest.fixture(scope="module")
def server(runs):
    server = Server(
        [f"sentiment={runs['sentiment']}", f"topic={runs['topic']}", "--max-texts", "8", "--max-tokens-per-text", "64",
         "--max-new-tokens", "16", "--max-body-bytes", "20000", "--max-queue", "64", "--log-bodies"],
        env={"FINEGRAIN_API_KEYS": f"{KEY},{OTHER_KEY}"},
    )
    server.wait_ready()
    yield server
    assert server.stop() == 0, server.read_rest()[-3000:]


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as client:
        yield client


def assert_same_predictions(served, expected):
    assert [p["label"] for p in served] == [p["label"] for p in expected]
    for a, b in zip(served, expected):
        assert a["probabilities"].keys() == b["probabilities"].keys()
        for label in a["probabilities"]:
            assert abs(a["probabilities"][label] - b["probabilities"][label]) < 1e-4


# ---------------------------------------------------------------------------------------------- happy paths


def test_classify_each_adapter_like_its_predictor(client, runs):
    for name, run_dir in runs.items():
        expected = finegrain.load(run_dir).predict(TEXTS)
        response = client.post("/v1/classify", json={"texts": TEXTS, "model": name})
        assert response.status_code == 200, response.text
        assert response.json()["model"] == name
        assert_same_predictions(response.json()["predictions"], expected)
    # Two runs answer on /v1/classify, so the request must say which.
    response = client.post("/v1/classify", json={"texts": TEXTS})
    assert response.status_code == 422 and response.json()["error"]["param"] == "model"


def test_second_adapter_costs_only_its_own_tensors(runs):
    from finegrain.peft import read_adapter
    from finegrain.serve.models import ModelRegistry

    registry = ModelRegistry(list(runs.items()))
    registry.load()
    base = registry.bases["tiny-llama"]
    sentiment, topic = registry.runs["sentiment"], registry.runs["topic"]
    assert sentiment.base is topic.base is base  # one copy of the base
    shared = base.llama.model.layers[0].mlp.up_proj.weight
    for run in (sentiment, topic):
        assert run.classifier.model.layers[0].mlp.up_proj.weight.data_ptr() == shared.data_ptr()
        _, tensors = read_adapter(run.run_dir / "adapter")
        assert run.adapter_bytes == sum(t.nbytes for t in tensors.values())
    tensors = {id(t): t for m in (base.llama, sentiment.classifier, topic.classifier) for t in m.parameters()}
    held = sum(t.nbytes for t in tensors.values()) + sum(
        A.nbytes + B.nbytes for m in base.llama.modules() for A, B, _ in getattr(m, "adapters", {}).values()
    )
    assert held == base.num_bytes + sentiment.adapter_bytes + topic.adapter_bytes
    print(f"\nbase {base.num_bytes} bytes; second adapter adds {topic.adapter_bytes} bytes "
          f"({100 * topic.adapter_bytes / base.num_bytes:.1f}% of the base)")
    # The bank leaves no adapter switched on between batches.
    assert base.bank.active.name is None


def test_generate_and_chat(client, server, tiny_model_dir):
    from finegrain.generation import generate

    model, tokenizer = finegrain.load_model(tiny_model_dir, progress=False)
    expected = generate(model, tokenizer, "The capital of France", max_new_tokens=8)
    response = client.post("/v1/generate", json={"prompt": "The capital of France", "max_new_tokens": 8})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["text"] == expected and body["model"] == "tiny-llama"
    assert body["usage"]["prompt_tokens"] == len(tokenizer.encode("The capital of France"))

    request = {"model": "tiny-llama", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 6, "temperature": 0}
    chat = client.post("/v1/chat/completions", json=request)
    assert chat.status_code == 200, chat.text
    answer = chat.json()["choices"][0]["message"]["content"]
    assert answer == generate(model, tokenizer, "Hello", max_new_tokens=6, chat=True)

    pieces, done = [], False
    with client.stream("POST", "/v1/chat/completions", json={**request, "stream": True}) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        for line in stream.iter_lines():
            if line.startswith("data: "):
                if line == "data: [DONE]":
                    done = True
                    break
                for choice in json.loads(line[6:])["choices"]:
                    pieces.append(choice["delta"].get("content") or "")
    assert done and "".join(pieces) == answer


def test_openai_client(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
    assert {m.id for m in client.models.list()} == {"sentiment", "topic", "tiny-llama"}
    messages = [{"role": "user", "content": "Hello"}]
    completion = client.chat.completions.create(model="tiny-llama", messages=messages, max_tokens=5, temperature=0)
    text = completion.choices[0].message.content
    streamed = "".join(
        chunk.choices[0].delta.content or ""
        for chunk in client.chat.completions.create(model="tiny-llama", messages=messages, max_tokens=5, temperature=0, stream=True)
        if chunk.choices
    )
    assert streamed == text
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong-key-0123456789", max_retries=0).models.list()


def test_models_health_ready_metrics(client, server):
    models = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert models["sentiment"]["labels"] == ["fresh", "rotten"] and models["topic"]["endpoint"] == "/v1/classify"
    assert models["topic"]["adapter_bytes"] < models["tiny-llama"]["parameter_bytes"] / 10
    assert httpx.get(f"{server.url}/healthz").json() == {"status": "ok"}  # no key needed
    assert httpx.get(f"{server.url}/readyz").status_code == 200
    assert "/v1/classify" in httpx.get(f"{server.url}/openapi.json").json()["paths"]
    metrics = httpx.get(f"{server.url}/metrics").text
    for name in ("finegrain_requests_total{endpoint=\"/v1/classify\",status=\"200\"}", "finegrain_request_duration_seconds_bucket",
                 "finegrain_batch_size_count", "finegrain_queue_depth", "finegrain_generated_tokens_total{model=\"tiny-llama\"}"):
        assert name in metrics, name


# ---------------------------------------------------------------------------------------------- keys, limits


def test_api_keys(server, tmp_path):
    from finegrain.serve.security import check_bind, load_keys

    url = f"{server.url}/v1/models"
    assert httpx.get(url).status_code == 401
    wrong = httpx.get(url, headers={"Authorization": "Bearer not-the-key-0123456789"})
    assert wrong.status_code == 401 and wrong.headers["www-authenticate"].startswith("Bearer")
    assert httpx.get(url, headers={"Authorization": f"Basic {KEY}"}).status_code == 401
    assert httpx.get(url, headers={"Authorization": f"Bearer {OTHER_KEY}"}).status_code == 200
    # A stranger cannot make the server read a body, nor learn anything from a malformed one.
    assert httpx.post(f"{server.url}/v1/classify", content=b"{not json").status_code == 401

    key_file = tmp_path / "keys"
    key_file.write_text("# ops team\nfile-key-0123456789abcdef\n")
    keys = load_keys(key_file, environ={})
    assert len(keys) == 1 and keys.identify("file-key-0123456789abcdef") and keys.identify("file-key") is None
    with pytest.raises(FinegrainError, match="16 printable"):
        load_keys(None, environ={"FINEGRAIN_API_KEYS": "short"})
    with pytest.raises(FinegrainError, match="--host 0.0.0.0"):
        check_bind("0.0.0.0", load_keys(None, environ={}), insecure=False)
    check_bind("0.0.0.0", load_keys(None, environ={}), insecure=True)  # checked only; nothing binds
    check_bind("::1", load_keys(None, environ={}), insecure=False)


def test_non_loopback_host_without_keys_is_refused_before_binding(runs, monkeypatch):
    from finegrain.serve.cli import main

    monkeypatch.delenv("FINEGRAIN_API_KEYS", raising=False)
    # 192.0.2.1 is a documentation address: even a broken check could not listen there.
    assert main([str(runs["sentiment"]), "--host", "192.0.2.1", "--port", "0"]) == 1


@pytest.mark.parametrize(
    "body, status, message",
    [
        ({"texts": ["a"], "model": "sentiment", "colour": "red"}, 422, "colour: Extra inputs are not permitted"),
        ({"texts": "great", "model": "sentiment"}, 422, "texts: Input should be a valid list"),
        ({"texts": [1], "model": "sentiment"}, 422, "texts.0: Input should be a valid string"),
        ({"texts": [""], "model": "sentiment"}, 422, "texts.0: String should have at least 1 character"),
        ({"texts": [], "model": "sentiment"}, 422, "texts: List should have at least 1 item"),
        ({"texts": ["a"] * 9, "model": "sentiment"}, 422, "--max-texts"),
        ({"texts": ["ok", "great fun film " * 30], "model": "sentiment"}, 422, "over the limit of 64 tokens per text (--max-tokens-per-text)"),
        ({"texts": ["\ud800"], "model": "sentiment"}, 422, "texts.0: Input should be a valid string"),
        ({"texts": ["a"], "model": "nope"}, 404, "model 'nope' is not served"),
        ({"texts": ["a"], "model": "tiny-llama"}, 422, "'tiny-llama' is a generation model"),
        ({"texts": ["x" * 30000], "model": "sentiment"}, 413, "over the limit of 20000 bytes"),
    ],
)
def test_classify_refusals(client, body, status, message):
    # json.dumps escapes the lone surrogate as JSON allows ("\\ud800"); httpx's json= cannot encode it.
    response = client.post("/v1/classify", content=json.dumps(body), headers={"Content-Type": "application/json"})
    assert response.status_code == status, response.text
    assert message in response.json()["error"]["message"]
    if status == 422:  # names the field
        assert response.json()["error"]["message"].split(":")[0] == response.json()["error"]["param"]


@pytest.mark.parametrize(
    "path, body, message",
    [
        ("/v1/generate", {"prompt": "hi", "max_new_tokens": 17}, "max_new_tokens: 17 is over the limit of 16 (--max-new-tokens)"),
        ("/v1/generate", {"prompt": "hi", "temperature": -1}, "temperature: Input should be greater than or equal to 0"),
        ("/v1/generate", {"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, "stop: List should have at most 4 items"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 2}, "n: Input should be less than or equal to 1"),
        ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role: Input should be"),
        ("/v1/chat/completions", {"messages": []}, "messages: List should have at least 1 item"),
    ],
)
def test_generation_refusals(client, path, body, message):
    response = client.post(path, json=body)
    assert response.status_code == 422, response.text
    assert message in response.json()["error"]["message"]


def test_malformed_bodies(client, server):
    assert client.post("/v1/classify", content=b"{not json", headers={"Content-Type": "application/json"}).status_code == 422
    chunked = client.post("/v1/classify", content=iter([b'{"texts": ["', b"x" * 25000, b'"]}']))  # no Content-Length
    assert chunked.status_code == 413
    form = client.post("/v1/classify", content=b'{"texts": ["a"]}', headers={"Content-Type": "text/plain"})
    assert form.status_code == 422 and "application/json" in form.json()["error"]["message"]


def test_bodies_are_logged_only_masked(client, server):
    from finegrain.serve.logs import mask_pii

    text = "mail ann@example.com or call +44 20 7946 0958, id 123-45-6789"
    assert client.post("/v1/classify", json={"texts": [text], "model": "sentiment"}).status_code == 200
    time.sleep(0.3)
    log = server.read_rest()
    assert "<email>" in log and "<phone>" in log
    assert "ann@example.com" not in log and "7946" not in log and "6789" not in log
    assert mask_pii(text) == "mail <email> or call <phone>, id <number>"
    assert mask_pii("order 12345678, IBAN DE89370400440532013000, 10/10, v1.2.3") == "order <number>, IBAN <number>, 10/10, v1.2.3"


# ---------------------------------------------------------------------------------------------- load, fuzzing


def test_load_2000_requests_16_concurrent(server):
    # 16 threads, each with its own keep-alive connection: http.client costs the client little
    # CPU, so on a small machine the numbers are mostly the server's.
    latencies, statuses = [], []

    def worker(n: int) -> None:
        connection = http.client.HTTPConnection(LOOPBACK, server.port, timeout=60)
        headers = {**AUTH, "Content-Type": "application/json"}
        for i in range(n):
            body = json.dumps({"texts": [TEXTS[i % len(TEXTS)]], "model": ("sentiment", "topic")[i % 2]})
            started = time.perf_counter()
            connection.request("POST", "/v1/classify", body, headers)
            response = connection.getresponse()
            response.read()
            latencies.append(time.perf_counter() - started)
            statuses.append(response.status)
        connection.close()

    threads = [threading.Thread(target=worker, args=(125,)) for _ in range(16)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    latencies.sort()
    p50, p99 = latencies[len(latencies) // 2], latencies[int(len(latencies) * 0.99)]
    print(f"\n2000 requests, 16 concurrent: {2000 / seconds:.0f} req/s, p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, "
          f"mean {statistics.mean(latencies) * 1000:.1f} ms")
    assert len(statuses) == 2000 and not [s for s in statuses if s >= 500]
    assert statuses.count(200) == 2000


def test_fuzz_openapi_schema_no_server_errors(server, client, runs):
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, Phase, given, settings

    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    failures = []
    for result in schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(max_examples=25, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
        def check(case):
            response = case.call(base_url=server.url, headers=AUTH, timeout=30)
            if response.status_code >= 500:
                failures.append((case.method, case.path, case.body, response.status_code, response.text[:300]))

        check()
    assert not failures, failures[:5]
    # And it still answers correctly.
    response = client.post("/v1/classify", json={"texts": TEXTS, "model": "sentiment"})
    assert response.status_code == 200
    assert_same_predictions(response.json()["predictions"], finegrain.load(runs["sentiment"]).predict(TEXTS))


# ---------------------------------------------------------------------------------------------- queue, timeout, drain


def fire(url: str, body: dict, results: list, key: str = KEY) -> threading.Thread:
    def send():
        try:
            results.append(httpx.post(f"{url}/v1/classify", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=30))
        except httpx.HTTPError as exc:
            results.append(exc)

    thread = threading.Thread(target=send)
    thread.start()
    return thread


def test_queue_full_429_and_timeout_504(runs):
    server = Server([str(runs["sentiment"]), "--max-batch", "1", "--max-queue", "2", "--timeout", "1.5"],
                    env={"FINEGRAIN_API_KEYS": KEY}, slow=True)
    try:
        server.wait_ready()
        results: list = []
        threads = []
        for _ in range(5):  # one runs (3 s), two wait, two find the queue full
            threads.append(fire(server.url, {"texts": ["sleep:3"]}, results))
            time.sleep(0.1)
        for thread in threads:
            thread.join()
        statuses = sorted(r.status_code for r in results)
        assert statuses == [429, 429, 504, 504, 504], [r.text for r in results]
        full = next(r for r in results if r.status_code == 429)
        assert int(full.headers["retry-after"]) >= 1 and "busy" in full.json()["error"]["message"]
        assert "--timeout" in next(r for r in results if r.status_code == 504).json()["error"]["message"]

        metrics = httpx.get(f"{server.url}/metrics").text
        assert 'finegrain_rejected_total{reason="queue_full"} 2' in metrics
    finally:
        assert server.stop() == 0


def test_rate_limit_per_key_then_sigterm_drains_in_flight_requests(runs):
    server = Server([str(runs["sentiment"]), "--timeout", "20", "--rate-limit", "0.2"],
                    env={"FINEGRAIN_API_KEYS": f"{KEY},{OTHER_KEY}"}, slow=True)
    server.wait_ready()
    # One request per 5 s per key: the other key's second request is refused, KEY's budget is its own.
    other = {"Authorization": f"Bearer {OTHER_KEY}"}
    assert httpx.get(f"{server.url}/v1/models", headers=other).status_code == 200
    limited = httpx.get(f"{server.url}/v1/models", headers=other)
    assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1

    results: list = []
    thread = fire(server.url, {"texts": ["sleep:1.5 great fun film"]}, results)
    time.sleep(0.5)  # the request is in the model now
    started = time.perf_counter()
    server.process.terminate()
    thread.join()
    assert server.process.wait(20) == 0
    assert time.perf_counter() - started >= 0.8  # it waited for the request
    assert results[0].status_code == 200, results[0]
    assert len(results[0].json()["predictions"]) == 1
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.url}/healthz")
    log = server.read_rest()
    assert '"event": "draining"' in log and '"event": "stopped"' in log
