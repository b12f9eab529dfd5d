"""The gateway's Prometheus metrics: HTTP requests, jobs by status and outcome, time queued, generation latency.

Both front doors are counted where their work is, the job store: a REST image, a REST video and a gRPC Generate
are each a job, labelled by `model`, `kind` (image | video) and `api` (rest | grpc, from the job id's prefix that
each front door gives). gRPC calls themselves (Generate, GetJob, CancelJob, ListModels) are counted with every
server's in diffmesh_grpc_requests_total (services/common/metrics.py); /metrics serves both registries.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from services.common import metrics as common_metrics

# A job's life, from milliseconds (a tiny model's image) to an hour (a long clip waiting behind others).
JOB_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
# The front door that made a job, by its id's prefix (services/gateway/rest.py and server.py choose them).
API_BY_PREFIX = {"gen": "grpc", "img": "rest", "video": "rest"}


def api_of(job_id: str) -> str:
    return API_BY_PREFIX.get(job_id.partition("_")[0], "other")


def job_kind(request) -> str:
    """image or video: what a GenerationRequest makes (a one-frame MP4 is a video)."""
    return "video" if request.format == "mp4" or request.num_frames > 1 else "image"


class JobObserver:
    """What the job store reports as jobs move (services/gateway/jobs.py); this base records nothing."""

    def job_started(self, job_id: str, model: str, kind: str, queued_s: float) -> None:
        """A job left the queue and runs, `queued_s` after it was accepted."""

    def job_finished(self, job_id: str, model: str, kind: str, status: str, code: str,
                     elapsed_s: float | None) -> None:
        """A job ended (status completed | failed | cancelled, code its error's gRPC code or OK), `elapsed_s` after
        it was accepted (None if not known)."""


class _JobsCollector(Collector):
    """diffmesh_jobs{model, status}: the jobs this gateway holds now, queued and in progress, read at each scrape."""

    def __init__(self, jobs) -> None:
        self.jobs = jobs

    def collect(self):
        family = GaugeMetricFamily("diffmesh_jobs", "Jobs this gateway holds now, by model and status",
                                   labels=["model", "status"])
        for model, counts in sorted(self.jobs.counts().items()):
            for status, count in counts.items():
                family.add_metric([model, status], float(count))
        return [family]


class GatewayMetrics(JobObserver):
    """The gateway's own metrics, on a registry of its own (one per app: tests build several in one process)."""

    def __init__(self, jobs) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.http_requests = Counter("diffmesh_http_requests_total", "HTTP requests, by route and status",
                                     ["route", "status"], registry=r)
        self.generation_seconds = Histogram(
            "diffmesh_generation_seconds", "From accepting a job to its completion (time queued included)",
            ["model", "kind", "api"], buckets=JOB_BUCKETS, registry=r)
        self.queued_seconds = Histogram("diffmesh_job_queued_seconds", "From accepting a job to starting it",
                                        ["model", "kind", "api"], buckets=JOB_BUCKETS, registry=r)
        self.jobs_started = Counter("diffmesh_jobs_started_total", "Jobs that left the queue and ran",
                                    ["model", "kind", "api"], registry=r)
        self.jobs_finished = Counter("diffmesh_jobs_finished_total",
                                     "Jobs that ended, by status (completed | failed | cancelled) and code",
                                     ["model", "kind", "api", "status", "code"], registry=r)
        active = Gauge("diffmesh_active_jobs", "Jobs running or queued on this gateway", registry=r)
        active.set_function(lambda: jobs.active)
        r.register(_JobsCollector(jobs))

    def http_request(self, route: str, status: int) -> None:
        self.http_requests.labels(route, str(status)).inc()

    def job_started(self, job_id: str, model: str, kind: str, queued_s: float) -> None:
        api = api_of(job_id)
        self.jobs_started.labels(model, kind, api).inc()
        self.queued_seconds.labels(model, kind, api).observe(max(0.0, queued_s))

    def job_finished(self, job_id: str, model: str, kind: str, status: str, code: str,
                     elapsed_s: float | None) -> None:
        api = api_of(job_id)
        self.jobs_finished.labels(model, kind, api, status, code).inc()
        if status == "completed" and elapsed_s is not None:
            self.generation_seconds.labels(model, kind, api).observe(max(0.0, elapsed_s))

    def exposition(self) -> bytes:
        """The gateway's metrics, then the process's (gRPC calls, rejections, build info, process)."""
        return generate_latest(self.registry) + common_metrics.exposition()[0]
