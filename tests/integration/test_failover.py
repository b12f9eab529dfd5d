"""Replicas that die, drain and return, against real processes: two denoiser replicas of the shared mesh's model
(started here, so that killing one leaves the mesh alone) behind one lone gateway."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from diffmesh.v1 import decoder_pb2, gateway_pb2, gateway_pb2_grpc

from .conftest import free_port
from .test_stage_failures import start_gateway

START_TIMEOUT_S = 90
REQUEST_TIMEOUT_S = 60
RETURN_BOUND_S = 2.0      # a stage back (SERVING) is used again within this long


@dataclasses.dataclass
class Replica:
    """One stage process (a denoiser unless `module` says otherwise) on a fixed port, so that a restart comes back
    at the same address."""

    model_dir: pathlib.Path
    model: str
    port: int
    log: pathlib.Path
    process: subprocess.Popen | None = None
    module: str = "services.denoiser.server"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        port_file = self.log.with_suffix(f".port-{time.monotonic_ns()}")
        self.process = subprocess.Popen(
            [sys.executable, "-m", self.module, "--model", str(self.model_dir), "--model-name",
             self.model, "--port", str(self.port), "--port-file", str(port_file), "--grace", "10"],
            env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=self.log.open("a"), stderr=subprocess.STDOUT)
        self._port_file = port_file

    def wait_serving(self) -> float:
        """Block until it serves (its port file is written once health says SERVING); return when that was."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._port_file.exists():
            assert self.process.poll() is None, f"{self.module} exited:\n{self.log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, f"{self.module} did not start"
            time.sleep(0.02)
        return time.monotonic()

    def ensure_running(self) -> None:
        if self.process is None or self.process.poll() is not None:
            self.start()
            self.wait_serving()

    def stop(self, sig: int = signal.SIGTERM) -> int:
        self.process.send_signal(sig)
        return self.process.wait(timeout=30)

    def calls_seen(self) -> int:
        return self.log.read_text().count("Denoise called")


@pytest.fixture(scope="module")
def replicas(mesh, tmp_path_factory):
    root = tmp_path_factory.mktemp("replicas")
    pair = [Replica(mesh.model_dir, mesh.model, free_port(), root / f"denoiser-{name}.log") for name in "bc"]
    for replica in pair:
        replica.start()
    for replica in pair:
        replica.wait_serving()
    yield pair
    for replica in pair:
        if replica.process.poll() is None:
            replica.process.kill()
            replica.process.wait()


@dataclasses.dataclass
class Gateway:
    process: subprocess.Popen
    grpc_address: str
    http_url: str
    log: pathlib.Path


def lone_gateway(mesh, root: pathlib.Path, denoiser: str, *extra: str) -> Gateway:
    log = root / "gateway.log"
    process, grpc_address, http_url = start_gateway(root, mesh, extra, log=log, denoiser=denoiser)
    return Gateway(process, grpc_address, http_url, log)


def stop(gateway: Gateway) -> None:
    if gateway.process.poll() is None:
        gateway.process.kill()
        gateway.process.wait()


@pytest.fixture(scope="module")
def pair_gateway(mesh, replicas, tmp_path_factory):
    """A gateway in front of both replicas (one gateway for every test here: each start costs seconds). Its stall
    timeout is shorter than a call may wait in a replica's queue: queued calls must not count as stalled (the pool
    tells one from the other by whether the replica answers any of its calls). A long grace, to drain a request in
    flight."""
    gateway = lone_gateway(mesh, tmp_path_factory.mktemp("pair"), ",".join(r.address for r in replicas),
                           "--stage-stall-timeout", "2", "--grace", "20")
    yield gateway
    stop(gateway)


def request(seed: int, steps: int = 4) -> gateway_pb2.GenerateRequest:
    return gateway_pb2.GenerateRequest(prompt="a lighthouse at dusk", width=32, height=32, num_inference_steps=steps,
                                       seed=seed, format=decoder_pb2.MEDIA_FORMAT_PNG)


def generate(address: str, message: gateway_pb2.GenerateRequest, on_event=None) -> bytes:
    """The request's PNG; raises the RpcError if it failed."""
    with grpc.insecure_channel(address) as channel:
        media, kinds = b"", []
        for event in gateway_pb2_grpc.GatewayStub(channel).Generate(message, timeout=REQUEST_TIMEOUT_S):
            if on_event is not None:
                on_event(event)
            kinds.append(event.WhichOneof("item"))
            if kinds[-1] == "media":
                media += event.media.data
    assert kinds[-1] == "completed" and kinds.count("completed") == 1
    return media


