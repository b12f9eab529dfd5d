"""Tests for services.gateway.jobs.JobStore: bounded jobs, outcome tracking, cancellation and eviction."""

from __future__ import annotations

import asyncio

import pytest

from services.common.errors import Cancelled, Internal, InvalidArgument, NotFound, ResourceExhausted
from services.gateway.jobs import Job, JobStatus, JobStore
from services.gateway.pipeline import GenerationRequest, MediaEvent, ProgressEvent

REQUEST = GenerationRequest(request_id="req-1", model="wan-tiny", prompt="a cat")
TIMEOUT_S = 2.0


async def _events(*events, then: BaseException | None = None, hang: bool = False):
    """An event source as MeshPipeline.generate would be: yields events, then fails or hangs if asked."""
    for event in events:
        await asyncio.sleep(0)
        yield event
    if then is not None:
        raise then
    if hang:
        await asyncio.Event().wait()


async def _drain(store: JobStore, job: Job, source) -> list:
    return [event async for event in store.track(job, source)]


def test_second_active_job_is_refused():
    store = JobStore(max_active=1)
    store.create(REQUEST, "job_1")
    with pytest.raises(ResourceExhausted):
        store.create(REQUEST, "job_2")
    with pytest.raises(NotFound):
        store.get("job_2")  # the refused job was not stored
    assert store.active == 1


def test_finished_job_frees_its_active_slot():
    store = JobStore(max_active=1)
    store.create(REQUEST, "job_1").finish(JobStatus.COMPLETED)
    assert store.create(REQUEST, "job_2").status == JobStatus.QUEUED


def test_get_unknown_job_is_not_found():
    store = JobStore()
    with pytest.raises(NotFound) as info:
        store.get("job_missing")
    assert "job_missing" in info.value.message


def test_get_returns_the_created_job():
    store = JobStore()
    job = store.create(REQUEST, "job_1")
    assert store.get("job_1") is job
    assert job.status == JobStatus.QUEUED and job.progress == 0.0


def test_track_marks_completed_with_full_progress_and_keeps_media():
    async def scenario():
        store = JobStore()
        job = store.create(REQUEST, "job_1")
        media = MediaEvent(0, "image/png", b"\x89PNG...")
        source = _events(ProgressEvent("encode", 1, 1, 0.05), ProgressEvent("denoise", 1, 2, 0.475), media)
        seen = await _drain(store, job, source)
        return job, media, seen

    job, media, seen = asyncio.run(scenario())
    assert len(seen) == 3 and seen[-1] is media  # events pass through unchanged
    assert job.status == JobStatus.COMPLETED
    assert job.progress == 100.0
    assert job.error is None
    assert job.media == {0: media}
    assert job.done.is_set()
    assert job.completed_at is not None


def test_track_records_progress_while_running():
    async def scenario():
        store = JobStore()
        job = store.create(REQUEST, "job_1")
        release = asyncio.Event()

        async def paused_source():
            yield ProgressEvent("denoise", 3, 10, 0.305)
            await release.wait()  # the job is still running while the consumer looks at it

        observed = []
        async for _ in store.track(job, paused_source()):
            observed.append((job.status, job.progress))
            release.set()
        return observed, job.status

    observed, final = asyncio.run(scenario())
    assert observed == [(JobStatus.IN_PROGRESS, 30.5)]
    assert final == JobStatus.COMPLETED


def test_track_marks_failed_with_the_mesh_error():
    error = InvalidArgument("width", "bad")

    async def scenario():
        store = JobStore()
        job = store.create(REQUEST, "job_1")
        with pytest.raises(InvalidArgument) as info:
            await _drain(store, job, _events(ProgressEvent("encode", 1, 1, 0.05), then=error))
        assert info.value is error  # re-raised to the consumer too
        return job

    job = asyncio.run(scenario())
    assert job.status == JobStatus.FAILED
    assert job.error is error
    assert job.progress == 5.0  # not forced to 100 on failure
    assert job.done.is_set()


def test_track_hides_unexpected_errors_behind_internal():
    async def scenario():
        store = JobStore()
        job = store.create(REQUEST, "job_1")
        with pytest.raises(KeyError):
            await _drain(store, job, _events(then=KeyError("secret detail")))
        return job

    job = asyncio.run(scenario())
    assert job.status == JobStatus.FAILED
    assert isinstance(job.error, Internal)
    assert "secret detail" not in job.error.message
    assert REQUEST.request_id in job.error.message


