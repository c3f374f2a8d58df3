"""`finegrain ui`'s API (FastAPI's TestClient) on tiny trained runs: the runs and their status as
the run files say, a run's curve and report, compare, the playground against `finegrain.load`,
config checks with their line, the launch queue, and what the dashboard refuses to serve."""

import json
import shutil
import sys
import textwrap
import time
import tomllib
from importlib import resources
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

import finegrain
import finegrain.run
from finegrain import rundir
from finegrain.atomic import exclusive_lock
from finegrain.cli import main
from finegrain.errors import FinegrainError
from finegrain.serve.security import ApiKeys
from finegrain.ui.app import create_app
from finegrain.ui.launcher import Launcher
from serve_helpers import train_run

SENTIMENT = {"fresh": ["great fun film", "a gripping story", "good cast"], "rotten": ["dull and slow", "badly acted", "a bad story"]}
KEY = "ui-key-0123456789abcdef"


@pytest.fixture(scope="module")
def root(tiny_model_dir, tmp_path_factory):
    """A runs directory: two finished runs (one in a subfolder), an interrupted copy of one, and a
    failed one whose error `train --resume` recorded."""
    root = tmp_path_factory.mktemp("ui") / "runs"
    data = tmp_path_factory.mktemp("ui-data")
    (root / "group").mkdir(parents=True)
    train_run(tiny_model_dir, root / "sentiment", SENTIMENT)
    train_run(tiny_model_dir, root / "group" / "slower", SENTIMENT, seed=1, sections={"train": {"lr": 1e-3, "epochs": 2}})
    for name in ("interrupted", "failed"):
        shutil.copytree(root / "sentiment", root / name)
        shutil.rmtree(root / name / rundir.ADAPTER)
        (root / name / rundir.METRICS).unlink()
    # The failed run lost its data file: resuming stops with a one-line error, which train records.
    config = (root / "failed" / rundir.CONFIG).read_text(encoding="utf-8")
    shutil.copy(root / "sentiment.jsonl", data / "gone.jsonl")
    (root / "failed" / rundir.CONFIG).write_text(config.replace(str(root / "sentiment.jsonl"), str(data / "gone.jsonl")), encoding="utf-8")
    (data / "gone.jsonl").unlink()
    with pytest.raises(FinegrainError):
        finegrain.run.train(None, resume_dir=root / "failed", progress=False)
    return root


@pytest.fixture(scope="module")
def client(root):
    with TestClient(create_app(root)) as client:
        yield client


def by_id(client):
    return {row["id"]: row for row in client.get("/api/runs").json()["runs"]}


def test_runs_with_status_task_method_and_headline(client, root):
    rows = by_id(client)
    assert set(rows) == {"sentiment", "group/slower", "interrupted", "failed"}
    finished = rows["sentiment"]
    metrics = json.loads((root / "sentiment" / rundir.METRICS).read_text())
    assert (finished["status"], finished["task"], finished["method"], finished["model"]) == ("finished", "classification", "lora", "tiny-llama")
    assert (finished["metric"], finished["split"]) == ("accuracy", "test")
    assert finished["value"] == pytest.approx(metrics["test"]["accuracy"])
    assert finished["duration"] == pytest.approx(metrics["train"]["total_seconds"])
    assert rows["group/slower"]["status"] == "finished"
    assert rows["interrupted"]["status"] == "interrupted" and rows["interrupted"]["error"] is None


def test_a_failed_train_records_its_one_line_error(client, root):
    error = (root / "failed" / rundir.ERROR).read_text(encoding="utf-8")
    assert error.count("\n") == 1 and "gone.jsonl" in error
    row = by_id(client)["failed"]
    assert row["status"] == "failed" and row["error"] == error.strip()
    # A run that starts again clears the old error, before anything else can fail.
    assert rundir.status(root / "sentiment") == "finished" and rundir.read_error(root / "sentiment") is None


def test_running_while_a_train_holds_the_lock(root):
    run_dir = root / "interrupted"
    with exclusive_lock(run_dir, "finegrain train"):
        assert rundir.status(run_dir) == "running"
        assert rundir.status(root / "sentiment") == "finished"
    assert rundir.status(run_dir) == "interrupted"


