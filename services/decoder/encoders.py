"""The decoder's file encoders: threads that turn a request's decoded pixels into its PNG / MP4 files as the VAE hands
them over (services/decoder/writer.py), so that a video's encoding overlaps its own decode and the next request's
VAE decode runs while this one's last files are encoded (issue 15).

Bounded on both sides. The servicer takes a place here inside its VAE gate, before the decode, and holds it until
the request's files are done: at most `workers + backlog` requests' pixels are on the host at once (a 480x832x81
video is 97 MB of uint8), and while every place is taken the VAE waits with the gate held, so a burst queues in the
gate (counted, and refused beyond --max-queue as before) instead of piling up as decoded pixels. A place is given
back when its encoding ends, not when its caller stops waiting: a cancelled request's encode still holds its place
until its thread is done with it (an MP4 cannot be stopped halfway).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

T = TypeVar("T")

# Two threads: while one request's MP4 keeps x264's frame threads busy, the next request's files need not wait for
# it (a PNG is one zlib stream on one core). One more request may wait decoded, so that an encoder that finishes
# finds its next request ready instead of idling through the VAE's decode of it.
WORKERS = 2
BACKLOG = 1


class Place:
    """One request's place among the encoders: runs its encoding once, on an encoder thread."""

    def __init__(self, pool: concurrent.futures.ThreadPoolExecutor) -> None:
        self._pool = pool
        self.future: concurrent.futures.Future | None = None

    def start(self, fn: Callable[..., T], *args: object) -> asyncio.Future[T]:
        """`fn(*args)` on an encoder thread from now, in the caller's context (its request id in the logs, its
        trace); its result is the future's."""
        if self.future is not None:
            raise RuntimeError("a place runs one request's encoding")
        self.future = self._pool.submit(contextvars.copy_context().run, fn, *args)
        return asyncio.wrap_future(self.future)

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """`fn(*args)` on an encoder thread, awaited."""
        return await self.start(fn, *args)


class FileEncoders:
    def __init__(self, workers: int = WORKERS, backlog: int = BACKLOG) -> None:
        if workers < 1 or backlog < 0:
            raise ValueError(f"file encoders need at least 1 worker and a backlog of 0 or more, got {workers} and "
                             f"{backlog}")
        self.workers, self.backlog = workers, backlog
        self._pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="decoder-files")
        self._places = asyncio.Semaphore(workers + backlog)

    @contextlib.asynccontextmanager
    async def place(self) -> AsyncIterator[Place]:
        """Wait for a free place (all taken: every encoder busy and the backlog full); it is given back when the
        encoding run in it ends, or at once if none was."""
        await self._places.acquire()
        place = Place(self._pool)
        try:
            yield place
        finally:
            self._give_back(place)

    def _give_back(self, place: Place) -> None:
        future = place.future
        if future is None or future.done():      # never started, finished, or cancelled before its thread took it
            self._places.release()
            return
        loop = asyncio.get_running_loop()

        def release(_: concurrent.futures.Future) -> None:
            if not loop.is_closed():
                loop.call_soon_threadsafe(self._places.release)

        future.add_done_callback(release)         # still encoding on its thread (its caller went away)
