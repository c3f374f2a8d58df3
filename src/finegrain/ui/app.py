"""The dashboard's HTTP app: the page (static/), and the JSON API it reads.

Runs are named by their path under the runs directory (`?run=ID`) and resolved by
`finegrain.ui.runs`, which refuses anything outside it; the only files served are the page's own
and the run files `runs.FILES` lists. `KeyGate` asks for an API key (`finegrain serve`'s keys:
`FINEGRAIN_API_KEYS`, `--api-key-file`) on every `/api` path when the dashboard has keys, accepts
only the hosts it was bound to (a web page elsewhere cannot reach it by DNS rebinding) and only
JSON bodies on POST (a form on another site cannot post one without the browser asking first).
"""

from __future__ import annotations

import asyncio
import re
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from fastapi import FastAPI, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import BaseModel

from finegrain import rundir
from finegrain.errors import FinegrainError
from finegrain.peft import METHODS
from finegrain.serve.security import ApiKeys, send_error
from finegrain.tasks import TASKS
from finegrain.ui import runs
from finegrain.ui.launcher import Launcher
from finegrain.ui.playground import Playground, describe

STATIC = {"/": ("index.html", "text/html; charset=utf-8"), "/app.js": ("app.js", "text/javascript; charset=utf-8"),
          "/style.css": ("style.css", "text/css; charset=utf-8")}
# The page runs only its own script and style, and nothing it shows may run any (reports are sandboxed).
PAGE_POLICY = "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; frame-src 'self'; object-src 'none'; base-uri 'none'"
COOKIE = "finegrain_key"


class LaunchBody(BaseModel):
    name: str
    config: str


class PredictBody(BaseModel):
    run: str
    input: Any = None
    messages: list[dict[str, Any]] | None = None


