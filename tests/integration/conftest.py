"""Fixtures that run the real mesh: `diffmesh up` starting four services as separate processes on loopback."""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import grpc
import pytest

from diffmesh.v1 import gateway_pb2_grpc
from services.common.tiny.flux import write_tiny_flux, write_tiny_flux_schnell
from services.common.tiny_model import write_tiny_model

START_TIMEOUT_S = 240
FLUX_DEV, FLUX_SCHNELL = "flux-dev-tiny", "flux-schnell-tiny"
READY = re.compile(
    r"diffmesh is up: gateway grpc=(?P<grpc>\S+) http=(?P<http>\S+) model=(?P<model>\S+) "
    r"encoder=(?P<encoder>\S+) denoiser=(?P<denoiser>\S+) decoder=(?P<decoder>\S+)"
)


@dataclasses.dataclass
class RunningMesh:
    grpc_address: str
    http_url: str
    model: str
    model_dir: pathlib.Path
    stages: dict[str, str]
    process: subprocess.Popen
    log: list[str]

    def gateway_stub(self) -> gateway_pb2_grpc.GatewayStub:
        channel = grpc.insecure_channel(self.grpc_address, options=[("grpc.max_receive_message_length", 16 << 20)])
        return gateway_pb2_grpc.GatewayStub(channel)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mesh(model_dir: pathlib.Path, extra: list[str] | None = None,
               env: dict[str, str] | None = None, start_timeout_s: float = START_TIMEOUT_S) -> RunningMesh:
    """`diffmesh up` serving `model_dir` with `extra` flags, and `env` added to the environment of it and its
    services (e.g. OTEL_EXPORTER_OTLP_ENDPOINT); it must report ready within `start_timeout_s`."""
    # Its own jobs directory: no two test meshes (nor a developer's own `diffmesh up`) share jobs.
    data_dir = tempfile.mkdtemp(prefix="diffmesh-test-data-")
    argv = [sys.executable, "-m", "diffmesh.cli", "up", "--model", str(model_dir), "--grpc-port", "0",
            "--http-port", "0", "--default-size", "32x32", "--default-steps", "3", "--data-dir", data_dir,
            *(extra or [])]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    log: list[str] = []
    ready = threading.Event()
    match: dict[str, str] = {}

    def pump() -> None:
        for line in process.stdout:
            log.append(line)
            found = READY.search(line)
            if found:
                match.update(found.groupdict())
                ready.set()

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + start_timeout_s
    while not ready.wait(0.2):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError("diffmesh up failed to start:\n" + "".join(log[-50:]))
    return RunningMesh(
        grpc_address=match["grpc"], http_url=match["http"], model=match["model"], model_dir=model_dir,
        stages={stage: match[stage] for stage in ("encoder", "denoiser", "decoder")}, process=process, log=log,
    )


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # a closed listener's TIME_WAIT does not count
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def mesh_ports(mesh: RunningMesh) -> list[int]:
    """The ports of every server `diffmesh up` started (the gateway's two, each stage's)."""
    addresses = [mesh.grpc_address, mesh.http_url.removeprefix("http://"), *mesh.stages.values()]
    return [int(address.rsplit(":", 1)[1]) for address in addresses]


def wait_ports_free(ports: list[int], timeout: float) -> list[int]:
    """The ports still held once `timeout` has passed (empty: all freed)."""
    deadline = time.monotonic() + timeout
    while (held := [port for port in ports if not port_is_free(port)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return held


def stop_mesh(mesh: RunningMesh) -> int:
    """Stop `diffmesh up` as Ctrl-C does; once it has exited, every server it started is gone too."""
    mesh.process.send_signal(signal.SIGINT)
    try:
        code = mesh.process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        mesh.process.kill()
        raise
    assert wait_ports_free(mesh_ports(mesh), 5) == [], "diffmesh up exited leaving servers behind"
    return code


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> pathlib.Path:
    return write_tiny_model(tmp_path_factory.mktemp("models") / "wan2.1-tiny")


@pytest.fixture(scope="session")
def trace_receiver():
    """An OTLP receiver the session mesh exports its spans to (tests/integration/test_observability.py reads them)."""
    from tests.integration.otlp_receiver import TraceReceiver

    running = TraceReceiver().start()
    yield running
    running.stop()


@pytest.fixture(scope="session")
def mesh(model_dir, trace_receiver) -> RunningMesh:
    # Traced, so the observability tests need no mesh of their own (each start costs the CI machine ~30 s); the
    # families mesh and the other test meshes run with tracing off, the default.
    running = start_mesh(model_dir, env={"OTEL_EXPORTER_OTLP_ENDPOINT": trace_receiver.endpoint,
                                         "OTEL_BSP_SCHEDULE_DELAY": "100"})   # spans leave every 100 ms, not 5 s
    yield running
    code = stop_mesh(running)
    log_file = os.environ.get("DIFFMESH_TEST_MESH_LOG")
    if log_file:  # the services' own logs, for debugging a failed run
        pathlib.Path(log_file).write_text("".join(running.log))
    assert code == 0, "diffmesh up did not stop cleanly:\n" + "".join(running.log[-30:])


@pytest.fixture(scope="session")
def flux_dirs(tmp_path_factory) -> dict[str, pathlib.Path]:
    root = tmp_path_factory.mktemp("flux")
    return {FLUX_DEV: write_tiny_flux(root / FLUX_DEV), FLUX_SCHNELL: write_tiny_flux_schnell(root / FLUX_SCHNELL)}


@pytest.fixture(scope="session")
def families_mesh(model_dir, flux_dirs) -> RunningMesh:
    """One `diffmesh up` serving Wan2.1 T2V (the default), FLUX.1 dev and FLUX.1 schnell: the FLUX tests and the
    two-family tests share it (each mesh start costs the CI machine half a minute)."""
    running = start_mesh(model_dir, extra=[arg for path in flux_dirs.values() for arg in ("--model", str(path))])
    yield running
    code = stop_mesh(running)
    assert code == 0, "diffmesh up did not stop cleanly:\n" + "".join(running.log[-30:])
