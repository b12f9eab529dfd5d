"""Observability across stages, against the session mesh, which traces to an OTLP receiver the tests run on
loopback (tests/integration/conftest.py): one trace per request over all four services, every stage's Prometheus
metrics moving for REST and gRPC, images and videos, request ids echoed, and the gateway's gRPC health following its
stages (one encoder and one lone gateway of its own in front of that mesh's other stages)."""

from __future__ import annotations

import re
import secrets
import signal
import threading
import time

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from diffmesh.v1 import decoder_pb2, denoiser_pb2, denoiser_pb2_grpc, gateway_pb2, gateway_pb2_grpc

from .conftest import free_port
from .test_failover import Replica
from .test_stage_failures import start_gateway

SERVICES = {"diffmesh-gateway", "diffmesh-encoder", "diffmesh-denoiser", "diffmesh-decoder"}
METRICS_LINE = re.compile(r"diffmesh metrics: encoder=(?P<encoder>\S+) denoiser=(?P<denoiser>\S+) "
                          r"decoder=(?P<decoder>\S+) model=\S+ gateway=(?P<gateway>\S+)")
SPANS_TIMEOUT_S = 30.0
HEALTH_BOUND_S = 5.0


@pytest.fixture(scope="module")
def receiver(trace_receiver):
    return trace_receiver


@pytest.fixture(scope="module")
def traced_mesh(mesh):
    """The session mesh: it exports its spans to the session's OTLP receiver (tests/integration/conftest.py)."""
    return mesh


@pytest.fixture(scope="module")
def metrics_urls(traced_mesh) -> dict[str, str]:
    deadline = time.monotonic() + 10      # printed just after the READY line
    while time.monotonic() < deadline:
        found = next((METRICS_LINE.search(line) for line in traced_mesh.log if METRICS_LINE.search(line)), None)
        if found:
            return found.groupdict()
        time.sleep(0.1)
    raise AssertionError("diffmesh up printed no metrics line:\n" + "".join(traced_mesh.log[-20:]))


def new_traceparent() -> tuple[str, str, str]:
    trace_id, parent = secrets.token_hex(16), secrets.token_hex(8)
    return trace_id, parent, f"00-{trace_id}-{parent}-01"


def post_image(mesh, steps: int = 2, headers: dict | None = None) -> httpx.Response:
    reply = httpx.post(f"{mesh.http_url}/v1/images/generations", timeout=120, headers=headers or {},
                       json={"prompt": "a lighthouse", "size": "32x32", "num_inference_steps": steps})
    assert reply.status_code == 200, reply.text
    return reply


def run_video(mesh, steps: int = 2, headers: dict | None = None) -> dict:
    reply = httpx.post(f"{mesh.http_url}/v1/videos", timeout=60, headers=headers or {},
                       json={"prompt": "waves", "size": "32x32", "num_frames": 5, "num_inference_steps": steps})
    assert reply.status_code == 200, reply.text
    video = reply.json()
    deadline = time.monotonic() + 120
    while video["status"] not in ("completed", "failed"):
        assert time.monotonic() < deadline, f"video job stuck: {video}"
        time.sleep(0.2)
        video = httpx.get(f"{mesh.http_url}/v1/videos/{video['id']}", timeout=30).json()
    assert video["status"] == "completed", video
    return video


def grpc_generate(mesh, steps: int = 3, request_id: str = "") -> grpc.Call:
    with grpc.insecure_channel(mesh.grpc_address) as channel:
        call = gateway_pb2_grpc.GatewayStub(channel).Generate(
            gateway_pb2.GenerateRequest(prompt="a fox", width=32, height=32, num_inference_steps=steps,
                                        format=decoder_pb2.MEDIA_FORMAT_PNG),
            metadata=(("x-request-id", request_id),) if request_id else None, timeout=120)
        kinds = [event.WhichOneof("item") for event in call]
        assert kinds[-1] == "completed" and "media" in kinds
        return call


