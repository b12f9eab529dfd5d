"""Limits on what an HTTP client can make the gateway hold: body bytes, and connection time before a request.

- `BodyLimit` answers 413 in OpenAI's error shape for a body over the limit: at once when Content-Length says so
  (before a byte of it is read), else as soon as the streamed bytes pass it, so no handler buffers more. (Starlette's
  RequestBodyLimitMiddleware, behind FastAPI's max_body_size, answers a declared-too-large body only once the app
  reads it, and in plain text.)
- `bounded_h11(header_timeout_s, body_stall_s)` is uvicorn's h11 protocol with two more timers. uvicorn closes a
  kept-alive connection that sends nothing for `timeout_keep_alive`, but arms no timer on a new connection, and any
  byte cancels the keep-alive timer: a client that connects and sends nothing, or trickles header bytes
  (slowloris), holds its connection forever (h11's max incomplete event size bounds the header's bytes, not their
  time), and so does one that stops half-way through its body. Here a request's headers must be complete within
  `header_timeout_s` of the connection opening (or of the next request's first byte on a kept-alive connection),
  and a body that is being sent may pause for at most `body_stall_s` (while the app is not the one holding it
  back); otherwise the connection is closed.
"""

from __future__ import annotations

import asyncio
import json

import h11
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

DEFAULT_MAX_BODY_BYTES = 32 << 20      # an image-to-video upload: a 12 MiB image as a base64 data URL is 16 MiB
DEFAULT_HEADER_TIMEOUT_S = 10.0
DEFAULT_IDLE_TIMEOUT_S = 60.0


class BodyTooLarge(HTTPException):
    """Raised from `receive` once the body passes the limit. An HTTPException, so FastAPI's own body parsing passes
    it on (it turns other exceptions into 400) and the app's HTTPException handler answers it."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, f"body: over this gateway's limit of {max_bytes} bytes (--max-body-bytes)")


def too_large_response(max_bytes: int) -> tuple[Message, Message]:
    error = BodyTooLarge(max_bytes)
    body = json.dumps({"error": {"message": error.detail, "type": "invalid_request_error", "param": "body",
                                 "code": None}}, separators=(",", ":")).encode()
    start = {"type": "http.response.start", "status": 413,
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                         (b"connection", b"close")]}
    return start, {"type": "http.response.body", "body": body}


def declared_length(scope: Scope) -> int | None:
    for key, value in scope.get("headers", ()):
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None     # h11 refuses a malformed Content-Length before the app sees the request
    return None


class BodyLimit:
    """At most `max_bytes` of request body per request. Plain ASGI (see RequestCounter): `receive` passes every
    other message through, so handlers still see the client's disconnect."""

    def __init__(self, app: ASGIApp, max_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = declared_length(scope)
        if declared is not None and declared > self.max_bytes:
            for message in too_large_response(self.max_bytes):
                await send(message)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, limited_receive, send)


class HeaderTimeoutH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose request headers are not complete in `header_timeout_s`."""

    header_timeout_s = DEFAULT_HEADER_TIMEOUT_S
    body_stall_s = DEFAULT_IDLE_TIMEOUT_S
    _header_timer: asyncio.TimerHandle | None = None
    _body_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        if self._header_timer is None and self.conn.their_state is h11.IDLE:
            self._arm_header_timer()    # the first bytes of the next request on a kept-alive connection
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:   # h11 leaves IDLE once a request's headers are complete
            self._cancel_header_timer()
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        if self.conn.their_state is h11.SEND_BODY:  # a body under way: it may stall only so long
            self._body_timer = self.loop.call_later(self.body_stall_s, self._body_stalled)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        if self._body_timer is not None:
            self._body_timer.cancel()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()

    def _body_stalled(self) -> None:
        self._body_timer = None
        if self.conn.their_state is not h11.SEND_BODY or self.transport.is_closing():
            return
        if self.flow.read_paused:       # uvicorn stopped reading until the app takes what it has: not the client
            self._body_timer = self.loop.call_later(self.body_stall_s, self._body_stalled)
        else:                           # the app's receive() then says the client disconnected
            self.transport.close()


def bounded_h11(header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S,
                body_stall_s: float = DEFAULT_IDLE_TIMEOUT_S) -> type[H11Protocol]:
    """The protocol class for uvicorn.Config(http=...)."""
    return type("BoundedH11Protocol", (HeaderTimeoutH11Protocol,),
                {"header_timeout_s": header_timeout_s, "body_stall_s": body_stall_s})
