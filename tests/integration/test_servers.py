"""Every server speaks health and reflection; stages validate what they receive; cancellation stops work."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from diffmesh.v1 import denoiser_pb2, denoiser_pb2_grpc, gateway_pb2, tensor_pb2

SERVICES = {"encoder": "diffmesh.v1.Encoder", "denoiser": "diffmesh.v1.Denoiser",
            "decoder": "diffmesh.v1.Decoder", "gateway": "diffmesh.v1.Gateway"}


def address_of(mesh, server: str) -> str:
    return mesh.grpc_address if server == "gateway" else mesh.stages[server]


@pytest.mark.parametrize("server", sorted(SERVICES))
def test_server_reports_serving_and_lists_its_service_by_reflection(mesh, server):
    channel = grpc.insecure_channel(address_of(mesh, server))
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", SERVICES[server]):
        # The gateway's status mirrors its stages' every 0.25 s (services/gateway/health.py): right after `up` it may
        # still read NOT_SERVING for that long.
        deadline = time.monotonic() + 5
        while (reply := health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)).status != \
                health_pb2.HealthCheckResponse.SERVING and time.monotonic() < deadline:
            time.sleep(0.05)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                              timeout=10)
    names = {service.name for reply in replies for service in reply.list_services_response.service}
    assert {SERVICES[server], "grpc.health.v1.Health"} <= names


def denoise(mesh, *chunks: tensor_pb2.TensorChunk, **params):
    stub = denoiser_pb2_grpc.DenoiserStub(grpc.insecure_channel(mesh.stages["denoiser"]))
    values = dict(width=32, height=32, num_frames=1, num_inference_steps=1, guidance_scale=1.0, seed=0)
    values.update(params)
    messages = [denoiser_pb2.DenoiseRequest(params=denoiser_pb2.DenoiseParams(**values))]
    messages += [denoiser_pb2.DenoiseRequest(tensor=chunk) for chunk in chunks]
    return list(stub.Denoise(iter(messages), timeout=60))


@pytest.mark.parametrize("chunk,named", [
    (tensor_pb2.TensorChunk(name="prompt_embeds", dtype="float32", shape=[1, 4, 32], data=b"abc", last=True),
     "prompt_embeds"),
    (tensor_pb2.TensorChunk(name="prompt_embeds", dtype="complex64", shape=[1, 4, 32], data=b"", last=True),
     "dtype"),
    (tensor_pb2.TensorChunk(name="prompt_embeds", dtype="float32", shape=[1, 4, 7], data=bytes(112), last=True),
     "prompt_embeds"),
    (tensor_pb2.TensorChunk(name="secret", dtype="float32", shape=[1], data=bytes(4), last=True), "secret"),
])
def test_stage_rejects_a_malformed_tensor_naming_it(mesh, chunk, named):
    with pytest.raises(grpc.RpcError) as raised:
        denoise(mesh, chunk)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert named in raised.value.details()


def test_stage_rejects_bad_params_and_unknown_model(mesh):
    embeds = tensor_pb2.TensorChunk(name="prompt_embeds", dtype="float32", shape=[1, 4, 32], data=bytes(512),
                                    last=True)
    with pytest.raises(grpc.RpcError) as raised:
        denoise(mesh, embeds, width=40)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "width" in raised.value.details()
    with pytest.raises(grpc.RpcError) as raised:
        denoise(mesh, embeds, model="other-model")
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    events = denoise(mesh, embeds)  # the same stage still serves a good request
    assert [e.WhichOneof("item") for e in events][:1] == ["progress"] and events[-1].tensor.last


def test_cancel_job_stops_a_running_generation_and_the_mesh_serves_on(mesh):
    stub = mesh.gateway_stub()
    call = stub.Generate(gateway_pb2.GenerateRequest(prompt="long", width=256, height=256, num_frames=33,
                                                     num_inference_steps=200, seed=1), timeout=300)
    job_id, steps_seen = "", 0
    with pytest.raises(grpc.RpcError) as raised:
        for event in call:
            kind = event.WhichOneof("item")
            if kind == "accepted":
                job_id = event.accepted.job_id
            elif kind == "progress" and event.progress.stage == "denoise":
                steps_seen += 1
                if steps_seen == 2:
                    threading.Thread(target=stub.CancelJob, args=(gateway_pb2.CancelJobRequest(job_id=job_id),),
                                     kwargs={"timeout": 10}).start()
    assert raised.value.code() == grpc.StatusCode.CANCELLED
    assert steps_seen < 200
    job = stub.GetJob(gateway_pb2.GetJobRequest(job_id=job_id), timeout=10)
    assert job.status == gateway_pb2.JOB_STATUS_CANCELLED
    events = list(stub.Generate(gateway_pb2.GenerateRequest(prompt="next", width=32, height=32,
                                                            num_inference_steps=1), timeout=120))
    assert events[-1].WhichOneof("item") == "completed"


def wait_for_log(mesh, *needles: str, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in list(mesh.log):
            if all(needle in line for needle in needles):
                return line
        time.sleep(0.1)
    raise AssertionError(f"no log line with {needles}")


def long_request(request_id: str) -> gateway_pb2.GenerateRequest:
    return gateway_pb2.GenerateRequest(prompt="long", width=256, height=256, num_frames=33,
                                       num_inference_steps=200, seed=1, request_id=request_id)


def test_client_cancelling_the_stream_stops_the_denoiser(mesh):
    stub = mesh.gateway_stub()
    call = stub.Generate(long_request("client-cancel-1"), timeout=300)
    job_id = ""
    for event in call:
        if event.WhichOneof("item") == "accepted":
            job_id = event.accepted.job_id
        if event.WhichOneof("item") == "progress" and event.progress.stage == "denoise":
            call.cancel()
            break
    wait_for_log(mesh, "service=denoiser", "request_id=client-cancel-1", "cancelled")
    deadline = time.monotonic() + 10
    while stub.GetJob(gateway_pb2.GetJobRequest(job_id=job_id), timeout=10).status != \
            gateway_pb2.JOB_STATUS_CANCELLED:
        assert time.monotonic() < deadline, "job never reported cancelled"
        time.sleep(0.1)


def test_client_deadline_is_passed_down_to_the_stages(mesh):
    stub = mesh.gateway_stub()
    with pytest.raises(grpc.RpcError) as raised:
        list(stub.Generate(long_request("deadline-1"), timeout=3))
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # The denoiser saw the deadline too and stopped, rather than finishing 200 steps for nobody.
    wait_for_log(mesh, "service=denoiser", "request_id=deadline-1", "cancelled")
