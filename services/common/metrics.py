"""Prometheus metrics of every diffmesh process, and the HTTP endpoint a stage serves them on.

Stage code sees no prometheus types: engines time their steps with `phase(...)` (a context manager) and a
`StepTimer`, and servers register what they can be asked about (`watch_gate`, `watch_device`); the definitions
live here, on one registry per process (`REGISTRY`), served at `GET /metrics` on `--metrics-port` by a stage
(`start_metrics_server`) and beside the gateway's own metrics on its REST port.

Latency histograms carry the served model as `model`; a gang serves its leader's view (rank 0 runs the same loop
as every rank, and its device's memory is the one shown).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import platform as python_platform
import time
from collections.abc import Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from services.common import tracing

logger = logging.getLogger(__name__)

REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)        # process_resident_memory_bytes, process_cpu_seconds_total, ...
PlatformCollector(registry=REGISTRY)       # python_info

# One step ranges from milliseconds (the tiny test models) to seconds (Wan 14B at 720p on one device); a whole
# encode or decode, from milliseconds to minutes (a long clip's VAE decode on CPU).
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
PHASE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0)
RPC_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)

# name -> histogram; `phase(name, ...)` observes the one of that name.
PHASES: dict[str, Histogram] = {
    "encode": Histogram("diffmesh_encode_seconds", "Encoder: prompt (and image) encoding of one request",
                        ["model"], buckets=PHASE_BUCKETS, registry=REGISTRY),
    "denoise": Histogram("diffmesh_denoise_seconds", "Denoiser: one request's whole denoising loop",
                         ["model"], buckets=PHASE_BUCKETS, registry=REGISTRY),
    "decode": Histogram("diffmesh_decode_seconds", "Decoder: VAE decode of one request's latents",
                        ["model"], buckets=PHASE_BUCKETS, registry=REGISTRY),
    "media_encode": Histogram("diffmesh_media_encode_seconds",
                              "Decoder: encoding one request's frames as files (PNG, MP4, ...)",
                              ["model", "format"], buckets=PHASE_BUCKETS, registry=REGISTRY),
    "condition_encode": Histogram("diffmesh_condition_encode_seconds",
                                  "Decoder: VAE encoding of a conditioning image (image-to-video)",
                                  ["model"], buckets=PHASE_BUCKETS, registry=REGISTRY),
}
DENOISE_STEP = Histogram("diffmesh_denoise_step_seconds", "Denoiser: one denoising step (every branch of it)",
                         ["model"], buckets=STEP_BUCKETS, registry=REGISTRY)

REQUESTS_RUNNING = Gauge("diffmesh_stage_requests_running", "Requests a stage is working on now",
                         ["stage", "model"], registry=REGISTRY)
REQUESTS_QUEUED = Gauge("diffmesh_stage_requests_queued", "Requests admitted and waiting for the stage's model",
                        ["stage", "model"], registry=REGISTRY)
STAGE_CAPACITY = Gauge("diffmesh_stage_capacity", "Requests a stage runs at once (concurrency) and queues at most",
                       ["stage", "model", "kind"], registry=REGISTRY)
GRPC_REQUESTS = Counter("diffmesh_grpc_requests_total", "gRPC calls served, by method and final status code",
                        ["service", "method", "code"], registry=REGISTRY)
GRPC_SECONDS = Histogram("diffmesh_grpc_request_seconds", "Time to serve a gRPC call, to its last response",
                         ["service", "method"], buckets=RPC_BUCKETS, registry=REGISTRY)
REJECTIONS = Counter("diffmesh_rejections_total",
                     "Requests refused: bad input (reason: the field), at capacity, unknown model, no key, ...",
                     ["service", "code", "reason"], registry=REGISTRY)
BUILD = Info("diffmesh_build", "Versions this process runs", registry=REGISTRY)


class DeviceMemoryCollector(Collector):
    """The device memory in use and its peak, read from the platform layer at each scrape (see
    Platform.memory_in_use: an accelerator's allocator; on CPU the process's resident set)."""

    def __init__(self, platform, stage: str) -> None:
        self.platform, self.stage = platform, stage

    def collect(self):
        labels = ["stage", "device", "source"]
        values = [self.stage, self.platform.kind, "rss" if self.platform.kind == "cpu" else "allocator"]
        in_use, peak = self.platform.memory_in_use()
        used = GaugeMetricFamily("diffmesh_device_memory_bytes", "Device memory this process holds now", labels=labels)
        used.add_metric(values, float(in_use))
        top = GaugeMetricFamily("diffmesh_device_memory_peak_bytes", "Most device memory this process has held",
                                labels=labels)
        top.add_metric(values, float(peak))
        return [used, top]


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "none"


def set_build_info(service: str) -> None:
    """diffmesh_build_info{service, version, torch, diffusers, python} 1 (versions from package metadata, so the
    gateway imports neither torch nor diffusers for it)."""
    BUILD.info({"service": service, "version": _version("diffmesh"), "torch": _version("torch"),
                "diffusers": _version("diffusers"), "transformers": _version("transformers"),
                "python": python_platform.python_version()})


_watched_devices: set[str] = set()


def watch_device(platform, stage: str) -> None:
    """Report `platform`'s memory at each scrape (once per process)."""
    if stage not in _watched_devices:
        _watched_devices.add(stage)
        REGISTRY.register(DeviceMemoryCollector(platform, stage))


