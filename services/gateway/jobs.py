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
        """Stop a job: its worker task is cancelled, which cancels the stage call in flight."""
        job = self.get(job_id)
        if not job.status.finished:
            job.cancel_requested.set()
            if job.task is not None:
                job.task.cancel()
            if job.status == JobStatus.QUEUED:  # it may never get to run: record the outcome now
                job.finish(JobStatus.CANCELLED, Cancelled(f"job {job.id} was cancelled"))
        return job

    def start(self, job: Job, events: AsyncIterator[Event], sink: asyncio.Queue | None = None) -> asyncio.Task:
        """Run a job's events to the end in a worker task of its own, recording progress, outputs and the
        final status on the job, and passing each event to `sink` when given.

        The worker is separate from whoever relays the events so that cancelling it always works: grpc.aio
        stops pulling from a server stream whose client went away, so a handler may never run again.
        """

        async def work() -> None:
            with request_context(job.request.request_id):
                try:
                    if job.cancel_requested.is_set():
                        raise asyncio.CancelledError
                    async for event in events:
                        job.observe(event)
                        if sink is not None:
                            sink.put_nowait(event)
                except asyncio.CancelledError:
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

        job.task = asyncio.create_task(work(), name=f"job-{job.id}")
        return job.task

    async def track(self, job: Job, events: AsyncIterator[Event]) -> AsyncIterator[Event]:
        """Run a job (see `start`) and yield its events as they come; raises what ended the job, if not success.

        Cancelling the consumer cancels the job."""
        sink: asyncio.Queue[Event] = asyncio.Queue()
        worker = self.start(job, events, sink)
        try:
            while True:
                next_event = asyncio.ensure_future(sink.get())
                await asyncio.wait({next_event, worker}, return_when=asyncio.FIRST_COMPLETED)
                if next_event.done():
                    yield next_event.result()
                    continue
                next_event.cancel()
                if worker.done() and sink.empty():
                    break
            if worker.cancelled():
                raise job.error or Cancelled(f"job {job.id} was cancelled")
            worker.result()  # re-raises the error that ended the job
        finally:
            if not worker.done():
                worker.cancel()

    def start_background(self, job: Job, events: AsyncIterator[Event]) -> None:
        """Run a job with nobody reading its events (REST video jobs): outputs stay on the job."""
        worker = self.start(job, events)
        # Retrieve the outcome so asyncio does not warn about it; it is recorded on the job already.
        worker.add_done_callback(lambda task: task.cancelled() or task.exception())

    def _evict(self) -> None:
        finished = [job_id for job_id, job in self._jobs.items() if job.status.finished]
        for job_id in finished[: max(0, len(finished) - self.max_finished)]:
            del self._jobs[job_id]
