"""The gateway's jobs: durable (rows in store.py's database, outputs in outputs.py's store), queued until the
stages can take them, run by one gateway under a lease, resumed after a restart.

A job's life: accepted -> `queued` (its row written and leased to this gateway, a position in its model's
queue) -> `in_progress` once its model has a free slot (admission.py sizes them from the stages' capacity) ->
`completed`, `failed` (with the error) or `cancelled`. A job that meets a full stage (RESOURCE_EXHAUSTED) waits
and retries: nothing accepted fails for load. On start a gateway takes every unfinished job that no live
gateway holds and re-runs it from the start (stages are deterministic for request + seed); on shutdown the
running jobs get the grace period, then go back to `queued` with the rest, for the next start.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import enum
import functools
import logging
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator

from services.common import tracing
from services.common.errors import (
    Cancelled,
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    MeshError,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from services.common.logs import request_context
from services.gateway.admission import Admission
from services.gateway.metrics import JobObserver, job_kind
from services.gateway.outputs import OutputStore, is_job_id
from services.gateway.pipeline import (
    PREVIEW_MIME_TYPE,
    Event,
    GenerationRequest,
    MediaEvent,
    MeshPipeline,
    PreviewEvent,
    ProgressEvent,
    TensorEvent,
)
from services.gateway.store import BYTES_FIELDS, JobDatabase, JobRow, StoredRequestError, decode_request

logger = logging.getLogger(__name__)

# A running job's progress reaches the database at most this often (a step is not worth a write each).
PROGRESS_WRITE_S = 1.0
# A job started this many times without finishing (the gateway died under it each time) is failed, not retried.
MAX_ATTEMPTS = 3
MAX_RETRY_WAIT_S = 10.0
DEFAULT_LEASE_S = 30.0
DEFAULT_MAX_QUEUED = 256
DEFAULT_RETENTION_INTERVAL_S = 60.0
# An accepted job whose stage has no replica serving (restarting, being rolled) waits this long for one.
DEFAULT_STAGE_WAIT_S = 60.0
# A synchronous client's event stream nobody attached to is dropped this long after its job ended.
UNCLAIMED_STREAM_S = 60.0
# What latest_preview returns (the gateway encodes every preview as PNG).
PREVIEW_MEDIA_TYPE = PREVIEW_MIME_TYPE


class JobStatus(str, enum.Enum):
    QUEUED = "queued"
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED)


@dataclasses.dataclass(frozen=True)
class Output:
    index: int
    mime_type: str
    size: int


@dataclasses.dataclass(frozen=True)
class Job:
    """A job as the front doors show it: a snapshot (ask again for news). `request` carries every parameter but
    the bytes inputs (the conditioning image), which are read only when the job is dispatched."""

    id: str
    request: GenerationRequest
    status: JobStatus
    progress: float = 0.0                      # 0..100
    error: MeshError | None = None
    created_at: float = 0.0
    completed_at: float | None = None
    queue_position: int | None = None          # while queued: 1 = the next to run
    outputs: tuple[Output, ...] = ()

    def output(self, index: int) -> Output | None:
        return next((output for output in self.outputs if output.index == index), None)


def new_job_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


def default_instance_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def _error_classes() -> dict[str, type[MeshError]]:
    found: dict[str, type[MeshError]] = {}
    pending = [MeshError]
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        if cls is not MeshError:
            found.setdefault(cls.grpc_code.name, cls)
    return found


def error_from(code: str | None, message: str | None) -> MeshError | None:
    """A stored error back as the MeshError of its code (its message as recorded)."""
    if not code:
        return None
    cls = _error_classes().get(code, Internal)
    error = cls.__new__(cls)
    MeshError.__init__(error, message or "")
    if isinstance(error, InvalidArgument):
        error.field, _, error.reason = error.message.partition(": ")
    if isinstance(error, Unavailable):
        error.stage = error.message.partition(" ")[0]
    if isinstance(error, ResourceExhausted):
        error.retry_after_s = None
    return error


@dataclasses.dataclass(frozen=True)
class _Outcome:
    """The last item of a job's event stream: how it ended."""

    status: JobStatus
    error: MeshError | None


