"""Soak: a mixed load against the real mesh for a set time while faults are injected; counts what was lost.

Starts, as separate processes on loopback on the tiny Wan model: an encoder, two denoiser replicas, a decoder and a
gateway (SQLite under a temporary --data-dir). Client threads send REST video jobs (then poll them) and gRPC
`Generate` streams (a broken stream is followed by polling `GetJob`), small sizes, a few steps. Meanwhile faults:
every `--kill-every` seconds one denoiser replica is SIGKILLed and restarted on its port a few seconds later, and
every `--gateway-kill-every` seconds the gateway is SIGKILLed and restarted on the same ports and data dir (its
jobs must resume). At the end every accepted job id is waited for (up to `--drain` seconds) and classified:
completed, failed (with its reason), or lost (not found, or never finished). Refusals at submit (429 / 503) are
counted apart: they were not accepted. Lost must be 0.

    python bench/soak.py --minutes 30
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import pathlib
import platform as host_platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import grpc  # noqa: E402
import httpx  # noqa: E402

from diffmesh.v1 import gateway_pb2, gateway_pb2_grpc  # noqa: E402
from services.common.tiny_model import write_tiny_model  # noqa: E402

VIDEO = {"prompt": "a cat", "size": "32x32", "num_frames": 5, "num_inference_steps": 3}
GENERATE = dict(prompt="a dog", width=32, height=32, num_inference_steps=3)
FINISHED = {"completed", "failed", "cancelled"}
GRPC_STATUS = {gateway_pb2.JOB_STATUS_COMPLETED: "completed", gateway_pb2.JOB_STATUS_FAILED: "failed",
               gateway_pb2.JOB_STATUS_CANCELLED: "cancelled", gateway_pb2.JOB_STATUS_QUEUED: "queued",
               gateway_pb2.JOB_STATUS_IN_PROGRESS: "in_progress"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Process:
    """One server, restartable on the same argv (same ports)."""

    def __init__(self, name: str, argv: list[str], log: pathlib.Path) -> None:
        self.name, self.argv, self.log = name, argv, log
        self.popen: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log, "a") as log:
            self.popen = subprocess.Popen([sys.executable, "-m", *self.argv], stdout=log, stderr=subprocess.STDOUT,
                                          env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def kill(self) -> None:
        if self.popen and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
            self.popen.wait()

    def stop(self) -> None:
        if self.popen and self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()


def wait_serving(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} not healthy after {timeout:.0f}s")


class Ledger:
    """Everything the clients saw, thread-safe."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.accepted: dict[str, str] = {}              # job id -> front door ("rest" | "grpc")
        self.refused: collections.Counter[str] = collections.Counter()
        self.client_errors: collections.Counter[str] = collections.Counter()

    def accept(self, job_id: str, door: str) -> None:
        with self.lock:
            self.accepted[job_id] = door

    def refuse(self, why: str) -> None:
        with self.lock:
            self.refused[why] += 1

    def error(self, why: str) -> None:
        with self.lock:
            self.client_errors[why[:120]] += 1


def rest_client(http: str, ledger: Ledger, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            reply = httpx.post(f"{http}/v1/videos", json={**VIDEO, "seed": random.randrange(2**31)}, timeout=30)
        except httpx.HTTPError as error:
            ledger.error(f"rest submit: {type(error).__name__}")      # the gateway is down: nothing accepted
            time.sleep(1)
            continue
        if reply.status_code == 200:
            ledger.accept(reply.json()["id"], "rest")
        else:
            ledger.refuse(f"rest {reply.status_code}")
            time.sleep(float(reply.headers.get("retry-after", 1)))
        time.sleep(random.uniform(0.5, 2.0))


def grpc_client(grpc_address: str, ledger: Ledger, stop: threading.Event) -> None:
    while not stop.is_set():
        stub = gateway_pb2_grpc.GatewayStub(grpc.insecure_channel(grpc_address))
        job_id = None
        try:
            request = gateway_pb2.GenerateRequest(**GENERATE, seed=random.randrange(2**31))
            for event in stub.Generate(request, timeout=300):
                if event.WhichOneof("item") == "accepted":
                    job_id = event.accepted.job_id
                    ledger.accept(job_id, "grpc")
        except grpc.RpcError as error:
            if job_id is None:
                if error.code() in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE):
                    ledger.refuse(f"grpc {error.code().name}")
                else:
                    ledger.error(f"grpc {error.code().name}: {error.details()}")
                time.sleep(1)
            # A broken stream after acceptance is fine: the job is checked at the end.
        time.sleep(random.uniform(0.5, 2.0))


