"""What the server's routers share: the registry, limits, queue and metrics (`Service`), and the
refusals they answer with (`ServeError`)."""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi.responses import JSONResponse

from finegrain.errors import FinegrainError
from finegrain.serve.batching import Batcher, QueueFull
from finegrain.serve.engine import Engine
from finegrain.serve.metrics import Metrics
from finegrain.serve.models import GENERATE_ENDPOINTS, ModelRegistry
from finegrain.serve.schemas import ErrorBody
from finegrain.serve.settings import ServeSettings


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


async def off_loop(function: Callable[..., Any], *args: Any) -> Any:
    """`function(*args)` on a worker thread: tokenizing takes milliseconds to seconds, during
    which the event loop must keep answering other requests (and /healthz)."""
    return await asyncio.get_running_loop().run_in_executor(None, function, *args)


@dataclass
class Service:
    """The models, limits, queue and metrics one server answers with; each router reads them here.

    Attributes:
        state: {"ready", "draining", "error"}: set by the app's start-up and shutdown.
    """

    registry: ModelRegistry
    settings: ServeSettings
    engine: Engine
    batcher: Batcher
    metrics: Metrics
    state: dict[str, Any]

    def serving(self, endpoint: str) -> list[str]:
        """The models that answer `endpoint`."""
        if endpoint in GENERATE_ENDPOINTS:
            runs = [n for n, r in self.registry.runs.items() if r.generative]
            return runs + [e["id"] for e in self.registry.describe() if e["task"] == "generation"]
        return [n for n, r in self.registry.runs.items() if r.endpoint == endpoint and r.part_of is None]

    def pick(self, model: str | None, endpoint: str) -> str:
        """The model a request names (or the only one answering `endpoint`), once the models are loaded."""
        if self.state["draining"]:
            raise ServeError(503, "the server is shutting down")
        if not self.state["ready"]:
            raise ServeError(503, "the models are still loading; poll /readyz", headers={"Retry-After": "1"})
        candidates = self.serving(endpoint)
        if model is None:
            if len(candidates) == 1:
                return candidates[0]
            raise limit_error("model", f"several models answer {endpoint} ({', '.join(candidates)}); name one")
        if model not in candidates:
            known = {e["id"]: e for e in self.registry.describe()}
            if model not in known:
                raise ServeError(404, f"model '{model}' is not served here; GET /v1/models lists the models", "model")
            raise limit_error("model", f"'{model}' is a {known[model]['task']} model; it answers on {known[model]['endpoint']}")
        return model

    def enqueue(self, key: Any, payload: Any, size: int) -> Any:
        """Queue a job for the batching thread; 429 when the queue is full."""
        try:
            return self.batcher.enqueue(key, payload, size)
        except QueueFull as exc:
            self.metrics.rejected.inc("queue_full")
            raise ServeError(429, str(exc), headers={"Retry-After": str(exc.retry_after)}) from None

    async def submit(self, key: Any, payload: Any, size: int, started: float) -> Any:
        """Queue a job and wait for its result until the request's `--timeout` (504 past it)."""
        job = self.enqueue(key, payload, size)
        try:
            return await self.batcher.wait(job, max(0.0, started + self.settings.timeout - time.monotonic()))
        except TimeoutError:
            self.metrics.rejected.inc("timeout")
            raise ServeError(504, f"no answer within {self.settings.timeout:g} s (--timeout); try fewer texts or tokens") from None
        except FinegrainError as exc:
            raise ServeError(422, str(exc)) from None

    def check_length(self, tokenizer: Any, param: str, text: str) -> None:
        """Refuse a text too long to fit --max-tokens-per-text, without tokenizing it: one token
        stands for at most `tokenizer.max_token_chars` characters. Tokenizing a 1 MiB text takes
        seconds, which no one should be able to make the server spend on a text it then refuses."""
        limit = self.settings.max_tokens_per_text
        if len(text) > limit * tokenizer.max_token_chars:
            raise limit_error(param, f"{len(text)} characters, more than {limit} tokens can hold: over the limit of "
                                     f"{limit} tokens per text (--max-tokens-per-text)")
