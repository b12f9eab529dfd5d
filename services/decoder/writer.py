"""A request's files, written as its frames come off the VAE.

The VAE thread `add`s each chunk of decoded pixels as it reaches the host and `close`s after the last; `write`, on
one of the file encoders' threads (services/decoder/encoders.py), encodes them as they come and returns the files.
A video's MP4 is then encoded while its later frames are still being decoded, so what follows the VAE is the
encoding of its last chunk, not of the whole video (Wan2.1 480x832x81 on an H200: decode 1.83 s, then MP4 0.87 s
whole; streamed, 0.14 s after the decode: bench/diagnostics/vae_stream.py). A PNG is one frame: it is encoded
when its chunk comes. Whoever decodes calls `abort` instead of `close` when the decode fails, and `write` stops; an
abort from elsewhere (the caller went away) stops the decode too, at its next chunk (`aborted`).

The phase `media_encode` (metrics, traces) runs from the first chunk's arrival to the files' end: for a streamed
video it overlaps the decode, and the part after the decode is what the request waits for.
"""

from __future__ import annotations

import dataclasses
import queue
import threading

import numpy as np

from services.common import metrics
from services.common.errors import Cancelled
from services.decoder import media


@dataclasses.dataclass(frozen=True)
class MediaItem:
    mime_type: str
    data: bytes


class WriteAborted(Cancelled):
    """The request's files were given up (its decode failed, or its caller went away): there are none. A decode
    that finds its writer aborted stops at its next chunk with this."""


_CLOSED = object()
_ABORTED = object()


class FileWriter:
    """`format`: png | mp4 | none (no files: chunks are dropped); one file per output of the request; `model`
    labels its metrics."""

    def __init__(self, format: str, fps: int = media.DEFAULT_FPS, model: str = "") -> None:
        if format not in ("png", "mp4", "none"):
            raise ValueError(f"file format {format!r} is not png, mp4 or none")
        self.format, self.fps, self.model = format, fps, model
        # Unbounded: a request's pixels are on the host in either case (97 MB for a 480x832x81 video), and the
        # encoders' places bound how many requests are (services/decoder/encoders.py).
        self._chunks: queue.SimpleQueue = queue.SimpleQueue()
        self._aborted = threading.Event()

    def add(self, pixels: np.ndarray) -> None:
        """The next frames of every output: uint8 [n, f, H, W, 3]."""
        if self.format != "none":
            self._chunks.put(pixels)

    def close(self) -> None:
        self._chunks.put(_CLOSED)

    def pending(self) -> int:
        """Chunks handed over that `write` has not taken yet."""
        return self._chunks.qsize()

    def abort(self) -> None:
        if not self._aborted.is_set():
            self._aborted.set()
            self._chunks.put(_ABORTED)

    @property
    def aborted(self) -> bool:
        return self._aborted.is_set()

    def check_wanted(self) -> None:
        """For the decode: WriteAborted once the files were given up elsewhere (the caller went away)."""
        if self.aborted:
            raise WriteAborted("the request's files were given up during its decode")

    def write(self) -> list[MediaItem]:
        """Encode the chunks as they come, until `close` (the files) or `abort` (WriteAborted)."""
        chunk = self._next()
        if chunk is _CLOSED:
            return []
        with metrics.phase("media_encode", self.model, format=self.format):
            return self._write_mp4(chunk) if self.format == "mp4" else self._write_png(chunk)

    def _write_png(self, chunk: np.ndarray) -> list[MediaItem]:
        items: list[MediaItem] = []
        while chunk is not _CLOSED:
            items += [MediaItem("image/png", media.encode_png(frame)) for output in chunk for frame in output]
            chunk = self._next()
        return items

    def _write_mp4(self, chunk: np.ndarray) -> list[MediaItem]:
        _, _, height, width, _ = chunk.shape
        videos = [media.Mp4Writer(width, height, self.fps) for _ in chunk]
        try:
            while chunk is not _CLOSED:
                for video, frames in zip(videos, chunk, strict=True):
                    video.add(frames)
                chunk = self._next()
            return [MediaItem("video/mp4", video.finish()) for video in videos]
        finally:
            for video in videos:
                video.close()

    def _next(self) -> object:
        chunk = self._chunks.get()
        if chunk is _ABORTED:
            raise WriteAborted("the decode failed")
        return chunk