def job_status(http: str, grpc_address: str, job_id: str, door: str) -> tuple[str, str]:
    """(status, error message) of a job, "lost" when the gateway does not know it."""
    if door == "rest":
        reply = httpx.get(f"{http}/v1/videos/{job_id}", timeout=30)
        if reply.status_code == 404:
            return "lost", "404"
        body = reply.json()
        return body["status"], (body.get("error") or {}).get("message", "")
    stub = gateway_pb2_grpc.GatewayStub(grpc.insecure_channel(grpc_address))
    try:
        job = stub.GetJob(gateway_pb2.GetJobRequest(job_id=job_id), timeout=30)
    except grpc.RpcError as error:
        if error.code() == grpc.StatusCode.NOT_FOUND:
            return "lost", "NOT_FOUND"
        raise
    return GRPC_STATUS.get(job.status, "unknown"), job.error


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--clients", type=int, default=4, help="client threads per front door")
    parser.add_argument("--kill-every", type=float, default=60.0, help="seconds between denoiser kills")
    parser.add_argument("--gateway-kill-every", type=float, default=300.0, help="seconds between gateway kills")
    parser.add_argument("--drain", type=float, default=600.0, help="seconds to wait for accepted jobs at the end")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    work = pathlib.Path(tempfile.mkdtemp(prefix="diffmesh-soak-"))
    model = write_tiny_model(work / "wan2.1-tiny")
    ports = {name: free_port() for name in ("encoder", "denoiser-a", "denoiser-b", "decoder", "grpc", "http")}
    stage = ["--model", str(model), "--host", "127.0.0.1", "--grace", "5"]
    processes = {
        "encoder": Process("encoder", ["services.encoder.server", *stage, "--port", str(ports["encoder"])],
                           work / "encoder.log"),
        **{name: Process(name, ["services.denoiser.server", *stage, "--port", str(ports[name])], work / f"{name}.log")
           for name in ("denoiser-a", "denoiser-b")},
        "decoder": Process("decoder", ["services.decoder.server", *stage, "--port", str(ports["decoder"])],
                           work / "decoder.log"),
    }
    address = "127.0.0.1:{}".format
    processes["gateway"] = Process("gateway", [
        "services.gateway.server", "--grpc-port", str(ports["grpc"]), "--http-port", str(ports["http"]),
        "--model-name", model.name, "--data-dir", str(work / "data"), "--grace", "5",
        f"--encoder={address(ports['encoder'])}", f"--decoder={address(ports['decoder'])}",
        f"--denoiser={address(ports['denoiser-a'])},{address(ports['denoiser-b'])}"], work / "gateway.log")
    http, grpc_address = f"http://127.0.0.1:{ports['http']}", address(ports["grpc"])
    for process in processes.values():
        process.start()
    faults: collections.Counter[str] = collections.Counter()
    try:
        wait_serving(f"{http}/health", 300)
        ledger, stop = Ledger(), threading.Event()
        threads = [threading.Thread(target=rest_client, args=(http, ledger, stop), daemon=True)
                   for _ in range(args.clients)]
        threads += [threading.Thread(target=grpc_client, args=(grpc_address, ledger, stop), daemon=True)
                    for _ in range(args.clients)]
        for thread in threads:
            thread.start()
        started = time.monotonic()
        end = started + 60 * args.minutes
        next_kill, next_gateway_kill = started + args.kill_every, started + args.gateway_kill_every
        next_report = started + 60
        while time.monotonic() < end:
            now = time.monotonic()
            if now >= next_kill:
                victim = processes[random.choice(["denoiser-a", "denoiser-b"])]
                victim.kill()
                faults["denoiser SIGKILL"] += 1
                time.sleep(random.uniform(2, 8))
                victim.start()
                next_kill = now + args.kill_every
            elif now >= next_gateway_kill:
                processes["gateway"].kill()
                faults["gateway SIGKILL"] += 1
                time.sleep(2)
                processes["gateway"].start()
                next_gateway_kill = now + args.gateway_kill_every
            time.sleep(0.5)
            if time.monotonic() >= next_report:
                next_report += 60
                print(f"{(time.monotonic() - started) / 60:5.1f} min: {len(ledger.accepted)} accepted, "
                      f"faults {dict(faults)}", flush=True)
        stop.set()
        for thread in threads:
            thread.join(timeout=330)
        wait_serving(f"{http}/health", 300)
        outcomes: dict[str, tuple[str, str]] = {}
        drain_end = time.monotonic() + args.drain
        while time.monotonic() < drain_end:
            for job_id, door in list(ledger.accepted.items()):
                if outcomes.get(job_id, ("",))[0] not in FINISHED:
                    outcomes[job_id] = job_status(http, grpc_address, job_id, door)
            if all(status in FINISHED or status == "lost" for status, _ in outcomes.values()):
                break
            time.sleep(2)
        statuses = collections.Counter(status for status, _ in outcomes.values())
        unfinished = sum(n for status, n in statuses.items() if status not in FINISHED and status != "lost")
        failures = collections.Counter(message[:160] for status, message in outcomes.values() if status == "failed")
        report = {
            "benchmark": "soak: mixed REST video + gRPC Generate load with denoiser and gateway kills",
            "date": datetime.date.today().isoformat(), "machine": f"{os.cpu_count()} cores, "
            f"{host_platform.machine()}, python {host_platform.python_version()}",
            "minutes": args.minutes, "clients_per_door": args.clients, "faults": dict(faults),
            "accepted": len(ledger.accepted), "completed": statuses.get("completed", 0),
            "failed": statuses.get("failed", 0), "cancelled": statuses.get("cancelled", 0),
            "lost": statuses.get("lost", 0) + unfinished, "failure_reasons": dict(failures),
            "refused_at_submit": dict(ledger.refused), "client_errors": dict(ledger.client_errors),
        }
    finally:
        for process in processes.values():
            process.stop()
    out = pathlib.Path(args.out or ROOT / "bench" / "results" / f"soak-cpu-{report['date']}.json")
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0 if report["lost"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
