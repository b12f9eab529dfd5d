"""Tests for services.gateway.jobs.JobStore on a real SQLite database and output directory: queueing, outcomes,
retries on a full stage, cancellation, the queue's bound, shutdown and resume.

The pipeline is a scripted event source (as MeshPipeline.generate would yield), so these run without stages;
tests/integration/test_durable_jobs.py runs the same paths against the real processes."""

from __future__ import annotations

import asyncio
import dataclasses
import pathlib

import pytest

from services.common.errors import Cancelled, Internal, NotFound, ResourceExhausted, Unavailable
from services.gateway.jobs import JobStatus, JobStore, new_job_id
from services.gateway.outputs import LocalOutputStore
from services.gateway.pipeline import GenerationRequest, MediaEvent, ProgressEvent, TensorEvent
from services.gateway.store import JobDatabase

MODEL = "wan-tiny"
REQUEST = GenerationRequest(request_id="req-1", model=MODEL, prompt="a cat")
TIMEOUT_S = 5.0
MP4 = b"\x00\x00\x00\x18ftypmp42" + b"x" * 100


class ScriptedPipeline:
    """What JobStore asks of MeshPipeline: routes, validate, generate. Each generate() runs the next script."""

    def __init__(self, *scripts, models=(MODEL,)) -> None:
        self.routes = dict.fromkeys(models)      # admission then finds no stages to ask: one job at a time
        self.scripts = list(scripts)
        self.started: list[str] = []
        self.release = asyncio.Event()

    async def validate(self, request: GenerationRequest) -> None:
        return None

    async def generate(self, request: GenerationRequest):
        self.started.append(request.request_id)
        script = self.scripts.pop(0) if len(self.scripts) > 1 else self.scripts[0]
        for item in script:
            await asyncio.sleep(0)
            if item == "hang":
                await self.release.wait()
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item


DONE = [ProgressEvent("encode", 1, 1, 0.05), ProgressEvent("denoise", 1, 2, 0.475), MediaEvent(0, "video/mp4", MP4),
        ProgressEvent("decode", 1, 1, 1.0)]


def make_store(tmp_path: pathlib.Path, pipeline, **kwargs) -> JobStore:
    db = JobDatabase(f"sqlite:///{tmp_path / 'jobs.sqlite3'}")
    return JobStore(db, LocalOutputStore(tmp_path / "outputs"), pipeline, instance_id="test", **kwargs)


async def wait_for(store: JobStore, job_id: str, status: JobStatus):
    for _ in range(int(TIMEOUT_S / 0.01)):
        job = await store.get(job_id)
        if job.status == status:
            return job
        await asyncio.sleep(0.01)
    raise AssertionError(f"{job_id} is {job.status}, never {status}")


def test_a_job_streams_its_events_and_keeps_its_outputs_on_disk(tmp_path):
    async def scenario():
        store = make_store(tmp_path, ScriptedPipeline(DONE))
        await store.start()
        job = await store.submit(REQUEST, new_job_id("gen"))
        assert job.status == JobStatus.QUEUED and job.queue_position == 1
        seen = [event async for event in store.events(job.id)]
        final = await store.get(job.id)
        await store.shutdown(1.0)
        return seen, final

    seen, final = asyncio.run(scenario())
    assert seen == DONE
    assert final.status == JobStatus.COMPLETED and final.progress == 100.0 and final.error is None
    assert [(o.index, o.mime_type, o.size) for o in final.outputs] == [(0, "video/mp4", len(MP4))]
    assert (tmp_path / "outputs" / final.id / "0.mp4").read_bytes() == MP4


