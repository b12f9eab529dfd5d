"""`diffmesh up` leaves no server behind however it dies, and `diffmesh generate` writes its file."""

from __future__ import annotations

import subprocess
import sys
import time

import grpc
import imageio_ffmpeg
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .conftest import mesh_ports, start_mesh, wait_ports_free


def test_up_killed_leaves_no_server_behind(model_dir):
    """However `diffmesh up` dies (SIGKILL: none of its own code runs), the servers it started end with it and free
    their ports. (A clean stop is checked by every mesh fixture's teardown, stop_mesh.)"""
    mesh = start_mesh(model_dir)
    ports = mesh_ports(mesh)
    mesh.process.kill()
    mesh.process.wait(timeout=10)
    started = time.monotonic()
    assert wait_ports_free(ports, 15) == [], "servers outlived diffmesh up"
    print(f"every server gone {time.monotonic() - started:.1f}s after diffmesh up was killed")
    for address in [mesh.grpc_address, *mesh.stages.values()]:
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