@dataclasses.dataclass(eq=False)
class _Run:
    """A job this gateway holds: queued here or running here."""

    id: str
    model: str
    stream: asyncio.Queue | None = None       # the submitter's events (synchronous front doors), or None
    task: asyncio.Task | None = None
    running: bool = False
    progress: float = 0.0
    progress_written: float = 0.0
    cancel_requested: bool = False
    saved: set = dataclasses.field(default_factory=set)        # outputs already stored
    delivered: set = dataclasses.field(default_factory=set)    # outputs and tensors already streamed
    ended: bool = False                                         # its stream has had its _Outcome
    preview: bytes | None = None                                # the latest preview of output 0, while it runs
    kind: str = ""                                              # image | video, for metrics ("" until known)
    created_at: float = 0.0                                     # when it was accepted (time.time())
    trace: dict = dataclasses.field(default_factory=dict)       # its submitter's trace context (tracing.carrier)

    def deliver(self, item: object) -> None:
        if self.stream is not None and not self.ended:
            self.ended = isinstance(item, _Outcome)
            self.stream.put_nowait(item)


class JobStore:
    def __init__(
        self,
        db: JobDatabase,
        outputs: OutputStore,
        pipeline: MeshPipeline,
        *,
        max_queued: int = DEFAULT_MAX_QUEUED,
        instance_id: str | None = None,
        exclusive: bool = True,
        lease_s: float = DEFAULT_LEASE_S,
        retention_age_s: float | None = None,
        retention_bytes: int | None = None,
        retention_interval_s: float = DEFAULT_RETENTION_INTERVAL_S,
        stage_wait_s: float = DEFAULT_STAGE_WAIT_S,
    ) -> None:
        """`exclusive`: this gateway is the only one on the database (SQLite under its data-dir lock), so at start
        it takes every unfinished job at once; on a shared database it takes only those whose lease expired."""
        self.db = db
        self.outputs = outputs
        self.pipeline = pipeline
        self.admission = Admission(pipeline.routes)
        self.max_queued = max_queued
        self.instance_id = instance_id or default_instance_id()
        self.exclusive = exclusive
        self.lease_s = lease_s
        self.retention_age_s = retention_age_s or None
        self.retention_bytes = retention_bytes or None
        self.retention_interval_s = retention_interval_s
        self.stage_wait_s = stage_wait_s
        # One thread: SQLite has one writer anyway, and the order of a job's writes is the order they were made.
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1 if db.is_sqlite else 4, thread_name_prefix="jobs-db")
        self._runs: dict[str, _Run] = {}
        self._queues: dict[str, collections.deque[_Run]] = collections.defaultdict(collections.deque)
        self._running: collections.Counter[str] = collections.Counter()
        self._streams: dict[str, asyncio.Queue] = {}
        self._admitting = 0
        self._wake = asyncio.Event()
        self._stopping = False
        self._drain_started: float | None = None
        self._interrupted: set[str] = set()
        self._loops: list[asyncio.Task] = []
        self._closed = False
        self.lock = None        # the data dir's lock file, when the caller took one (kept open while we run)
        self.observer: JobObserver = JobObserver()      # metrics (services/gateway/metrics.py) once the app is made

    async def _db(self, method, *args, **kwargs):
        if self._closed:    # a request that arrives while the front doors close, after shutdown: 503, not 500
            raise Unavailable("gateway", "shutting down; retry on another gateway replica or after the restart")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(method, *args, **kwargs))

    # -- life of the store ---------------------------------------------------------------------------------

    async def start(self) -> None:
        """Take the unfinished jobs (see __init__), then dispatch, renew leases and apply retention until
        shutdown."""
        await self._adopt(at_start=True)
        self._loops = [asyncio.create_task(self._dispatch_loop(), name="jobs-dispatch"),
                       asyncio.create_task(self._lease_loop(), name="jobs-leases"),
                       asyncio.create_task(self._retention_loop(), name="jobs-retention")]

    def stop_dispatching(self) -> None:
        """No queued job starts from now on (the gateway is draining); running ones go on."""
        if not self._stopping:
            self._stopping = True
            self._drain_started = time.monotonic()
            self._wake.set()
            # A client waiting on a job that will not start here hears so now, not when the grace period ends.
            for queue in self._queues.values():
                for run in queue:
                    run.deliver(_Outcome(JobStatus.QUEUED, self._kept(run)))

    async def shutdown(self, grace_s: float) -> None:
        """Stop dispatching, give running jobs until `grace_s` after the drain began, then stop them and put them
        back in the queue; everything unfinished stays in the database for the next start."""
        self.stop_dispatching()
        remaining = grace_s - (time.monotonic() - self._drain_started)
        running = [run.task for run in self._runs.values() if run.task is not None]
        if running and remaining > 0:
            await asyncio.wait(running, timeout=remaining)
        leftover = [run.task for run in self._runs.values() if run.task is not None and not run.task.done()]
        for task in leftover:
            task.cancel()
        await asyncio.gather(*leftover, return_exceptions=True)
        for loop_task in self._loops:
            loop_task.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        try:
            await self._db(self.db.requeue, self._interrupted, self.instance_id, release=True, refund_attempt=True)
            await self._db(self.db.release_leases, self.instance_id)
        except Exception as error:   # the database is away: the next start requeues them anyway (and leases expire)
            logger.warning("could not hand the unfinished jobs back at shutdown: %s", str(error).splitlines()[0])
        finally:
            logger.info("jobs: %d interrupted and %d queued kept for the next start", len(self._interrupted),
                        len(self._runs))
            self._closed = True
            self._executor.shutdown(wait=True)
            self.db.close()

    # -- the front doors' calls ----------------------------------------------------------------------------

    @property
    def active(self) -> int:
        """Jobs queued or running on this gateway."""
        return len(self._runs)

    @property
    def queued(self) -> int:
        return sum(len(queue) for queue in self._queues.values())

    def counts(self) -> dict[str, dict[str, int]]:
        """Jobs held here now, by model: {"queued": n, "in_progress": m} (for metrics)."""
        models = {model for model, queue in self._queues.items() if queue} | set(self._running)
        return {model: {"queued": len(self._queues.get(model, ())), "in_progress": self._running[model]}
                for model in models}

    async def submit(self, request: GenerationRequest, job_id: str, stream: bool = True) -> Job:
        """Record a new job as queued; `stream` keeps its events for one `events(job_id)` reader. Raises
        ResourceExhausted (with the time to retry after) when the queue is full."""
        queued = self.queued + self._admitting
        if queued >= self.max_queued:
            slots = max(1, sum(self._running.values()))
            raise ResourceExhausted(
                f"the gateway has {queued} jobs queued, its limit (--max-queued-jobs); retry later",
                retry_after_s=self.admission.retry_after(queued, slots))
        self._admitting += 1
        created = time.time()
        try:
            await self._db(self.db.insert, job_id, request, created_at=created, lease_owner=self.instance_id,
                           lease_expires=created + self.lease_s)
        except Exception as error:
            logger.exception("could not record job %s", job_id)
            raise Unavailable("gateway", "cannot record the job in its database; retry later") from error
        finally:
            self._admitting -= 1
        # The job runs in a task of its own: it keeps the submitter's trace context, to join its trace.
        run = _Run(job_id, request.model, stream=asyncio.Queue() if stream else None, kind=job_kind(request),
                   created_at=created, trace=tracing.carrier())
        if run.stream is not None:
            self._streams[job_id] = run.stream
        self._enqueue(run)
        return Job(id=job_id, request=dataclasses.replace(request, **dict.fromkeys(BYTES_FIELDS, b"")),
                   status=JobStatus.QUEUED,
                   created_at=created, queue_position=len(self._queues[run.model]))

    async def get(self, job_id: str) -> Job:
        """The job as it is now; NotFound for an id that is not a job's (or not of our form)."""
        if not is_job_id(job_id):
            raise NotFound(f"job {job_id!r} not found")
        found = await self._db(self.db.get, job_id)
        if found is None:
            raise NotFound(f"job {job_id!r} not found")
        row, outputs = found
        try:
            request = decode_request(row.request_json, None)
        except StoredRequestError:
            request = GenerationRequest(request_id="", model=row.model, prompt="")
        status = JobStatus(row.status)
        run = self._runs.get(job_id)
        progress = run.progress if run is not None and run.running and status == JobStatus.IN_PROGRESS \
            else row.progress
        position = None
        if status == JobStatus.QUEUED:
            queue = self._queues.get(row.model, ())
            if run is not None and run in queue:
                position = list(queue).index(run) + 1
            else:
                position = await self._db(self.db.queued_ahead, row) + 1
        return Job(id=row.id, request=request, status=status, progress=progress,
                   error=error_from(row.error_code, row.error_message), created_at=row.created_at,
                   completed_at=row.completed_at, queue_position=position,
                   outputs=tuple(Output(o.index, o.mime_type, o.size) for o in outputs))

    async def cancel(self, job_id: str) -> Job:
        """Stop a job: a queued one never runs, a running one's stage call is cancelled. A finished job is left
        as it is."""
        if not is_job_id(job_id):
            raise NotFound(f"job {job_id!r} not found")
        run = self._runs.get(job_id)
        if run is not None and run.task is not None:
            run.cancel_requested = True
            run.task.cancel()
            await asyncio.wait({run.task})
        elif run is not None:
            self._queues[run.model].remove(run)
            await self._finish(run, JobStatus.CANCELLED, Cancelled(f"job {job_id} was cancelled"))
            self._forget(run)
        else:   # not here: held by another gateway on the database, whose runner sees it at its next write
            await self._db(self.db.finish, job_id, "cancelled", now=time.time(), error_code="CANCELLED",
                           error_message=f"job {job_id} was cancelled")
        return await self.get(job_id)

    async def delete(self, job_id: str) -> None:
        """Forget a job for good: cancelled first if it has not finished, then its rows and its files are gone
        (NotFound for an unknown id)."""
        job = await self.get(job_id)
        if not job.status.finished:
            await self.cancel(job_id)
        # Rows first, as retention does: nobody is sent to a file that is missing.
        await self._db(self.db.delete, [job_id])
        await asyncio.to_thread(self.outputs.delete, job_id)
        logger.info("job %s deleted", job_id)

    async def page(self, owner: str, id_prefix: str, *, after: str | None = None, limit: int = 20,
                   descending: bool = True) -> tuple[list[Job], bool]:
        """`owner`'s jobs whose id starts with `id_prefix`, one page (newest first when `descending`), and whether
        more follow. NotFound when `after` is not one of those jobs."""
        found = await self._db(self.db.page, owner=owner, id_prefix=id_prefix, after=after, limit=limit,
                               descending=descending)
        if found is None:
            raise NotFound(f"job {after!r} not found")
        rows, has_more = found
        page = []
        for row in rows:
            try:
                page.append(await self.get(row.id))
            except NotFound:        # deleted since the page was read
                pass
        return page, has_more

    async def replace_output(self, job_id: str, index: int, mime_type: str, data: bytes) -> None:
        """Store an output again in another encoding (the REST image's output_format), in place of the stage's."""
        old = (await self.get(job_id)).output(index)
        size = await asyncio.to_thread(self.outputs.write, job_id, index, mime_type, data)
        await self._db(self.db.add_output, job_id, index, mime_type, size)
        if old is not None and old.mime_type != mime_type:
            await asyncio.to_thread(self.outputs.remove, job_id, index, old.mime_type)

    def latest_preview(self, job_id: str) -> bytes | None:
        """The latest live preview (of the first output, PREVIEW_MEDIA_TYPE) of a job running on this gateway; None
        when it asked for none (preview_every), has none yet, has finished, or runs on another gateway.

        Kept in memory, not in the database: a preview is obsolete within seconds and worthless once the job ends
        (its outputs, and their thumbnail, replace it); writing each one would put a blob write per k steps of
        every running job on the database that PROGRESS_WRITE_S keeps to one small write a second; and after a
        restart the job runs again from the start and makes new previews anyway."""
        run = self._runs.get(job_id)
        return run.preview if run is not None and run.running else None

    def abandon(self, job_id: str) -> None:
        """The client waiting on the job went away: cancel it, unless the gateway is shutting down (then the
        job stays for the next start)."""
        run = self._runs.get(job_id)
        if run is None or self._stopping:
            return
        task = asyncio.ensure_future(self.cancel(job_id))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def events(self, job_id: str) -> AsyncIterator[Event]:
        """The events of a job submitted with `stream`, as they come; raises what ended the job, if not success.
        A reader that stops early (cancelled, gone) cancels the job."""
        stream = self._streams.pop(job_id, None)
        if stream is None:
            raise Internal(f"job {job_id} has no event stream")
        ended = False
        try:
            while True:
                item = await stream.get()
                if isinstance(item, _Outcome):
                    ended = True
                    if item.error is not None:
                        raise item.error
                    return
                yield item
        finally:
            if not ended:
                self.abandon(job_id)

    # -- queue and dispatch --------------------------------------------------------------------------------

    def _enqueue(self, run: _Run) -> None:
        self._runs[run.id] = run
        self._queues[run.model].append(run)
        self._wake.set()

    def _forget(self, run: _Run) -> None:
        self._runs.pop(run.id, None)
        if run.id in self._streams:      # nobody attached to it (yet): drop it later rather than keep it forever
            asyncio.get_running_loop().call_later(UNCLAIMED_STREAM_S, self._streams.pop, run.id, None)

    async def _dispatch_loop(self) -> None:
        while not self._stopping:
            self._wake.clear()
            for model, queue in list(self._queues.items()):
                if not queue:
                    continue
                try:
                    slots = await self.admission.slots(model)
                except Exception:    # never let a failed probe stop dispatching
                    logger.exception("reading the capacity of %s's stages failed", model)
                    slots = 1
                while queue and self._running[model] < slots and not self._stopping:
                    run = queue.popleft()
                    self._running[model] += 1
                    run.task = asyncio.create_task(self._execute(run), name=f"job-{run.id}")
            await self._wake.wait()

    async def _execute(self, run: _Run) -> None:
        try:
            try:
                claimed = await self._db(self.db.claim, run.id, self.instance_id, time.time())
            except StoredRequestError as error:
                await self._finish(run, JobStatus.FAILED, Internal(f"job {run.id} cannot be resumed: {error}"))
                return
            if claimed is None:          # cancelled, or taken over, while it waited
                run.deliver(_Outcome(JobStatus.CANCELLED, Cancelled(f"job {run.id} was cancelled")))
                return
            row, request = claimed
            with request_context(request.request_id), tracing.resumed(run.trace, "diffmesh.job", job_id=run.id,
                                                                         model=run.model):
                await self._run(run, row, request)
        except asyncio.CancelledError:   # while it was being claimed; _run handles its own
            await self._stopped(run)
        except Exception:                # the database failed under it: the row stays unfinished, for a restart
            logger.exception("job %s: recording its progress failed", run.id)
        finally:
            run.deliver(_Outcome(JobStatus.FAILED, Unavailable(
                "gateway", f"its job database failed; job {run.id} is kept and runs again when the gateway restarts")))
            self._running[run.model] -= 1
            self._forget(run)
            self._wake.set()

    async def _run(self, run: _Run, row: JobRow, request: GenerationRequest) -> None:
        run.running = True
        started = time.monotonic()
        run.kind, run.created_at = job_kind(request), row.created_at
        self.observer.job_started(run.id, run.model, run.kind, time.time() - row.created_at)
        try:
            if row.attempts > MAX_ATTEMPTS:
                raise Internal(f"job {run.id} was started {row.attempts - 1} times and the gateway stopped under "
                               "it each time; it is not tried again")
            if row.attempts > 1:        # resumed: the model's limits may have changed since it was accepted
                await self.pipeline.validate(request)
                logger.info("job %s resumed (attempt %d)", run.id, row.attempts)
            await self._generate(run, request)
        except asyncio.CancelledError:
            await self._stopped(run)
        except Cancelled as error:
            await self._finish(run, JobStatus.CANCELLED, error)
        except MeshError as error:
            await self._finish(run, JobStatus.FAILED, error)
        except Exception:
            logger.exception("job %s failed", run.id)
            await self._finish(run, JobStatus.FAILED, Internal(f"internal error (request_id={request.request_id})"))
        else:
            self.admission.record(time.monotonic() - started)
            await self._finish(run, JobStatus.COMPLETED, None)

    @staticmethod
    def _kept(run: _Run) -> Unavailable:
        return Unavailable("gateway", f"shutting down; job {run.id} is kept and runs when the gateway restarts")

    async def _stopped(self, run: _Run) -> None:
        """A run's task was cancelled: by a client (the job is cancelled) or by shutdown (it is kept)."""
        if self._stopping and not run.cancel_requested:
            self._interrupted.add(run.id)
            run.deliver(_Outcome(JobStatus.QUEUED, self._kept(run)))
            return
        await self._finish(run, JobStatus.CANCELLED, Cancelled(f"job {run.id} was cancelled"))

    async def _generate(self, run: _Run, request: GenerationRequest) -> None:
        """Run the pipeline to the end; a stage that is full (RESOURCE_EXHAUSTED) means wait and run again (from
        the start: the same request and seed give the same outputs, and those already passed on are not passed
        on twice), until the request's own deadline. A stage with no replica serving (a restart, a roll-out, the
        stages still starting when a restarted gateway resumes its jobs) is waited for up to `stage_wait_s`."""
        deadline = time.monotonic() + request.timeout_s if request.timeout_s else None
        backoff = 0.5
        down_since: float | None = None
        while True:
            try:
                async for event in self.pipeline.generate(request):
                    await self._observe(run, event)
                return
            except ResourceExhausted as error:
                self.admission.forget(request.model)
                wait = min(max(error.retry_after_s or 0.0, backoff), MAX_RETRY_WAIT_S)
                what, message = "a full stage", error.message
            except Unavailable as error:
                down_since = down_since or time.monotonic()
                if error.stage == "gateway" or time.monotonic() - down_since >= self.stage_wait_s:
                    raise
                wait = min(backoff, MAX_RETRY_WAIT_S)
                what, message = f"the {error.stage} stage", error.message
            if deadline is not None and time.monotonic() + wait > deadline:
                raise DeadlineExceeded(f"request {request.request_id} waited for {what} past its "
                                       f"{request.timeout_s:.0f}s deadline ({message})") from None
            logger.info("job %s: %s; retrying in %.1fs", run.id, message, wait)
            await asyncio.sleep(wait)
            backoff = min(2 * backoff, MAX_RETRY_WAIT_S)

    async def _observe(self, run: _Run, event: Event) -> None:
        if isinstance(event, ProgressEvent):
            run.progress = round(100.0 * event.fraction, 1)
            now = time.monotonic()
            if now - run.progress_written >= PROGRESS_WRITE_S:
                run.progress_written = now
                if not await self._db(self.db.set_progress, run.id, run.progress):
                    raise Cancelled(f"job {run.id} was cancelled")
            run.deliver(event)
            return
        if isinstance(event, PreviewEvent):
            if event.index == 0:
                run.preview = event.data
            run.deliver(event)
            return
        if isinstance(event, MediaEvent):
            key = ("media", event.index)
            if key not in run.saved:
                size = await asyncio.to_thread(self.outputs.write, run.id, event.index, event.mime_type, event.data)
                await self._db(self.db.add_output, run.id, event.index, event.mime_type, size)
                run.saved.add(key)
        elif isinstance(event, TensorEvent):
            key = ("tensor", event.name)
        else:
            raise TypeError(f"unknown event {event!r}")
        if key not in run.delivered:
            run.delivered.add(key)
            run.deliver(event)

    async def _finish(self, run: _Run, status: JobStatus, error: MeshError | None) -> None:
        recorded = await self._db(
            self.db.finish, run.id, status.value, now=time.time(),
            progress=100.0 if status == JobStatus.COMPLETED else None,
            error_code=error.grpc_code.name if error else None, error_message=error.message if error else None)
        if recorded:
            logger.info("job %s %s%s", run.id, status.value, f": {error.message}" if error else "")
            self.observer.job_finished(run.id, run.model, run.kind or "unknown", status.value,
                                       error.grpc_code.name if error else "OK",
                                       time.time() - run.created_at if run.created_at else None)
        run.deliver(_Outcome(status, error))

    # -- leases, resume, retention -------------------------------------------------------------------------

    async def _adopt(self, at_start: bool = False) -> None:
        now = time.time()
        rows = await self._db(self.db.adopt, self.instance_id, now, now + self.lease_s,
                              everything=self.exclusive and at_start, include_own=at_start)
        adopted = 0
        for row in rows:
            if row.id in self._runs:
                continue
            run = _Run(row.id, row.model)
            if row.model not in self.pipeline.routes:
                self._runs[row.id] = run
                await self._finish(run, JobStatus.FAILED, NotFound(
                    f"job {row.id} cannot be resumed: model {row.model!r} is no longer served by this gateway"))
                self._forget(run)
                continue
            self._enqueue(run)
            adopted += 1
        if adopted:
            logger.info("resuming %d unfinished job(s)", adopted)

    async def _lease_loop(self) -> None:
        while True:
            await asyncio.sleep(self.lease_s / 3)
            try:
                await self._db(self.db.heartbeat, self.instance_id, time.time() + self.lease_s)
                if not self.exclusive and not self._stopping:
                    await self._adopt()
            except Exception:       # the database is away for now: try again at the next beat
                logger.exception("renewing job leases failed")

    async def _retention_loop(self) -> None:
        while True:
            try:
                await self.apply_retention()
            except Exception:
                logger.exception("retention failed")
            await asyncio.sleep(self.retention_interval_s)

    async def apply_retention(self) -> list[str]:
        """Delete finished jobs older than the retention age, then the oldest finished until their outputs fit in
        the retention bytes; returns the ids deleted."""
        if self.retention_age_s is None and self.retention_bytes is None:
            return []
        older_than = time.time() - self.retention_age_s if self.retention_age_s else None
        ids = await self._db(self.db.expired, older_than=older_than, max_bytes=self.retention_bytes)
        if ids:
            # Rows first: a job is gone before its files are, so nobody is sent to a file that is missing.
            await self._db(self.db.delete, ids)
            for job_id in ids:
                await asyncio.to_thread(self.outputs.delete, job_id)
            logger.info("retention: deleted %d finished job(s)", len(ids))
        return ids