def test_jobs_wait_in_order_and_the_full_queue_answers_with_retry_after(tmp_path):
    async def scenario():
        pipeline = ScriptedPipeline(["hang", *DONE])
        store = make_store(tmp_path, pipeline, max_queued=2)
        await store.start()
        ids = [(await store.submit(REQUEST, new_job_id("video"), stream=False)).id for _ in range(3)]
        await wait_for(store, ids[0], JobStatus.IN_PROGRESS)   # one slot: the other two wait
        positions = [(await store.get(job_id)).queue_position for job_id in ids]
        with pytest.raises(ResourceExhausted) as refused:
            await store.submit(REQUEST, new_job_id("video"))
        pipeline.release.set()
        finals = [await wait_for(store, job_id, JobStatus.COMPLETED) for job_id in ids]
        await store.shutdown(1.0)
        return positions, refused.value, finals

    positions, refused, finals = asyncio.run(scenario())
    assert positions == [None, 1, 2]
    assert refused.retry_after_s >= 1 and "--max-queued-jobs" in refused.message
    assert all(job.status == JobStatus.COMPLETED for job in finals)


def test_a_full_stage_means_wait_and_retry_not_fail(tmp_path):
    full = ResourceExhausted("denoiser: denoiser is at capacity (17 requests running or queued)", retry_after_s=0.05)
    latents = TensorEvent("latents", [])
    first = [ProgressEvent("encode", 1, 1, 0.05), latents, full]
    again = [ProgressEvent("encode", 1, 1, 0.05), latents, *DONE]

    async def scenario():
        pipeline = ScriptedPipeline(first, again)
        store = make_store(tmp_path, pipeline)
        await store.start()
        job = await store.submit(REQUEST, new_job_id("gen"))
        seen = [event async for event in store.events(job.id)]
        final = await store.get(job.id)
        await store.shutdown(1.0)
        return pipeline, seen, final

    pipeline, seen, final = asyncio.run(scenario())
    assert final.status == JobStatus.COMPLETED
    assert len(pipeline.started) == 2
    assert seen.count(latents) == 1          # a retry never delivers an output twice; progress may repeat
    assert [e for e in seen if isinstance(e, MediaEvent)] == [DONE[2]]


def test_failures_are_recorded_and_unexpected_ones_hidden_behind_internal(tmp_path):
    async def scenario():
        store = make_store(tmp_path, ScriptedPipeline([Unavailable("denoiser", "gone")], [KeyError("secret")]),
                           stage_wait_s=0.0)      # a stage down fails the job at once
        await store.start()
        outcomes = []
        for _ in range(2):
            job = await store.submit(REQUEST, new_job_id("gen"))
            with pytest.raises((Unavailable, Internal)) as raised:
                [event async for event in store.events(job.id)]
            outcomes.append((raised.value, await store.get(job.id)))
        await store.shutdown(1.0)
        return outcomes

    (first, first_job), (second, second_job) = asyncio.run(scenario())
    assert first_job.status == JobStatus.FAILED and isinstance(first_job.error, Unavailable)
    assert first_job.error.message == "denoiser stage unavailable: gone"
    assert second_job.status == JobStatus.FAILED and isinstance(second_job.error, Internal)
    assert "secret" not in second_job.error.message and REQUEST.request_id in second_job.error.message


def test_a_job_waits_for_a_stage_that_is_down_then_runs(tmp_path):
    """A stage with no replica serving (restarting) is waited for, up to stage_wait_s; the job then completes."""
    async def scenario():
        pipeline = ScriptedPipeline([Unavailable("decoder", "no replica is serving (1 configured)")],
                                    [Unavailable("decoder", "no replica is serving (1 configured)")], DONE)
        store = make_store(tmp_path, pipeline, stage_wait_s=30.0)
        await store.start()
        job = await store.submit(REQUEST, new_job_id("video"), stream=False)
        done = await wait_for(store, job.id, JobStatus.COMPLETED)
        await store.shutdown(1.0)
        return done, pipeline.started

    done, started = asyncio.run(scenario())
    assert done.status == JobStatus.COMPLETED and len(started) == 3


