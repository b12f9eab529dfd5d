"""Stored outputs served over HTTP as browsers expect of media: HEAD, and Range requests (206 Partial Content,
`Accept-Ranges: bytes`) so a <video> element can seek, which Safari requires before it plays at all.

Starlette's FileResponse does the ranges (single and multiple, If-Range, sendfile); it answers an unsatisfiable
range (416) and a malformed one (400) in plain text, so those two are re-sent here in OpenAI's error shape.
"""

from __future__ import annotations

import json

from starlette.responses import FileResponse
from starlette.types import Message, Receive, Scope, Send

RANGE_ERRORS = {400: ("the Range header is malformed", "invalid_request_error"),
                416: ("the Range asked for is outside the file", "invalid_request_error")}


class RangedFileResponse(FileResponse):
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        held: Message | None = None

        async def send_errors_as_json(message: Message) -> None:
            nonlocal held
            if message["type"] == "http.response.start" and message["status"] in RANGE_ERRORS:
                held = message      # the plain-text body follows; both are replaced
                return
            if held is not None and message["type"] == "http.response.body":
                status = held["status"]
                text, kind = RANGE_ERRORS[status]
                body = json.dumps({"error": {"message": text, "type": kind, "param": "range",
                                             "code": "range_not_satisfiable" if status == 416 else None}},
                                  separators=(",", ":")).encode()
                headers = [(key, value) for key, value in held["headers"]
                           if key not in (b"content-type", b"content-length")]
                await send({"type": "http.response.start", "status": status, "headers": [
                    *headers, (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                held = None
                return
            await send(message)

        await super().__call__(scope, receive, send_errors_as_json)
