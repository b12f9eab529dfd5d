"""An OTLP/gRPC trace receiver on loopback, built from the OpenTelemetry protocol package (what a collector serves):
it keeps every span exported to it, with its service's name."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import threading
import time

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


@dataclasses.dataclass(frozen=True)
class ReceivedSpan:
    service: str
    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    start_ns: int = 0           # the span's start and end, nanoseconds since the epoch (the exporter's clock)
    end_ns: int = 0


class TraceReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self._spans: list[ReceivedSpan] = []
        self._lock = threading.Lock()
        self._server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> TraceReceiver:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop(0)

    def Export(self, request: trace_service_pb2.ExportTraceServiceRequest, context):
        received = []
        for resource_spans in request.resource_spans:
            attributes = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            service = attributes.get("service.name", "")
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    received.append(ReceivedSpan(service, span.trace_id.hex(), span.span_id.hex(),
                                                 span.parent_span_id.hex(), span.name, span.start_time_unix_nano,
                                                 span.end_time_unix_nano))
        with self._lock:
            self._spans.extend(received)
        return trace_service_pb2.ExportTraceServiceResponse()

    def spans(self, trace_id: str | None = None) -> list[ReceivedSpan]:
        with self._lock:
            return [span for span in self._spans if trace_id is None or span.trace_id == trace_id]

    def wait_for_spans(self, trace_id: str, wanted: set[tuple[str, str]], timeout_s: float) -> set[tuple[str, str]]:
        """The (service, span name) pairs of `trace_id` received, once all of `wanted` have been (spans reach the
        receiver as each process's batch leaves, in no order) or `timeout_s` has passed."""
        deadline = time.monotonic() + timeout_s
        while True:
            seen = {(span.service, span.name) for span in self.spans(trace_id)}
            if wanted <= seen or time.monotonic() > deadline:
                return seen
            time.sleep(0.1)