def test_run_config_report_and_curve(client, root):
    run = client.get("/api/run", params={"run": "sentiment"}).json()
    assert run["config_text"] == (root / "sentiment" / rundir.CONFIG).read_text()
    assert run["metrics"]["test"]["per_class"].keys() == {"fresh", "rotten"}
    assert "report.html" in run["files"] and run["playground"] == {"task": "classification", "field": "texts"}
    records = [json.loads(line) for line in (root / "sentiment" / rundir.METRICS_LOG).read_text().splitlines()]
    curve = client.get("/api/curve", params={"run": "sentiment"}).json()
    assert curve["records"] == records and curve["next"] == len(records) and curve["status"] == "finished"
    later = client.get("/api/curve", params={"run": "sentiment", "start": 2}).json()
    assert later["records"] == records[2:]
    report = client.get("/api/file", params={"run": "sentiment", "name": "report.html"})
    assert report.status_code == 200 and report.headers["content-type"].startswith("text/html")
    assert "sandbox" in report.headers["content-security-policy"]


def test_a_line_being_written_is_not_read(tmp_path, root):
    run_dir = tmp_path / "live"
    shutil.copytree(root / "interrupted", run_dir)
    with open(run_dir / rundir.METRICS_LOG, "a", encoding="utf-8") as log:
        log.write('{"step": 99, "train_lo')
    records = rundir.read_metrics_log(run_dir)
    assert records and all(r["step"] != 99 for r in records)


def test_compare_configs_metrics_and_curves(client, root):
    got = client.get("/api/compare", params=[("run", "sentiment"), ("run", "group/slower")]).json()
    assert [r["id"] for r in got["runs"]] == ["sentiment", "group/slower"]
    diff = {row["key"]: row["values"] for row in got["config"]}
    assert diff["train.lr"] == [0.005, 0.001] and diff["train.epochs"] == [1, 2]
    assert "task" not in diff and "model.name" not in diff  # the same in both
    metrics = {row["key"]: row["values"] for row in got["metrics"]}
    for i, name in enumerate(("sentiment", "group/slower")):
        assert metrics["test.accuracy"][i] == pytest.approx(json.loads((root / name / rundir.METRICS).read_text())["test"]["accuracy"])
    assert len(got["curves"]) == 2 and got["curves"][1][-1]["step"] > got["curves"][0][-1]["step"]
    assert client.get("/api/compare", params={"run": "sentiment"}).status_code == 422


def test_playground_answers_as_the_run_predicts(client, root):
    texts = ["great fun film and good cast", "dull and slow"]
    expected = finegrain.load(root / "sentiment").predict(texts)
    for text, want in zip(texts, expected):
        got = client.post("/api/predict", json={"run": "sentiment", "input": text})
        assert got.status_code == 200, got.text
        prediction = got.json()["prediction"]
        assert prediction["label"] == want["label"]
        for label, p in want["probabilities"].items():
            assert prediction["probabilities"][label] == pytest.approx(p, abs=1e-4)
    blank = client.post("/api/predict", json={"run": "sentiment", "input": "   "})
    assert blank.status_code == 422 and "no text" in blank.json()["error"]
    unfinished = client.post("/api/predict", json={"run": "interrupted", "input": "good"})
    assert unfinished.status_code == 422 and "no trained adapter" in unfinished.json()["error"]


@pytest.mark.parametrize("run, name", [
    ("../runs/sentiment", "report.html"), ("/etc", "report.html"), ("sentiment/..", "report.html"),
    ("sentiment", "../../etc/passwd"), ("sentiment", "adapter/adapter_model.safetensors"), ("sentiment", "/etc/passwd"),
    ("", "config.yaml"), ("nothing", "config.yaml"),
])
def test_nothing_outside_the_runs_directory(client, run, name):
    response = client.get("/api/file", params={"run": run, "name": name})
    assert response.status_code == 404, response.text