# -- (a) one trace per request -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["image", "video"])
def test_one_request_is_one_trace_across_the_gateway_and_every_stage(traced_mesh, receiver, kind):
    trace_id, parent, traceparent = new_traceparent()
    if kind == "image":
        post_image(traced_mesh, headers={"traceparent": traceparent})
    else:   # a job that runs after its request was answered: the trace must still be one
        run_video(traced_mesh, headers={"traceparent": traceparent})
    stage_calls = [("diffmesh-encoder", "/diffmesh.v1.Encoder/Encode"),
                   ("diffmesh-denoiser", "/diffmesh.v1.Denoiser/Denoise"),
                   ("diffmesh-decoder", "/diffmesh.v1.Decoder/Decode")]
    wanted = {("diffmesh-gateway", "diffmesh.job"), *stage_calls,
              *{("diffmesh-gateway", method) for _, method in stage_calls},   # the gateway's client spans
              ("diffmesh-encoder", "diffmesh.encode"), ("diffmesh-decoder", "diffmesh.decode"),
              ("diffmesh-decoder", "diffmesh.media_encode")}
    names = receiver.wait_for_spans(trace_id, wanted, SPANS_TIMEOUT_S)
    assert {service for service, _ in names} == SERVICES, f"trace {trace_id} has spans of {sorted(names)} only"
    assert wanted <= names, f"missing from trace {trace_id}: {sorted(wanted - names)}"

    spans = receiver.spans(trace_id)
    # The gateway continued the client's trace: its HTTP span's parent is the client's span.
    http_spans = [span for span in spans if span.service == "diffmesh-gateway" and span.parent_span_id == parent]
    assert [span.name.split()[0] for span in http_spans] == ["POST"]
    # The job runs under the request's span, and the stage calls under the job's.
    jobs = [span for span in spans if span.name == "diffmesh.job"]
    assert len(jobs) == 1 and jobs[0].parent_span_id == http_spans[0].span_id
    encode_client = next(span for span in spans if span.service == "diffmesh-gateway"
                         and span.name == "/diffmesh.v1.Encoder/Encode")
    assert encode_client.parent_span_id == jobs[0].span_id
    # The stages' own phases are spans too, children of their server spans.
    server_spans = {span.span_id: span for span in spans if span.name.startswith("/diffmesh.v1.")}
    for service, phase in [("diffmesh-encoder", "diffmesh.encode"), ("diffmesh-decoder", "diffmesh.decode"),
                           ("diffmesh-decoder", "diffmesh.media_encode")]:
        found = [span for span in spans if (span.service, span.name) == (service, phase)]
        assert len(found) == 1 and server_spans[found[0].parent_span_id].service == service, (service, phase)


# -- (b) metrics ---------------------------------------------------------------------------------------------------

