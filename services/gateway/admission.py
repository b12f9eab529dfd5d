"""How many jobs the gateway runs at once per model, from what its stages say they can take, and how long a
refused client should wait.

A job holds one call on each stage at a time, so running at most min over the stages of what each stage admits
(its replicas' concurrency + queue) never overfills a stage from this gateway. Within that, the widest stage's
replicas each get one request waiting behind each one they run, enough to keep it busy between requests (a
batching denoiser's concurrency is its --max-batch: that many jobs in flight, the others' encodes and decodes
overlapping its batch); more would only move the queue from the gateway, where it is durable and has positions,
into the stages' memory.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import statistics
import time

import grpc

from diffmesh.v1 import admission_pb2, admission_pb2_grpc
from services.gateway.pipeline import ModelRoute

logger = logging.getLogger(__name__)

CAPACITY_TIMEOUT_S = 2.0
# Stages report their capacity at start; it is re-read this often (a replica added or restarted with other flags).
CAPACITY_TTL_S = 30.0
# A stage that cannot say (down, or an older build without the Admission service) counts as one request per
# replica, and is asked again after this long.
UNKNOWN_TTL_S = 5.0
DEFAULT_JOB_SECONDS = 2.0


def stage_slots(capacities: list[tuple[int, int] | None]) -> int:
    """Jobs one stage takes from this gateway: per replica (concurrency, max_queue), or None when unknown."""
    total = 0
    for capacity in capacities:
        if capacity is None:
            total += 1
        else:
            concurrency, max_queue = capacity
            total += max(1, min(concurrency + max_queue, 2 * concurrency))
    return max(1, total)


def stage_admits(capacities: list[tuple[int, int] | None]) -> int:
    """Calls one stage admits before it refuses: per replica concurrency + max_queue (1 when unknown)."""
    return max(1, sum(1 if capacity is None else capacity[0] + capacity[1] for capacity in capacities))


def job_slots(stages: list[list[tuple[int, int] | None]]) -> int:
    """Jobs run at once: enough to keep the widest stage busy (a denoiser batching N requests reports concurrency
    N, so N jobs must be in flight for it to batch, their encodes and decodes overlapping its denoising), never more
    than the smallest stage admits. With every stage at concurrency 1 this is each stage's `stage_slots`."""
    if not stages:
        return 1
    return max(1, min(max(stage_slots(c) for c in stages), min(stage_admits(c) for c in stages)))


async def replica_capacity(channel: grpc.aio.Channel) -> tuple[int, int] | None:
    try:
        reply = await admission_pb2_grpc.AdmissionStub(channel).GetCapacity(
            admission_pb2.GetCapacityRequest(), timeout=CAPACITY_TIMEOUT_S)
    except grpc.RpcError:
        return None
    return reply.concurrency, reply.max_queue


class Admission:
    """Per-model job slots (cached) and recent job durations (for Retry-After)."""

    def __init__(self, routes: dict[str, ModelRoute]) -> None:
        self.routes = routes
        self._slots: dict[str, tuple[int, float]] = {}        # model -> (slots, valid until, monotonic)
        self._durations: collections.deque[float] = collections.deque(maxlen=32)

    async def slots(self, model: str) -> int:
        cached = self._slots.get(model)
        if cached is not None and time.monotonic() < cached[1]:
            return cached[0]
        route = self.routes.get(model)
        if route is None:
            return 1
        per_stage = []
        unknown = False
        for pool in route.pools.values():
            channels = [getattr(replica, "channel", None) for replica in pool.replicas]
            found = await asyncio.gather(*(replica_capacity(c) for c in channels if c is not None))
            unknown = unknown or any(c is None for c in found) or not found
            per_stage.append(list(found))
        slots = job_slots(per_stage)
        self._slots[model] = (slots, time.monotonic() + (UNKNOWN_TTL_S if unknown else CAPACITY_TTL_S))
        if cached is None or cached[0] != slots:
            logger.info("model %s: running up to %d jobs at once (stages' capacity)", model, slots)
        return slots

    def forget(self, model: str) -> None:
        """Ask the stages again before the next dispatch (one refused a call: its capacity changed)."""
        self._slots.pop(model, None)

    def record(self, seconds: float) -> None:
        self._durations.append(seconds)

    def retry_after(self, queued: int, running_slots: int) -> float:
        """Seconds until the queue ahead has drained at the recent pace: queued jobs x the median recent job
        duration / jobs run at once."""
        typical = statistics.median(self._durations) if self._durations else DEFAULT_JOB_SECONDS
        return max(1.0, typical * max(1, queued) / max(1, running_slots))
