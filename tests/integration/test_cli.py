"""The `diffmesh` command: `up` pins ports and leaves no server behind however it dies, `generate` writes its file
and Ctrl-C cancels its job, a bad value from a flag, the environment or a --config file is one line with exit 2 (a
usage error) or 1 (it could not run), `--version` and `serve --help` say what a user looks for."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import grpc
import imageio_ffmpeg
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from diffmesh import cli
from diffmesh.v1 import gateway_pb2

from .conftest import free_port, mesh_ports, start_mesh, wait_ports_free


def test_up_pins_stage_ports_and_killed_leaves_no_server_behind(model_dir):
    """`--encoder-port` & co. pin the stages' ports. However `diffmesh up` dies (SIGKILL: none of its own code runs),
    the servers it started end with it and free their ports. (A clean stop is checked by every mesh fixture's
    teardown, stop_mesh.)"""
    pinned = {stage: free_port() for stage in ("encoder", "denoiser", "decoder")}
    mesh = start_mesh(model_dir, extra=[arg for stage, port in pinned.items()
                                        for arg in (f"--{stage}-port", str(port))])
    assert mesh.stages == {stage: f"127.0.0.1:{port}" for stage, port in pinned.items()}
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
    ["serve", "decoder", "--config", "{config}"],          # model = "/nonexistent/model" in the stage's file
])
def test_a_server_that_cannot_start_says_why_in_one_line(model_dir, tmp_path, argv):
    import socket

    config = tmp_path / "decoder.toml"
    config.write_text('model = "/nonexistent/model"\nmax_queue = 2\n')
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        args = [a.replace("{busy}", str(busy.getsockname()[1])).replace("{config}", str(config)) for a in argv]
        if args[1] != "gateway" and "--model" not in args and "--config" not in args:
            args += ["--model", str(model_dir)]
        done = subprocess.run([sys.executable, "-m", "diffmesh.cli", *args], capture_output=True, text=True,
                              timeout=120)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    lines = ours(done.stderr).splitlines()
    assert "cannot start:" in lines[-1], done.stderr
    if "{busy}" not in argv:        # a bad --model, by flag or in the file: that one line is all (bar INFO lines)
        assert [line for line in lines if " INFO " not in line] == [lines[-1]], done.stderr
        assert "/nonexistent/model is not a diffusers model directory" in lines[-1]


@pytest.mark.parametrize("flags,message", [
    (["--compile-vae", "--devices", "2"], "--compile-vae with --devices 2: a decoder gang's row split is untried"),
    (["--compile-vae", "--vae-warmup-sizes", "50x32x9"], "--vae-warmup-sizes 50x32x9: width: 50 must be a multiple"),
])
def test_a_compiled_vae_that_cannot_work_fails_start_up_in_one_line(model_dir, flags, message):
    done = subprocess.run([sys.executable, "-m", "diffmesh.cli", "serve", "decoder", "--model", str(model_dir),
                           "--device", "cpu", "--port", "0", *flags], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert f"cannot start: {message}" in ours(done.stderr).splitlines()[-1], done.stderr


def ours(stderr: str) -> str:
    """stderr without what transformers prints on its first import on this machine (it has no torchvision): the
    lines diffmesh itself wrote."""
    return "".join(line for line in stderr.splitlines(keepends=True) if not line.startswith("[transformers]"))


def run_cli(capsys, argv: list[str]) -> tuple[int, str, str]:
    """`diffmesh ARGV` in this process: the console script's code path (`sys.exit(main())`) without another
    interpreter's seconds of imports. Returns (exit status, stdout, our stderr)."""
    try:
        code = cli.main(argv)
    except SystemExit as exited:
        code = exited.code
    out, err = capsys.readouterr()
    return code, out, ours(err)


@pytest.mark.parametrize(("argv", "code", "message"), [
    (["generate", "--prompt", "x", "--size", "64", "-o", "x.png"], 2,
     "diffmesh generate: error: argument --size: '64' is not WIDTHxHEIGHT, e.g. 832x480"),
    (["generate", "--prompt", "x", "-o", "x.jpg"], 2, "'x.jpg' must end in .png (an image) or .mp4 (a video)"),
    (["generate", "-o", "x.png"], 2, "--prompt is required"),
    (["up", "--default-size", "64"], 2, "diffmesh up: error: argument --default-size: '64' is not WIDTHxHEIGHT"),
    (["up", "--model", "/nonexistent/model"], 1,
     "diffmesh up failed: /nonexistent/model is not a diffusers model directory: no model_index.json"),
    (["up", "--encoder-port", "6001", "--model", "a", "--model", "b"], 2, "give them with one --model only"),
    (["up", "--devices", "two"], 2, "argument --devices: invalid int value: 'two'"),
    (["serve", "gateway", "--default-size", "64"], 2,
     "diffmesh serve gateway: error: --default-size: '64' is not of the form WIDTHxHEIGHT, e.g. 832x480"),
    (["serve", "gateway", "--route", "wan encoder=e:1"], 2, "--route 'wan encoder=e:1' must name every stage"),
    (["serve", "gateway", "--retention-age", "soon"], 2, "retention age 'soon' is not a duration"),
    (["serve", "encoder", "--port", "abc"], 2, "diffmesh serve encoder: error: argument --port: invalid int value"),
    (["serve", "decoder", "--vae-tiling", "sometimes"], 2, "argument --vae-tiling: invalid choice: 'sometimes'"),
    (["serve", "denoiser", "--warmup-sizes", "64"], 2, "'64' is not WIDTHxHEIGHT[xFRAMES]"),
    (["serve", "renderer"], 2, "argument STAGE: invalid choice: 'renderer'"),
])
def test_a_bad_value_is_one_line_and_exit_2_or_1(capsys, argv, code, message):
    status, _, err = run_cli(capsys, argv)
    assert (status, err.count("\n")) == (code, 1), err
    assert message in err and "Traceback" not in err, err


