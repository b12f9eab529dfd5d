"""Logging configured once per process; every record carries service, rank and request id.

The request id lives in a contextvar, so it follows a request through `asyncio` tasks and
`asyncio.to_thread` (which copies the context) without being passed by hand.

Two formats: `text` (one line a record, for people) and `json` (one JSON object a line, for log pipelines:
Loki, Elasticsearch, Cloud Logging), chosen by `--log-format` or DIFFMESH_LOG_FORMAT. An access line per request
(`log_access`) carries its protocol, method, route, status and duration as fields of their own in JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import datetime
import json
import logging
import os
from collections.abc import Iterator

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")

LOG_FORMATS = ("text", "json")
LOG_FORMAT_ENV = "DIFFMESH_LOG_FORMAT"
TEXT_FORMAT = ("%(asctime)s %(levelname)s service=%(service)s rank=%(rank)s request_id=%(request_id)s "
               "%(name)s: %(message)s")

_service = "diffmesh"
_rank = 0
_format: str | None = None      # as first chosen: a later configure() (a gang rank learning its rank) keeps it
# Set by services/common/tracing.py once a tracer provider is up: JSON records then carry the trace and span ids.
current_trace_ids = None

access_logger = logging.getLogger("diffmesh.access")


def service_name() -> str:
    return _service


class _ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.service = _service
        record.rank = _rank
        record.request_id = request_id_var.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (UTC, ISO 8601), level, service, rank, request_id, logger, message, the
    record's own `fields` (an access line's), trace_id/span_id under tracing, and the traceback as one string."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc).isoformat(
                timespec="milliseconds"),
            "level": record.levelname,
            "service": getattr(record, "service", _service),
            "rank": getattr(record, "rank", _rank),
            "request_id": getattr(record, "request_id", "-"),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if current_trace_ids is not None and (ids := current_trace_ids()) is not None:
            entry["trace_id"], entry["span_id"] = ids
        entry.update(getattr(record, "fields", None) or {})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        return json.dumps(entry, default=str)


def add_log_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--log-format", choices=LOG_FORMATS, default=None,
                        help=f"text (one line a record) or json (one object a line) (default: ${LOG_FORMAT_ENV} "
                        "or text)")
    return parser


def chosen_format(fmt: str | None = None) -> str:
    """The flag's format, else the one this process chose already, else DIFFMESH_LOG_FORMAT's, else text."""
    choice = (fmt or _format or os.environ.get(LOG_FORMAT_ENV) or "text").strip().lower()
    return choice if choice in LOG_FORMATS else "text"


def configure(service: str, rank: int = 0, level: str | None = None, fmt: str | None = None) -> None:
    """Set up the root logger for this process. Non-zero ranks log at WARNING to keep gang logs readable."""
    global _service, _rank, _format
    _service, _rank = service, rank
    env_format = os.environ.get(LOG_FORMAT_ENV, "")
    _format = chosen_format(fmt)
    default_level = "INFO" if rank == 0 else "WARNING"
    handler = logging.StreamHandler()
    handler.addFilter(_ContextFilter())
    handler.setFormatter(JsonFormatter() if _format == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level or os.environ.get("DIFFMESH_LOG_LEVEL", default_level))
    # Library chatter (HTTP access lines, diffusers progress) stays below our own records; our own access lines
    # (log_access) replace uvicorn's.
    for noisy in ("httpx", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if fmt is None and env_format and env_format.strip().lower() not in LOG_FORMATS:
        logging.getLogger(__name__).warning("%s=%r is not one of %s: logging as text", LOG_FORMAT_ENV, env_format,
                                            ", ".join(LOG_FORMATS))


def log_access(protocol: str, method: str, route: str, status: str | int, duration_s: float, **fields) -> None:
    """One line per request served, once it has ended: `http POST /v1/images/generations 200 812.4ms` (the request
    id is the record's own, from the context)."""
    duration_ms = round(duration_s * 1000.0, 1)
    access_logger.info("%s %s %s %s %.1fms", protocol, method, route, status, duration_ms,
                       extra={"fields": {"protocol": protocol, "method": method, "route": route, "status": status,
                                         "duration_ms": duration_ms, **fields}})


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
