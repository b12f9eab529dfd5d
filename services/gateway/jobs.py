"""The gateway's job store: every generation is a job with an id, a status, progress and its outputs.

In memory, bounded: finished jobs beyond `max_finished` are dropped oldest first, and no more than
`max_active` jobs run or wait at once (the next one is refused with RESOURCE_EXHAUSTED).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import enum
import logging
import time
import uuid
from collections.abc import AsyncIterator

from services.common.errors import Cancelled, Internal, MeshError, NotFound, ResourceExhausted
from services.common.logs import request_context
from services.gateway.pipeline import Event, GenerationRequest, MediaEvent, ProgressEvent

logger = logging.getLogger(__name__)


class JobStatus(str, enum.Enum):
    QUEUED = "queued"
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED)


@dataclasses.dataclass
class Job:
    id: str
    request: GenerationRequest
    status: JobStatus = JobStatus.QUEUED
    progress: float = 0.0                      # 0..100
    error: MeshError | None = None
    created_at: float = dataclasses.field(default_factory=time.time)
    completed_at: float | None = None
    media: dict[int, MediaEvent] = dataclasses.field(default_factory=dict)
    task: asyncio.Task | None = None
    done: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    cancel_requested: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)

    def observe(self, event: Event) -> None:
        if isinstance(event, ProgressEvent):
            self.status = JobStatus.IN_PROGRESS
            self.progress = round(100.0 * event.fraction, 1)
        elif isinstance(event, MediaEvent):
            self.media[event.index] = event

    def finish(self, status: JobStatus, error: MeshError | None = None) -> None:
        self.status, self.error = status, error
        if status == JobStatus.COMPLETED:
            self.progress = 100.0
        self.completed_at = time.time()
        self.done.set()


def new_job_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


class JobStore:
    def __init__(self, max_active: int = 64, max_finished: int = 256) -> None:
        self.max_active = max_active
        self.max_finished = max_finished
        self._jobs: collections.OrderedDict[str, Job] = collections.OrderedDict()

    @property
    def active(self) -> int:
        return sum(1 for job in self._jobs.values() if not job.status.finished)

    def create(self, request: GenerationRequest, job_id: str) -> Job:
        if self.active >= self.max_active:
            raise ResourceExhausted(f"the gateway is running {self.active} jobs, its limit; retry later")
        job = Job(id=job_id, request=request)
        self._jobs[job_id] = job
        self._evict()
        return job

    def get(self, job_id: str) -> Job:
        job = self._jobs.get(job_id)
        if job is None:
            raise NotFound(f"job {job_id!r} not found")
        return job

    def cancel(self, job_id: str) -> Job:
        job = self.get(job_id)
        if not job.status.finished:
            job.cancel_requested.set()
            if job.status == JobStatus.QUEUED:  # it may never get to run: record the outcome now
                job.finish(JobStatus.CANCELLED, Cancelled(f"job {job.id} was cancelled"))
        return job

    async def track(self, job: Job, events: AsyncIterator[Event]) -> AsyncIterator[Event]:
        """Pass a job's events through, recording progress, outputs and the final status on the job.

        A cancel request interrupts the stage call in flight (its client call is cancelled, which the stage
        sees and stops at its next step) and ends the stream with Cancelled. Cancelling the consuming task
        is not enough: grpc.aio does not end a server stream whose handler task is cancelled from outside.
        """
        job.task = asyncio.current_task()
        source = events.__aiter__()
        cancel_wait = asyncio.ensure_future(job.cancel_requested.wait())
        try:
            while True:
                if job.cancel_requested.is_set():
                    raise Cancelled(f"job {job.id} was cancelled")
                next_event = asyncio.ensure_future(source.__anext__())
                await asyncio.wait({next_event, cancel_wait}, return_when=asyncio.FIRST_COMPLETED)
                if not next_event.done():
                    next_event.cancel()
                    await asyncio.wait({next_event})
                    raise Cancelled(f"job {job.id} was cancelled")
                try:
                    event = next_event.result()
                except StopAsyncIteration:
                    break
                job.observe(event)
                yield event
        except (asyncio.CancelledError, Cancelled):
            job.finish(JobStatus.CANCELLED, Cancelled(f"job {job.id} was cancelled"))
            raise
        except MeshError as error:
            job.finish(JobStatus.FAILED, error)
            raise
        except Exception:
            logger.exception("job %s failed", job.id)
            job.finish(JobStatus.FAILED, Internal(f"internal error (request_id={job.request.request_id})"))
            raise
        else:
            job.finish(JobStatus.COMPLETED)
        finally:
            cancel_wait.cancel()

    def start_background(self, job: Job, events: AsyncIterator[Event]) -> None:
        """Run a job to completion in the background (REST video jobs), keeping its outputs on the job."""

        async def run() -> None:
            with request_context(job.request.request_id):
                try:
                    async for _ in self.track(job, events):
                        pass
                except (Exception, asyncio.CancelledError):  # noqa: BLE001 - track() recorded it on the job
                    pass

        job.task = asyncio.create_task(run(), name=f"job-{job.id}")

    def _evict(self) -> None:
        finished = [job_id for job_id, job in self._jobs.items() if job.status.finished]
        for job_id in finished[: max(0, len(finished) - self.max_finished)]:
            del self._jobs[job_id]