def watch_gate(stage: str, model: str, gate) -> None:
    """Report an AdmissionGate's running and queued requests (read at each scrape) and its size."""
    REQUESTS_RUNNING.labels(stage, model).set_function(lambda: gate.running)
    REQUESTS_QUEUED.labels(stage, model).set_function(lambda: gate.queued)
    STAGE_CAPACITY.labels(stage, model, "concurrency").set(gate.concurrency)
    STAGE_CAPACITY.labels(stage, model, "max_queue").set(gate.max_queue)


@contextlib.contextmanager
def phase(name: str, model: str, **labels: str) -> Iterator[None]:
    """Time a phase of a stage's work into its histogram (PHASES[name]), and trace it as a span `diffmesh.<name>`
    when tracing is on. Only a phase that ends without an exception is observed (a cancelled loop is no latency)."""
    started = time.perf_counter()
    with tracing.span(f"diffmesh.{name}", model=model, **labels):
        yield
    PHASES[name].labels(model=model, **labels).observe(time.perf_counter() - started)


class StepTimer:
    """Times each denoising step: `lap()` at the end of every step observes the time since the last lap (or since
    the timer was made, just before the loop); `done()` after the loop observes the whole loop."""

    def __init__(self, model: str) -> None:
        self._steps = DENOISE_STEP.labels(model=model)
        self._loop = PHASES["denoise"].labels(model=model)
        self._started = self._last = time.perf_counter()

    def lap(self) -> None:
        now = time.perf_counter()
        self._steps.observe(now - self._last)
        self._last = now

    def done(self) -> None:
        self._loop.observe(time.perf_counter() - self._started)


def rejected(service: str, code: str, reason: str = "") -> None:
    REJECTIONS.labels(service, code, reason).inc()


def rpc_served(service: str, method: str, code: str, seconds: float) -> None:
    GRPC_REQUESTS.labels(service, method, code).inc()
    GRPC_SECONDS.labels(service, method).observe(seconds)


def exposition() -> tuple[bytes, str]:
    """This process's metrics in Prometheus' text format, and its content type."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def start_metrics_server(host: str, port: int) -> int:
    """Serve REGISTRY at http://host:port/metrics from a daemon thread (prometheus_client's own WSGI server); port 0
    picks a free one. Returns the bound port; OSError if it cannot bind."""
    server, _ = start_http_server(port, addr=host, registry=REGISTRY)
    bound = int(server.server_port)
    logger.info("metrics on http://%s:%d/metrics", host if ":" not in host else f"[{host}]", bound)
    return bound

