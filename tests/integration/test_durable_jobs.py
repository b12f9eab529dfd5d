"""Jobs survive the gateway and wait for the stages: a lone gateway (real process, real SQLite) in front of the
shared mesh's stages, killed with SIGKILL and restarted on the same --data-dir, and hit by a burst beyond its
queue."""

from __future__ import annotations

import asyncio
import pathlib
import threading
import time

import grpc
import httpx
import pytest

from diffmesh.v1 import admission_pb2, admission_pb2_grpc, encoder_pb2, encoder_pb2_grpc, gateway_pb2, gateway_pb2_grpc

from .test_stage_failures import start_gateway

BOUND_S = 120.0
SMALL = {"prompt": "a cat", "size": "32x32", "num_frames": 5, "num_inference_steps": 1}
# Slow enough that, two at a time (what the tiny mesh's stages admit), some run and some wait at the kill: at 40 steps
# the first could finish between two polls on a loaded 2-core machine, and the third then start, none left queued.
SLOW = {"prompt": "a slow dog", "size": "32x32", "num_frames": 5, "num_inference_steps": 150}


def rss_bytes(pid: int) -> int:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def descendants(pid: int) -> list[int]:
    """Every process under `pid`, children first."""
    children = [int(child) for task in pathlib.Path(f"/proc/{pid}/task").iterdir()
                for child in (task / "children").read_text().split()]
    return children + [grandchild for child in children for grandchild in descendants(child)]


def stage_pids(mesh) -> dict[str, int]:
    """The mesh's stage processes (under its `diffmesh up`: forked by its forkserver), by the module each serves."""
    found = {}
    for pid in descendants(mesh.process.pid):
        command = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").split()
        for stage in ("encoder", "denoiser", "decoder"):
            if f"services.{stage}.server".encode() in command:
                found[stage] = pid
    return found


def post_video(http: str, body: dict) -> dict:
    reply = httpx.post(f"{http}/v1/videos", json=body, timeout=30)
    assert reply.status_code == 200, reply.text
    return reply.json()


def wait_finished(http: str, job_ids: list[str], deadline: float) -> dict[str, dict]:
    finished: dict[str, dict] = {}
    while len(finished) < len(job_ids):
        assert time.monotonic() < deadline, f"unfinished: {sorted(set(job_ids) - set(finished))}"
        for job_id in job_ids:
            if job_id not in finished:
                video = httpx.get(f"{http}/v1/videos/{job_id}", timeout=30).json()
                if video["status"] in ("completed", "failed"):
                    finished[job_id] = video
        time.sleep(0.2)
    return finished


def test_every_stage_reports_its_capacity(mesh):
    for stage, address in mesh.stages.items():
        capacity = admission_pb2_grpc.AdmissionStub(grpc.insecure_channel(address)).GetCapacity(
            admission_pb2.GetCapacityRequest(), timeout=10)
        assert (capacity.concurrency, capacity.max_queue) == (1, 16), stage      # `diffmesh up`'s defaults
        assert capacity.in_flight >= 0


def test_gateway_killed_and_restarted_loses_no_job(tmp_path, mesh):
    data = ("--data-dir", str(tmp_path / "jobs"))
    process, _, http = start_gateway(tmp_path, mesh, data)
    restarted = None
    marks = [time.monotonic()]
    try:
        # Finished before the kill: an image kept behind its URL, and a video.
        image_request = {"prompt": "a cat", "size": "32x32", "num_inference_steps": 1, "response_format": "url"}
        image = httpx.post(f"{http}/v1/images/generations", json=image_request, timeout=60).json()
        image_path = httpx.URL(image["data"][0]["url"]).path
        png = httpx.get(f"{http}{image_path}", timeout=30).content
        done = post_video(http, SMALL)["id"]
        wait_finished(http, [done], time.monotonic() + BOUND_S)
        mp4 = httpx.get(f"{http}/v1/videos/{done}/content", timeout=30).content
        # Then running and queued ones.
        slow = [post_video(http, SLOW)["id"] for _ in range(3)]
        deadline = time.monotonic() + BOUND_S
        while True:
            videos = [httpx.get(f"{http}/v1/videos/{job_id}", timeout=30).json() for job_id in slow]
            if any(v["status"] == "in_progress" and v["progress"] > 0 for v in videos) and \
                    any(v["status"] == "queued" for v in videos):
                break
            assert time.monotonic() < deadline, videos
            time.sleep(0.05)
        marks.append(time.monotonic())
        process.kill()
        process.wait(timeout=30)
        statuses = {v["status"] for v in videos}
        assert {"in_progress", "queued"} <= statuses, statuses
        queued = [v for v in videos if v["status"] == "queued"]
        assert sorted(v["queue_position"] for v in queued) == list(range(1, len(queued) + 1))

        restarted, grpc_address, http = start_gateway(tmp_path, mesh, data)
        marks.append(time.monotonic())
        finished = wait_finished(http, [done, *slow], time.monotonic() + BOUND_S)
        marks.append(time.monotonic())
        print(f"restart test: before the kill {marks[1] - marks[0]:.1f}s, restart {marks[2] - marks[1]:.1f}s, "
              f"resumed jobs done in {marks[3] - marks[2]:.1f}s")
        assert {job_id: v["status"] for job_id, v in finished.items()} == dict.fromkeys([done, *slow], "completed")
        assert httpx.get(f"{http}/v1/videos/{done}/content", timeout=30).content == mp4
        assert httpx.get(f"{http}{image_path}", timeout=30).content == png
        for job_id in slow:
            content = httpx.get(f"{http}/v1/videos/{job_id}/content", timeout=30)
            assert content.status_code == 200 and content.content[4:8] == b"ftyp"
        stub = gateway_pb2_grpc.GatewayStub(grpc.insecure_channel(grpc_address))
        job = stub.GetJob(gateway_pb2.GetJobRequest(job_id=slow[-1]), timeout=30)
        assert job.status == gateway_pb2.JOB_STATUS_COMPLETED and job.queue_position == 0
        # Ids that are not ours never reach the filesystem.
        for bad in ("..", "video_..%2F..%2Fjobs.sqlite3", "video_" + "0" * 23 + "%2E"):
            assert httpx.get(f"{http}/v1/videos/{bad}/content", timeout=30).status_code == 404
        with pytest.raises(grpc.RpcError) as raised:
            stub.GetJob(gateway_pb2.GetJobRequest(job_id="../jobs.sqlite3"), timeout=30)
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        for running in (process, restarted):
            if running is not None and running.poll() is None:
                running.terminate()
                assert running.wait(timeout=30) == 0


