"""A stage that is down gives UNAVAILABLE / 503 naming it, quickly; a pool fails over to a live replica."""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys
import time

import grpc
import httpx
import pytest

from diffmesh.v1 import gateway_pb2, gateway_pb2_grpc

from .conftest import free_port

BOUND_S = 15.0


def start_gateway(tmp_path: pathlib.Path, mesh, extra: tuple[str, ...] = (), log: pathlib.Path | None = None,
                  **stages: str) -> tuple[subprocess.Popen, str, str]:
    """A lone gateway in front of the mesh's stages (or those given); its output goes to `log` when given."""
    port_file = tmp_path / f"gateway-{time.monotonic_ns()}"
    addresses = {**mesh.stages, **stages}
    process = subprocess.Popen(
        [sys.executable, "-m", "services.gateway.server", "--grpc-port", "0", "--http-port", "0",
         "--model-name", mesh.model, "--port-file", str(port_file), "--grace", "1",
         "--data-dir", str(tmp_path / f"data-{port_file.name}"),
         *[f"--{stage}={address}" for stage, address in addresses.items()], *extra],
        env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=log.open("w") if log else subprocess.DEVNULL,
        stderr=subprocess.STDOUT if log else subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while not port_file.exists():
        assert process.poll() is None and time.monotonic() < deadline, "gateway did not start"
        time.sleep(0.1)
    grpc_port, http_port = port_file.read_text().split()
    return process, f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{http_port}"


@pytest.fixture
def gateway_factory(tmp_path, mesh):
    started: list[subprocess.Popen] = []

    def make(extra: tuple[str, ...] = (), **stages: str) -> tuple[str, str]:
        process, grpc_address, http_url = start_gateway(tmp_path, mesh, extra, **stages)
        started.append(process)
        return grpc_address, http_url

    yield make
    for process in started:
        process.terminate()
        assert process.wait(timeout=30) == 0


def small_request() -> gateway_pb2.GenerateRequest:
    return gateway_pb2.GenerateRequest(prompt="a cat", width=32, height=32, num_inference_steps=1)


@pytest.mark.parametrize("stage", ["encoder", "denoiser", "decoder"])
def test_stage_down_is_unavailable_naming_the_stage(gateway_factory, stage):
    grpc_address, http_url = gateway_factory(**{stage: f"127.0.0.1:{free_port()}"})
    stub = gateway_pb2_grpc.GatewayStub(grpc.insecure_channel(grpc_address))
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as raised:
        list(stub.Generate(small_request(), timeout=60))
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert stage in raised.value.details()
    assert time.monotonic() - started < BOUND_S

    reply = httpx.post(f"{http_url}/v1/images/generations", json={"prompt": "a cat", "size": "32x32",
                                                                   "num_inference_steps": 1}, timeout=60)
    assert reply.status_code == 503 and stage in reply.json()["error"]["message"]
    health = httpx.get(f"{http_url}/health", timeout=30)
    assert health.status_code == 503 and health.json()["stages"][stage] is False


def test_pool_fails_over_to_a_live_replica(gateway_factory, mesh):
    dead = f"127.0.0.1:{free_port()}"
    grpc_address, http_url = gateway_factory(encoder=f"{dead},{mesh.stages['encoder']}",
                                             decoder=f"{dead},{mesh.stages['decoder']}")
    stub = gateway_pb2_grpc.GatewayStub(grpc.insecure_channel(grpc_address))
    for _ in range(3):  # whichever replica is tried first, every request succeeds
        kinds = [event.WhichOneof("item") for event in stub.Generate(small_request(), timeout=120)]
        assert kinds[-1] == "completed" and "media" in kinds
    assert httpx.get(f"{http_url}/health", timeout=30).status_code == 200


@pytest.fixture
def hung_address():
    """A peer that accepts TCP connections and never says a word: the kernel completes the handshake for a
    listening socket, so gRPC connects and then waits for an HTTP/2 reply that never comes."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield f"127.0.0.1:{listener.getsockname()[1]}"


def test_hung_stage_is_unavailable_naming_it(gateway_factory, hung_address):
    grpc_address, _ = gateway_factory(extra=("--stage-stall-timeout", "2"), encoder=hung_address)
    stub = gateway_pb2_grpc.GatewayStub(grpc.insecure_channel(grpc_address))
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as raised:
        list(stub.Generate(small_request(), timeout=60))
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    # Refused before it is accepted: its health never answers, so no encoder replica is serving.
    assert "encoder stage unavailable: no replica is serving" in raised.value.details()
    assert time.monotonic() - started < BOUND_S


def test_pool_skips_a_hung_replica(gateway_factory, hung_address, mesh):
    grpc_address, _ = gateway_factory(extra=("--stage-stall-timeout", "2"),
                                      decoder=f"{hung_address},{mesh.stages['decoder']}")
    stub = gateway_pb2_grpc.GatewayStub(grpc.insecure_channel(grpc_address))
    for _ in range(2):
        kinds = [event.WhichOneof("item") for event in stub.Generate(small_request(), timeout=60)]
        assert kinds[-1] == "completed" and "media" in kinds