def scrape(url: str) -> dict[tuple[str, frozenset], float]:
    reply = httpx.get(url, timeout=10)
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/plain")
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(reply.text) for sample in family.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def moved(before: dict, after: dict, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def wait_until_idle(metrics_urls: dict[str, str], timeout: float = 60) -> None:
    """The session mesh may still run a job an earlier test left (cancelled, or not waited for): counts are exact
    only once nothing runs or waits anywhere."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        gateway = scrape(metrics_urls["gateway"])
        busy = sum(v for (name, labels), v in gateway.items() if name == "diffmesh_jobs"
                   and dict(labels).get("status") in ("queued", "in_progress"))
        for stage in ("encoder", "denoiser", "decoder"):
            samples = scrape(metrics_urls[stage])
            busy += sum(v for (name, _), v in samples.items()
                        if name in ("diffmesh_stage_requests_running", "diffmesh_stage_requests_queued"))
        if busy == 0:
            return
        time.sleep(0.2)
    raise AssertionError("the mesh never went idle")


def test_every_stage_and_the_gateway_count_rest_and_grpc_images_and_videos(traced_mesh, metrics_urls):
    model = traced_mesh.model
    wait_until_idle(metrics_urls)
    before = {server: scrape(url) for server, url in metrics_urls.items()}
    post_image(traced_mesh, steps=2)
    run_video(traced_mesh, steps=2)
    grpc_generate(traced_mesh, steps=3)
    time.sleep(0.5)     # the video's last job writes land a moment after its status reads completed
    after = {server: scrape(url) for server, url in metrics_urls.items()}

    encoder, denoiser, decoder, gateway = (after[s] for s in ("encoder", "denoiser", "decoder", "gateway"))
    assert moved(before["encoder"], encoder, "diffmesh_encode_seconds_count", model=model) == 3
    assert moved(before["denoiser"], denoiser, "diffmesh_denoise_seconds_count", model=model) == 3
    assert moved(before["denoiser"], denoiser, "diffmesh_denoise_step_seconds_count", model=model) == 2 + 2 + 3
    assert moved(before["decoder"], decoder, "diffmesh_decode_seconds_count", model=model) == 3
    assert moved(before["decoder"], decoder, "diffmesh_media_encode_seconds_count", model=model, format="png") == 2
    assert moved(before["decoder"], decoder, "diffmesh_media_encode_seconds_count", model=model, format="mp4") == 1
    for server, samples, method in [("encoder", encoder, "Encode"), ("denoiser", denoiser, "Denoise"),
                                    ("decoder", decoder, "Decode")]:
        assert moved(before[server], samples, "diffmesh_grpc_requests_total", service=server, method=method,
                     code="OK") == 3
        assert value(samples, "diffmesh_stage_requests_running", stage=server, model=model) == 0
        assert value(samples, "diffmesh_stage_requests_queued", stage=server, model=model) == 0
        # On CPU the device is host memory: the process's resident set, in use and peak.
        in_use = value(samples, "diffmesh_device_memory_bytes", stage=server, device="cpu", source="rss")
        assert 0 < in_use <= value(samples, "diffmesh_device_memory_peak_bytes", stage=server, device="cpu",
                                   source="rss")
        build = [labels for (name, labels) in samples if name == "diffmesh_build_info"]
        assert len(build) == 1 and {("service", server), ("version", "0.1.0")} <= build[0]
        assert dict(build[0])["torch"].startswith("2.") and dict(build[0])["diffusers"] != "none"

    for kind, api in [("image", "rest"), ("video", "rest"), ("image", "grpc")]:
        labels = dict(model=model, kind=kind, api=api)
        assert moved(before["gateway"], gateway, "diffmesh_generation_seconds_count", **labels) == 1, labels
        assert moved(before["gateway"], gateway, "diffmesh_job_queued_seconds_count", **labels) == 1, labels
        assert moved(before["gateway"], gateway, "diffmesh_jobs_finished_total", **labels, status="completed",
                     code="OK") == 1, labels
    assert moved(before["gateway"], gateway, "diffmesh_grpc_requests_total", service="gateway", method="Generate",
                 code="OK") == 1
    assert moved(before["gateway"], gateway, "diffmesh_http_requests_total", route="/v1/images/generations",
                 status="200") == 1
    assert value(gateway, "diffmesh_jobs", model=model, status="queued") == 0
    assert value(gateway, "diffmesh_jobs", model=model, status="in_progress") == 0


def test_a_refused_request_counts_as_a_rejection_naming_its_field(traced_mesh, metrics_urls):
    before = scrape(metrics_urls["gateway"])
    stub = traced_mesh.gateway_stub()
    with pytest.raises(grpc.RpcError) as raised:
        list(stub.Generate(gateway_pb2.GenerateRequest(prompt="a cat", width=33, height=32), timeout=30))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    after = scrape(metrics_urls["gateway"])
    assert moved(before, after, "diffmesh_rejections_total", service="gateway", code="INVALID_ARGUMENT",
                 reason="width") == 1
    assert moved(before, after, "diffmesh_grpc_requests_total", service="gateway", method="Generate",
                 code="INVALID_ARGUMENT") == 1


# -- request ids -------------------------------------------------------------------------------------------------

def test_rest_echoes_the_clients_request_id_or_a_new_one_on_every_response(traced_mesh):
    given = post_image(traced_mesh, steps=1, headers={"x-request-id": "obs-rest-1"})
    assert given.headers["x-request-id"] == "obs-rest-1"
    drawn = post_image(traced_mesh, steps=1)
    assert re.fullmatch(r"[0-9a-f]{16}", drawn.headers["x-request-id"])
    # Errors too: an unknown route, a bad body.
    for reply in (httpx.get(f"{traced_mesh.http_url}/v1/nothing-here", headers={"x-request-id": "obs-404"}),
                  httpx.post(f"{traced_mesh.http_url}/v1/images/generations", json={"size": "32x32"},
                             headers={"x-request-id": "obs-400"})):
        assert reply.status_code in (400, 404) and reply.headers["x-request-id"] == f"obs-{reply.status_code}"
    # The id the client sees is the one the services log under, with an access line for the request.
    deadline = time.monotonic() + 5
    wanted = ("request_id=obs-rest-1 diffmesh.access: http POST /v1/images/generations 200",
              "service=denoiser rank=0 request_id=obs-rest-1")
    while not all(any(w in line for line in traced_mesh.log) for w in wanted) and time.monotonic() < deadline:
        time.sleep(0.05)
    for w in wanted:
        assert any(w in line for line in traced_mesh.log), w


def test_grpc_echoes_the_request_id_in_initial_metadata(traced_mesh):
    call = grpc_generate(traced_mesh, steps=1, request_id="obs-grpc-1")
    assert dict(call.initial_metadata())["x-request-id"] == "obs-grpc-1"
    with grpc.insecure_channel(traced_mesh.stages["denoiser"]) as channel:
        _, call = denoiser_pb2_grpc.DenoiserStub(channel).Describe.with_call(denoiser_pb2.DescribeRequest(),
                                                                            timeout=10)
    assert re.fullmatch(r"[0-9a-f]{16}", dict(call.initial_metadata())["x-request-id"])


# -- (c) the gateway's gRPC health follows its stages --------------------------------------------------------------

class HealthWatch:
    """The gateway's health for one service name, as its Watch stream reports it, with when each change came."""

    def __init__(self, address: str, service: str = "") -> None:
        self.channel = grpc.insecure_channel(address)
        self.changes: list[tuple[float, int]] = []
        self._changed = threading.Condition()
        self._stream = health_pb2_grpc.HealthStub(self.channel).Watch(health_pb2.HealthCheckRequest(service=service))
        threading.Thread(target=self._follow, daemon=True).start()

    def _follow(self) -> None:
        try:
            for reply in self._stream:
                with self._changed:
                    self.changes.append((time.monotonic(), reply.status))
                    self._changed.notify_all()
        except grpc.RpcError:
            pass

    def wait_for(self, status: int, timeout_s: float) -> float | None:
        """When the status last became `status` (waiting up to `timeout_s` for it); None if it did not."""
        with self._changed:
            self._changed.wait_for(lambda: self.changes and self.changes[-1][1] == status, timeout_s)
            return self.changes[-1][0] if self.changes and self.changes[-1][1] == status else None

    def close(self) -> None:
        self._stream.cancel()
        self.channel.close()


def check(address: str, service: str) -> int:
    with grpc.insecure_channel(address) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                         timeout=5).status