def create_app(root: str | Path, keys: ApiKeys | None = None, hosts: list[str] | None = None,
               launcher: Launcher | None = None, playground: Playground | None = None) -> FastAPI:
    """The dashboard of the runs under `root`.

    Args:
        keys: API keys every `/api` request must present (bearer header or the page's cookie); none: open.
        hosts: the Host headers accepted (the bound address and its names); None: any (tests).
        launcher: the queue of launched runs (default: one on `root`).
        playground: what answers the playground (default: a new one).
    """
    root = Path(root).resolve()
    if not root.is_dir():
        raise FinegrainError(f"{root}: not a directory; give the directory holding your runs (e.g. runs)")
    launcher = launcher or Launcher(root)
    playground = playground or Playground()

    async def lifespan(app: FastAPI):
        yield
        await asyncio.get_running_loop().run_in_executor(None, launcher.close)

    app = FastAPI(title="finegrain ui", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.root, app.state.launcher, app.state.playground = root, launcher, playground

    @app.exception_handler(FinegrainError)
    async def _refused(request: Request, exc: FinegrainError):
        status = 404 if isinstance(exc, runs.NotFound) else 422
        return JSONResponse({"error": str(exc)}, status_code=status)

    for path, (name, media) in STATIC.items():
        app.add_api_route(path, _static(name, media), methods=["GET"], include_in_schema=False)

    @app.get("/api/runs")
    def list_runs() -> dict[str, Any]:
        return {"root": str(root), "runs": runs.list_runs(root), "sweeps": runs.list_sweeps(root),
                "sequences": runs.list_sequences(root)}

    @app.get("/api/run")
    def run(run: str = Query(...)) -> dict[str, Any]:
        run_dir = runs.resolve_run(root, run)
        config, _ = runs.read_config(run_dir)
        files = [name for name in runs.FILES if (run_dir / name).is_file()]
        return {
            "summary": runs.summary(root, run_dir), "config_text": (run_dir / rundir.CONFIG).read_text(encoding="utf-8"),
            "metrics": rundir.read_metrics(run_dir), "files": files,
            "playground": describe(config) if config is not None and rundir.has_adapter(run_dir) else None,
        }

    @app.get("/api/curve")
    def curve(run: str = Query(...), start: int = Query(0, ge=0)) -> dict[str, Any]:
        run_dir = runs.resolve_run(root, run)
        records = rundir.read_metrics_log(run_dir, start)
        return {"records": records, "next": start + len(records), "status": rundir.status(run_dir)}

    @app.get("/api/predictions")
    def predictions(run: str = Query(...), errors: bool = Query(True), offset: int = Query(0, ge=0),
                    limit: int = Query(20, ge=1, le=200)) -> dict[str, Any]:
        """A page of a span run's test predictions (gold and predicted spans), the wrong ones by default."""
        run_dir = runs.resolve_run(root, run)
        page = runs.read_predictions(run_dir, errors, offset, limit)
        if page is None:
            raise runs.NotFound(f"run '{run}': no {rundir.TEST_PREDICTIONS} (NER, relation and QA runs write it when they test)")
        config, _ = runs.read_config(run_dir)
        return {"task": config.task if config is not None else None, **page}

    @app.get("/api/file")
    def file(run: str = Query(...), name: str = Query(...)) -> Response:
        path = runs.resolve_file(runs.resolve_run(root, run), name)
        # A report is shown in a frame, sandboxed: it may not run scripts nor reach the page.
        headers = {"Content-Security-Policy": "sandbox; default-src 'none'; img-src data:; style-src 'unsafe-inline'",
                   "X-Content-Type-Options": "nosniff"}
        return FileResponse(path, media_type=runs.FILES[name], headers=headers)

    @app.get("/api/compare")
    def compare(run: list[str] = Query(...)) -> dict[str, Any]:
        if len(run) < 2:
            raise FinegrainError("compare: choose two or more runs")
        run_dirs = [runs.resolve_run(root, r) for r in run]
        configs = [runs.config_values(runs.read_config(d)[0]) for d in run_dirs]
        metrics = [runs.metric_values(rundir.read_metrics(d)) for d in run_dirs]
        return {
            "runs": [runs.summary(root, d) for d in run_dirs], "config": runs.differing(configs),
            "metrics": runs.table(metrics), "curves": [rundir.read_metrics_log(d) for d in run_dirs],
            # The sweeps and continual sequences holding every one of the runs: their tables show here too.
            "sweeps": runs.holding(root, runs.list_sweeps(root), run_dirs),
            "sequences": runs.holding(root, runs.list_sequences(root), run_dirs),
        }

    @app.get("/api/sweep")
    def sweep(sweep: str = Query(...)) -> dict[str, Any]:
        """A `finegrain sweep`'s table (markdown: mean ± std of every score) and whether it has a plot."""
        directory = runs.resolve_sweep(root, sweep)
        return {"table": (directory / rundir.SWEEP_TABLE).read_text(encoding="utf-8"),
                "plot": (directory / rundir.SWEEP_PLOT).is_file()}

    @app.get("/api/sweep-plot")
    def sweep_plot(sweep: str = Query(...)) -> Response:
        directory = runs.resolve_sweep(root, sweep)
        path = (directory / rundir.SWEEP_PLOT).resolve()
        if not path.is_relative_to(directory) or not path.is_file():  # a link out of the sweep is no plot of it
            raise runs.NotFound(f"sweep '{sweep}': no plot")
        return FileResponse(path, media_type="image/png", headers={"X-Content-Type-Options": "nosniff"})

    @app.get("/api/continual")
    def continual(sequence: str = Query(...)) -> dict[str, Any]:
        """A continual sequence's tables: the accuracy matrix (R[i][j]: stage j's test score after
        training stage i), average accuracy, backward transfer, forgetting, seconds per stage."""
        return runs.read_continual(runs.resolve_sequence(root, sequence))

    @app.post("/api/predict")
    def predict(body: PredictBody) -> dict[str, Any]:
        run_dir = runs.resolve_run(root, body.run)
        rundir.require_adapter(run_dir)
        return playground.answer(run_dir, body.model_dump(exclude_none=True))

    @app.get("/api/options")
    def options() -> dict[str, Any]:
        """What the Launch form offers: the task table's tasks and the PEFT methods."""
        return {"tasks": list(TASKS), "methods": list(METHODS)}

    @app.post("/api/validate")
    def validate(body: LaunchBody) -> dict[str, Any]:
        try:
            launcher.check(body.name, body.config)
        except FinegrainError as exc:
            return {"ok": False, **_located(exc, body.name)}
        return {"ok": True}

    @app.post("/api/launch")
    def launch(body: LaunchBody) -> JSONResponse:
        try:
            job = launcher.submit(body.name, body.config)
        except FinegrainError as exc:
            return JSONResponse({"ok": False, **_located(exc, body.name)}, status_code=422)
        return JSONResponse({"ok": True, "job": job.describe()})

    @app.get("/api/jobs")
    def jobs() -> dict[str, Any]:
        return {"jobs": launcher.describe()}

    @app.post("/api/jobs/{job_id}/cancel")
    def cancel(job_id: int) -> dict[str, Any]:
        return {"job": launcher.cancel(job_id).describe()}

    app.add_middleware(KeyGate, keys=keys or ApiKeys([]), hosts=hosts)
    return app


def _static(name: str, media: str):
    """A route answering with the packaged file `static/<name>` (read once, at start-up)."""
    body = resources.files("finegrain.ui").joinpath("static", name).read_bytes()
    headers = {"Content-Security-Policy": PAGE_POLICY, "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}

    def serve() -> Response:
        return Response(body, media_type=media, headers=headers)

    return serve


def _located(exc: FinegrainError, name: str) -> dict[str, Any]:
    """A config error for the editor: its message without the file's path, and its line if it names one."""
    message = str(exc)
    match = re.match(rf".*?{re.escape(name)}\.yaml(?::(\d+))?: (.*)", message, re.DOTALL)
    if match and match[1]:
        return {"error": f"line {match[1]}: {match[2]}", "line": int(match[1])}
    if match:
        return {"error": match[2], "line": None}
    return {"error": re.sub(r"\S*/\.launch/", "", message), "line": None}


class KeyGate:
    """ASGI middleware: the Host check, API keys on `/api`, and JSON-only POST bodies."""

    def __init__(self, app, keys: ApiKeys, hosts: list[str] | None):
        self.app, self.keys, self.hosts = app, keys, hosts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.hosts is not None and headers.get(b"host", b"").decode("latin-1") not in self.hosts:
            return await send_error(send, 421, "this dashboard answers only to the address it listens on", "invalid_request_error")
        if scope["path"].startswith("/api/"):
            if len(self.keys) and self.keys.identify(_presented_key(headers)) is None:
                return await send_error(send, 401, "missing or unknown API key; enter it in the page (or send 'Authorization: Bearer <key>')",
                                        "authentication_error")
            content_type = headers.get(b"content-type", b"").split(b";")[0].strip()
            if scope["method"] == "POST" and content_type != b"application/json":
                return await send_error(send, 415, "send a JSON body with 'Content-Type: application/json'", "invalid_request_error")
        return await self.app(scope, receive, send)


def _presented_key(headers: dict[bytes, bytes]) -> str:
    """The bearer token, else the key the page keeps in its cookie."""
    scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    for part in headers.get(b"cookie", b"").decode("latin-1").split(";"):
        name, _, value = part.strip().partition("=")
        if name == COOKIE:
            return unquote(value)
    return ""
