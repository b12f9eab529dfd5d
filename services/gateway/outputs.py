"""Where finished jobs' outputs (PNGs, MP4s) live: files under a directory, written atomically, served from
disk. `OutputStore` is the interface; object storage could implement it the same way."""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import tempfile
from collections.abc import Iterator
from typing import Protocol

# Ids are made by jobs.new_job_id: a lowercase prefix and 24 hex digits. Anything else never reaches a path.
JOB_ID = re.compile(r"[a-z]{1,16}_[0-9a-f]{24}")
EXTENSIONS = {"image/png": ".png", "video/mp4": ".mp4"}
CHUNK_BYTES = 1 << 20


def is_job_id(job_id: str) -> bool:
    return isinstance(job_id, str) and JOB_ID.fullmatch(job_id) is not None


class OutputStore(Protocol):
    def write(self, job_id: str, index: int, mime_type: str, data: bytes) -> int:
        """Store one output atomically (a reader sees all of it or nothing); returns its size."""

    def path(self, job_id: str, index: int, mime_type: str) -> pathlib.Path | None:
        """A local file holding the output, when the store has one (served with sendfile), else None."""

    def read(self, job_id: str, index: int, mime_type: str) -> Iterator[bytes]:
        """The output in chunks; FileNotFoundError if it is gone."""

    def delete(self, job_id: str) -> None:
        """Remove every output of a job (nothing if there are none)."""


class LocalOutputStore:
    def __init__(self, root: str | os.PathLike) -> None:
        self.root = pathlib.Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _dir(self, job_id: str) -> pathlib.Path:
        if not is_job_id(job_id):  # callers check too; this is the last line before the filesystem
            raise ValueError(f"not a job id: {job_id!r}")
        return self.root / job_id

    def _file(self, job_id: str, index: int, mime_type: str) -> pathlib.Path:
        return self._dir(job_id) / f"{int(index)}{EXTENSIONS.get(mime_type, '.bin')}"

    def write(self, job_id: str, index: int, mime_type: str, data: bytes) -> int:
        target = self._file(job_id, index, mime_type)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            pathlib.Path(tmp).unlink(missing_ok=True)
            raise
        return len(data)

    def path(self, job_id: str, index: int, mime_type: str) -> pathlib.Path | None:
        target = self._file(job_id, index, mime_type)
        return target if target.is_file() else None

    def read(self, job_id: str, index: int, mime_type: str) -> Iterator[bytes]:
        with open(self._file(job_id, index, mime_type), "rb") as f:
            while chunk := f.read(CHUNK_BYTES):
                yield chunk

    def delete(self, job_id: str) -> None:
        shutil.rmtree(self._dir(job_id), ignore_errors=True)