def test_gateway_health_is_not_serving_while_a_stage_is_down_and_serving_once_it_returns(
        traced_mesh, tmp_path_factory):
    root = tmp_path_factory.mktemp("health")
    encoder = Replica(traced_mesh.model_dir, traced_mesh.model, free_port(), root / "encoder.log",
                      module="services.encoder.server")
    encoder.start()
    gateway = None
    watch = None
    try:
        # The gateway starts while the encoder loads; it is SERVING once the encoder is.
        gateway, grpc_address, _ = start_gateway(root, traced_mesh, log=root / "gateway.log",
                                                 encoder=encoder.address)
        watch = HealthWatch(grpc_address)
        encoder.wait_serving()
        assert watch.wait_for(health_pb2.HealthCheckResponse.SERVING, 15) is not None, watch.changes

        stopped = time.monotonic()
        encoder.stop(signal.SIGKILL)        # a crash: no drain, nothing said; the gateway must notice
        went_down = watch.wait_for(health_pb2.HealthCheckResponse.NOT_SERVING, HEALTH_BOUND_S)
        assert went_down is not None, f"still SERVING {HEALTH_BOUND_S}s after the encoder died: {watch.changes}"
        print(f"NOT_SERVING {went_down - stopped:.2f}s after the encoder was killed")
        for name in ("diffmesh.v1.Gateway", f"diffmesh.v1.Gateway/{traced_mesh.model}"):
            assert check(grpc_address, name) == health_pb2.HealthCheckResponse.NOT_SERVING, name
        # A liveness probe must not restart a gateway whose stage is down.
        assert check(grpc_address, "liveness") == health_pb2.HealthCheckResponse.SERVING

        encoder.start()
        back_at = encoder.wait_serving()
        came_back = watch.wait_for(health_pb2.HealthCheckResponse.SERVING, HEALTH_BOUND_S)
        assert came_back is not None, f"not SERVING {HEALTH_BOUND_S}s after the encoder returned: {watch.changes}"
        print(f"SERVING {max(0.0, came_back - back_at):.2f}s after the encoder reported SERVING")
        assert check(grpc_address, f"diffmesh.v1.Gateway/{traced_mesh.model}") == \
            health_pb2.HealthCheckResponse.SERVING
    finally:
        if watch is not None:
            watch.close()
        if gateway is not None:
            gateway.terminate()
            assert gateway.wait(timeout=30) == 0
        if encoder.process is not None and encoder.process.poll() is None:
            encoder.process.kill()
            encoder.process.wait()