def test_links_leading_out_are_refused(client, root, tmp_path):
    outside = tmp_path / "outside"
    shutil.copytree(root / "sentiment", outside, ignore=shutil.ignore_patterns("adapter", "checkpoint", "best"))
    (outside / "secret.txt").write_text("secret")
    (root / "linked").symlink_to(outside, target_is_directory=True)
    (root / "interrupted" / rundir.SKIPPED_ROWS).symlink_to(outside / "secret.txt")
    try:
        assert "linked" not in by_id(client)
        assert client.get("/api/run", params={"run": "linked"}).status_code == 404
        assert client.get("/api/file", params={"run": "linked", "name": "config.yaml"}).status_code == 404
        assert client.get("/api/file", params={"run": "interrupted", "name": "skipped_rows.txt"}).status_code == 404
        assert client.get("/api/file", params={"run": "sentiment", "name": "config.yaml"}).status_code == 200
    finally:
        (root / "linked").unlink()
        (root / "interrupted" / rundir.SKIPPED_ROWS).unlink()


def test_config_errors_name_their_line(client, tiny_model_dir):
    def check(name, config):
        return client.post("/api/validate", json={"name": name, "config": textwrap.dedent(config)}).json()

    assert check("new-run", f"task: classification\nmodel:\n  name: {tiny_model_dir}\ndata:\n  dataset: rotten_tomatoes\n") == {"ok": True}
    assert check("new-run", "task: classification\n") == {"ok": False, "line": None, "error": (
        "no training data; set data.dataset (e.g. rotten_tomatoes) or data.train (a file)")}
    options = client.get("/api/options").json()
    assert "classification" in options["tasks"] and "lora" in options["methods"]
    got = check("new-run", "task: classification\ntrain:\n  epochs: 1\n  lrr: 0.1\n")
    assert got == {"ok": False, "error": "line 4: unknown key 'train.lrr'; did you mean 'train.lr'?", "line": 4}
    got = check("new-run", "task: classification\ntrain: [1, 2\n")
    assert not got["ok"] and got["line"] == 3 and "not valid YAML" in got["error"]
    got = check("new-run", f"{CONFIG}task: clasification\n")
    assert not got["ok"] and got["line"] == 3 and "classification" in got["error"]
    got = check("new-run", f"{CONFIG}peft:\n  method: loraa\n")
    assert not got["ok"] and "peft.method" in got["error"] and "lora" in got["error"]
    assert "already exists" in check("sentiment", "task: classification\n")["error"]
    assert "letters, digits" in check("../escape", "task: classification\n")["error"]


CONFIG = "data:\n  dataset: rotten_tomatoes\n"
FAKE_TRAIN = """
import signal, sys, time
signal.signal(signal.SIGINT, lambda *_: sys.exit(130))
for step in range(1, 400):
    print(f"\\rtraining:  {step}%|#   | {step}/400 [00:01<00:02]", end="", file=sys.stderr, flush=True)
    time.sleep(0.05)
"""


def test_launch_queue_runs_one_at_a_time_and_cancels(tmp_path):
    script = tmp_path / "fake_train.py"
    script.write_text(FAKE_TRAIN)
    launcher = Launcher(tmp_path, command=[sys.executable, str(script)])
    try:
        first = launcher.submit("first", CONFIG)
        second = launcher.submit("second", CONFIG)
        deadline = time.monotonic() + 20
        while (first.progress()[0] or 0) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        states = {job["name"]: job for job in launcher.describe()}
        assert states["first"]["state"] == "running" and states["first"]["total"] == 400 and states["first"]["step"] >= 2
        assert states["second"]["state"] == "queued"
        assert "training:" in states["first"]["tail"] and "\r" not in states["first"]["tail"]
        launcher.cancel(first.id)
        while second.state != "running" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert first.state == "cancelled" and first.returncode == 130  # stopped by SIGINT, as Ctrl-C stops train
        assert second.state == "running"
        launcher.cancel(second.id)
        third = launcher.submit("third", CONFIG)
        launcher.cancel(third.id)
        assert third.state == "cancelled" and third.started is None  # cancelled while queued: never ran
        assert (tmp_path / ".launch" / "first.yaml").read_text() == CONFIG
    finally:
        launcher.close()
    assert second.state == "cancelled"