def denoise_progress(steps: threading.Semaphore):
    def on_event(event) -> None:
        if event.WhichOneof("item") == "progress" and event.progress.stage == "denoise":
            steps.release()
    return on_event


def test_rolling_restart_fails_no_request(replicas, pair_gateway):
    for replica in replicas:
        replica.ensure_running()
    failures: list[str] = []
    done = [0]
    stop_trickle = threading.Event()

    def trickle(first_seed: int) -> None:
        seed = first_seed
        while not stop_trickle.is_set():
            try:
                generate(pair_gateway.grpc_address, request(seed, steps=2))
                done[0] += 1
            except grpc.RpcError as error:
                failures.append(f"{error.code().name}: {error.details()}")
            seed += 2

    clients = [threading.Thread(target=trickle, args=(first,)) for first in (0, 1)]
    for client in clients:
        client.start()
    try:
        for replica in replicas:
            calls_before = replica.calls_seen()
            assert replica.stop() == 0
            replica.start()
            serving_at = replica.wait_serving()
            while replica.calls_seen() <= calls_before:   # taken back into use
                assert time.monotonic() - serving_at < RETURN_BOUND_S, "the restarted replica sat unused"
                time.sleep(0.02)
            print(f"restarted replica used again {time.monotonic() - serving_at:.2f}s after SERVING")
    finally:
        stop_trickle.set()
        for client in clients:
            client.join(timeout=REQUEST_TIMEOUT_S)
    assert failures == []
    assert done[0] > 0
    print(f"rolling restart: {done[0]} requests, {len(failures)} failed")


def test_a_replica_killed_mid_request_fails_no_request(mesh, replicas, pair_gateway):
    b, c = replicas
    for replica in replicas:
        replica.ensure_running()
    seeds, steps = range(20), 8
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        undisturbed = list(pool.map(lambda seed: generate(mesh.grpc_address, request(seed, steps)), seeds))

    # Kill c while two requests are mid-denoise at once: a replica runs one request at a time, so one of the two is
    # on c, cut off after it produced progress (the steps seen by its client repeat as it starts over).
    log_before = len(pair_gateway.log.read_text())
    lock, last_step, went_back = threading.Lock(), {}, set()
    two_mid_denoise = threading.Event()

    def watcher(seed: int):
        def on_event(event) -> None:
            if event.WhichOneof("item") != "progress" or event.progress.stage != "denoise":
                return
            with lock:
                if event.progress.step <= last_step.get(seed, 0):    # steps only rise, but on a restart
                    went_back.add(seed)
                last_step[seed] = event.progress.step
                if sum(1 <= step <= steps - 3 for step in last_step.values()) >= 2:
                    two_mid_denoise.set()
        return on_event

    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(generate, pair_gateway.grpc_address, request(seed, steps), watcher(seed))
                   for seed in seeds]
        assert two_mid_denoise.wait(REQUEST_TIMEOUT_S)
        c.stop(signal.SIGKILL)
        outputs = [future.result(timeout=REQUEST_TIMEOUT_S) for future in futures]
    print(f"20 requests, a replica killed mid-request: all done in {time.monotonic() - started:.1f}s; "
          f"{len(went_back)} started over after producing progress")

    assert outputs == undisturbed     # one result each (a second PNG would double the bytes), the same bytes
    assert went_back, "no request was cut off after it had produced progress: the test proved nothing"
    gateway_log = pair_gateway.log.read_text()[log_before:]
    assert "starting the call over on replica" in gateway_log


