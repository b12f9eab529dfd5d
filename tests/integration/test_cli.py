"""`diffmesh up` stops every service it started on SIGTERM, and `diffmesh generate` writes its file."""

from __future__ import annotations

import signal
import subprocess
import sys

import grpc
import imageio_ffmpeg
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .conftest import start_mesh


def test_up_stops_every_service_on_sigterm(model_dir):
    mesh = start_mesh(model_dir)
    addresses = [mesh.grpc_address, *mesh.stages.values()]
    mesh.process.send_signal(signal.SIGTERM)
    assert mesh.process.wait(timeout=60) == 0
    for address in addresses:
        with grpc.insecure_channel(address) as channel, pytest.raises(grpc.RpcError) as raised:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=3)
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE


def test_generate_writes_an_mp4_with_the_requested_frames(mesh, tmp_path):
    output = tmp_path / "clip.mp4"
    done = subprocess.run(
        [sys.executable, "-m", "diffmesh.cli", "generate", "--gateway", mesh.grpc_address, "--prompt", "waves",
         "--size", "48x32", "--frames", "9", "--steps", "2", "--seed", "4", "-o", str(output)],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "seed 4" in done.stdout
    frames, _ = imageio_ffmpeg.count_frames_and_secs(str(output))
    assert frames == 9


def test_generate_reports_a_bad_request_without_a_traceback(mesh, tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "diffmesh.cli", "generate", "--gateway", mesh.grpc_address, "--prompt", "x",
         "--size", "50x32", "-o", str(tmp_path / "x.png")],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 1
    assert "INVALID_ARGUMENT" in done.stderr and "width" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("argv", [
    ["serve", "encoder", "--port", "{busy}"],
    ["serve", "gateway", "--grpc-port", "0", "--http-port", "{busy}"],
    ["serve", "decoder", "--model", "/nonexistent/model"],
])
def test_a_server_that_cannot_start_says_why_in_one_line(model_dir, argv):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        args = [a.replace("{busy}", str(busy.getsockname()[1])) for a in argv]
        if args[1] != "gateway" and "--model" not in args:
            args += ["--model", str(model_dir)]
        done = subprocess.run([sys.executable, "-m", "diffmesh.cli", *args], capture_output=True, text=True,
                              timeout=120)
    assert done.returncode == 1
    assert "cannot start:" in done.stderr and "Traceback" not in done.stderr
