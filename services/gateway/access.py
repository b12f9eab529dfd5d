"""Around every HTTP request to the gateway: its request id, its access line, its count.

The request id is the client's `x-request-id` when it is a valid one, else a new one; it is bound to every log
line of the request, handed to the handlers (`request.state.request_id`, which the job takes), and echoed on the
response, errors included. One access line per request once it has ended (method, route, status, duration), and
diffmesh_http_requests_total by route and status.

Plain ASGI, and outside Starlette's ServerErrorMiddleware (see `install`): Starlette's BaseHTTPMiddleware hides
the client's disconnect from handlers (the image endpoint relies on seeing it to cancel abandoned jobs), and a
user middleware never sees the 500 that ServerErrorMiddleware sends for an unhandled error.
"""

from __future__ import annotations

import logging
import time
import uuid

from starlette.datastructures import MutableHeaders

from services.common import logs
from services.common.errors import InvalidArgument
from services.common.limits import check_request_id
from services.gateway.metrics import GatewayMetrics

logger = logging.getLogger(__name__)

REQUEST_ID_HEADER = "x-request-id"


def request_id_of(scope) -> str:
    """The client's x-request-id if it is a valid id, else a new one (a bad one is refused by the handler that
    reads it, naming the header; the response still carries an id to quote)."""
    given = next((value.decode("latin-1") for key, value in scope.get("headers", ()) if key == b"x-request-id"), "")
    if given:
        try:
            return check_request_id(given, REQUEST_ID_HEADER)
        except InvalidArgument:
            pass
    return uuid.uuid4().hex[:16]


class AccessLog:
    def __init__(self, app, metrics: GatewayMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_of(scope)
        scope.setdefault("state", {})["request_id"] = request_id
        status = {"code": 500, "sent": False}

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                status["code"], status["sent"] = message["status"], True
                headers = MutableHeaders(scope=message)
                if REQUEST_ID_HEADER not in headers:
                    headers.append(REQUEST_ID_HEADER, request_id)
            await send(message)

        started = time.monotonic()
        with logs.request_context(request_id):
            try:
                await self.app(scope, receive, send_with_id)
            except Exception:
                # ServerErrorMiddleware re-raises what it answered 500 for, once its handler has logged it: told
                # twice (and by uvicorn with a traceback) it would read as two failures.
                if not status["sent"]:
                    raise
            finally:
                route = getattr(scope.get("route"), "path", "unmatched")
                self.metrics.http_request(route, status["code"])
                logs.log_access("http", scope.get("method", ""), route, status["code"], time.monotonic() - started,
                                path=scope.get("path", ""))


def install(app, metrics: GatewayMetrics) -> None:
    """Make AccessLog the outermost layer of `app`: around the middleware stack Starlette builds at its first
    request (ServerErrorMiddleware outermost, then the app's middlewares). Call it after the tracing
    instrumentation, which rebuilds that same stack and checks what it finds."""
    build = app.build_middleware_stack
    app.build_middleware_stack = lambda: AccessLog(build(), metrics)