BURST = 100


async def _burst(http: str) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=BURST, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        return await asyncio.gather(*(client.post(f"{http}/v1/videos", json={**SMALL, "seed": n})
                                      for n in range(BURST)))


class EncoderFlood:
    """Direct clients that keep the mesh's encoder full (more calls than its 1 running + 16 queued), as another
    gateway sharing the stages would: the gateway's own calls then meet RESOURCE_EXHAUSTED."""

    def __init__(self, address: str, model: str, callers: int = 24) -> None:
        self.stub = encoder_pb2_grpc.EncoderStub(grpc.insecure_channel(address))
        self.request = encoder_pb2.EncodeRequest(request_id="flood", model=model, prompt="flood", guidance_scale=1.0)
        self.stop = threading.Event()
        self.refused = 0
        self.threads = [threading.Thread(target=self._call, daemon=True) for _ in range(callers)]

    def _call(self) -> None:
        while not self.stop.is_set():
            try:
                for _ in self.stub.Encode(self.request, timeout=30):
                    pass
            except grpc.RpcError as error:
                if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    self.refused += 1

    def __enter__(self) -> "EncoderFlood":
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=30)


def test_a_burst_beyond_the_queue_gets_429_with_retry_after_and_every_accepted_job_completes(tmp_path, mesh):
    log = tmp_path / "gateway.log"
    process, _, http = start_gateway(tmp_path, mesh, ("--max-queued-jobs", "8"), log=log)
    try:
        warm = [post_video(http, {**SMALL, "seed": 1000 + n})["id"] for n in range(3)]
        wait_finished(http, warm, time.monotonic() + BOUND_S)
        idle = rss_bytes(process.pid)
        stages = stage_pids(mesh)
        assert set(stages) == {"encoder", "denoiser", "decoder"}
        stages_idle = {stage: rss_bytes(pid) for stage, pid in stages.items()}

        started = time.monotonic()
        with EncoderFlood(mesh.stages["encoder"], mesh.model) as flood:
            replies = asyncio.run(_burst(http))
            deadline = time.monotonic() + BOUND_S
            while "retrying in" not in log.read_text():       # a job of ours met the full encoder
                assert time.monotonic() < deadline, "no gateway call met the full encoder"
                time.sleep(0.1)
        assert flood.refused > 0
        codes = [reply.status_code for reply in replies]
        accepted = [reply.json()["id"] for reply in replies if reply.status_code == 200]
        refused = [reply for reply in replies if reply.status_code == 429]
        assert len(accepted) + len(refused) == BURST, sorted(set(codes))
        assert refused and len(accepted) >= 8
        assert all(int(reply.headers["retry-after"]) >= 1 for reply in refused)
        assert all("--max-queued-jobs" in reply.json()["error"]["message"] for reply in refused)
        peak = rss_bytes(process.pid)

        finished = wait_finished(http, accepted, time.monotonic() + BOUND_S)
        failures = {job_id: v["error"] for job_id, v in finished.items() if v["status"] != "completed"}
        assert not failures                                  # none failed "at capacity", or at all
        retries = log.read_text().count("retrying in")
        elapsed = time.monotonic() - started
        deadline = time.monotonic() + 10
        while (after := rss_bytes(process.pid)) > idle * 1.10 and time.monotonic() < deadline:
            time.sleep(0.5)
        print(f"burst of {BURST}: {len(accepted)} accepted, {len(refused)} refused (Retry-After "
              f"{sorted({r.headers['retry-after'] for r in refused})} s), {retries} stage calls refused and retried, "
              f"all done in {elapsed:.1f}s; gateway RSS "
              f"idle {idle / 2**20:.1f} MiB, peak {peak / 2**20:.1f} MiB, after {after / 2**20:.1f} MiB")
        assert after <= idle * 1.10, (idle, peak, after)
        stages_after = {stage: rss_bytes(pid) for stage, pid in stages.items()}
        print("stages' RSS idle -> after (MiB):", {stage: f"{stages_idle[stage] / 2**20:.0f} -> "
                                                  f"{stages_after[stage] / 2**20:.0f}" for stage in stages})
        assert all(stages_after[stage] <= stages_idle[stage] * 1.10 for stage in stages), (stages_idle, stages_after)
    finally:
        process.terminate()
        assert process.wait(timeout=30) == 0
