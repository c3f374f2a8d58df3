"""The HTTP app: its routers, errors, request logs and metrics, built around a `ModelRegistry`.

Request path: `Observe` (request id, JSON log line, metrics, last-resort 500) -> `Gate` (draining,
API key, rate limit, body limit) -> FastAPI (strict schema) -> a route of one of the routers
(`finegrain.serve.routers`: the task endpoints, one per task of the task table; generation; the
server's own), which checks the command-line limits, tokenizes off the event loop, and queues a
job for the batching thread (429 when the queue is full, 504 past the timeout).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from finegrain.errors import FinegrainError
from finegrain.serve.batching import Batcher
from finegrain.serve.engine import Engine
from finegrain.serve.logs import log, mask_pii
from finegrain.serve.metrics import Metrics
from finegrain.serve.models import GENERATE_ENDPOINTS, ModelRegistry
from finegrain.serve.routers.about import about_router
from finegrain.serve.routers.generation import generation_router
from finegrain.serve.routers.tasks import task_router
from finegrain.serve.security import ApiKeys, Gate, RateLimiter, error_body
from finegrain.serve.service import ServeError, Service
from finegrain.serve.settings import ServeSettings
from finegrain.tasks import TASKS

__all__ = ["ServeSettings", "create_app"]

# The paths metrics and logs name; any other is counted as "other" (no unbounded label values).
PATHS = (*(task.endpoint.path for task in TASKS.values() if task.endpoint is not None), *GENERATE_ENDPOINTS,
         "/v1/models", "/healthz", "/readyz", "/metrics", "/openapi.json", "/docs")


def create_app(
    registry: ModelRegistry, settings: ServeSettings | None = None, keys: ApiKeys | None = None,
    engine: Callable[[ModelRegistry, Metrics], Engine] = Engine, on_fatal: Callable[[], None] | None = None,
) -> FastAPI:
    """The ASGI app serving `registry`. Its models load in the background at start-up (`/readyz`);
    a registry loaded already (a worker of `serve --workers`) is ready before the first connection.

    Args:
        registry: the runs and base models (constructed, not necessarily loaded).
        settings: limits and batching.
        keys: API keys required on `/v1` routes; empty or None: no key needed.
        engine: makes what runs batches from the registry and metrics (tests pass a slowed-down one).
        on_fatal: called when the models cannot be loaded (the CLI stops the server).
    """
    settings = settings or ServeSettings()
    keys = keys or ApiKeys([])
    metrics = Metrics()
    runner = engine(registry, metrics)
    batcher = Batcher(
        runner.run, max_batch=settings.max_batch, max_wait=settings.batch_wait_ms / 1000,
        max_queue=settings.max_queue, metrics=metrics,
    )
    state = {"ready": False, "draining": False, "error": None}
    service = Service(registry, settings, runner, batcher, metrics, state)

    def load() -> None:
        started = time.perf_counter()
        try:
            registry.load()
        except Exception as exc:
            state["error"] = str(exc)
            log("load_failed", logging.ERROR, error=str(exc), exc_info=not isinstance(exc, FinegrainError))
            if on_fatal is not None:
                on_fatal()
            return
        batcher.start()
        state["ready"] = True
        log("ready", seconds=round(time.perf_counter() - started, 2), models=registry.describe())

    async def lifespan(app: FastAPI):
        if registry.bases:  # a worker of `serve --workers` loaded before serving: ready before it accepts
            load()
        else:
            threading.Thread(target=load, name="finegrain-load", daemon=True).start()
        yield
        state["draining"] = True
        await asyncio.get_running_loop().run_in_executor(None, batcher.stop)

    # No ReDoc, no OAuth2 redirect page; Swagger UI at /docs only with --docs, and only to key
    # holders (`Gate`): its page loads JavaScript from a CDN, blank offline and a third party's code.
    app = FastAPI(
        title="finegrain", version=_version(), lifespan=lifespan,
        docs_url="/docs" if settings.docs else None, redoc_url=None, swagger_ui_oauth2_redirect_url=None,
        description="Fine-tuned LLaMA-family models: classification, regression, NER, relations, QA and generation. "
                    "`/v1` routes need `Authorization: Bearer <key>` when the server has keys.",
    )
    app.state.registry, app.state.batcher, app.state.metrics, app.state.serve = registry, batcher, metrics, state
    app.state.settings = settings
    _handle_errors(app)
    for router in (task_router(service), generation_router(service), about_router(service)):
        app.include_router(router)
    _document_security(app, bool(len(keys)))
    limiter = RateLimiter(settings.rate_limit) if settings.rate_limit else None
    app.add_middleware(Gate, keys=keys, max_body_bytes=settings.max_body_bytes, limiter=limiter, draining=lambda: state["draining"],
                       read_timeout=settings.read_timeout)
    app.add_middleware(Observe, metrics=metrics, log_bodies=settings.log_bodies)  # added last: runs first
    return app


def _handle_errors(app: FastAPI) -> None:
    """Every refusal as the one JSON error body: `ServeError`s, invalid bodies (422, naming the
    field) and Starlette's own HTTP errors (404, 405)."""

    @app.exception_handler(ServeError)
    async def _serve_error(request: Request, exc: ServeError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        details = [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")} for e in exc.errors()
        ]
        first = details[0] if details else {"loc": [], "msg": "invalid request"}
        field = ".".join(str(p) for p in first["loc"] if p != "body") or "body"
        if first.get("type") == "json_invalid":  # its loc holds a character offset, not a field
            reason = (exc.errors()[0].get("ctx") or {}).get("error", "")
            where = f"at character {first['loc'][-1]}" if len(first["loc"]) > 1 else ""
            field, first = "body", {**first, "msg": f"not valid JSON ({', '.join(filter(None, (reason, where)))}); send a JSON object"}
        first = {**first, "msg": first["msg"].removeprefix("Value error, ")}
        content_type = request.headers.get("content-type", "")
        if field == "body" and "json" not in content_type:
            first = {**first, "msg": f"send a JSON object with 'Content-Type: application/json' (got '{content_type}')"}
        body = {"error": {"message": f"{field}: {first['msg']}", "type": "invalid_request_error", "param": field, "code": 422}, "detail": details}
        return JSONResponse(body, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        return ServeError(exc.status_code, str(exc.detail), headers=dict(exc.headers or {})).response()


class Observe:
    """Outermost ASGI middleware: request id, one JSON log line per request, metrics, and a JSON 500
    for anything that escaped (a malformed request never takes down more than itself)."""

    def __init__(self, app, metrics: Metrics, log_bodies: bool):
        self.app, self.metrics, self.log_bodies = app, metrics, log_bodies

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        request_id = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")[:64] or uuid.uuid4().hex[:16]
        status = 500
        response_started = False

        async def observed_send(message):
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status, response_started = message["status"], True
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode("latin-1", "replace"))]
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, observed_send)
        except Exception:
            log("unhandled_error", logging.ERROR, exc_info=True, request_id=request_id, path=scope["path"])
            if not response_started:
                body = error_body(500, f"internal error (request id {request_id})", "server_error")
                await observed_send({"type": "http.response.start", "status": 500,
                                     "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
        finally:
            self.metrics.in_flight.inc(amount=-1)
            endpoint = scope["path"] if scope["path"] in PATHS else "other"
            seconds = time.perf_counter() - started
            self.metrics.requests.inc(endpoint, str(status))
            self.metrics.latency.observe(seconds, endpoint)
            extra = scope.get("state") or {}
            fields = {"request_id": request_id, "method": scope["method"], "path": endpoint, "status": status,
                      "ms": round(seconds * 1000, 2), "key": extra.get("key_id")}
            if self.log_bodies and extra.get("body"):
                fields["body"] = mask_pii(extra["body"][:4096].decode("utf-8", "replace"))
            log("request", **fields)


def _document_security(app: FastAPI, required: bool) -> None:
    """Add the bearer scheme to the OpenAPI document, on every /v1 operation."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = build()
        if required:
            schema.setdefault("components", {}).setdefault("securitySchemes", {})["bearer"] = {"type": "http", "scheme": "bearer"}
            for path, operations in schema.get("paths", {}).items():
                if path.startswith("/v1"):
                    for operation in operations.values():
                        operation["security"] = [{"bearer": []}]
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _version() -> str:
    from finegrain import __version__

    return __version__
