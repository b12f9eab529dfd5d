"""OpenTelemetry tracing: one trace per request, across the gateway and every stage.

On only when OTEL_EXPORTER_OTLP_ENDPOINT (or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) is set, and then exported over
OTLP/gRPC in batches. When it is not set, nothing is set up: no tracer provider, no instrumentation, no
OpenTelemetry SDK imported, and the hooks below (`span`, `carrier`, `resumed`) are a null context or an empty
dict. The standard OTEL_* variables apply (OTEL_BSP_SCHEDULE_DELAY, OTEL_EXPORTER_OTLP_HEADERS,
OTEL_EXPORTER_OTLP_CERTIFICATE, OTEL_RESOURCE_ATTRIBUTES, OTEL_TRACES_SAMPLER ...).

The libraries carry the context: OpenTelemetry's grpc.aio server and client instrumentation (every diffmesh
server runs grpc.aio, and the gateway calls the stages on grpc.aio channels) reads and writes `traceparent` in
gRPC metadata; its FastAPI instrumentation reads it from HTTP clients. What they cannot see is the gateway's job
runner, which runs each job in a task of its own after the request has been answered (video jobs) or while it
waits (images, gRPC Generate): the job keeps its submitter's context as a carrier (`carrier()` at submit,
`resumed()` when it runs), so the stage calls still join the request's trace.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping

from services.common import logs

logger = logging.getLogger(__name__)

ENDPOINT_ENVS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
# Calls that are not requests: every gateway holds a health Watch open per replica, and asks each stage's
# Admission service for its capacity; tracing them would bury the requests' traces.
UNTRACED_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.", "diffmesh.v1.Admission")
UNTRACED_HTTP = "/health,/metrics"

_tracer = None


def enabled() -> bool:
    return _tracer is not None


def wanted() -> bool:
    """Whether this process should trace: an OTLP endpoint is set and the SDK is not disabled."""
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    return any(os.environ.get(name, "").strip() for name in ENDPOINT_ENVS)


def setup_tracing(service_name: str) -> bool:
    """Trace this process as `diffmesh-<service_name>` when an OTLP endpoint is set; call once from a server's
    main, before it makes its gRPC server or channels (the instrumentation wraps their constructors). Returns
    whether tracing is on."""
    global _tracer
    if _tracer is not None or not wanted():
        return _tracer is not None
    from importlib.metadata import PackageNotFoundError, version

    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.instrumentation.grpc import GrpcAioInstrumentorClient, GrpcAioInstrumentorServer, filters
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    try:
        diffmesh_version = version("diffmesh")
    except PackageNotFoundError:
        diffmesh_version = "unknown"
    # Ours over OTEL_SERVICE_NAME: `diffmesh up` hands one environment to four processes, which must stay apart.
    resource = Resource.create({"service.name": f"diffmesh-{service_name}", "service.namespace": "diffmesh",
                                "service.version": diffmesh_version})
    provider = TracerProvider(resource=resource)
    # The batch processor exports from a thread of its own, every OTEL_BSP_SCHEDULE_DELAY ms (5 s by default),
    # and flushes at exit (the provider's atexit shutdown).
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    requests_only = filters.negate(filters.any_of(*(filters.service_prefix(name) for name in UNTRACED_SERVICES)))
    GrpcAioInstrumentorServer(filter_=requests_only).instrument()
    GrpcAioInstrumentorClient(filter_=requests_only).instrument()
    _tracer = trace.get_tracer("diffmesh", diffmesh_version)
    logs.current_trace_ids = _current_ids
    logger.info("tracing to %s as diffmesh-%s", next(os.environ[name] for name in ENDPOINT_ENVS
                                                     if os.environ.get(name, "").strip()), service_name)
    return True


def flush() -> None:
    """Export the spans still batched (a process about to end without its atexit handlers calls this)."""
    if _tracer is None:
        return
    from opentelemetry import trace

    trace.get_tracer_provider().shutdown()


def instrument_fastapi(app) -> None:
    """Trace the gateway's REST requests (a client's `traceparent` header continues its trace); nothing when
    tracing is off."""
    if _tracer is None:
        return
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

    # Without its per-message "http receive" / "http send" spans: a request is one span, with its stage calls.
    FastAPIInstrumentor.instrument_app(app, excluded_urls=UNTRACED_HTTP, exclude_spans=["receive", "send"])


def _current_ids() -> tuple[str, str] | None:
    from opentelemetry import trace

    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return format(context.trace_id, "032x"), format(context.span_id, "016x")


@contextlib.contextmanager
def span(name: str, **attributes) -> Iterator[None]:
    """A child span of the current one, around a step of the work (an encode, a decode); nothing when off."""
    if _tracer is None:
        yield
        return
    with _tracer.start_as_current_span(name, attributes={k: v for k, v in attributes.items() if v is not None}):
        yield


def carrier() -> dict[str, str]:
    """The current trace context as W3C headers ({"traceparent": ...}), to carry across a task boundary; {} when
    off or outside any trace."""
    if _tracer is None:
        return {}
    from opentelemetry import propagate

    headers: dict[str, str] = {}
    propagate.inject(headers)
    return headers


@contextlib.contextmanager
def resumed(headers: Mapping[str, str] | None, name: str, **attributes) -> Iterator[None]:
    """A span `name` continuing the trace `headers` carry (see `carrier`), current for the block; a new trace when
    they carry none; nothing when off."""
    if _tracer is None:
        yield
        return
    from opentelemetry import propagate

    parent = propagate.extract(dict(headers or {}))
    with _tracer.start_as_current_span(name, context=parent,
                                       attributes={k: v for k, v in attributes.items() if v is not None}):
        yield
