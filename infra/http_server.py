"""uvicorn's HTTP/1.1 protocol with the deadlines it lacks (G11: a client holds a connection only
as long as it keeps its side of the exchange).

uvicorn closes an idle keep-alive connection (``timeout_keep_alive``) but sets no deadline on
reading a request: a connection that sends nothing, or sends its request head a byte at a time
(slowloris), is held for ever, and so is one whose body never ends. ``GuardedH11Protocol``:

- **head**: the request line and headers must be complete within ``header_timeout`` seconds of
  the connection (or, on a kept-alive connection, of the first byte of the next request); else
  the server answers ``408`` and closes. A connection never holds a task before its head is in.
- **body**: once the head is in, the body must be complete within ``body_timeout`` seconds; the
  gateway's routes answer ``408`` themselves at ``CQRSKIT_HTTP_BODY_TIMEOUT``; this is the
  backstop for a body nothing reads (then the connection is closed).

Passed to uvicorn as ``http=GuardedH11Protocol``; its deadlines are class attributes, set from the
settings by ``configure`` in each server process before it serves (uvicorn's worker processes
import the class by name, so each sets them again from its own settings).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

BODY_GRACE = 2.0  # seconds the routes' own 408 gets before the backstop closes the connection


def _timeout_response(detail: str) -> bytes:
    body = json.dumps({"type": "https://cqrskit.dev/problems/request-timeout", "title": "Request timeout",
                       "status": 408, "detail": detail}).encode()
    return (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/problem+json\r\nconnection: close\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


class GuardedH11Protocol(H11Protocol):
    header_timeout: float = 10.0
    body_timeout: float = 10.0 + BODY_GRACE

    @classmethod
    def configure(cls, header_timeout: float, body_timeout: float) -> type[GuardedH11Protocol]:
        """Set the deadlines of every connection made from now on in this process; returns the class."""
        cls.header_timeout, cls.body_timeout = header_timeout, body_timeout + BODY_GRACE
        return cls

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._deadline: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        self._arm(self.header_timeout, self._head_late)

    def data_received(self, data: bytes) -> None:
        if self._deadline is None and self.conn.their_state is h11.IDLE:  # the next request of a kept-alive connection
            self._arm(self.header_timeout, self._head_late)
        head_pending = self.conn.their_state is h11.IDLE
        super().data_received(data)
        state = self.conn.their_state
        if head_pending and state is not h11.IDLE:  # the head is in
            self._disarm()
            if state is h11.SEND_BODY:
                self._arm(self.body_timeout, self._body_late)
        elif state in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED, h11.ERROR):
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.conn.their_state is h11.IDLE:
            self._disarm()  # idle between requests: uvicorn's keep-alive timeout governs

    def _arm(self, seconds: float, late: Any) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, late)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _head_late(self) -> None:
        self._deadline = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.write(_timeout_response(
                f"the request head did not arrive within {self.header_timeout:g} s"))
            self.transport.close()

    def _body_late(self) -> None:
        self._deadline = None
        if self.conn.their_state is h11.SEND_BODY and not self.transport.is_closing():
            if self.cycle is None or not self.cycle.response_started:
                self.transport.write(_timeout_response(
                    f"the request body did not arrive within {self.body_timeout - BODY_GRACE:g} s"))
            self.transport.close()
