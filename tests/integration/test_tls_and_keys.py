"""Transport security and API keys against the real processes: one `diffmesh up --tls` with three API keys and a
rate limit (mutual TLS between the gateway and the stages on a development CA), shared by every test here."""

from __future__ import annotations

import http.client
import json
import ssl
import time
import urllib.error
import urllib.request
import uuid

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from diffmesh.client import GatewayClient
from diffmesh.v1 import gateway_pb2, gateway_pb2_grpc
from services.common.devca import make_dev_ca
from tests.integration.conftest import RunningMesh, start_mesh, stop_mesh

KEY_A, KEY_B, KEY_RATE = "key-a-" + uuid.uuid4().hex, "key-b-" + uuid.uuid4().hex, "key-rate-" + uuid.uuid4().hex
RATE_PER_MINUTE = 20
STAGE_SERVICES = ("service=encoder", "service=denoiser", "service=decoder")


@pytest.fixture(scope="module")
def tls_mesh(model_dir, tmp_path_factory):
    ca_dir = tmp_path_factory.mktemp("dev-ca")
    running = start_mesh(model_dir, extra=["--tls", "--tls-dir", str(ca_dir), "--api-key", KEY_A, "--api-key", KEY_B,
                                           "--api-key", KEY_RATE, "--rate-limit", str(RATE_PER_MINUTE)])
    running.ca_dir = ca_dir
    yield running
    code = stop_mesh(running)
    assert code == 0, "diffmesh up --tls did not stop cleanly:\n" + "".join(running.log[-30:])


def https(mesh: RunningMesh, method: str, path: str, key: str | None = None, body: dict | None = None,
          headers: dict | None = None) -> tuple[int, dict, bytes]:
    """(status, headers, body) of one HTTPS request to the gateway, verified against the mesh's CA."""
    context = ssl.create_default_context(cafile=str(mesh.ca_dir / "ca.pem"))
    request = urllib.request.Request(mesh.http_url + path, method=method, headers=dict(headers or {}),
                                     data=None if body is None else json.dumps(body).encode())
    if body is not None:
        request.add_header("Content-Type", "application/json")
    if key is not None:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=60, context=context) as reply:
            return reply.status, dict(reply.headers), reply.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def gateway(mesh: RunningMesh) -> gateway_pb2_grpc.GatewayStub:
    credentials = grpc.ssl_channel_credentials((mesh.ca_dir / "ca.pem").read_bytes())
    return gateway_pb2_grpc.GatewayStub(grpc.secure_channel(mesh.grpc_address, credentials))


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


def stage_health(address: str, credentials: grpc.ChannelCredentials | None) -> grpc.StatusCode | int:
    """The stage's health status, or the gRPC code the call failed with."""
    channel = grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.RpcError as error:
            return error.code()
    return reply.status


def test_plaintext_clients_are_refused(tls_mesh):
    with grpc.insecure_channel(tls_mesh.grpc_address) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            gateway_pb2_grpc.GatewayStub(channel).ListModels(gateway_pb2.ListModelsRequest(), timeout=5,
                                                             metadata=bearer(KEY_A))
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    plain_url = tls_mesh.http_url.replace("https://", "http://")
    assert plain_url.startswith("http://")
    with pytest.raises((OSError, http.client.HTTPException)) as plain:      # the TLS server never answers HTTP
        urllib.request.urlopen(plain_url + "/health", timeout=5)
    assert not isinstance(plain.value, urllib.error.HTTPError), "a plaintext HTTP request got an HTTP answer"


def test_stages_refuse_clients_without_a_certificate_signed_by_the_mesh_ca(tls_mesh, tmp_path):
    ca = (tls_mesh.ca_dir / "ca.pem").read_bytes()
    other = make_dev_ca(tmp_path / "other-ca")
    cases = {
        "plaintext": None,
        "no client certificate": grpc.ssl_channel_credentials(ca),
        "a certificate from another CA": grpc.ssl_channel_credentials(
            ca, other.client_key.read_bytes(), other.client_cert.read_bytes()),
    }
    for stage, address in tls_mesh.stages.items():
        for case, credentials in cases.items():
            assert stage_health(address, credentials) == grpc.StatusCode.UNAVAILABLE, f"{stage} took {case}"
        signed = grpc.ssl_channel_credentials(ca, (tls_mesh.ca_dir / "client-key.pem").read_bytes(),
                                              (tls_mesh.ca_dir / "client.pem").read_bytes())
        assert stage_health(address, signed) == health_pb2.HealthCheckResponse.SERVING, stage


def test_a_generation_completes_over_tls_through_both_front_doors(tls_mesh):
    result = GatewayClient(tls_mesh.grpc_address, tls_ca=str(tls_mesh.ca_dir / "ca.pem"), api_key=KEY_A).generate(
        gateway_pb2.GenerateRequest(prompt="a fox over TLS", width=32, height=32, num_frames=1, seed=3), timeout=120)
    assert result.media and result.media[0][1].startswith(b"\x89PNG")
    status, _, body = https(tls_mesh, "POST", "/v1/images/generations", KEY_B, {"prompt": "a fox", "seed": 3})
    assert status == 200, body
    assert json.loads(body)["data"][0]["b64_json"]


