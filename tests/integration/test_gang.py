"""The denoiser gang through its real gRPC service: every layout returns the single-device latents.

Each gang is `diffmesh serve denoiser --devices N ...` on the CPU (gloo), its ranks separate processes; the
reference is a one-device denoiser server. Requests go over gRPC exactly as the gateway sends them.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest
import torch

from diffmesh.v1 import denoiser_pb2, denoiser_pb2_grpc
from services.common.tensors import TensorAssembler, iter_chunks

START_TIMEOUT_S = 180
REL_L2_TOLERANCE = 1e-5

# 48x80 px, 9 frames -> 3x3x5 = 45 tokens: divides by neither 2 nor 4, so padding and trimming are exercised.
# 32x64 px, 5 frames, three outputs, unguided -> 2x2x4 = 16 tokens per sample; a CFG-parallel gang splits the
# three outputs over its two cfg ranks (2 + 1, padded to 2 + 2).
REQUESTS = {
    "guided-45-tokens": dict(width=80, height=48, num_frames=9, num_inference_steps=3, guidance_scale=5.0,
                             seed=7, num_outputs=1),
    "unguided-16-tokens-x3": dict(width=64, height=32, num_frames=5, num_inference_steps=2, guidance_scale=1.0,
                                  seed=3, num_outputs=3),
}

LAYOUTS = {
    "ulysses2": ["--devices", "2", "--ulysses", "2"],
    "ring2": ["--devices", "2", "--ring", "2"],
    "cfg2": ["--devices", "2", "--cfg-parallel"],
    "tp2": ["--devices", "2", "--tp", "2"],
    "ulysses4": ["--devices", "4", "--ulysses", "4"],
    "ring4": ["--devices", "4", "--ring", "4"],
    "ulysses2-ring2": ["--devices", "4", "--ulysses", "2", "--ring", "2"],
    "cfg2-ulysses2": ["--devices", "4", "--cfg-parallel", "--ulysses", "2"],
    "tp2-ulysses2": ["--devices", "4", "--tp", "2", "--ulysses", "2"],
    "tp4": ["--devices", "4", "--tp", "4"],
}


class DenoiserProcess:
    """`diffmesh serve denoiser ...` (or another `stage`) in its own process, on a free port."""

    def __init__(self, model_dir: pathlib.Path, tmp: pathlib.Path, extra: list[str], env: dict | None = None,
                 serves_port: bool = True, stage: str = "denoiser") -> None:
        port_file = tmp / f"port-{time.monotonic_ns()}"
        argv = [sys.executable, "-m", "diffmesh.cli", "serve", stage, "--model", str(model_dir),
                "--device", "cpu", "--port", "0", "--port-file", str(port_file), *extra]
        self.log: list[str] = []
        self.process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        threading.Thread(target=lambda: self.log.extend(self.process.stdout), daemon=True).start()
        if not serves_port:             # a worker beside its leader on one host: it serves nothing
            return
        deadline = time.monotonic() + START_TIMEOUT_S
        while not port_file.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.process.kill()
                raise RuntimeError(f"{stage} did not start:\n" + "".join(self.log[-40:]))
            time.sleep(0.1)
        self.address = f"127.0.0.1:{port_file.read_text().split()[0]}"     # "GRPC_PORT METRICS_PORT"
        self.stub = denoiser_pb2_grpc.DenoiserStub(grpc.insecure_channel(self.address))

    def stop(self) -> int:
        self.process.terminate()
        try:
            return self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise


def embeddings(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(1, 11, 32, generator=generator), torch.randn(1, 11, 32, generator=generator)


def request_messages(params: dict, request_id: str = "gang-test"):
    prompt, negative = embeddings(params["seed"])
    yield denoiser_pb2.DenoiseRequest(params=denoiser_pb2.DenoiseParams(request_id=request_id, **params))
    for name, tensor in (("prompt_embeds", prompt), ("negative_prompt_embeds", negative)):
        for chunk in iter_chunks(name, tensor):
            yield denoiser_pb2.DenoiseRequest(tensor=chunk)


def denoise(stub, params: dict) -> tuple[torch.Tensor, int]:
    assembler, steps = TensorAssembler(), 0
    for event in stub.Denoise(request_messages(params), timeout=120):
        if event.WhichOneof("item") == "progress":
            steps += 1
        else:
            assembler.add(event.tensor)
    return assembler.finish()["latents"], steps


def relative_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def reference(model_dir, tmp_path_factory) -> dict[str, torch.Tensor]:
    single = DenoiserProcess(model_dir, tmp_path_factory.mktemp("single"), [])
    try:
        return {name: denoise(single.stub, params)[0] for name, params in REQUESTS.items()}
    finally:
        single.stop()


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_gang_returns_the_single_device_latents(model_dir, tmp_path, reference, layout):
    gang = DenoiserProcess(model_dir, tmp_path, LAYOUTS[layout])
    try:
        for name, params in REQUESTS.items():
            latents, steps = denoise(gang.stub, params)
            assert steps == params["num_inference_steps"], name
            assert latents.shape == reference[name].shape, name
            error = relative_l2(latents, reference[name])
            assert error <= REL_L2_TOLERANCE, f"{layout} {name}: relative L2 error {error:.2e}"
    finally:
        assert gang.stop() == 0, "".join(gang.log[-30:])


def test_cancelled_request_stops_every_rank_and_the_gang_serves_the_next(model_dir, tmp_path, reference):
    gang = DenoiserProcess(model_dir, tmp_path, ["--devices", "2", "--ulysses", "2"])
    try:
        long_request = dict(REQUESTS["guided-45-tokens"], num_inference_steps=200)
        call = gang.stub.Denoise(request_messages(long_request, request_id="to-cancel"), timeout=120)
        started = time.monotonic()
        for event in call:
            if event.WhichOneof("item") == "progress" and event.progress.step >= 2:
                call.cancel()
                break
        with pytest.raises(grpc.RpcError) as raised:
            next(call)
        assert raised.value.code() == grpc.StatusCode.CANCELLED
        # The gang is free again long before 200 steps would have finished, and still correct.
        latents, _ = denoise(gang.stub, REQUESTS["guided-45-tokens"])
        assert time.monotonic() - started < 60
        assert relative_l2(latents, reference["guided-45-tokens"]) <= REL_L2_TOLERANCE
    finally:
        assert gang.stop() == 0, "".join(gang.log[-30:])
    log = "".join(gang.log)
    assert "cancelled at step" in log


@contextlib.contextmanager
def separate_ranks(model_dir: pathlib.Path, tmp_path: pathlib.Path, extra: list[str], per_rank_env=lambda rank: {},
                   worker_serves_port: bool = True):
    """Two ranks of a gang, each its own `diffmesh serve denoiser` joined by torch.distributed's env, as one
    rank per pod runs them; yields (leader, worker) and kills whatever is still running on exit."""
    from services.denoiser.gang.launcher import free_port

    base = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2", "LOCAL_RANK": "0",
            "LOCAL_WORLD_SIZE": "1"}
    ranks = {}
    # Started together: each blocks in the rendezvous until the other arrives.
    starting = [threading.Thread(target=lambda r=r: ranks.__setitem__(r, DenoiserProcess(
        model_dir, tmp_path, extra, env={**base, "RANK": str(r), **per_rank_env(r)},
        serves_port=r == 0 or worker_serves_port))) for r in (0, 1)]
    try:
        for thread in starting:
            thread.start()
        for thread in starting:
            thread.join()
        assert set(ranks) == {0, 1}, "a rank did not start"
        yield ranks[0], ranks[1]
    finally:
        for rank in ranks.values():
            if rank.process.poll() is None:
                rank.process.kill()


def test_a_launcher_killed_outright_takes_its_ranks_with_it(model_dir, tmp_path):
    """The ranks fork from the launcher's forkserver, not from the launcher: killed with SIGKILL (no chance to stop
    them), the launcher still leaves no rank, and no forkserver, behind."""
    gang = DenoiserProcess(model_dir, tmp_path, ["--devices", "2", "--ulysses", "2"])
    started = next(line for line in gang.log if "started a gang of 2 processes" in line)
    ranks = [int(pid) for pid in started.split("pids [", 1)[1].split("]", 1)[0].split(", ")]
    forkserver = _children(gang.process.pid)
    assert forkserver, "the launcher started no forkserver"
    gang.process.kill()
    gang.process.wait(timeout=30)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and any(_running(pid) for pid in [*ranks, *forkserver]):
        time.sleep(0.2)
    assert not [pid for pid in [*ranks, *forkserver] if _running(pid)], "".join(gang.log[-20:])
    assert any("is gone: stopping" in line for line in gang.log)


def _children(parent: int) -> list[int]:
    children = []
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == parent:
                children.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            pass
    return children


def _running(pid: int) -> bool:
    """Alive and not a zombie (an ended child of a live parent stays listed until reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_gang_of_separately_started_ranks_serves_and_exits_when_a_rank_dies(model_dir, tmp_path, reference):
    """One rank per pod, as a StatefulSet runs it. The worker serves health only; when it dies the leader
    answers UNAVAILABLE naming the stage and exits non-zero so its supervisor restarts the gang."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with separate_ranks(model_dir, tmp_path, []) as (leader, worker):
        health = health_pb2_grpc.HealthStub(grpc.insecure_channel(worker.address))
        status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as raised:
            denoise(worker.stub, REQUESTS["guided-45-tokens"])
        assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED

        latents, _ = denoise(leader.stub, REQUESTS["guided-45-tokens"])
        assert relative_l2(latents, reference["guided-45-tokens"]) <= REL_L2_TOLERANCE

        worker.process.kill()
        worker.process.wait(timeout=30)
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as raised:
            denoise(leader.stub, REQUESTS["guided-45-tokens"])
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "denoiser" in raised.value.details()
        assert time.monotonic() - started < 30
        assert leader.process.wait(timeout=30) == 1
        assert "Traceback" not in raised.value.details()


def test_a_hung_rank_fails_the_request_within_the_gang_timeout(model_dir, tmp_path):
    """A rank that stops answering (not one that dies: that closes its connections) mid-request: the leader
    gives up after --gang-timeout, answers UNAVAILABLE naming the stage and exits 1, rather than hang."""
    with separate_ranks(model_dir, tmp_path, ["--gang-timeout", "3"]) as (leader, worker):
        long_request = dict(REQUESTS["guided-45-tokens"], num_inference_steps=200)
        call = leader.stub.Denoise(request_messages(long_request), timeout=120)
        for event in call:
            if event.WhichOneof("item") == "progress" and event.progress.step >= 2:
                worker.process.send_signal(signal.SIGSTOP)
                break
        stopped = time.monotonic()
        with pytest.raises(grpc.RpcError) as raised:
            for _ in call:
                pass
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "denoiser" in raised.value.details()
        assert time.monotonic() - stopped < 30
        assert leader.process.wait(timeout=30) == 1


@pytest.mark.parametrize("flags,message", [
    (["--devices", "4", "--ulysses", "2"], "must equal --devices"),
    (["--devices", "3", "--cfg-parallel"], "even number"),
    (["--devices", "3", "--ulysses", "3"], "not divisible by ulysses 3"),
    (["--devices", "2", "--tp", "2", "--ring", "2"], "do not match the layout"),
])
def test_bad_layout_fails_at_start_with_one_clear_line(model_dir, flags, message):
    result = subprocess.run([sys.executable, "-m", "diffmesh.cli", "serve", "denoiser", "--model", str(model_dir),
                             "--device", "cpu", "--port", "0", *flags], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_diffmesh_up_with_a_cfg_parallel_gang_generates_what_the_one_device_mesh_does(mesh, model_dir):
    """The whole mesh (gateway -> encoder -> gang -> decoder) with `diffmesh up --devices 2 --cfg-parallel`."""
    from diffmesh.client import GatewayClient
    from diffmesh.v1 import gateway_pb2
    from tests.integration.conftest import start_mesh, stop_mesh

    request = gateway_pb2.GenerateRequest(prompt="a red fox running through snow", negative_prompt="blurry",
                                          seed=11, num_inference_steps=3, width=48, height=32, num_frames=5,
                                          guidance_scale=4.0, return_latents=True, return_frames=True)
    expected = GatewayClient(mesh.grpc_address).generate(request, timeout=300).tensors
    gang_mesh = start_mesh(model_dir, ["--device", "cpu", "--devices", "2", "--cfg-parallel"])
    try:
        got = GatewayClient(gang_mesh.grpc_address).generate(request, timeout=300).tensors
    finally:
        assert stop_mesh(gang_mesh) == 0, "".join(gang_mesh.log[-30:])
    assert relative_l2(got["latents"], expected["latents"]) <= REL_L2_TOLERANCE
    assert (got["frames"].float() - expected["frames"].float()).abs().max() <= 1e-4
