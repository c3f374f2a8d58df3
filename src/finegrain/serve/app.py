"""The HTTP app: endpoints, errors, request logs and metrics, built around a `ModelRegistry`.

Request path: `Observe` (request id, JSON log line, metrics, last-resort 500) -> `Gate` (draining,
API key, rate limit, body limit) -> FastAPI (strict schema) -> the endpoint, which checks the
command-line limits, tokenizes, and queues a job for the batching thread (429 when the queue is
full, 504 past the timeout).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from finegrain.errors import FinegrainError
from finegrain.serve.batching import Batcher, QueueFull
from finegrain.serve.settings import ServeSettings
from finegrain.serve.engine import Engine, GenerationWork
from finegrain.serve.logs import log, mask_pii
from finegrain.serve.metrics import Metrics
from finegrain.serve.models import GENERATE_ENDPOINTS, TASK_ENDPOINTS, ModelRegistry
from finegrain.serve.schemas import (
    ChatResponse, ClassifyResponse, ErrorBody, GenerateResponse, ModelList, NerResponse, QAResponse, RegressResponse,
    RelationResponse, generation_requests, task_requests,
)
from finegrain.serve.security import ApiKeys, Gate, RateLimiter, error_body

PATHS = (*TASK_ENDPOINTS.values(), *GENERATE_ENDPOINTS, "/v1/models", "/healthz", "/readyz", "/metrics",
         "/openapi.json", "/docs")


class ServeError(Exception):
    """A refusal with its status, message and the request field it is about."""

    KINDS = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error", 500: "server_error",
             503: "unavailable", 504: "timeout"}

    def __init__(self, status: int, message: str, param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers or {}

    def response(self) -> JSONResponse:
        kind = self.KINDS.get(self.status, "invalid_request_error")
        return JSONResponse(
            {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.status}},
            status_code=self.status, headers=self.headers,
        )


def limit_error(param: str, message: str) -> ServeError:
    return ServeError(422, f"{param}: {message}", param)


def input_error(exc: FinegrainError, field: str) -> ServeError:
    """A task's error about its N-th input ("input:N: ...", as `examples_from_inputs` and `encode`
    name them) as a 422 about the request field that holds it ("texts.<N-1>: ...")."""
    match = re.match(r"input:(\d+): (.*)", str(exc), re.DOTALL)
    if match is None:
        return limit_error(field, str(exc))
    return limit_error(f"{field}.{int(match[1]) - 1}", match[2])


ERRORS = {
    status: {"model": ErrorBody, "description": text}
    for status, text in {
        401: "No or an unknown API key", 404: "Unknown model", 413: "Body over --max-body-bytes",
        408: "Head or body not sent within --read-timeout", 422: "Invalid request: the message names the field",
        429: "Queue full or rate limit; see Retry-After", 500: "The model gave a NaN or infinite score (a damaged run)",
        503: "Loading or shutting down", 504: "Not answered within --timeout",
    }.items()
}


def create_app(
    registry: ModelRegistry, settings: ServeSettings | None = None, keys: ApiKeys | None = None,
    engine: Callable[[ModelRegistry, Metrics], Engine] = Engine, on_fatal: Callable[[], None] | None = None,
) -> FastAPI:
    """The ASGI app serving `registry`. Its models load in the background at start-up (`/readyz`).

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
    engine = engine(registry, metrics)
    batcher = Batcher(
        engine.run, max_batch=settings.max_batch, max_wait=settings.batch_wait_ms / 1000,
        max_queue=settings.max_queue, metrics=metrics,
    )
    state = {"ready": False, "draining": False, "error": None}

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

    # -- errors ----------------------------------------------------------------------------

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

    # -- helpers ---------------------------------------------------------------------------

    def serving(endpoint: str) -> list[str]:
        if endpoint in GENERATE_ENDPOINTS:
            runs = [n for n, r in registry.runs.items() if r.generative]
            return runs + [e["id"] for e in registry.describe() if e["task"] == "generation"]
        return [n for n, r in registry.runs.items() if r.endpoint == endpoint]

    def pick(model: str | None, endpoint: str) -> str:
        if state["draining"]:
            raise ServeError(503, "the server is shutting down")
        if not state["ready"]:
            raise ServeError(503, "the models are still loading; poll /readyz", headers={"Retry-After": "1"})
        candidates = serving(endpoint)
        if model is None:
            if len(candidates) == 1:
                return candidates[0]
            raise limit_error("model", f"several models answer {endpoint} ({', '.join(candidates)}); name one")
        if model not in candidates:
            known = {e["id"]: e for e in registry.describe()}
            if model not in known:
                raise ServeError(404, f"model '{model}' is not served here; GET /v1/models lists the models", "model")
            raise limit_error("model", f"'{model}' is a {known[model]['task']} model; it answers on {known[model]['endpoint']}")
        return model

    async def submit(key, payload, size: int, started: float):
        try:
            job = batcher.enqueue(key, payload, size)
        except QueueFull as exc:
            metrics.rejected.inc("queue_full")
            raise ServeError(429, str(exc), headers={"Retry-After": str(exc.retry_after)}) from None
        try:
            return await batcher.wait(job, max(0.0, started + settings.timeout - time.monotonic()))
        except TimeoutError:
            metrics.rejected.inc("timeout")
            raise ServeError(504, f"no answer within {settings.timeout:g} s (--timeout); try fewer texts or tokens") from None
        except FinegrainError as exc:
            raise ServeError(422, str(exc)) from None

    def check_length(tokenizer, param: str, text: str) -> None:
        """Refuse a text too long to fit --max-tokens-per-text, without tokenizing it: one token
        stands for at most `tokenizer.max_token_chars` characters. Tokenizing a 1 MiB text takes
        seconds, which no one should be able to make the server spend on a text it then refuses."""
        limit = settings.max_tokens_per_text
        if len(text) > limit * tokenizer.max_token_chars:
            raise limit_error(param, f"{len(text)} characters, more than {limit} tokens can hold: over the limit of "
                                     f"{limit} tokens per text (--max-tokens-per-text)")

    def count_tokens(tokenizer, fields: list[tuple[str, str]]) -> None:
        """Refuse any (param, text) pair over --max-tokens-per-text. Runs off the event loop."""
        encoded = tokenizer.encode_batch([text for _, text in fields], add_special_tokens=False)
        for (param, _), ids in zip(fields, encoded):
            if len(ids) > settings.max_tokens_per_text:
                raise limit_error(param, f"{len(ids)} tokens, over the limit of {settings.max_tokens_per_text} tokens per text (--max-tokens-per-text)")

    async def off_loop(function: Callable[..., Any], *args: Any) -> Any:
        """`function(*args)` on a worker thread: tokenizing takes milliseconds to seconds, during
        which the event loop must keep answering other requests (and /healthz)."""
        return await asyncio.get_running_loop().run_in_executor(None, function, *args)

    async def answer(endpoint: str, model: str | None, field: str, inputs: list, texts: list[tuple[str, str]]):
        """The run answering `endpoint` and its predictions, one per input.

        Args:
            field: the request field that holds the inputs ("texts", "items").
            inputs: what the task's `examples_from_inputs` takes (texts, or dicts of the items).
            texts: every string of the inputs with its param ("items.0.context"), for the token limit.
        """
        started = time.monotonic()
        name = pick(model, endpoint)
        if len(inputs) > settings.max_texts:
            raise limit_error(field, f"{len(inputs)} {field}, over the limit of {settings.max_texts} per request (--max-texts)")
        run = registry.runs[name]
        for param, text in texts:
            check_length(run.tokenizer, param, text)
        items = await off_loop(encode_inputs, run, field, inputs, texts)
        predictions = await submit(("task", name), items, len(items), started)
        if not all_finite(predictions):
            log("non_finite_output", logging.ERROR, model=name)
            raise ServeError(500, f"model '{name}' gave a NaN or infinite score: its adapter or base model is damaged; "
                                  "check the run (finegrain evaluate) and train it again")
        return name, predictions

    def encode_inputs(run, field: str, inputs: list, texts: list[tuple[str, str]]) -> list:
        """The task's encoded items for `inputs`, after the token limit. Runs off the event loop."""
        count_tokens(run.tokenizer, texts)
        try:
            examples = run.task.examples_from_inputs(inputs, run.config.data)
            items = run.task.encode(run.tokenizer, examples, run.config.data.max_length)
        except FinegrainError as exc:
            raise input_error(exc, field) from None
        if any(not item.input_ids for item in items):
            raise limit_error(field, "an input encodes to no tokens; send some text")
        return items

    # -- task endpoints --------------------------------------------------------------------

    # The request bodies carry the command line's limits in their schema, so they are made here;
    # FastAPI reads a body's type from the annotation, set on each endpoint before it is registered.
    def body_type(model: type) -> Callable:
        def annotate(endpoint: Callable) -> Callable:
            endpoint.__annotations__["body"] = model
            return endpoint
        return annotate

    TextsBody, RelationBody, QABody = task_requests(settings.max_texts)
    endpoints = registry.endpoints()

    def numbered(field: str, values: list[str]) -> list[tuple[str, str]]:
        return [(f"{field}.{i}", value) for i, value in enumerate(values)]

    if "/v1/classify" in endpoints:

        @app.post("/v1/classify", response_model=ClassifyResponse, responses=ERRORS, tags=["tasks"])
        @body_type(TextsBody)
        async def classify(body) -> ClassifyResponse:
            """Label each text with a classification run: the label (labels, multi-label) and every label's probability."""
            name, predictions = await answer("/v1/classify", body.model, "texts", body.texts, numbered("texts", body.texts))
            return ClassifyResponse(model=name, predictions=predictions)

    if "/v1/regress" in endpoints:

        @app.post("/v1/regress", response_model=RegressResponse, responses=ERRORS, tags=["tasks"])
        @body_type(TextsBody)
        async def regress(body) -> RegressResponse:
            """Score each text with a regression run: the predicted `value`."""
            name, predictions = await answer("/v1/regress", body.model, "texts", body.texts, numbered("texts", body.texts))
            return RegressResponse(model=name, predictions=predictions)

    if "/v1/ner" in endpoints:

        @app.post("/v1/ner", response_model=NerResponse, responses=ERRORS, tags=["tasks"])
        @body_type(TextsBody)
        async def ner(body) -> NerResponse:
            """Tag each text's words with an NER run: words, tags and the entities with character offsets."""
            name, predictions = await answer("/v1/ner", body.model, "texts", body.texts, numbered("texts", body.texts))
            return NerResponse(model=name, predictions=predictions)

    if "/v1/relation" in endpoints:

        @app.post("/v1/relation", response_model=RelationResponse, responses=ERRORS, tags=["tasks"])
        @body_type(RelationBody)
        async def relation(body) -> RelationResponse:
            """Classify the relation between the head and tail spans of each text with a relation run."""
            texts = [(f"items.{i}.text", item.text) for i, item in enumerate(body.items)]
            name, predictions = await answer("/v1/relation", body.model, "items", [item.model_dump() for item in body.items], texts)
            return RelationResponse(model=name, predictions=predictions)

    if "/v1/qa" in endpoints:

        @app.post("/v1/qa", response_model=QAResponse, responses=ERRORS, tags=["tasks"])
        @body_type(QABody)
        async def qa(body) -> QAResponse:
            """Answer each question with a span of its context, with an extractive QA run."""
            texts = [(f"items.{i}.{key}", getattr(item, key)) for i, item in enumerate(body.items) for key in ("question", "context")]
            name, predictions = await answer("/v1/qa", body.model, "items", [item.model_dump() for item in body.items], texts)
            return QAResponse(model=name, predictions=predictions)

    # -- generation ------------------------------------------------------------------------

    def generation_work(model: str, prompt: str, max_new_tokens: int, options: dict[str, Any], prompt_param: str) -> tuple[GenerationWork, int]:
        if max_new_tokens > settings.max_new_tokens:
            raise limit_error(prompt_param.replace("prompt", "max_new_tokens").replace("messages", "max_tokens"),
                              f"{max_new_tokens} is over the limit of {settings.max_new_tokens} (--max-new-tokens)")
        _, tokenizer, _ = engine.model_of(model)
        prompt_tokens = len(tokenizer.encode(prompt))  # a ChatPrompt's own ids: see `chat`
        if prompt_tokens > settings.max_tokens_per_text:
            raise limit_error(prompt_param, f"{prompt_tokens} tokens, over the limit of {settings.max_tokens_per_text} (--max-tokens-per-text)")
        context = engine.model_of(model)[0].llama.config.max_position_embeddings
        if prompt_tokens + max_new_tokens > context:
            raise limit_error(prompt_param, f"{prompt_tokens} prompt tokens + {max_new_tokens} new tokens exceed the model's context of {context}")
        return GenerationWork(prompt, model, max_new_tokens, options), prompt_tokens

    def generation_key(work: GenerationWork, stream: bool):
        # Greedy requests with equal options share a batch; sampled ones and streams run alone.
        if stream or work.options.get("temperature", 0) > 0:
            return ("generate", work.model, uuid.uuid4().hex)
        return ("generate", work.model, work.max_new_tokens, tuple(sorted((k, str(v)) for k, v in work.options.items())))

    def finish(tokenizer, text: str, max_new_tokens: int) -> tuple[int, str]:
        completion = len(tokenizer.encode(text, add_special_tokens=False))
        return completion, "length" if completion >= max_new_tokens else "stop"

    GenerateBody, ChatBody = generation_requests(settings.max_new_tokens)

    @app.post("/v1/generate", response_model=GenerateResponse, responses=ERRORS, tags=["generation"])
    @body_type(GenerateBody)
    async def generate_text(body) -> GenerateResponse:
        """Continue a prompt with a base model (or a generative run)."""
        started = time.monotonic()
        name = pick(body.model, "/v1/generate")
        options = {"temperature": body.temperature, "top_k": body.top_k, "top_p": body.top_p,
                   "repetition_penalty": body.repetition_penalty, "stop": tuple(body.stop), "seed": body.seed}
        check_length(engine.model_of(name)[1], "prompt", body.prompt)
        work, prompt_tokens = await off_loop(generation_work, name, body.prompt, body.max_new_tokens, options, "prompt")
        text = await submit(generation_key(work, False), work, 1, started)
        completion, reason = finish(engine.model_of(name)[1], text, body.max_new_tokens)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}
        return GenerateResponse(model=name, text=text, finish_reason=reason, usage=usage)

    @app.post(
        "/v1/chat/completions", response_model=ChatResponse, responses={**ERRORS, 200: {"content": {"text/event-stream": {}}}},
        tags=["generation"],
    )
    @body_type(ChatBody)
    async def chat(body, request: Request):
        """OpenAI-compatible chat completion; `stream: true` answers with server-sent events."""
        started = time.monotonic()
        name = pick(body.model, "/v1/chat/completions")
        tokenizer = engine.model_of(name)[1]
        messages = [m.model_dump() for m in body.messages]
        check_length(tokenizer, "messages", "".join(m["content"] for m in messages))
        max_tokens = body.max_completion_tokens or body.max_tokens or min(settings.max_new_tokens, 256)
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        options = {"temperature": body.temperature, "top_p": body.top_p, "stop": stop, "seed": body.seed}

        def prepare() -> tuple[GenerationWork, int]:
            # The messages' text stays text: a message spelling "<|im_end|>" forges no turn (ChatPrompt).
            try:
                prompt = tokenizer.chat_prompt(messages)
            except FinegrainError as exc:
                raise limit_error("messages", str(exc)) from None
            return generation_work(name, prompt, max_tokens, options, "messages")

        work, prompt_tokens = await off_loop(prepare)
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if not body.stream:
            text = await submit(generation_key(work, False), work, 1, started)
            completion, reason = finish(tokenizer, text, max_tokens)
            return ChatResponse(
                id=completion_id, created=created, model=name,
                choices=[{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason}],
                usage={"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion},
            )

        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue[str] = asyncio.Queue()
        work.on_piece = lambda piece: loop.call_soon_threadsafe(pieces.put_nowait, piece)
        try:
            job = batcher.enqueue(generation_key(work, True), work, 1)
        except QueueFull as exc:
            metrics.rejected.inc("queue_full")
            raise ServeError(429, str(exc), headers={"Retry-After": str(exc.retry_after)}) from None
        job.future.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved here, reported below

        def chunk(delta: dict, reason: str | None = None, usage: dict | None = None) -> str:
            data = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": name,
                    "choices": [] if usage else [{"index": 0, "delta": delta, "finish_reason": reason}]}
            if usage:
                data["usage"] = usage
            return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

        async def events():
            deadline = started + settings.timeout
            try:
                yield chunk({"role": "assistant", "content": ""})
                while True:
                    getter = asyncio.ensure_future(pieces.get())
                    done, _ = await asyncio.wait({getter, job.future}, timeout=max(0.0, deadline - time.monotonic()),
                                                 return_when=asyncio.FIRST_COMPLETED)
                    if getter in done:
                        yield chunk({"content": getter.result()})
                        continue
                    getter.cancel()
                    if not done:
                        metrics.rejected.inc("timeout")
                        yield f"data: {error_body(504, f'no answer within {settings.timeout:g} s (--timeout)', 'timeout').decode()}\n\n"
                        return
                    while not pieces.empty():
                        yield chunk({"content": pieces.get_nowait()})
                    if job.future.exception() is not None:
                        log("stream_failed", logging.ERROR, exc_info=job.future.exception())
                        yield f"data: {error_body(500, 'generation failed', 'server_error').decode()}\n\n"
                        return
                    completion, reason = finish(tokenizer, job.future.result(), max_tokens)
                    yield chunk({}, reason)
                    if body.stream_options and body.stream_options.include_usage:
                        yield chunk({}, usage={"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                                               "total_tokens": prompt_tokens + completion})
                    yield "data: [DONE]\n\n"
                    return
            finally:
                job.cancelled = True  # a client that went away stops the generation at its next token

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    # -- about the server ------------------------------------------------------------------

    @app.get("/v1/models", response_model=ModelList, response_model_exclude_none=True, responses=ERRORS, tags=["about"])
    async def models() -> ModelList:
        """The runs and base models served, with the endpoint each answers on."""
        return ModelList(data=registry.describe())

    @app.get("/healthz", tags=["about"])
    async def healthz() -> dict[str, str]:
        """200 while the process runs (no key needed)."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["about"], responses={503: {"description": "Loading, failed or shutting down"}})
    async def readyz() -> Response:
        """200 once the models are loaded and until shutdown begins; 503 otherwise."""
        if state["ready"] and not state["draining"]:
            return JSONResponse({"status": "ready", "queue": batcher.depth})
        status = "draining" if state["draining"] else "failed" if state["error"] else "loading"
        return JSONResponse({"status": status, "error": state["error"]}, status_code=503)

    @app.get("/metrics", tags=["about"], response_class=PlainTextResponse)
    async def prometheus() -> PlainTextResponse:
        """Prometheus text format: requests, latency, batch sizes, queue depth, tokens generated."""
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    _document_security(app, bool(len(keys)))
    limiter = RateLimiter(settings.rate_limit) if settings.rate_limit else None
    app.add_middleware(Gate, keys=keys, max_body_bytes=settings.max_body_bytes, limiter=limiter, draining=lambda: state["draining"],
                       read_timeout=settings.read_timeout)
    app.add_middleware(Observe, metrics=metrics, log_bodies=settings.log_bodies)  # added last: runs first
    return app


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


def all_finite(value: Any) -> bool:
    """No NaN or infinity anywhere in `value` (predictions: dicts, lists, numbers): JSON holds neither,
    and a damaged adapter gives them. Checked before answering, rather than sent as null."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(all_finite(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(all_finite(v) for v in value)
    return True


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
