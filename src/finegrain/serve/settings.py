"""Limits and batching of the server: light to import, so `finegrain --help` needs no torch."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ServeSettings:
    """Limits and batching; the `finegrain serve` flags of the same names set them."""

    max_body_bytes: int = 1 << 20
    max_texts: int = 64
    max_tokens_per_text: int = 512
    max_new_tokens: int = 256
    max_batch: int = 32
    batch_wait_ms: float = 5.0
    max_queue: int = 256
    timeout: float = 30.0
    rate_limit: float | None = None
    log_bodies: bool = False
    docs: bool = False  # Swagger UI at /docs, for key holders
    read_timeout: float = 10.0  # seconds a client has to send a request's head, and then its body
    keep_alive: float = 5.0  # seconds an idle keep-alive connection stays open
    max_connections: int = 512  # open connections; one more is answered 503 and closed
    max_header_bytes: int = 65536  # a request head larger than this is answered 431