def test_keys_hosts_and_json_bodies(root):
    app = create_app(root, keys=ApiKeys([KEY]), hosts=["127.0.0.1:7860"])
    with TestClient(app, base_url="http://127.0.0.1:7860") as client:
        assert client.get("/").status_code == 200  # the page holds no data
        assert client.get("/api/runs").status_code == 401
        assert client.get("/api/runs", headers={"Authorization": "Bearer wrong-key-0123456789"}).status_code == 401
        assert client.get("/api/runs", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
        assert client.get("/api/runs", headers={"Cookie": f"finegrain_key={KEY}"}).status_code == 200
        # DNS rebinding: a page of another site that resolves its name to 127.0.0.1
        assert client.get("/", headers={"Host": "evil.example:7860"}).status_code == 421
        # A form another site posts (no JSON type, so no preflight) is refused before it is read.
        form = client.post("/api/validate", content=b'{"name": "x", "config": ""}',
                           headers={"Authorization": f"Bearer {KEY}", "Content-Type": "text/plain"})
        assert form.status_code == 415


def test_page_assets_ship_in_the_package():
    static = resources.files("finegrain.ui").joinpath("static")
    for name in ("index.html", "app.js", "style.css"):
        assert static.joinpath(name).is_file()
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert "static/*" in pyproject["tool"]["setuptools"]["package-data"]["finegrain.ui"]
    page = static.joinpath("index.html").read_text()
    assert "http://" not in page and "https://" not in page  # nothing from the internet


def test_cli_refuses_a_public_address_without_keys(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("FINEGRAIN_API_KEYS", raising=False)
    assert main(["ui", str(tmp_path), "--host", "0.0.0.0", "--port", "0"]) == 1
    assert "API keys" in capsys.readouterr().err
    assert main(["ui", str(tmp_path / "missing")]) == 1
    assert "no such directory" in capsys.readouterr().err
    assert main(["ui", str(tmp_path), "--port", "70000"]) == 1  # not 70000 % 65536
    assert "--port 70000: ports run from 1 to 65535" in capsys.readouterr().err


def test_the_dashboard_reads_runs_without_the_training_code():
    from test_architecture import import_graph, within

    wrong = [f"{module} imports {target}" for module, targets in sorted(import_graph().items()) if within(module, "finegrain.ui")
             for target in sorted(targets) if within(target, "finegrain.train") or within(target, "finegrain.run")]
    assert not wrong, "finegrain.ui reads runs through finegrain.rundir and launches `finegrain train` as a command:\n" + "\n".join(wrong)


def test_a_sweep_shows_its_table_and_plot(tiny_model_dir, tmp_path):
    root = tmp_path / "runs"
    root.mkdir()
    rows = [{"text": text, "label": label} for label, texts in SENTIMENT.items() for text in texts] * 5
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (tmp_path / "sweep.yaml").write_text(textwrap.dedent(f"""\
        task: classification
        model: {{name: {tiny_model_dir}}}
        data: {{train: {tmp_path / "train.jsonl"}, max_length: 16}}
        lora: {{r: 4, layers: [-1]}}
        train: {{epochs: 1, batch_size: 8, threads: 1, recipe: off}}
        """))
    assert main(["sweep", str(tmp_path / "sweep.yaml"), "--seeds", "2", "--output", str(root / "seeds")]) == 0
    with TestClient(create_app(root)) as client:
        listing = client.get("/api/runs").json()
        assert listing["sweeps"] == ["seeds"] and len(listing["runs"]) == 2  # the sweep's runs are runs too
        got = client.get("/api/sweep", params={"sweep": "seeds"}).json()
        assert got["table"] == (root / "seeds" / rundir.SWEEP_TABLE).read_text() and got["plot"]
        plot = client.get("/api/sweep-plot", params={"sweep": "seeds"})
        assert plot.status_code == 200 and plot.content == (root / "seeds" / rundir.SWEEP_PLOT).read_bytes()
        for bad in ("..", "/tmp", "seeds/../..", listing["runs"][0]["id"]):
            assert client.get("/api/sweep", params={"sweep": bad}).status_code == 404