def test_bad_values_from_a_config_file_or_the_environment_name_their_source(capsys, tmp_path, monkeypatch):
    config = tmp_path / "up.toml"
    config.write_text('default_size = "64"\n')
    status, _, err = run_cli(capsys, ["up", "--config", str(config)])
    assert (status, err.count("\n")) == (2, 1)
    assert f"--config {config}: default_size = '64': '64' is not WIDTHxHEIGHT" in err
    config.write_text('prompt = "a fox"\noutput = "fox.gif"\n')
    status, _, err = run_cli(capsys, ["generate", "--config", str(config)])
    assert status == 2 and "output = 'fox.gif': 'fox.gif' must end in .png" in err
    monkeypatch.setenv("DIFFMESH_RATE_LIMIT", "fast")
    status, _, err = run_cli(capsys, ["serve", "gateway"])
    assert (status, err.count("\n")) == (2, 1)
    assert "DIFFMESH_RATE_LIMIT='fast' (for --rate-limit): Input should be a valid number" in err


def test_version_is_one_line():
    done = subprocess.run([sys.executable, "-m", "diffmesh.cli", "--version"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0
    assert re.fullmatch(r"diffmesh \d+\.\d+\.\d+\S* \(torch \S+, diffusers \S+, python 3\.\d+\.\d+\)\n",
                        done.stdout), done.stdout


def test_serve_help_lists_the_stages_and_a_stage_help_shows_defaults(capsys):
    status, out, _ = run_cli(capsys, ["serve", "--help"])
    assert status == 0
    for stage, text in cli.STAGE_HELP.items():
        assert re.search(rf"^\s+{stage}\s+{re.escape(text.split()[0])}", out, re.MULTILINE), out
    status, out, _ = run_cli(capsys, ["serve", "encoder", "--help"])
    flat = " ".join(out.split())
    assert status == 0
    assert "gRPC port (0 picks a free one; default: 50061)" in flat
    assert "requests waiting beyond the one running (default: 16)" in flat
    assert "address to bind (default: 127.0.0.1; env DIFFMESH_HOST)" in flat


def test_ctrl_c_in_generate_cancels_the_job_and_exits_quietly(mesh, tmp_path):
    output = tmp_path / "never.png"
    # SIGINT handled as a terminal's foreground job has it: a test run started in the background (`cmd &` in a
    # script) hands its children SIGINT ignored, and Ctrl-C would never reach the command. Set in the child's own
    # first line rather than by preexec_fn, which forks this multi-threaded (gRPC) process without exec'ing at once.
    argv = ["diffmesh", "generate", "--gateway", mesh.grpc_address, "--prompt", "a long one", "--size", "128x128",
            "--steps", "200", "-o", str(output)]
    launch = (f"import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
              f"sys.argv = {argv!r}; runpy.run_module('diffmesh.cli', run_name='__main__')")
    process = subprocess.Popen([sys.executable, "-c", launch], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err = bytearray()

    def pump() -> None:      # tqdm redraws its bar with \r and no newline: read bytes as they come
        while chunk := os.read(process.stderr.fileno(), 4096):
            err.extend(chunk)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    deadline = time.monotonic() + 120
    while b"denoise" not in err:          # the progress bar shows denoising steps: the job is running
        assert process.poll() is None and time.monotonic() < deadline, err.decode()
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    code = process.wait(timeout=60)
    reader.join(10)
    text = err.decode()
    assert code == 130 and "Traceback" not in text, text
    found = re.search(r"diffmesh generate: interrupted; job (\S+) cancelled\n$", text)
    assert found, text
    job = mesh.gateway_stub().GetJob(gateway_pb2.GetJobRequest(job_id=found[1]), timeout=10)
    assert job.status == gateway_pb2.JOB_STATUS_CANCELLED
    assert not output.exists()