def test_cancel_stops_a_running_job_and_a_queued_one_never_starts(tmp_path):
    async def scenario():
        pipeline = ScriptedPipeline(["hang", *DONE])
        store = make_store(tmp_path, pipeline)
        await store.start()
        running = await store.submit(REQUEST, new_job_id("video"), stream=False)
        queued = await store.submit(dataclasses.replace(REQUEST, request_id="req-2"), new_job_id("video"),
                                    stream=False)
        await wait_for(store, running.id, JobStatus.IN_PROGRESS)
        cancelled_queued = await store.cancel(queued.id)
        cancelled_running = await store.cancel(running.id)
        again = await store.cancel(running.id)      # a finished job is left as it is
        await store.shutdown(1.0)
        return pipeline, cancelled_queued, cancelled_running, again

    pipeline, cancelled_queued, cancelled_running, again = asyncio.run(scenario())
    assert cancelled_queued.status == JobStatus.CANCELLED and isinstance(cancelled_queued.error, Cancelled)
    assert cancelled_running.status == JobStatus.CANCELLED
    assert again.status == JobStatus.CANCELLED
    assert pipeline.started == ["req-1"]             # the queued one never ran


def test_shutdown_keeps_unfinished_jobs_and_the_next_start_finishes_them(tmp_path):
    async def first_life():
        pipeline = ScriptedPipeline([DONE[0], "hang"])
        store = make_store(tmp_path, pipeline)
        await store.start()
        running = await store.submit(REQUEST, new_job_id("gen"))
        queued = await store.submit(REQUEST, new_job_id("video"), stream=False)
        await wait_for(store, running.id, JobStatus.IN_PROGRESS)
        events = store.events(running.id)
        first = await anext(events)
        store.stop_dispatching()                    # SIGTERM
        await store.shutdown(0.05)                  # the hung job outlives the grace period
        with pytest.raises(Unavailable, match="shutting down"):
            await anext(events)
        return first, running.id, queued.id

    async def second_life(ids):
        store = make_store(tmp_path, ScriptedPipeline(DONE))
        await store.start()
        finals = [await wait_for(store, job_id, JobStatus.COMPLETED) for job_id in ids]
        await store.shutdown(1.0)
        return finals

    async def kept(ids):
        db = JobDatabase(f"sqlite:///{tmp_path / 'jobs.sqlite3'}")
        rows = [db.get(job_id)[0] for job_id in ids]
        db.close()
        return rows

    first, *ids = asyncio.run(first_life())
    assert first == DONE[0]
    rows = asyncio.run(kept(ids))
    assert [(row.status, row.attempts) for row in rows] == [("queued", 0), ("queued", 0)]
    finals = asyncio.run(second_life(ids))
    assert [job.status for job in finals] == [JobStatus.COMPLETED, JobStatus.COMPLETED]
    assert all(job.outputs for job in finals)


def test_a_job_whose_model_is_no_longer_served_fails_with_the_reason(tmp_path):
    async def first_life():
        store = make_store(tmp_path, ScriptedPipeline(["hang"], models=(MODEL, "flux-tiny")))
        await store.start()
        await store.submit(REQUEST, new_job_id("video"), stream=False)
        job = await store.submit(dataclasses.replace(REQUEST, model="flux-tiny"), new_job_id("video"), stream=False)
        await store.shutdown(0.0)
        return job.id

    async def second_life(job_id):
        store = make_store(tmp_path, ScriptedPipeline(DONE))
        await store.start()
        job = await wait_for(store, job_id, JobStatus.FAILED)
        await store.shutdown(1.0)
        return job

    job = asyncio.run(second_life(asyncio.run(first_life())))
    assert isinstance(job.error, NotFound) and "no longer served" in job.error.message


def test_ids_not_of_our_form_are_not_found(tmp_path):
    async def scenario():
        store = make_store(tmp_path, ScriptedPipeline(DONE))
        await store.start()
        errors = []
        for bad in ("../../etc/passwd", "video_..%2f", "video_" + "g" * 24, "x" * 5000):
            for call in (store.get, store.cancel):
                with pytest.raises(NotFound) as raised:
                    await call(bad)
                errors.append(raised.value)
        await store.shutdown(1.0)
        return errors

    assert len(asyncio.run(scenario())) == 8
