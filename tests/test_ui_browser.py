"""`finegrain ui` in a real browser: Debian's headless Chromium driven by Playwright, against the
dashboard served by uvicorn on 127.0.0.1, on tiny trained runs. The page lists the runs (a failed
one with its error), opens one (report, curves), compares two, answers in the playground, and
launches a real `finegrain train` whose curve grows while it trains, then cancels it; no console
error anywhere. FINEGRAIN_UI_SCREENSHOTS=docs/img saves a screenshot of each view there.
"""

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from finegrain import rundir

playwright = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed: pip install -r requirements-test.txt")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH: apt-get install -y chromium (as .ci/run does)")

from serve_helpers import train_run  # noqa: E402
from test_ui import SENTIMENT  # noqa: E402
from test_ui_spans import span_runs  # noqa: E402

TIMEOUT_MS = 30_000


@pytest.fixture(scope="module")
def root(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("ui-browser") / "runs"
    (root / "group").mkdir(parents=True)
    train_run(tiny_model_dir, root / "sentiment", SENTIMENT)
    train_run(tiny_model_dir, root / "group" / "slower", SENTIMENT, seed=1, sections={"train": {"lr": 1e-3, "epochs": 2}})
    shutil.copytree(root / "sentiment", root / "failed", ignore=shutil.ignore_patterns(rundir.ADAPTER, rundir.METRICS))
    (root / "failed" / rundir.ERROR).write_text("runs/failed.jsonl:7: no 'label' field; add it or pass --skip-bad-rows\n")
    return root


@contextlib.contextmanager
def serving(root, **options):
    """The dashboard on 127.0.0.1 (a free port) in a thread of this process; yields its URL."""
    import uvicorn

    from finegrain.ui.app import create_app

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    app = create_app(root, hosts=[f"127.0.0.1:{port}"], **options)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.fixture(scope="module")
def url(root):
    with serving(root) as url:
        yield url


@pytest.fixture(scope="module")
def page(url):
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(TIMEOUT_MS)
        page.errors = []
        page.on("console", lambda message: message.type == "error" and page.errors.append(message.text))
        page.on("pageerror", lambda error: page.errors.append(str(error)))
        yield page
        browser.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    return Path(os.environ.get("FINEGRAIN_UI_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))


def shot(page, shots: Path, name: str) -> None:
    shots.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(shots / f"ui-{name}.png"), full_page=False)


def points(page, chart: str) -> int:
    return int(page.get_attribute(f"#{chart} svg", "data-points") or 0)


def test_runs_run_compare(page, url, shots):
    page.goto(url)
    page.wait_for_selector('#runs tr[data-run="sentiment"]')
    rows = page.eval_on_selector_all("#runs tbody tr", "rows => rows.map(r => r.dataset.run)")
    assert sorted(rows) == ["failed", "group/slower", "sentiment"]
    assert "no 'label' field" in page.inner_text('#runs tr[data-run="failed"] .run-error')
    assert page.inner_text('#runs tr[data-run="failed"] .badge') == "failed"
    shot(page, shots, "runs")
    page.fill("#filter", "slower")
    page.wait_for_function("() => document.querySelectorAll('#runs tbody tr').length === 1")
    page.fill("#filter", "")
    page.wait_for_function("() => document.querySelectorAll('#runs tbody tr').length === 3")

    page.click('#runs tr[data-run="sentiment"] td:nth-child(2)')
    page.wait_for_selector("#per-class")
    assert page.inner_text("#per-class").count("fresh") == 1
    assert page.inner_text("#confusion").startswith("")  # rendered
    page.wait_for_function("() => Number(document.querySelector('#curve-train_loss svg').dataset.points) > 0")
    assert "task: classification" in page.inner_text("#config")
    page.wait_for_selector("iframe.report")
    shot(page, shots, "run")

    page.goto(f"{url}/#/runs")
    page.check('#runs tr[data-run="sentiment"] input[type=checkbox]')
    page.check('#runs tr[data-run="group/slower"] input[type=checkbox]')
    page.click("#compare-selected")
    page.wait_for_selector("#compare-config")
    assert "train.lr" in page.inner_text("#compare-config")
    assert "test.accuracy" in page.inner_text("#compare-metrics")
    assert points(page, "compare-train_loss") > 0
    shot(page, shots, "compare")
    assert page.errors == []


def test_playground(page, url, shots, root):
    import finegrain

    text = "great fun film and good cast"
    page.goto(f"{url}/#/playground/sentiment")
    page.fill("#playground-input", text)
    page.click("#predict")
    page.wait_for_selector("#predicted-label")
    assert page.inner_text("#predicted-label") == finegrain.load(root / "sentiment").predict([text])[0]["label"]
    assert page.locator("#probabilities tr").count() == 2
    shot(page, shots, "playground")
    assert page.errors == []


@pytest.fixture(scope="module")
def span_root(tiny_model_dir, tmp_path_factory):
    return span_runs(tiny_model_dir, tmp_path_factory)


def test_span_predictions_and_continual_tables(page, span_root, shots):
    """An NER, a QA and a relation run's test predictions with their errors marked, the playground's
    entities and answer in the text, and a continual sequence's tables."""
    with serving(span_root) as url:
        page.goto(f"{url}/#/run/ner")
        page.wait_for_selector("#prediction-list .prediction")
        rows = [json.loads(line) for line in (span_root / "ner" / rundir.TEST_PREDICTIONS).read_text().splitlines()]
        wrong = [r for r in rows if not r["correct"]]
        assert page.inner_text("#predictions-count").startswith(f"{len(wrong)} of {len(rows)} test examples wrong")
        cards = page.locator("#prediction-list .prediction")
        assert cards.count() == min(20, len(wrong)) and page.locator("#prediction-list .prediction.right").count() == 0
        first = wrong[0]
        card = cards.nth(0)
        assert card.locator(".gold-line mark").count() >= len(first["gold"])  # an entity cut by another spans two marks
        gold = {(e["type"], e["start"], e["end"]) for e in first["gold"]}
        predicted = {(e["type"], e["start"], e["end"]) for e in first["predicted"]}
        assert card.locator(".predicted-line mark.wrong").count() >= len(predicted - gold) > 0 or \
            card.locator(".gold-line mark.missed").count() >= len(gold - predicted) > 0
        page.uncheck("#errors-only")
        page.wait_for_function(f"() => document.querySelectorAll('#prediction-list .prediction').length === {min(20, len(rows))}")
        page.locator("#predictions").scroll_into_view_if_needed()
        shot(page, shots, "run-ner")

        page.goto(f"{url}/#/run/pos")  # plain tags: each word marked with its predicted tag, the wrong ones red
        rows = [json.loads(line) for line in (span_root / "pos" / rundir.TEST_PREDICTIONS).read_text().splitlines()]
        wrong = [r for r in rows if not r["correct"]]
        page.wait_for_function("() => document.querySelector('#predictions-count')?.textContent"
                               f".startsWith('{len(wrong)} of {len(rows)} test examples wrong')")
        first = wrong[0]
        card = page.locator("#prediction-list .prediction").nth(0)
        assert card.locator("mark.entity").count() == len(first["words"])
        assert card.locator("mark.wrong").count() == len(first["wrong_words"]) > 0
        assert card.locator("mark sup").all_inner_texts() == first["predicted"]

        page.goto(f"{url}/#/run/qa")
        page.wait_for_selector("#prediction-list .prediction.wrong .question")
        qa = [json.loads(line) for line in (span_root / "qa" / rundir.TEST_PREDICTIONS).read_text().splitlines()]
        first = next(r for r in qa if not r["correct"])
        card = page.locator("#prediction-list .prediction").nth(0)
        assert first["question"] in card.inner_text()
        marked_gold = card.locator(".context mark.gold").all_inner_texts()
        assert "".join(marked_gold).replace("\n", "") or not first["gold"]
        if first["predicted"]["start"] is not None:
            assert "".join(card.locator(".context mark.answer").all_inner_texts()) == first["predicted"]["answer"]
        page.locator("#predictions").scroll_into_view_if_needed()
        shot(page, shots, "run-qa")

        page.goto(f"{url}/#/run/relation")
        page.wait_for_selector("#prediction-list .prediction mark.head")
        assert page.locator("#prediction-list .prediction").nth(0).locator("mark.tail").count() >= 1

        page.goto(f"{url}/#/compare")
        page.click("#sequences a")
        page.wait_for_selector(".accuracy-matrix")
        continual = json.loads((span_root / "sequence" / rundir.METRICS).read_text())["continual"]
        assert page.locator(".accuracy-matrix tr").count() == 1 + len(continual["accuracy_matrix"])
        assert f"{continual['bwt']:.4f}" in page.inner_text(".continual-summary")
        shot(page, shots, "continual")
        # Two stages compared: the sequence they belong to shows its tables under theirs.
        page.goto(f"{url}/#/compare/sequence%2Fstage-0,sequence%2Fstage-1")
        page.wait_for_selector(".compare-continual .accuracy-matrix")
        assert f"{continual['bwt']:.4f}" in page.inner_text(".compare-continual .continual-summary")

        import finegrain

        sentence = "Anna Berg met Tom in Paris today"
        page.goto(f"{url}/#/playground/ner")
        page.fill("#playground-input", sentence)
        page.click("#predict")
        page.wait_for_selector("#entities")
        expected = finegrain.load(span_root / "ner").predict([sentence])[0]["entities"]
        assert page.locator("#entities mark.entity").count() == len(expected)
        shot(page, shots, "playground-ner")
        page.goto(f"{url}/#/playground/pos")
        page.wait_for_function("() => document.querySelector('#playground-run')?.value === 'pos'")  # not the last page's
        page.fill("#playground-input", "the old dog runs")
        page.click("#predict")
        page.wait_for_selector("#tags")
        tags = finegrain.load(span_root / "pos").predict(["the old dog runs"])[0]["tags"]
        assert page.locator("#tags mark sup").all_inner_texts() == tags
        item = next((r for r in qa if r["predicted"]["start"] is not None), qa[0])
        page.goto(f"{url}/#/playground/relation")
        page.wait_for_function("() => document.querySelector('#playground-input')?.value.includes('head')")
        page.click("#predict")
        page.wait_for_selector("#mentions")
        assert page.locator("#mentions mark.head").inner_text().startswith("Anna")
        assert page.locator("#mentions mark.tail").inner_text().startswith("Paris")
        page.goto(f"{url}/#/playground/qa")
        page.fill("#playground-question", item["question"])
        page.fill("#playground-input", item["context"])
        page.click("#predict")
        page.wait_for_selector("#answer")
        answer = finegrain.load(span_root / "qa").predict([{"question": item["question"], "context": item["context"]}])[0]
        if answer["start"] is None:
            assert page.inner_text("#answer") == "no answer in the context"
        else:
            assert page.inner_text("#answer mark.answer") == answer["answer"]
        page.goto("about:blank")
    assert page.errors == []


def test_launch_watch_and_cancel(page, url, shots, root, tiny_model_dir):
    page.goto(f"{url}/#/launch")
    page.fill("#launch-name", "live")
    page.fill("#launch-config", "task: classification\ntrain:\n  lrr: 1\n")
    page.click("#validate")
    page.wait_for_function("() => document.querySelector('#launch-message').textContent.includes('line 3')")
    assert "did you mean 'train.lr'" in page.inner_text("#launch-message")
    # The form's common keys write a config the editor checks as it changes.
    page.select_option("#form-method", "ia3")
    page.fill("#form-epochs", "2")
    page.click("#form-fill")
    assert page.input_value("#launch-config") == (
        "task: classification\ndata:\n  dataset: rotten_tomatoes\npeft:\n  method: ia3\ntrain:\n  epochs: 2\n")
    page.wait_for_function("() => document.querySelector('#launch-message').textContent === 'valid'")
    # Long enough to still be training when cancelled; a validation every few steps.
    page.fill("#launch-config", (
        f"task: classification\nmodel:\n  name: {tiny_model_dir}\ndata:\n  train: {root / 'sentiment.jsonl'}\n  max_length: 16\n"
        "lora:\n  r: 4\n  layers: [-1]\ntrain:\n  epochs: 5000\n  batch_size: 8\n  threads: 1\n  eval_every: 4\n  recipe: off\n"
    ))
    page.click("#launch")
    page.wait_for_selector('#jobs tr[data-state="running"]')

    page.goto(f"{url}/#/run/live")
    page.wait_for_function("() => Number(document.querySelector('#curve-train_loss svg')?.dataset.points) > 0", timeout=60_000)
    before = points(page, "curve-train_loss")
    page.wait_for_function(f"() => Number(document.querySelector('#curve-train_loss svg').dataset.points) > {before}")
    assert page.inner_text("#run-status") == "running"
    shot(page, shots, "run-live")

    page.goto(f"{url}/#/launch")
    page.wait_for_function("() => document.querySelector('#jobs tr[data-state=\"running\"]')?.textContent.includes('steps')")
    shot(page, shots, "launch")
    page.click("#jobs button.cancel")
    page.wait_for_selector('#jobs tr[data-state="cancelled"]')
    assert rundir.status(root / "live") == "interrupted"
    assert page.errors == []


def test_a_key_entered_in_the_page(page, root):
    from finegrain.serve.security import ApiKeys

    key = "browser-key-0123456789abcdef"
    with serving(root, keys=ApiKeys([key])) as url:
        page.goto(url)
        page.wait_for_selector("#keybar:not([hidden])")
        page.errors.clear()  # the refused first call (401) is what shows the key bar
        page.fill("#key", key)
        page.click("#keybar button")
        page.wait_for_selector('#runs tr[data-run="sentiment"]')
        assert page.is_hidden("#keybar")
        page.goto("about:blank")  # its polls stop before the server does
    assert page.errors == []


def test_the_command_serves_the_page(page, root):
    """`finegrain ui RUNS_DIR --port 0`, as a user starts it: the page it prints lists the runs."""
    command = [sys.executable, "-m", "finegrain.cli", "ui", str(root), "--port", "0"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = process.stdout.readline()
        url = re.search(r"http://127\.0\.0\.1:\d+", line)
        assert url, line + process.stdout.read()[-2000:]
        page.goto(url[0])
        page.wait_for_selector('#runs tr[data-run="sentiment"]')
        page.goto(url[0].replace("127.0.0.1", "localhost"))  # the names of the bound address answer too
        page.wait_for_selector('#runs tr[data-run="group/slower"]')
        page.goto("about:blank")
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(30)
    assert page.errors == []