def test_requests_without_a_valid_key_are_refused_before_any_work(tls_mesh):
    tag = uuid.uuid4().hex[:8]
    refused_ids = []
    for case, key in (("nokey", None), ("badkey", "not-a-key")):
        request_id = f"{case}-grpc-{tag}"
        refused_ids.append(request_id)
        with pytest.raises(grpc.RpcError) as refused:
            list(gateway(tls_mesh).Generate(
                gateway_pb2.GenerateRequest(prompt="x", request_id=request_id), timeout=30,
                metadata=(("x-request-id", request_id), *(bearer(key) if key else ()))))
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, case
        for path, body in (("/v1/images/generations", {"prompt": "x"}), ("/v1/videos", {"prompt": "x"}),
                           ("/v1/models", None)):
            request_id = f"{case}-rest-{tag}-{len(refused_ids)}"
            refused_ids.append(request_id)
            status, headers, reply = https(tls_mesh, "POST" if body else "GET", path, key, body,
                                           {"X-Request-Id": request_id})
            assert status == 401, (case, path, reply)
            assert json.loads(reply)["error"]["type"] == "authentication_error"
            assert headers.get("www-authenticate", headers.get("WWW-Authenticate")) == "Bearer"
    # Probes stay open.
    assert https(tls_mesh, "GET", "/health")[0] == 200
    assert https(tls_mesh, "GET", "/metrics")[0] == 200
    # A keyed request with its own id reaches every stage (each logs every call it serves, with the request id) ...
    keyed_id = f"keyed-{tag}"
    list(gateway(tls_mesh).Generate(gateway_pb2.GenerateRequest(prompt="x", request_id=keyed_id), timeout=120,
                                    metadata=(("x-request-id", keyed_id), *bearer(KEY_A))))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        seen = [line for line in list(tls_mesh.log) if f"request_id={keyed_id}" in line]
        if all(any(service in line for line in seen) for service in STAGE_SERVICES):
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the keyed request {keyed_id} never showed in the stages' logs")
    # ... while none of the refused ones reached any stage.
    stage_lines = [line for line in list(tls_mesh.log) if any(service in line for service in STAGE_SERVICES)]
    reached = [rid for rid in refused_ids if any(rid in line for line in stage_lines)]
    assert not reached, f"refused requests reached a stage: {reached}"


def test_a_key_sees_and_cancels_only_its_own_jobs(tls_mesh):
    status, _, body = https(tls_mesh, "POST", "/v1/videos", KEY_A,
                            {"prompt": "waves", "size": "32x32", "num_frames": 5, "seed": 1})
    assert status == 200, body
    video = json.loads(body)["id"]
    unknown = "video_" + "0" * 24
    for method, path in (("GET", f"/v1/videos/{video}"), ("GET", f"/v1/videos/{video}/content"),
                         ("DELETE", f"/v1/videos/{video}")):
        status, _, reply = https(tls_mesh, method, path, KEY_B)
        assert status == 404, (method, path, reply)
        # Exactly what a job that does not exist gets: nothing tells B that A's job is there.
        _, _, missing = https(tls_mesh, method, path.replace(video, unknown), KEY_B)
        assert json.loads(reply)["error"]["message"].replace(video, unknown) == json.loads(missing)["error"]["message"]
    deadline = time.monotonic() + 60
    while True:
        status, _, reply = https(tls_mesh, "GET", f"/v1/videos/{video}", KEY_A)
        assert status == 200, reply
        job = json.loads(reply)
        assert job["status"] != "failed", job    # B's DELETE did not cancel it
        if job["status"] == "completed" or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert job["status"] == "completed", job
    assert https(tls_mesh, "GET", f"/v1/videos/{video}/content", KEY_A)[0] == 200

    status, _, body = https(tls_mesh, "POST", "/v1/images/generations", KEY_A,
                            {"prompt": "a fox", "response_format": "url", "seed": 2})
    assert status == 200, body
    image_path = json.loads(body)["data"][0]["url"].split(tls_mesh.http_url, 1)[1]
    assert https(tls_mesh, "GET", image_path, KEY_B)[0] == 404
    assert https(tls_mesh, "GET", image_path, KEY_A)[0] == 200

    stub = gateway(tls_mesh)
    events = stub.Generate(gateway_pb2.GenerateRequest(prompt="x", width=32, height=32, num_frames=1),
                           timeout=120, metadata=bearer(KEY_A))
    job_id = next(iter(events)).accepted.job_id
    list(events)
    for call in (stub.GetJob, stub.CancelJob):
        request = (gateway_pb2.GetJobRequest if call is stub.GetJob else gateway_pb2.CancelJobRequest)(job_id=job_id)
        with pytest.raises(grpc.RpcError) as hidden:
            call(request, timeout=10, metadata=bearer(KEY_B))
        assert hidden.value.code() == grpc.StatusCode.NOT_FOUND
    assert stub.GetJob(gateway_pb2.GetJobRequest(job_id=job_id), timeout=10,
                       metadata=bearer(KEY_A)).status == gateway_pb2.JOB_STATUS_COMPLETED


def test_the_rate_limit_answers_429_with_retry_after(tls_mesh):
    # A fresh key's bucket holds RATE_PER_MINUTE requests and refills one every 60 / RATE_PER_MINUTE seconds.
    started, served = time.monotonic(), 0
    while (reply := https(tls_mesh, "GET", "/v1/videos/none", KEY_RATE))[0] == 404 and served < 3 * RATE_PER_MINUTE:
        served += 1
    status, headers, body = reply
    assert status == 429, body
    refilled = (time.monotonic() - started) * RATE_PER_MINUTE / 60
    assert RATE_PER_MINUTE <= served <= RATE_PER_MINUTE + refilled + 1
    assert json.loads(body)["error"]["type"] == "rate_limit_error"
    assert 1 <= int(headers["retry-after" if "retry-after" in headers else "Retry-After"]) <= 60 // RATE_PER_MINUTE
    with pytest.raises(grpc.RpcError) as limited:       # one bucket per key, whichever front door
        gateway(tls_mesh).ListModels(gateway_pb2.ListModelsRequest(), timeout=10, metadata=bearer(KEY_RATE))
    assert limited.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # Other keys are not slowed down by it.
    assert https(tls_mesh, "GET", "/v1/models", KEY_B)[0] == 200
