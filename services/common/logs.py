"""Logging configured once per process; every record carries service, rank and request id.

The request id lives in a contextvar, so it follows a request through `asyncio` tasks and
`asyncio.to_thread` (which copies the context) without being passed by hand.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
from collections.abc import Iterator

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")

_service = "diffmesh"
_rank = 0


class _ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.service = _service
        record.rank = _rank
        record.request_id = request_id_var.get()
        return True


def configure(service: str, rank: int = 0, level: str | None = None) -> None:
    """Set up the root logger for this process. Non-zero ranks log at WARNING to keep gang logs readable."""
    global _service, _rank
    _service, _rank = service, rank
    default_level = "INFO" if rank == 0 else "WARNING"
    handler = logging.StreamHandler()
    handler.addFilter(_ContextFilter())
    handler.setFormatter(
        logging.Formatter(
            "%(asctime)s %(levelname)s service=%(service)s rank=%(rank)s request_id=%(request_id)s "
            "%(name)s: %(message)s"
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level or os.environ.get("DIFFMESH_LOG_LEVEL", default_level))
    # Library chatter (HTTP access lines, diffusers progress) stays below our own records.
    for noisy in ("httpx", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@contextlib.contextmanager
def request_context(request_id: str) -> Iterator[None]:
    token = request_id_var.set(request_id or "-")
    try:
        yield
    finally:
        try:
            request_id_var.reset(token)
        except ValueError:
            # A streaming handler closed from another task (its client went away) ends in that task's context,
            # where this token does not belong; that context keeps its own value.
            pass
