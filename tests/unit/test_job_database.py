"""Tests for services.gateway.store.JobDatabase and outputs.LocalOutputStore, on a real SQLite file and, when its
server binaries are installed, on a real PostgreSQL started for the session in a temporary directory."""

from __future__ import annotations

import dataclasses
import glob
import os
import pathlib
import shutil
import socket
import subprocess
import tempfile
import time
import typing

import pytest
import sqlalchemy as sa

from services.denoiser.cache import StepCache
from services.gateway.outputs import LocalOutputStore, is_job_id
from services.gateway.pipeline import GenerationRequest
from services.gateway.store import JobDatabase, StoredRequestError, decode_request, encode_request, inputs, jobs

PG_BIN_DIRS = ["/usr/local/bin", *sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)]


def _pg_bin() -> str | None:
    for directory in PG_BIN_DIRS:
        if all(os.access(os.path.join(directory, tool), os.X_OK) for tool in ("initdb", "pg_ctl", "postgres")):
            return directory
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def postgres_url():
    """A throwaway PostgreSQL cluster on a free loopback port; stopped and deleted after the session. As root,
    the server runs as the `postgres` (or `nobody`) user: PostgreSQL refuses to run as root."""
    bin_dir = _pg_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl, postgres) not found in "
                    f"{PG_BIN_DIRS}; scripts/setup.sh installs Debian's postgresql when it can")
    user = None
    if os.geteuid() == 0:
        user = next((name for name in ("postgres", "nobody") if _uid(name) is not None), None)
        if user is None:
            pytest.skip("running as root and no unprivileged user to run PostgreSQL as")
    root = tempfile.mkdtemp(prefix="diffmesh-pg-")   # not under pytest's tmp: its parent is private to root
    data = os.path.join(root, "data")
    if user is not None:
        os.chown(root, _uid(user), -1)
    port = _free_port()
    run = dict(user=user, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=60)
    try:
        subprocess.run([f"{bin_dir}/initdb", "-D", data, "-U", "diffmesh", "--auth=trust", "-E", "UTF8",
                        "--no-sync"], **run)
        subprocess.run([f"{bin_dir}/pg_ctl", "-D", data, "-w", "-t", "30", "-l", os.path.join(root, "log"),
                        "-o", f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off", "start"], **run)
    except subprocess.CalledProcessError as error:
        shutil.rmtree(root, ignore_errors=True)
        pytest.fail(f"could not start PostgreSQL: {error.stderr.decode(errors='replace')[-500:]}")
    try:
        yield f"postgresql://diffmesh@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([f"{bin_dir}/pg_ctl", "-D", data, "-m", "immediate", "-W", "stop"], user=user,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


def _uid(name: str) -> int | None:
    import pwd

    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        return None


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request, tmp_path):
    if request.param == "sqlite":
        database = JobDatabase(f"sqlite:///{tmp_path / 'jobs.sqlite3'}")
    else:
        database = JobDatabase(request.getfixturevalue("postgres_url"))
        with database.engine.begin() as conn:    # each test starts from an empty database
            for table in ("diffmesh_job_outputs", "diffmesh_job_inputs", "diffmesh_jobs"):
                conn.execute(sa.text(f"DELETE FROM {table}"))
    yield database
    database.close()


def every_field_set() -> GenerationRequest:
    """A request whose every field differs from its default, whatever fields GenerationRequest has."""
    hints = typing.get_type_hints(GenerationRequest)
    samples = {str: "x\u00e9\U0001f98a", int: 2**62 + 7, float: 7.25, bool: True, bytes: bytes(range(256)) * 3,
               StepCache: StepCache("magcache", threshold=0.125, interval=4, warmup_steps=2, mag_ratios=(1.0, 0.5))}
    values = {}
    for field in dataclasses.fields(GenerationRequest):
        kind = hints[field.name]
        kind = next((k for k in samples if k in typing.get_args(kind)), kind)   # float | None -> float
        values[field.name] = f"{field.name}-{samples[str]}" if kind is str else samples[kind]
    request = GenerationRequest(**values)
    for field in dataclasses.fields(GenerationRequest):
        assert getattr(request, field.name) != field.default, field.name
    return request


def _insert(db: JobDatabase, job_id: str, request: GenerationRequest, owner: str = "gw-a", created: float = 0.0,
            lease_s: float = 30.0) -> None:
    now = created or time.time()
    db.insert(job_id, request, created_at=now, lease_owner=owner, lease_expires=time.time() + lease_s)


def _id(n: int) -> str:
    return f"video_{n:024x}"


SIMPLE = GenerationRequest(request_id="r", model="wan-tiny", prompt="a cat")


def test_every_request_field_round_trips(db):
    request = every_field_set()
    _insert(db, _id(1), request)
    row, claimed = db.claim(_id(1), "gw-a", time.time())
    assert claimed == request                      # every field, the image bytes too
    listed, _ = db.get(_id(1))
    shown = decode_request(listed.request_json, None)
    assert shown == dataclasses.replace(request, image=b"")   # a listing does not load the inputs
    assert listed.owner == request.owner and listed.model == request.model


def test_status_transitions_are_recorded_once(db):
    _insert(db, _id(1), SIMPLE)
    assert db.get(_id(1))[0].status == "queued"
    assert db.claim(_id(1), "gw-other", time.time()) is None       # not that gateway's job
    row, _ = db.claim(_id(1), "gw-a", time.time())
    assert row.status == "in_progress" and row.attempts == 1 and row.started_at is not None
    assert db.claim(_id(1), "gw-a", time.time()) is None           # already running
    assert db.set_progress(_id(1), 42.5)
    assert db.get(_id(1))[0].progress == 42.5
    db.add_output(_id(1), 0, "video/mp4", 1000)
    assert db.finish(_id(1), "completed", now=time.time(), progress=100.0)
    assert not db.finish(_id(1), "failed", now=time.time(), error_code="INTERNAL", error_message="late")
    assert not db.set_progress(_id(1), 50.0)                       # its runner learns it has ended
    row, outputs = db.get(_id(1))
    assert (row.status, row.progress, row.error_code, row.output_bytes) == ("completed", 100.0, None, 1000)
    assert [(o.index, o.mime_type, o.size) for o in outputs] == [(0, "video/mp4", 1000)]

    _insert(db, _id(2), SIMPLE)
    assert db.finish(_id(2), "failed", now=time.time(), error_code="UNAVAILABLE", error_message="denoiser down")
    row, _ = db.get(_id(2))
    assert (row.status, row.error_code, row.error_message) == ("failed", "UNAVAILABLE", "denoiser down")
    assert db.get(_id(3)) is None


def test_unfinished_jobs_are_resumed_and_running_ones_requeued(db):
    for n in range(1, 5):
        _insert(db, _id(n), SIMPLE, created=1000.0 + n)
    db.claim(_id(2), "gw-a", time.time())                          # running when the gateway died
    db.claim(_id(3), "gw-a", time.time())
    db.finish(_id(3), "completed", now=time.time())
    # A fresh gateway that owns the database alone takes every unfinished job, whoever held it.
    rows = db.adopt("gw-b", time.time(), time.time() + 30, everything=True, include_own=True)
    assert [(r.id, r.status, r.lease_owner) for r in rows] == [
        (_id(1), "queued", "gw-b"), (_id(2), "queued", "gw-b"), (_id(4), "queued", "gw-b")]
    row, _ = db.claim(_id(2), "gw-b", time.time())
    assert row.attempts == 2                                       # the interrupted run counted


def test_a_live_lease_is_not_taken_an_expired_one_is(db):
    _insert(db, _id(1), SIMPLE, owner="gw-a", lease_s=30)
    _insert(db, _id(2), SIMPLE, owner="gw-a", lease_s=-1)           # gw-a stopped renewing it
    rows = db.adopt("gw-b", time.time(), time.time() + 30, everything=False, include_own=False)
    assert [r.id for r in rows] == [_id(2)]
    assert db.claim(_id(2), "gw-a", time.time()) is None           # the old owner cannot run it any more
    assert db.claim(_id(1), "gw-a", time.time()) is not None
    db.heartbeat("gw-a", time.time() + 30)
    assert db.adopt("gw-c", time.time(), time.time() + 30, everything=False, include_own=False) == []
    db.release_leases("gw-a")                                      # a clean shutdown hands them over at once
    assert [r.id for r in db.adopt("gw-c", time.time(), time.time() + 30, everything=False,
                                   include_own=False)] == [_id(1)]


def test_a_job_whose_input_is_gone_cannot_be_claimed(db):
    _insert(db, _id(1), dataclasses.replace(SIMPLE, image=b"\x89PNG" * 10))
    with db.engine.begin() as conn:
        conn.execute(inputs.delete())
    with pytest.raises(StoredRequestError, match="input 'image' is gone"):
        db.claim(_id(1), "gw-a", time.time())


def test_a_stored_field_this_gateway_does_not_know_is_refused():
    text, _ = encode_request(SIMPLE)
    with pytest.raises(StoredRequestError, match="does not know"):
        decode_request(text.replace('"prompt"', '"prompt_v9"'), {})


def test_retention_by_age_then_by_bytes_oldest_finished_first(db):
    now = time.time()
    sizes = {1: 100, 2: 200, 3: 300, 4: 400}
    for n, size in sizes.items():
        _insert(db, _id(n), SIMPLE)
        db.add_output(_id(n), 0, "video/mp4", size)
        db.finish(_id(n), "completed", now=now - 1000 + n)            # finished in order 1, 2, 3, 4
    _insert(db, _id(5), SIMPLE)
    db.add_output(_id(5), 0, "video/mp4", 10_000)                  # unfinished: never chosen, whatever its size
    assert db.expired(older_than=now - 1000 + 2.5, max_bytes=None) == [_id(1), _id(2)]
    assert db.expired(older_than=None, max_bytes=700) == [_id(1), _id(2)]         # 300 + 400 fit
    assert db.expired(older_than=now - 1000 + 1.5, max_bytes=400) == [_id(1), _id(2), _id(3)]
    assert db.expired(older_than=None, max_bytes=None) == []
    db.delete([_id(1), _id(2)])
    assert db.get(_id(1)) is None and db.get(_id(3)) is not None
    with db.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(jobs)).scalar_one() == 3


def test_outputs_are_written_whole_and_ids_cannot_escape(tmp_path):
    store = LocalOutputStore(tmp_path / "outputs")
    job_id = _id(1)
    assert store.write(job_id, 0, "video/mp4", b"mp4" * 1000) == 3000
    assert store.path(job_id, 0, "video/mp4").read_bytes() == b"mp4" * 1000
    assert b"".join(store.read(job_id, 0, "video/mp4")) == b"mp4" * 1000
    assert not list((tmp_path / "outputs" / job_id).glob(".*"))   # no temporary file left behind
    for bad in ("../../etc/passwd", "video_../x", "/abs", "video_" + "0" * 23 + "/", "VIDEO_" + "0" * 24, ""):
        assert not is_job_id(bad)
        with pytest.raises(ValueError):
            store.path(bad, 0, "video/mp4")
    store.delete(job_id)
    assert store.path(job_id, 0, "video/mp4") is None
    assert list(pathlib.Path(tmp_path / "outputs").iterdir()) == []
