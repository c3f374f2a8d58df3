"""Connections the server does not keep: a head that does not arrive, a head too large, one
connection too many.

uvicorn closes a keep-alive connection that stays idle after a response (`timeout_keep_alive`),
but it never times out a connection before its first request, nor a request head sent in
pieces: 200 such connections stayed open for good, each an open file. `guarded(base, ...)`
subclasses uvicorn's HTTP protocol (httptools or h11) to give every request head `read_timeout`
seconds to arrive (then 408), at most `max_header_bytes` (then 431), and to answer 503 to a
connection beyond `max_connections`; each of these closes the connection. The body's deadline
is `Gate`'s (security.py), which reads it.
"""

from __future__ import annotations

import asyncio


def refusal(status: int, reason: str) -> bytes:
    """A whole HTTP response that closes the connection."""
    body = f'{{"error": {{"message": "{reason}", "type": "invalid_request_error", "param": null, "code": {status}}}}}'.encode()
    head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n")
    return head.encode() + body


REFUSALS = {
    408: refusal(408, "Request Timeout"),
    431: refusal(431, "Request Header Fields Too Large"),
    503: refusal(503, "Service Unavailable"),
}


def default_protocol() -> type[asyncio.Protocol]:
    """The HTTP protocol uvicorn picks by itself: httptools when installed, else h11."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

        return HttpToolsProtocol
    except ImportError:
        from uvicorn.protocols.http.h11_impl import H11Protocol

        return H11Protocol


def guarded(base: type[asyncio.Protocol], read_timeout: float, max_connections: int, max_header_bytes: int) -> type[asyncio.Protocol]:
    """uvicorn's protocol `base` with a deadline and a size limit on request heads and a cap on connections.

    A head is awaited from the moment a connection opens, and again when data arrives after a
    response is complete (a keep-alive connection's next request); the protocol's `cycle`
    changing means the head arrived.
    """

    class Guarded(base):  # type: ignore[misc, valid-type]
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._head_timer: asyncio.TimerHandle | None = None
            self._head_bytes = 0
            self._awaited_after = None
            if len(self.connections) > max_connections:
                self._refuse(503)
            else:
                self._await_head()

        def data_received(self, data: bytes) -> None:
            if self._head_timer is None and (self.cycle is None or self.cycle.response_complete):
                self._await_head()
            awaiting = self._head_timer is not None
            self._head_bytes += len(data) if awaiting else 0
            super().data_received(data)
            if awaiting and self.cycle is not self._awaited_after:
                self._head_arrived()
            elif awaiting and self._head_bytes > max_header_bytes:
                self._refuse(431)

        def connection_lost(self, exc) -> None:
            self._head_arrived()
            super().connection_lost(exc)

        def _await_head(self) -> None:
            self._awaited_after, self._head_bytes = self.cycle, 0
            self._head_timer = self.loop.call_later(read_timeout, self._refuse, 408)

        def _head_arrived(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _refuse(self, status: int) -> None:
            self._head_arrived()
            if not self.transport.is_closing():
                self.transport.write(REFUSALS[status])
                self.transport.close()

    Guarded.__name__ = Guarded.__qualname__ = f"Guarded{base.__name__}"
    return Guarded
