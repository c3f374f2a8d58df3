"""Keeping strangers out: API keys, per-key rate limits, body limits, and where the server may listen.

Keys come from `FINEGRAIN_API_KEYS` (comma-separated) and/or a key file (one per line, `#`
comments). Only their SHA-256 digests are kept; a presented key is hashed and compared with
every digest by `hmac.compare_digest`, without stopping at the first match, so the time taken
says nothing about which key (or how much of one) matched.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import math
import os
import threading
import time
from pathlib import Path

from finegrain.errors import FinegrainError

KEYS_ENV = "FINEGRAIN_API_KEYS"


class ApiKeys:
    """A set of API keys held as digests. `identify(key)` gives a key's public id, or None."""

    def __init__(self, keys: list[str]):
        self._digests = [hashlib.sha256(k.encode("utf-8")).digest() for k in keys]

    def __len__(self) -> int:
        return len(self._digests)

    def identify(self, presented: str) -> str | None:
        """A short id for the key (the first 8 hex digits of its digest's digest), or None if unknown."""
        digest = hashlib.sha256(presented.encode("utf-8", "surrogatepass")).digest()
        found = None
        for known in self._digests:
            if hmac.compare_digest(known, digest):
                found = known
        return hashlib.sha256(found).hexdigest()[:8] if found is not None else None


def load_keys(key_file: str | os.PathLike | None, environ: dict[str, str] | None = None) -> ApiKeys:
    """Keys from `FINEGRAIN_API_KEYS` and `key_file`; FinegrainError for an unreadable file or a bad key."""
    environ = os.environ if environ is None else environ
    keys = [(KEYS_ENV, k.strip()) for k in environ.get(KEYS_ENV, "").split(",") if k.strip()]
    if key_file is not None:
        path = Path(key_file)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise FinegrainError(f"{path}: cannot read the API key file ({exc})") from None
        keys += [(f"{path}:{n}", line.strip()) for n, line in enumerate(lines, 1) if line.strip() and not line.lstrip().startswith("#")]
        if not any(where.startswith(str(path)) for where, _ in keys):
            raise FinegrainError(f"{path}: holds no API key; write one key per line")
    for where, key in keys:
        if len(key) < 16 or any(c.isspace() or not c.isprintable() for c in key):
            raise FinegrainError(f"{where}: an API key needs at least 16 printable characters and no spaces")
    return ApiKeys([k for _, k in keys])


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, keys: ApiKeys, insecure: bool) -> None:
    """Refuse a non-loopback address without API keys, unless `insecure`."""
    if not is_loopback(host) and not len(keys) and not insecure:
        raise FinegrainError(
            f"--host {host}: listening beyond this machine without API keys lets anyone use the model; "
            f"set {KEYS_ENV} or --api-key-file (or pass --insecure if a proxy in front checks callers)"
        )


class RateLimiter:
    """A token bucket per caller: `rate` requests a second, bursts of `burst`."""

    def __init__(self, rate: float, burst: int | None = None):
        self.rate = rate
        self.burst = float(burst or max(1, math.ceil(rate)))
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def acquire(self, caller: str) -> float:
        """0 when the request may go on, else the seconds until it may."""
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(caller, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            if tokens >= 1:
                self._buckets[caller] = (tokens - 1, now)
                return 0.0
            self._buckets[caller] = (tokens, now)
            return (1 - tokens) / self.rate


def error_body(status: int, message: str, kind: str, param: str | None = None) -> bytes:
    """The JSON error every refusal uses; its shape is OpenAI's, so their clients show the message."""
    return json.dumps({"error": {"message": message, "type": kind, "param": param, "code": status}}).encode()


async def send_error(send, status: int, message: str, kind: str, headers: list[tuple[bytes, bytes]] = ()) -> None:
    body = error_body(status, message, kind)
    await send({
        "type": "http.response.start", "status": status,
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers],
    })
    await send({"type": "http.response.body", "body": body})


class Gate:
    """ASGI middleware in front of the app: draining, API keys, rate limit, body size.

    Keys are checked before the body is read, so a caller without a key cannot make the server
    buffer anything; the body is then read whole (it is small: at most `max_body_bytes`) and
    replayed to the app, which is what makes the 413 exact for chunked uploads too.

    Args:
        app: the ASGI app behind.
        keys: required on every `/v1` path when not empty.
        max_body_bytes: larger bodies get 413.
        limiter: per-key (or, without keys, per-client) rate limit, or None.
        draining: called per request; True once shutdown began (answer 503).
        read_timeout: seconds the body may take to arrive; a slower one is answered 408 (a
            client trickling bytes would otherwise hold the connection and its buffer forever).
    """

    def __init__(self, app, keys: ApiKeys, max_body_bytes: int, limiter: RateLimiter | None, draining, read_timeout: float = 10.0):
        self.app, self.keys, self.max_body_bytes, self.limiter, self.draining = app, keys, max_body_bytes, limiter, draining
        self.read_timeout = read_timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        protected = path == "/v1" or path.startswith("/v1/") or path == "/docs"  # /docs exists only with --docs
        if protected and self.draining():
            return await send_error(send, 503, "the server is shutting down", "unavailable", [(b"connection", b"close")])
        caller = (scope.get("client") or ("unknown",))[0]
        if protected and len(self.keys):
            key_id = self.keys.identify(_bearer(scope))
            if key_id is None:
                return await send_error(
                    send, 401, "missing or unknown API key; send 'Authorization: Bearer <key>'", "authentication_error",
                    [(b"www-authenticate", b'Bearer realm="finegrain"')],
                )
            caller = scope.setdefault("state", {})["key_id"] = key_id
        if protected and self.limiter is not None:
            wait = self.limiter.acquire(caller)
            if wait > 0:
                scope.setdefault("state", {})["rejected"] = "rate_limit"
                return await send_error(
                    send, 429, "rate limit reached for this API key", "rate_limit_error",
                    [(b"retry-after", str(max(1, math.ceil(wait))).encode())],
                )
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body_bytes):
            return await self._too_large(send)
        chunks: list[bytes] = []
        if scope["method"] in ("POST", "PUT", "PATCH"):
            try:
                async with asyncio.timeout(self.read_timeout):
                    complete = await self._read_body(receive, chunks)
            except TimeoutError:
                return await send_error(send, 408, f"the request body did not arrive within {self.read_timeout:g} s (--read-timeout)",
                                        "invalid_request_error", [(b"connection", b"close")])
            if complete is None:
                return
            if not complete:
                return await self._too_large(send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        scope.setdefault("state", {})["body"] = b"".join(chunks)
        return await self.app(scope, replay, send)

    async def _read_body(self, receive, chunks: list[bytes]) -> bool | None:
        """Read the body into `chunks`: True when whole, False when over the limit, None when the client left."""
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            size += len(message.get("body", b""))
            if size > self.max_body_bytes:
                return False
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                return True

    async def _too_large(self, send):
        await send_error(
            send, 413, f"the request body is over the limit of {self.max_body_bytes} bytes (--max-body-bytes)",
            "invalid_request_error", [(b"connection", b"close")],
        )


def _bearer(scope) -> str:
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" else ""
    return ""