class HealthProbe:
    """Watches a server's health from outside, and probes whether it still takes calls, timing both."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(address)
        self.stub = health_pb2_grpc.HealthStub(self.channel)
        self.not_serving_at: float | None = None
        self.refused_at: float | None = None
        self.watch = self.stub.Watch(health_pb2.HealthCheckRequest(service=""))
        assert next(self.watch).status == health_pb2.HealthCheckResponse.SERVING
        threading.Thread(target=self._follow, daemon=True).start()
        threading.Thread(target=self._probe, daemon=True).start()

    def _follow(self) -> None:
        try:
            for reply in self.watch:
                if reply.status == health_pb2.HealthCheckResponse.NOT_SERVING and self.not_serving_at is None:
                    self.not_serving_at = time.monotonic()
        except grpc.RpcError:
            pass

    def _probe(self) -> None:
        while self.refused_at is None:
            try:
                self.stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
            except grpc.RpcError:
                self.refused_at = time.monotonic()
            time.sleep(0.02)

    def close(self) -> None:
        self.watch.cancel()
        self.channel.close()


def test_a_stopped_stage_drains_and_its_return_is_used_at_once(replicas, pair_gateway):
    b, c = replicas
    b.ensure_running()
    if c.process.poll() is None:    # b alone is the whole denoiser stage (the test before killed c)
        c.stop(signal.SIGKILL)
    address = pair_gateway.grpc_address
    generate(address, request(0, steps=1))

    # SIGTERM with a request in flight: NOT_SERVING first, calls refused only later, the request finished.
    probe = HealthProbe(b.address)
    calls_before = b.calls_seen()
    in_flight = concurrent.futures.ThreadPoolExecutor(1).submit(generate, address, request(1, steps=10))
    while b.calls_seen() == calls_before:
        time.sleep(0.02)
    b.process.send_signal(signal.SIGTERM)
    assert in_flight.result(timeout=REQUEST_TIMEOUT_S)
    assert b.process.wait(timeout=30) == 0
    probe.close()
    assert probe.not_serving_at is not None and probe.refused_at is not None
    assert probe.not_serving_at < probe.refused_at
    print(f"NOT_SERVING {probe.refused_at - probe.not_serving_at:.2f}s before refusing calls")

    # The whole stage down: a request fails quickly, naming the stage and no address.
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as raised:
        generate(address, request(2, steps=1))
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "denoiser" in raised.value.details()
    assert b.address not in raised.value.details() and c.address not in raised.value.details()
    assert time.monotonic() - started < 10
    time.sleep(1.0)   # long enough for gRPC's reconnect back-off to have grown

    # Back: the first request after it reports SERVING succeeds, within RETURN_BOUND_S.
    b.start()
    serving_at = b.wait_serving()
    generate(address, request(3, steps=1))
    recovered_s = time.monotonic() - serving_at
    print(f"first request after the stage came back done {recovered_s:.2f}s after it reported SERVING")
    assert recovered_s < RETURN_BOUND_S


def test_an_accepted_job_waits_for_its_stage_to_come_back(replicas, pair_gateway):
    """The whole denoiser stage dies under a running job and returns seconds later: the job is not failed, it
    waits for the stage (--stage-wait) and ends with the very image an undisturbed run gives."""
    b, c = replicas
    b.ensure_running()
    if c.process.poll() is None:
        c.stop(signal.SIGKILL)
    expected = generate(pair_gateway.grpc_address, request(7, steps=10))
    steps = threading.Semaphore(0)
    job = concurrent.futures.ThreadPoolExecutor(1).submit(generate, pair_gateway.grpc_address, request(7, steps=10),
                                                         denoise_progress(steps))
    assert steps.acquire(timeout=REQUEST_TIMEOUT_S)
    b.stop(signal.SIGKILL)
    time.sleep(2.0)                  # down for a while: the job's retries find no replica serving
    assert not job.done()
    b.start()
    assert job.result(timeout=REQUEST_TIMEOUT_S) == expected


def test_gateway_sigterm_drains(replicas, pair_gateway):
    replicas[0].ensure_running()
    steps = threading.Semaphore(0)
    # Running, not just accepted: what the gateway does with jobs still queued when it stops is not this test's.
    # Long enough (tiny steps take tens of ms) to be still running when the checks below end, on a loaded machine too.
    in_flight = concurrent.futures.ThreadPoolExecutor(1).submit(generate, pair_gateway.grpc_address,
                                                                request(5, steps=60), denoise_progress(steps))
    assert steps.acquire(timeout=REQUEST_TIMEOUT_S)
    pair_gateway.process.send_signal(signal.SIGTERM)
    http_url = pair_gateway.http_url
    deadline = time.monotonic() + 5
    while (health := httpx.get(f"{http_url}/health", timeout=5)).status_code == 200:
        assert time.monotonic() < deadline, "REST /health never said draining"
    assert health.status_code == 503 and health.json()["status"] == "draining"
    refused = httpx.post(f"{http_url}/v1/images/generations", json={"prompt": "a cat", "size": "32x32",
                                                                     "num_inference_steps": 1}, timeout=10)
    assert refused.status_code == 503 and "gateway" in refused.json()["error"]["message"]
    assert not in_flight.done()      # the checks above ran during the drain
    assert in_flight.result(timeout=REQUEST_TIMEOUT_S)
    assert pair_gateway.process.wait(timeout=30) == 0
