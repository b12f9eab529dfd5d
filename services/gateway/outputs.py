"""Where finished jobs' outputs (PNGs, MP4s) live: files under a directory, written atomically, served from
disk. `OutputStore` is the interface; object storage could implement it the same way.

An output may have derived variants (a video's thumbnail and spritesheet), made on first request and kept beside
it under the same job, so deleting the job frees them too."""

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
EXTENSIONS = {"image/png": ".png", "image/jpeg": ".jpg", "image/webp": ".webp", "video/mp4": ".mp4"}
VARIANT = re.compile(r"[a-z]{1,32}")
CHUNK_BYTES = 1 << 20


def is_job_id(job_id: str) -> bool:
    return isinstance(job_id, str) and JOB_ID.fullmatch(job_id) is not None


class OutputStore(Protocol):
    """`variant`: "" for the output itself, else the name of something derived from it (e.g. "thumbnail")."""

    def write(self, job_id: str, index: int, mime_type: str, data: bytes, variant: str = "") -> int:
        """Store one output atomically (a reader sees all of it or nothing); returns its size."""

    def path(self, job_id: str, index: int, mime_type: str, variant: str = "") -> pathlib.Path | None:
        """A local file holding the output, when the store has one (served with sendfile), else None."""

    def read(self, job_id: str, index: int, mime_type: str, variant: str = "") -> Iterator[bytes]:
        """The output in chunks; FileNotFoundError if it is gone."""

    def remove(self, job_id: str, index: int, mime_type: str, variant: str = "") -> None:
        """Remove one output (nothing if it is not there)."""

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

    def _file(self, job_id: str, index: int, mime_type: str, variant: str = "") -> pathlib.Path:
        if variant and not VARIANT.fullmatch(variant):
            raise ValueError(f"not a variant name: {variant!r}")
        return self._dir(job_id) / f"{int(index)}{'.' + variant if variant else ''}{EXTENSIONS.get(mime_type, '.bin')}"

    def write(self, job_id: str, index: int, mime_type: str, data: bytes, variant: str = "") -> int:
        target = self._file(job_id, index, mime_type, variant)
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

    def path(self, job_id: str, index: int, mime_type: str, variant: str = "") -> pathlib.Path | None:
        target = self._file(job_id, index, mime_type, variant)
        return target if target.is_file() else None

    def read(self, job_id: str, index: int, mime_type: str, variant: str = "") -> Iterator[bytes]:
        with open(self._file(job_id, index, mime_type, variant), "rb") as f:
            while chunk := f.read(CHUNK_BYTES):
                yield chunk

    def remove(self, job_id: str, index: int, mime_type: str, variant: str = "") -> None:
        self._file(job_id, index, mime_type, variant).unlink(missing_ok=True)

    def delete(self, job_id: str) -> None:
        shutil.rmtree(self._dir(job_id), ignore_errors=True)
