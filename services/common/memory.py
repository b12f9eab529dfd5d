"""Handing freed memory back to the operating system after a stream of tensors.

glibc serves blocks below its mmap threshold (which rises to the largest block freed, up to 32 MiB) from its heaps,
and keeps what is freed there for reuse instead of returning it, so a stage's resident memory stays at the peak of
its largest burst. `malloc_trim(0)` returns the free pages of every heap; it costs about 2 ms after a burst.

Measured on the denoiser (tiny Wan model, RSS from /proc, 458 MB idle): with the old bytearray buffer, streams
declaring 2 GiB and sending 256 MB took it to 732, 991, 1248 MB (trimmed after each: 725, 726, 726). With one
buffer per tensor (tensors.py) a 900 MB stream refused at its end leaves 470 MB, trimmed or not (a block that big is
mmapped and unmapped when freed); two concurrent 29 MB streams, heap-sized, left 548-558 MB untrimmed and 467-479 MB
trimmed after each stream.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):     # not glibc (musl, macOS): nothing to trim, the allocator decides
        return None


def release_memory() -> bool:
    """Return freed heap memory to the OS; False where the C library has no malloc_trim."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
