"""Logs, metrics hooks, request ids, reflection and error details, on real loggers and an in-process grpc.aio server
(no network beyond loopback; the mesh-wide checks are tests/integration/test_observability.py)."""

from __future__ import annotations

import asyncio
import json
import logging
import re

import grpc
import pytest
import torch
from google.protobuf import descriptor_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_reflection.v1alpha import reflection_pb2
from grpc_status import rpc_status

from diffmesh.v1 import admission_pb2, admission_pb2_grpc
from services.common import logs, metrics, tracing
from services.common.errors import InvalidArgument, ResourceExhausted, from_rpc_error
from services.common.reflection import V1_SERVICE_NAME
from services.common.server import rpc_method, run_server, status_of


@pytest.fixture
def logging_restored():
    """configure() replaces the root handler and the module's choice; put both back after the test."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, logs._service, logs._rank, logs._format)
    yield
    root.handlers[:], level, logs._service, logs._rank, logs._format = saved
    root.setLevel(level)


def lines_of(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def test_json_log_lines_parse_and_carry_the_request_id(logging_restored, capsys):
    logs.configure("encoder", fmt="json")
    log = logging.getLogger("services.test")
    with logs.request_context("req-json-1"):
        log.info("encoding %d prompts", 2)
        logs.log_access("grpc", "Encode", "Encoder/Encode", "OK", 0.0123)
        try:
            raise ValueError("broken\nacross lines")
        except ValueError:
            log.exception("failed")
    log.warning("outside any request")
    records = [json.loads(line) for line in lines_of(capsys)]     # one object a line, even with a traceback
    assert [r["message"] for r in records] == ["encoding 2 prompts", "grpc Encode Encoder/Encode OK 12.3ms",
                                               "failed", "outside any request"]
    assert [r["request_id"] for r in records] == ["req-json-1"] * 3 + ["-"]
    assert {r["service"] for r in records} == {"encoder"} and records[0]["level"] == "INFO"
    access = records[1]
    assert (access["logger"], access["protocol"], access["method"], access["route"], access["status"],
            access["duration_ms"]) == ("diffmesh.access", "grpc", "Encode", "Encoder/Encode", "OK", 12.3)
    assert "ValueError: broken" in records[2]["exception"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", records[0]["time"])


def test_log_format_comes_from_the_flag_then_the_environment_then_text(logging_restored, capsys, monkeypatch):
    monkeypatch.setenv(logs.LOG_FORMAT_ENV, "json")
    logs._format = None
    logs.configure("decoder")
    logging.getLogger("t").info("from env")
    assert json.loads(lines_of(capsys)[-1])["message"] == "from env"
    logs._format = None
    logs.configure("decoder", fmt="text")
    with logs.request_context("req-text"):
        logging.getLogger("t").info("from flag")
    assert "INFO service=decoder rank=0 request_id=req-text t: from flag" in lines_of(capsys)[-1]
    # A gang rank configuring again for its rank keeps the format the process chose.
    logs.configure("decoder", rank=0)
    logging.getLogger("t").info("kept")
    assert "request_id=- t: kept" in lines_of(capsys)[-1]
    monkeypatch.setenv(logs.LOG_FORMAT_ENV, "yaml")
    logs._format = None
    logs.configure("decoder")
    assert "is not one of text, json: logging as text" in lines_of(capsys)[-1]


def test_a_phase_is_observed_only_when_it_ends_well():
    with metrics.phase("encode", "unit-phase"):
        pass
    with pytest.raises(RuntimeError), metrics.phase("encode", "unit-phase"):
        raise RuntimeError("cancelled mid-way")
    assert sample(metrics.REGISTRY, "diffmesh_encode_seconds_count", model="unit-phase") == 1


def test_step_timer_observes_each_step_and_the_loop():
    timer = metrics.StepTimer("unit-steps")
    for _ in range(4):
        timer.lap()
    timer.done()
    assert sample(metrics.REGISTRY, "diffmesh_denoise_step_seconds_count", model="unit-steps") == 4
    assert sample(metrics.REGISTRY, "diffmesh_denoise_seconds_count", model="unit-steps") == 1


def sample(registry, name: str, **labels) -> float:
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def test_tracing_is_not_set_up_without_an_endpoint(monkeypatch):
    for name in tracing.ENDPOINT_ENVS:
        monkeypatch.delenv(name, raising=False)
    assert tracing.setup_tracing("unit") is False and not tracing.enabled()
    assert grpc.aio.server.__module__ == "grpc.aio._server"      # no instrumentation wrapped in
    assert tracing.carrier() == {}
    with tracing.span("nothing"), tracing.resumed({"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"}, "x"):
        pass


def test_invalid_argument_carries_a_bad_request_naming_the_field():
    status = status_of(InvalidArgument("width", "33 is not a multiple of 16"))
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT and status.details == "width: 33 is not a multiple of 16"
    rich = dict(status.trailing_metadata)["grpc-status-details-bin"]
    details = status_pb2.Status.FromString(rich).details
    bad_request = error_details_pb2.BadRequest()
    assert len(details) == 1 and details[0].Unpack(bad_request)
    assert [(v.field, v.description) for v in bad_request.field_violations] == [("width", "33 is not a multiple of 16")]
    retry = status_pb2.Status.FromString(dict(status_of(ResourceExhausted("full", 2.5)).trailing_metadata)[
        "grpc-status-details-bin"]).details
    info = error_details_pb2.RetryInfo()
    assert retry[0].Unpack(info) and info.retry_delay.ToTimedelta().total_seconds() == 2.5


class EchoingAdmission(admission_pb2_grpc.AdmissionServicer):
    """A servicer through the same boundary every diffmesh servicer uses (rpc_method)."""

    @rpc_method
    async def GetCapacity(self, request, context):
        if dict(context.invocation_metadata()).get("refuse"):
            raise InvalidArgument("max_queue", "refused for the test")
        if dict(context.invocation_metadata()).get("out-of-memory"):
            # PyTorch's own error, as a CUDA or XPU allocation raises it (none can be made to fail on this machine).
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total "
                                         "capacity of 139.80 GiB of which 1.20 GiB is free.")
        return admission_pb2.Capacity(concurrency=1, max_queue=2, in_flight=0)


async def with_server(client) -> None:
    """Run `client(address)` against an in-process run_server serving EchoingAdmission."""
    stop = asyncio.Event()
    started: asyncio.Future = asyncio.get_running_loop().create_future()
    serving = asyncio.ensure_future(run_server(
        services=[(admission_pb2_grpc.add_AdmissionServicer_to_server, EchoingAdmission(), "diffmesh.v1.Admission")],
        host="127.0.0.1", port=0, grace_seconds=0, stop_event=stop, handle_signals=False,
        on_started=started.set_result))
    try:
        port = await asyncio.wait_for(started, 10)
        await client(f"127.0.0.1:{port}")
    finally:
        stop.set()
        await serving


def test_a_device_out_of_memory_is_resource_exhausted_with_a_retry_hint_not_internal(logging_restored, capsys):
    """The request did not fit in the device memory free just then: the client gets RESOURCE_EXHAUSTED naming the
    service and what to change, with RetryInfo (the gateway's 429 + Retry-After); PyTorch's message goes to the log."""
    logs.configure("unit-oom", fmt="json")

    async def client(address: str) -> None:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = admission_pb2_grpc.AdmissionStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await stub.GetCapacity(admission_pb2.GetCapacityRequest(), metadata=(("out-of-memory", "1"),))
            assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert raised.value.details().startswith("unit-oom: out of device memory for this request")
            assert "Traceback" not in raised.value.details() and "20.00 GiB" not in raised.value.details()
            status = rpc_status.from_call(raised.value)
            retry = [detail for detail in status.details if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR)]
            info = error_details_pb2.RetryInfo()
            assert retry and retry[0].Unpack(info) and info.retry_delay.ToTimedelta().total_seconds() == 5.0
            # The gateway's translation keeps the stage's delay (its jobs wait that long; REST's Retry-After says it).
            mapped = from_rpc_error("denoiser", raised.value)
            assert type(mapped) is ResourceExhausted and mapped.retry_after_s == 5.0
            assert mapped.message.startswith("denoiser: unit-oom: out of device memory")

    asyncio.run(with_server(client))
    records = [json.loads(line) for line in lines_of(capsys)]
    assert any("Tried to allocate 20.00 GiB" in r["message"] and r["level"] == "WARNING" for r in records), records
    assert [r["status"] for r in records if r.get("logger") == "diffmesh.access"] == ["RESOURCE_EXHAUSTED"]


def test_reflection_v1_and_v1alpha_list_the_services_and_describe_them():
    async def client(address: str) -> None:
        async with grpc.aio.insecure_channel(address) as channel:
            for version in ("v1", "v1alpha"):
                info = channel.stream_stream(
                    f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
                    request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                    response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
                asks = [reflection_pb2.ServerReflectionRequest(list_services=""),
                        reflection_pb2.ServerReflectionRequest(file_containing_symbol="diffmesh.v1.Admission"),
                        reflection_pb2.ServerReflectionRequest(file_containing_symbol=V1_SERVICE_NAME)]
                replies = [reply async for reply in info(iter(asks))]
                names = {service.name for service in replies[0].list_services_response.service}
                assert names == {"diffmesh.v1.Admission", "grpc.health.v1.Health", V1_SERVICE_NAME,
                                 "grpc.reflection.v1alpha.ServerReflection"}, version
                files = [descriptor_pb2.FileDescriptorProto.FromString(data)
                         for data in replies[1].file_descriptor_response.file_descriptor_proto]
                assert any(f.package == "diffmesh.v1" and [s.name for s in f.service] == ["Admission"] for f in files)
                v1 = descriptor_pb2.FileDescriptorProto.FromString(
                    replies[2].file_descriptor_response.file_descriptor_proto[0])
                assert (v1.package, v1.service[0].name, v1.service[0].method[0].input_type) == (
                    "grpc.reflection.v1", "ServerReflection", ".grpc.reflection.v1.ServerReflectionRequest")

    asyncio.run(with_server(client))


def test_grpc_echoes_the_request_id_and_counts_the_call(logging_restored, capsys):
    logs.configure("unit-grpc", fmt="json")
    before = sample(metrics.REGISTRY, "diffmesh_grpc_requests_total", service="unit-grpc", method="GetCapacity",
                    code="OK")
    refused_before = sample(metrics.REGISTRY, "diffmesh_rejections_total", service="unit-grpc",
                            code="INVALID_ARGUMENT", reason="max_queue")

    async def client(address: str) -> None:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = admission_pb2_grpc.AdmissionStub(channel)
            call = stub.GetCapacity(admission_pb2.GetCapacityRequest(), metadata=(("x-request-id", "unit-id-7"),))
            assert (await call).max_queue == 2
            assert dict(await call.initial_metadata())["x-request-id"] == "unit-id-7"
            call = stub.GetCapacity(admission_pb2.GetCapacityRequest())
            await call
            assert re.fullmatch(r"[0-9a-f]{16}", dict(await call.initial_metadata())["x-request-id"])
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await stub.GetCapacity(admission_pb2.GetCapacityRequest(), metadata=(("refuse", "1"),))
            assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert rpc_status.from_call(raised.value) is not None

    asyncio.run(with_server(client))
    assert sample(metrics.REGISTRY, "diffmesh_grpc_requests_total", service="unit-grpc", method="GetCapacity",
                  code="OK") == before + 2
    assert sample(metrics.REGISTRY, "diffmesh_rejections_total", service="unit-grpc", code="INVALID_ARGUMENT",
                  reason="max_queue") == refused_before + 1
    access = [json.loads(line) for line in lines_of(capsys) if '"diffmesh.access"' in line]
    assert [(a["request_id"], a["status"]) for a in access][:1] == [("unit-id-7", "OK")]
    assert [a["status"] for a in access] == ["OK", "OK", "INVALID_ARGUMENT"]
