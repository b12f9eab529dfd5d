"""The gateway's job database: one row per job (every request field, status, progress, error, timestamps, the
lease of the gateway that runs it) and one per output, on SQLAlchemy Core, so the embedded SQLite default and
a shared PostgreSQL run the same statements.

Synchronous on purpose: the job store calls it from one worker thread (`JobStore`), which also serializes
SQLite's writers. Bytes fields of the request (the conditioning image) live in their own table and are read
only when a job is dispatched, so polling a job never loads its inputs.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import typing
from collections.abc import Iterable
from typing import IO

import sqlalchemy as sa

from services.denoiser.cache import StepCache
from services.gateway.pipeline import GenerationRequest

logger = logging.getLogger(__name__)

UNFINISHED = ("queued", "in_progress")
FINISHED = ("completed", "failed", "cancelled")

metadata = sa.MetaData()
jobs = sa.Table(
    "diffmesh_jobs", metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("model", sa.String(255), nullable=False),
    sa.Column("owner", sa.String(255), nullable=False, default=""),
    sa.Column("status", sa.String(16), nullable=False),
    # Every GenerationRequest field but the bytes ones, as JSON (see encode_request).
    sa.Column("request", sa.Text, nullable=False),
    sa.Column("progress", sa.Float, nullable=False, default=0.0),
    sa.Column("error_code", sa.String(32)),
    sa.Column("error_message", sa.Text),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("started_at", sa.Float),
    sa.Column("completed_at", sa.Float),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    # The gateway instance that runs (or will run) the job, until lease_expires (unix seconds).
    sa.Column("lease_owner", sa.String(128)),
    sa.Column("lease_expires", sa.Float),
    sa.Column("output_bytes", sa.BigInteger, nullable=False, default=0),
    sa.Index("diffmesh_jobs_queue", "status", "model", "created_at"),
    sa.Index("diffmesh_jobs_lease", "lease_owner"),
    sa.Index("diffmesh_jobs_completed", "completed_at"),
    sa.Index("diffmesh_jobs_owner", "owner", "created_at"),     # a caller's own jobs, newest first (GET /v1/videos)
)
inputs = sa.Table(
    "diffmesh_job_inputs", metadata,
    sa.Column("job_id", sa.String(64), sa.ForeignKey("diffmesh_jobs.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("field", sa.String(64), primary_key=True),
    sa.Column("data", sa.LargeBinary, nullable=False),
)
outputs = sa.Table(
    "diffmesh_job_outputs", metadata,
    sa.Column("job_id", sa.String(64), sa.ForeignKey("diffmesh_jobs.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("output_index", sa.Integer, primary_key=True),
    sa.Column("mime_type", sa.String(64), nullable=False),
    sa.Column("size", sa.BigInteger, nullable=False),
)


class StoredRequestError(ValueError):
    """A stored request this gateway cannot rebuild (a field it does not know, an input that is gone)."""


def _bytes_fields() -> set[str]:
    hints = typing.get_type_hints(GenerationRequest)
    return {field.name for field in dataclasses.fields(GenerationRequest) if hints[field.name] is bytes}


BYTES_FIELDS = _bytes_fields()


def encode_request(request: GenerationRequest) -> tuple[str, dict[str, bytes]]:
    """(JSON of the plain fields, {bytes field: data}). Generic over the dataclass's fields, so a field added to
    GenerationRequest is stored without touching this module; a bytes field records its length in the JSON, so a
    lost input is told apart from an empty one."""
    plain: dict = {}
    blobs: dict[str, bytes] = {}
    for field in dataclasses.fields(request):
        value = getattr(request, field.name)
        if field.name in BYTES_FIELDS:
            plain[field.name] = {"bytes": len(value)}
            if value:
                blobs[field.name] = value
        elif field.name == "cache" and value is not None:     # a StepCache: its fields
            plain[field.name] = dataclasses.asdict(value)
        else:
            plain[field.name] = value
    return json.dumps(plain, allow_nan=False), blobs


def decode_request(text: str, blobs: dict[str, bytes] | None) -> GenerationRequest:
    """The request back; `blobs` None leaves bytes fields empty (a listing, not a dispatch)."""
    try:
        plain = json.loads(text)
    except ValueError as error:
        raise StoredRequestError(f"the stored request is not valid JSON ({error})") from None
    known = {field.name for field in dataclasses.fields(GenerationRequest)}
    unknown = sorted(set(plain) - known)
    if unknown:
        raise StoredRequestError(f"the stored request has fields this gateway does not know: {unknown}")
    values = {}
    for name, value in plain.items():
        if name in BYTES_FIELDS:
            size = int(value.get("bytes", 0)) if isinstance(value, dict) else 0
            data = (blobs or {}).get(name, b"")
            if blobs is not None and len(data) != size:
                raise StoredRequestError(f"its input {name!r} is gone ({len(data)} of {size} bytes stored)")
            values[name] = data if blobs is not None else b""
        elif name == "cache" and value is not None:
            values[name] = StepCache(**{**value, "mag_ratios": tuple(value.get("mag_ratios", ()))})
        else:
            values[name] = value
    try:
        return GenerationRequest(**values)
    except TypeError as error:     # a field without a default missing from an old row
        raise StoredRequestError(f"the stored request cannot be rebuilt: {error}") from None


@dataclasses.dataclass(frozen=True)
class OutputRow:
    index: int
    mime_type: str
    size: int


@dataclasses.dataclass(frozen=True)
class JobRow:
    id: str
    model: str
    owner: str
    status: str
    request_json: str
    progress: float
    error_code: str | None
    error_message: str | None
    created_at: float
    started_at: float | None
    completed_at: float | None
    attempts: int
    lease_owner: str | None
    lease_expires: float | None
    output_bytes: int


def _row(row: sa.Row) -> JobRow:
    m = row._mapping
    return JobRow(id=m["id"], model=m["model"], owner=m["owner"], status=m["status"], request_json=m["request"],
                  progress=m["progress"], error_code=m["error_code"], error_message=m["error_message"],
                  created_at=m["created_at"], started_at=m["started_at"], completed_at=m["completed_at"],
                  attempts=m["attempts"], lease_owner=m["lease_owner"], lease_expires=m["lease_expires"],
                  output_bytes=m["output_bytes"])


def database_url(url: str) -> str:
    """PostgreSQL URLs as people write them (postgresql://, postgres://) go through psycopg 3."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def sqlite_path(url: str) -> str:
    """The file behind a sqlite:/// URL."""
    return sa.engine.make_url(url).database or ""


def redacted(url: str) -> str:
    """A database URL fit for logs and error messages: no password."""
    if not url:
        return ""
    try:
        return sa.engine.make_url(database_url(url)).render_as_string(hide_password=True)
    except sa.exc.ArgumentError:
        return "(unparsable URL)"


def lock_file(path: str) -> IO:
    """Hold an exclusive lock on `path` for as long as the returned file stays open (the kernel drops it when the
    process ends, however it ends): one gateway per SQLite database, which therefore owns every job in it."""
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise RuntimeError(f"another gateway is using this database (it holds {path}); give each gateway its own "
                           "--data-dir, or share a PostgreSQL --database-url") from None
    return handle


class JobDatabase:
    def __init__(self, url: str) -> None:
        self.url = database_url(url)
        self.is_sqlite = self.url.startswith("sqlite")
        self.engine = sa.create_engine(self.url, pool_pre_ping=not self.is_sqlite)
        if self.is_sqlite:
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)
        try:
            metadata.create_all(self.engine)
        except (sa.exc.ProgrammingError, sa.exc.IntegrityError):
            # Two gateways creating the tables at once on PostgreSQL: one loses the race; the tables exist now.
            metadata.create_all(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    # -- writes --------------------------------------------------------------------------------------------

    def insert(self, job_id: str, request: GenerationRequest, *, created_at: float, lease_owner: str,
               lease_expires: float) -> None:
        text, blobs = encode_request(request)
        with self.engine.begin() as conn:
            conn.execute(jobs.insert().values(
                id=job_id, model=request.model, owner=request.owner, status="queued", request=text, progress=0.0,
                created_at=created_at, attempts=0, lease_owner=lease_owner, lease_expires=lease_expires,
                output_bytes=0))
            if blobs:
                conn.execute(inputs.insert(), [{"job_id": job_id, "field": k, "data": v} for k, v in blobs.items()])

    def claim(self, job_id: str, owner: str, now: float) -> tuple[JobRow, GenerationRequest] | None:
        """queued -> in_progress for `owner`, with the full request (inputs too); None if the job is no longer
        queued or no longer this owner's (cancelled, taken over). Raises StoredRequestError when it cannot be
        rebuilt."""
        with self.engine.begin() as conn:
            done = conn.execute(
                jobs.update().where(jobs.c.id == job_id, jobs.c.status == "queued", jobs.c.lease_owner == owner)
                .values(status="in_progress", started_at=now, progress=0.0, attempts=jobs.c.attempts + 1))
            if done.rowcount != 1:
                return None
            row = _row(conn.execute(sa.select(jobs).where(jobs.c.id == job_id)).one())
            blobs = {r.field: r.data for r in conn.execute(sa.select(inputs).where(inputs.c.job_id == job_id))}
        return row, decode_request(row.request_json, blobs)

    def set_progress(self, job_id: str, progress: float) -> bool:
        """False when the job is no longer in progress (cancelled elsewhere): its runner should stop."""
        with self.engine.begin() as conn:
            done = conn.execute(jobs.update().where(jobs.c.id == job_id, jobs.c.status == "in_progress")
                                .values(progress=progress))
        return done.rowcount == 1

    def add_output(self, job_id: str, index: int, mime_type: str, size: int) -> None:
        with self.engine.begin() as conn:
            replaced = conn.execute(sa.select(outputs.c.size).where(
                outputs.c.job_id == job_id, outputs.c.output_index == index)).scalar()
            if replaced is None:
                conn.execute(outputs.insert().values(job_id=job_id, output_index=index, mime_type=mime_type,
                                                     size=size))
            else:
                conn.execute(outputs.update().where(outputs.c.job_id == job_id, outputs.c.output_index == index)
                             .values(mime_type=mime_type, size=size))
            conn.execute(jobs.update().where(jobs.c.id == job_id)
                         .values(output_bytes=jobs.c.output_bytes + size - (replaced or 0)))

    def finish(self, job_id: str, status: str, *, now: float, progress: float | None = None,
               error_code: str | None = None, error_message: str | None = None) -> bool:
        """Record a job's end, once: False if it had already ended (e.g. cancelled while it ran)."""
        values = dict(status=status, completed_at=now, error_code=error_code, error_message=error_message,
                      lease_owner=None, lease_expires=None)
        if progress is not None:
            values["progress"] = progress
        with self.engine.begin() as conn:
            done = conn.execute(jobs.update().where(jobs.c.id == job_id, jobs.c.status.in_(UNFINISHED))
                                .values(**values))
        return done.rowcount == 1

    def requeue(self, job_ids: Iterable[str], owner: str, *, release: bool, refund_attempt: bool) -> None:
        """in_progress -> queued (re-run from the start later). `release` gives up the lease so another gateway may
        take the jobs at once; `refund_attempt` does not count the interrupted run (a graceful shutdown)."""
        ids = list(job_ids)
        if not ids:
            return
        values: dict = dict(status="queued", progress=0.0, started_at=None)
        if refund_attempt:
            values["attempts"] = sa.case((jobs.c.attempts > 0, jobs.c.attempts - 1), else_=0)
        if release:
            values["lease_expires"] = 0.0
        with self.engine.begin() as conn:
            conn.execute(jobs.update().where(jobs.c.id.in_(ids), jobs.c.status == "in_progress",
                                             jobs.c.lease_owner == owner).values(**values))

    def release_leases(self, owner: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(jobs.update().where(jobs.c.lease_owner == owner, jobs.c.status.in_(UNFINISHED))
                         .values(lease_expires=0.0))

    def heartbeat(self, owner: str, lease_expires: float) -> None:
        with self.engine.begin() as conn:
            conn.execute(jobs.update().where(jobs.c.lease_owner == owner, jobs.c.status.in_(UNFINISHED))
                         .values(lease_expires=lease_expires))

    def adopt(self, owner: str, now: float, lease_expires: float, *, everything: bool,
              include_own: bool) -> list[JobRow]:
        """Take over the unfinished jobs no live gateway holds (their lease expired; all of them when `everything`:
        this gateway owns the database alone; also `owner`'s own when `include_own`: a restart under the same
        instance id), put those that were running back in the queue (they re-run from the start), and return every
        unfinished job `owner` now holds, oldest first. An UPDATE's WHERE is re-checked on the row it locks
        (PostgreSQL read committed, SQLite's single writer), so two gateways never both take one job."""
        free = jobs.c.lease_owner.is_(None) | (jobs.c.lease_expires < now)
        if include_own:
            free = free | (jobs.c.lease_owner == owner)
        with self.engine.begin() as conn:
            taken = sa.true() if everything else free
            conn.execute(jobs.update().where(jobs.c.status == "in_progress", taken)
                         .values(status="queued", progress=0.0, started_at=None, lease_owner=owner,
                                 lease_expires=lease_expires))
            conn.execute(jobs.update().where(jobs.c.status == "queued", taken)
                         .values(lease_owner=owner, lease_expires=lease_expires))
            rows = conn.execute(sa.select(jobs).where(jobs.c.lease_owner == owner, jobs.c.status.in_(UNFINISHED))
                                .order_by(jobs.c.created_at, jobs.c.id))
            return [_row(row) for row in rows]

    def delete(self, job_ids: Iterable[str]) -> None:
        ids = list(job_ids)
        if not ids:
            return
        with self.engine.begin() as conn:
            # Children first: SQLite enforces ON DELETE CASCADE only with foreign_keys on, which we set, but a
            # database made elsewhere might not have it.
            conn.execute(outputs.delete().where(outputs.c.job_id.in_(ids)))
            conn.execute(inputs.delete().where(inputs.c.job_id.in_(ids)))
            conn.execute(jobs.delete().where(jobs.c.id.in_(ids)))

    # -- reads ---------------------------------------------------------------------------------------------

    def get(self, job_id: str) -> tuple[JobRow, list[OutputRow]] | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(jobs).where(jobs.c.id == job_id)).one_or_none()
            if row is None:
                return None
            found = conn.execute(sa.select(outputs).where(outputs.c.job_id == job_id)
                                 .order_by(outputs.c.output_index))
            return _row(row), [OutputRow(r.output_index, r.mime_type, r.size) for r in found]

    def queued_ahead(self, job: JobRow) -> int:
        """Queued jobs of the same model accepted before `job` (on any gateway sharing the database)."""
        with self.engine.connect() as conn:
            return conn.execute(sa.select(sa.func.count()).select_from(jobs).where(
                jobs.c.status == "queued", jobs.c.model == job.model,
                (jobs.c.created_at < job.created_at) | ((jobs.c.created_at == job.created_at) & (jobs.c.id < job.id))
            )).scalar_one()

    def page(self, *, owner: str, id_prefix: str, after: str | None, limit: int,
             descending: bool) -> tuple[list[JobRow], bool] | None:
        """One page of `owner`'s jobs whose id starts with `id_prefix`, by creation time (then id), and whether more
        follow; `after`: the id the previous page ended with (None if it is not such a job of `owner`'s)."""
        order = (jobs.c.created_at.desc(), jobs.c.id.desc()) if descending else (jobs.c.created_at, jobs.c.id)
        mine = sa.and_(jobs.c.owner == owner, jobs.c.id.startswith(id_prefix, autoescape=True))
        with self.engine.connect() as conn:
            where = mine
            if after is not None:
                cursor = conn.execute(sa.select(jobs.c.created_at, jobs.c.id).where(mine, jobs.c.id == after)).first()
                if cursor is None:
                    return None
                # Keyset paging: what follows the cursor in the order, however many rows were added meanwhile.
                if descending:
                    follows = (jobs.c.created_at < cursor.created_at) | (
                        (jobs.c.created_at == cursor.created_at) & (jobs.c.id < cursor.id))
                else:
                    follows = (jobs.c.created_at > cursor.created_at) | (
                        (jobs.c.created_at == cursor.created_at) & (jobs.c.id > cursor.id))
                where = sa.and_(mine, follows)
            rows = conn.execute(sa.select(jobs).where(where).order_by(*order).limit(limit + 1)).all()
        return [_row(row) for row in rows[:limit]], len(rows) > limit

    def expired(self, *, older_than: float | None, max_bytes: int | None) -> list[str]:
        """Finished jobs to delete: those finished before `older_than`, then the oldest finished until the
        outputs of the rest fit in `max_bytes`. Unfinished jobs are never chosen."""
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(jobs.c.id, jobs.c.completed_at, jobs.c.output_bytes)
                                .where(jobs.c.status.in_(FINISHED))
                                .order_by(jobs.c.completed_at, jobs.c.id)).all()
        chosen = [r.id for r in rows if older_than is not None and (r.completed_at or 0) < older_than]
        if max_bytes is not None:
            old = set(chosen)
            kept = [r for r in rows if r.id not in old]
            total = sum(r.output_bytes for r in kept)
            for r in kept:
                if total <= max_bytes:
                    break
                chosen.append(r.id)
                total -= r.output_bytes
        return chosen

    def count(self, statuses: tuple[str, ...] = UNFINISHED) -> int:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(sa.func.count()).select_from(jobs)
                                .where(jobs.c.status.in_(statuses))).scalar_one()


def _sqlite_pragmas(dbapi_connection, connection_record) -> None:
    # WAL: readers do not block the writer; FULL: a committed transition survives a crash of the machine, not
    # only of the process; foreign keys: outputs and inputs go with their job.
    cursor = dbapi_connection.cursor()
    for pragma in ("journal_mode=WAL", "synchronous=FULL", "foreign_keys=ON", "busy_timeout=10000"):
        cursor.execute(f"PRAGMA {pragma}")
    cursor.close()