def test_track_marks_cancelled_when_consumer_task_is_cancelled():
    async def scenario():
        store = JobStore()
        job = store.create(REQUEST, "job_1")
        first = asyncio.Event()

        async def consume():
            async for _ in store.track(job, _events(ProgressEvent("encode", 1, 1, 0.05), hang=True)):
                first.set()

        task = asyncio.create_task(consume())
        await asyncio.wait_for(first.wait(), TIMEOUT_S)
        assert job.status == JobStatus.IN_PROGRESS
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return job

    job = asyncio.run(scenario())
    assert job.status == JobStatus.CANCELLED
    assert isinstance(job.error, Cancelled)
    assert job.done.is_set()


def test_store_cancel_of_running_job_cancels_its_task():
    async def scenario():
        store = JobStore(max_active=1)
        job = store.create(REQUEST, "job_1")
        store.start_background(job, _events(ProgressEvent("denoise", 1, 5, 0.2), hang=True))
        for _ in range(20):
            if job.status == JobStatus.IN_PROGRESS:
                break
            await asyncio.sleep(0)
        assert job.status == JobStatus.IN_PROGRESS
        store.cancel(job.id)
        await asyncio.wait_for(job.done.wait(), TIMEOUT_S)
        await asyncio.wait_for(asyncio.gather(job.task, return_exceptions=True), TIMEOUT_S)
        return store, job

    store, job = asyncio.run(scenario())
    assert job.status == JobStatus.CANCELLED
    assert store.active == 0


def test_cancel_of_queued_background_job_marks_it_cancelled():
    async def scenario():
        store = JobStore(max_active=1)
        job = store.create(REQUEST, "job_1")
        started = []

        async def source():
            started.append(True)
            yield ProgressEvent("encode", 1, 1, 0.05)

        store.start_background(job, source())
        assert job.status == JobStatus.QUEUED
        returned = store.cancel(job.id)
        assert returned is job
        # Recorded at once, before the task gets a chance to run (it may never start).
        assert job.status == JobStatus.CANCELLED
        assert job.done.is_set()
        await asyncio.gather(job.task, return_exceptions=True)
        assert job.status == JobStatus.CANCELLED
        assert started == []  # the generation never began
        assert started == []
        # The slot is free again.
        store.create(REQUEST, "job_2")
        return job

    job = asyncio.run(scenario())
    assert job.status == JobStatus.CANCELLED
    assert isinstance(job.error, Cancelled)


def test_background_job_runs_to_completion():
    async def scenario():
        store = JobStore()
        job = store.create(REQUEST, "job_1")
        store.start_background(job, _events(ProgressEvent("decode", 1, 1, 1.0), MediaEvent(0, "video/mp4", b"mp4")))
        await asyncio.wait_for(job.done.wait(), TIMEOUT_S)
        return job

    job = asyncio.run(scenario())
    assert job.status == JobStatus.COMPLETED
    assert job.media[0].data == b"mp4"


def test_cancel_of_finished_job_changes_nothing():
    store = JobStore()
    job = store.create(REQUEST, "job_1")
    job.finish(JobStatus.COMPLETED)
    assert store.cancel("job_1").status == JobStatus.COMPLETED
    with pytest.raises(NotFound):
        store.cancel("job_missing")


def test_finished_jobs_beyond_max_finished_are_evicted_oldest_first():
    store = JobStore(max_active=10, max_finished=2)
    for i in range(1, 4):
        store.create(REQUEST, f"job_{i}").finish(JobStatus.COMPLETED)
    store.create(REQUEST, "job_4")  # eviction runs as jobs are created
    with pytest.raises(NotFound):
        store.get("job_1")
    assert store.get("job_2").status == JobStatus.COMPLETED
    assert store.get("job_3").status == JobStatus.COMPLETED
    assert store.get("job_4").status == JobStatus.QUEUED


def test_active_jobs_are_never_evicted():
    store = JobStore(max_active=10, max_finished=0)
    active = store.create(REQUEST, "job_active")
    for i in range(3):
        store.create(REQUEST, f"job_{i}").finish(JobStatus.FAILED, InvalidArgument("x", "y"))
    store.create(REQUEST, "job_last")
    assert store.get("job_active") is active
    for i in range(3):
        with pytest.raises(NotFound):
            store.get(f"job_{i}")
