"""Stage pools: the gateway's view of each stage as a set of replicas.

Each replica's health is watched: a grpc.health `Watch` stream per replica, reopened whenever it breaks, so a
replica that goes away is skipped at once and one that comes back is used again as soon as it reports SERVING.
A call goes to the healthy replica with the fewest outstanding calls. When its replica goes away mid-call
(UNAVAILABLE, a transport failure, a stall) the call is repeated on another healthy replica, a bounded number of
times, even after it produced responses: every stage call is deterministic for a request + seed, so repeating
one is safe. A stream that starts over yields RESTARTED first, so that its consumer drops what the failed attempt
produced. Errors leave here as MeshErrors naming the stage; replica addresses go to the log, never to a client.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.errors import DeadlineExceeded, Unavailable, from_rpc_error
from services.common.server import CHANNEL_OPTIONS, REQUEST_ID_KEY
from services.common.tls import TlsFiles, channel_credentials

logger = logging.getLogger(__name__)

# How long /health waits for a replica's watch to report for the first time.
HEALTH_TIMEOUT_S = 2.0
# A replica that sends nothing, on any of its calls, for this long is taken as hung. Every stage speaks at least
# once a step (the denoiser streams a progress event per step), so this bounds one step, one encode or one decode.
DEFAULT_STALL_TIMEOUT_S = 300.0
# gRPC backs off reconnecting to a peer up to 120 s by default, so a stage that came back sat unused for that
# long; capped, a returning replica is reconnected (and its watch reports SERVING) within about half a second.
RECONNECT_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 500)]
STAGE_CHANNEL_OPTIONS = [*CHANNEL_OPTIONS, *RECONNECT_OPTIONS]
# Pause before reopening a health watch that ended, so a replica refusing watches does not spin the gateway.
WATCH_RETRY_S = 0.2
# With no replica healthy, how long a call waits for one to report SERVING before failing (a gateway that just
# started, the moment in a rolling restart between one replica returning and its watch reporting it).
NO_REPLICA_WAIT_S = 1.0
# Attempts one call gets, per replica in the pool (at least MIN_ATTEMPTS): enough to go round a rolling restart.
ATTEMPTS_PER_REPLICA, MIN_ATTEMPTS = 2, 3
# How transport failures read when they reach a client as UNKNOWN or INTERNAL rather than UNAVAILABLE (a reset
# connection, an HTTP/2 stream reset by a proxy, a half-written frame). A stage's own INTERNAL ("internal error
# (request_id=...)") is never retried: it would fail the same way again.
TRANSPORT_FAILURES = ("stream removed", "socket closed", "connection reset", "broken pipe", "rst_stream", "goaway",
                      "unexpected eos", "failed to connect", "connection refused", "end of tcp stream")


class Restarted:
    """Yielded by `StagePool.stream` when the call starts over on another replica: drop what it sent so far."""

    def __repr__(self) -> str:
        return "RESTARTED"


RESTARTED = Restarted()


class ReplicaGone(Exception):
    """The replica serving a call went away (died, drained, hung); `reason` is fit for a client (no address)."""

    def __init__(self, reason: str, details: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.details = details or reason


def went_away(error: grpc.RpcError) -> bool:
    """Whether a failed call means its replica went away (retry elsewhere) rather than that the call is bad."""
    code = error.code()
    if code == grpc.StatusCode.UNAVAILABLE:
        return True
    if code in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL):
        details = (error.details() or "").lower()
        return any(marker in details for marker in TRANSPORT_FAILURES)
    return False


@dataclasses.dataclass
class Replica:
    address: str
    channel: grpc.aio.Channel
    stub: object
    outstanding: int = 0
    serving: bool | None = None         # as its health watch last said; None until it first reports
    last_heard: float = 0.0             # when any call to it last received a response (monotonic)
    picked: int = 0                     # when it was last picked (a pool-wide count): ties go round-robin
    watcher: asyncio.Task | None = None

    @property
    def healthy(self) -> bool:
        """Worth a call: reported SERVING, or not heard from yet (tried, rather than failing the first requests)."""
        return self.serving is not False


class StagePool:
    def __init__(
        self,
        stage: str,
        addresses: list[str],
        stub_class: Callable[[grpc.aio.Channel], object],
        stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S,
        tls: TlsFiles | None = None,
    ) -> None:
        if not addresses:
            raise ValueError(f"no address given for the {stage} stage")
        self.stage = stage
        self.stall_timeout_s = stall_timeout_s
        self.tls = tls
        self.replicas = [
            Replica(address, channel, stub_class(channel))
            for address in addresses
            for channel in [self._connect(address)]
        ]
        self.max_attempts = max(MIN_ATTEMPTS, ATTEMPTS_PER_REPLICA * len(self.replicas))
        self._health_changed = asyncio.Condition()   # notified whenever a replica's health changes
        self._picks = itertools.count(1)

    def _connect(self, address: str) -> grpc.aio.Channel:
        """The one place a channel to a replica is made: TLS verified against the CA, presenting the gateway's own
        certificate (what a stage under mutual TLS requires), once TLS files are given; else plaintext."""
        if self.tls is not None:
            return grpc.aio.secure_channel(address, channel_credentials(self.tls), options=STAGE_CHANNEL_OPTIONS)
        return grpc.aio.insecure_channel(address, options=STAGE_CHANNEL_OPTIONS)

    @property
    def addresses(self) -> list[str]:
        return [replica.address for replica in self.replicas]

    # -- health, watched ---------------------------------------------------------------------------------------

    def _watch_all(self) -> None:
        """Start each replica's health watch (lazily: it needs the running loop), or restart one that ended."""
        for replica in self.replicas:
            if replica.watcher is None or replica.watcher.done():
                replica.watcher = asyncio.ensure_future(self._watch(replica))

    async def _watch(self, replica: Replica) -> None:
        """Keep `replica.serving` current from its health Watch stream, reopened whenever it ends or breaks."""
        stub = health_pb2_grpc.HealthStub(replica.channel)
        while True:
            try:
                async for reply in stub.Watch(health_pb2.HealthCheckRequest(service="")):
                    serving = reply.status == health_pb2.HealthCheckResponse.SERVING
                    await self._set_serving(replica, serving, health_pb2.HealthCheckResponse.ServingStatus.Name(
                        reply.status))
                reason = "its health watch ended"
            except grpc.RpcError as error:
                reason = f"health watch failed: {error.code().name} {error.details()}"
            await self._set_serving(replica, False, reason)
            await asyncio.sleep(WATCH_RETRY_S)
            # Waits (without spinning) while the replica is down: the channel reconnects on its capped back-off.
            await replica.channel.channel_ready()

    async def _set_serving(self, replica: Replica, serving: bool, reason: str) -> None:
        if replica.serving != serving:
            logger.info("%s replica %s is %s (%s)", self.stage, replica.address,
                        "serving" if serving else "not serving", reason)
        replica.serving = serving
        async with self._health_changed:
            self._health_changed.notify_all()

    async def _lost(self, replica: Replica, gone: ReplicaGone) -> None:
        """A call found `replica` gone: skip it from now on, until a fresh watch says it is SERVING again."""
        logger.warning("%s replica %s lost a call: %s", self.stage, replica.address, gone.details)
        await self._set_serving(replica, False, gone.reason)
        if replica.watcher is not None:
            replica.watcher.cancel()
        replica.watcher = asyncio.ensure_future(self._watch(replica))

    # -- picking a replica --------------------------------------------------------------------------------------

    def _pick(self, tried: list[str]) -> Replica | None:
        """A healthy replica, preferring those this call has tried least, then ones known SERVING, then the least
        busy, then the one picked longest ago. A replica that failed this call is healthy again only once its watch
        has reported it SERVING."""
        candidates = [r for r in self.replicas if r.healthy]
        if not candidates:
            return None
        replica = min(candidates, key=lambda r: (tried.count(r.address), r.serving is None, r.outstanding, r.picked))
        replica.picked = next(self._picks)
        return replica

    async def _next(self, tried: list[str]) -> Replica | None:
        """The replica for the next attempt; with none healthy, wait a moment for one to report SERVING. None once
        the attempts are spent or none came back."""
        if len(tried) >= self.max_attempts:
            return None
        if (replica := self._pick(tried)) is None:
            with contextlib.suppress(TimeoutError):
                async with self._health_changed:
                    await asyncio.wait_for(
                        self._health_changed.wait_for(lambda: any(r.healthy for r in self.replicas)), NO_REPLICA_WAIT_S)
            replica = self._pick(tried)
        return replica

    def _none_answered(self, tried: list[str], last: str) -> Unavailable:
        if not tried:
            return Unavailable(self.stage, f"no replica is serving ({len(self.replicas)} configured)")
        return Unavailable(self.stage, f"no replica answered ({len(tried)} tried; last: {last})")

    @staticmethod
    def _left(deadline: float | None, stage: str) -> float | None:
        if deadline is None:
            return None
        left = deadline - time.monotonic()
        if left <= 0:
            raise DeadlineExceeded(f"{stage}: the request ran past its deadline")
        return left

    # -- calls --------------------------------------------------------------------------------------------------

    async def stream(
        self,
        call: Callable[[object, dict], AsyncIterator],
        request_id: str,
        timeout: float | None,
    ) -> AsyncIterator:
        """Yield the responses of `call(stub, kwargs)`, starting over on another replica when the one serving it
        goes away. Before the responses of a new attempt comes RESTARTED when the failed one had yielded any.

        `call` must build a fresh request each time (a client stream cannot be replayed)."""
        self._watch_all()
        deadline = None if timeout is None else time.monotonic() + timeout
        tried: list[str] = []
        last = "none"
        produced = False
        while (replica := await self._next(tried)) is not None:
            if tried:
                logger.info("%s: %s on replica %s (attempt %d of at most %d)", self.stage,
                            "starting the call over" if produced else "retrying", replica.address, len(tried) + 1,
                            self.max_attempts)
            tried.append(replica.address)
            if produced:
                yield RESTARTED
                produced = False
            try:
                async for response in self._attempt(replica, call, request_id, self._left(deadline, self.stage)):
                    produced = True
                    yield response
                return
            except ReplicaGone as gone:
                last = gone.reason
                await self._lost(replica, gone)
        raise self._none_answered(tried, last)

    async def _attempt(self, replica: Replica, call: Callable[[object, dict], AsyncIterator], request_id: str,
                       timeout: float | None) -> AsyncIterator:
        """One try on one replica: its responses; ReplicaGone if it went away; a MeshError for a failed call."""
        replica.outstanding += 1
        rpc = call(replica.stub, {"metadata": ((REQUEST_ID_KEY, request_id),), "timeout": timeout})
        try:
            responses = rpc.__aiter__()
            while True:
                try:
                    response = await self._next_response(replica, responses)
                except StopAsyncIteration:
                    return
                yield response
        except grpc.RpcError as error:
            if went_away(error):
                raise ReplicaGone(f"it went away ({error.code().name})",
                                  f"{error.code().name}: {error.details()}") from None
            raise from_rpc_error(self.stage, error) from None
        finally:
            rpc.cancel()  # no-op once the call has ended; stops it if our consumer went away mid-stream
            replica.outstanding -= 1

    async def _next_response(self, replica: Replica, responses: AsyncIterator):
        """The call's next response; ReplicaGone once the replica has said nothing, on any of its calls, for the
        stall timeout. A call waiting in a replica's queue hears nothing while the calls ahead of it run: silence on
        it alone is no stall while the replica answers others (else a queue longer than the timeout failed)."""
        waiting_since = time.monotonic()
        next_response = asyncio.ensure_future(responses.__anext__())
        try:
            while True:
                quiet_for = time.monotonic() - max(waiting_since, replica.last_heard)
                if quiet_for >= self.stall_timeout_s:
                    raise ReplicaGone(f"it sent nothing for {self.stall_timeout_s:g}s")
                done, _ = await asyncio.wait({next_response}, timeout=self.stall_timeout_s - quiet_for)
                if done:
                    response = next_response.result()
                    replica.last_heard = time.monotonic()
                    return response
        finally:
            next_response.cancel()

    async def unary(self, call: Callable[[object, dict], Awaitable], request_id: str, timeout: float | None):
        """The reply of a unary `call(stub, kwargs)`, tried on another replica when one is gone or too slow."""
        self._watch_all()
        tried: list[str] = []
        last = "none"
        while (replica := await self._next(tried)) is not None:
            tried.append(replica.address)
            try:
                return await call(replica.stub, {"metadata": ((REQUEST_ID_KEY, request_id),), "timeout": timeout})
            except grpc.RpcError as error:
                if not (went_away(error) or error.code() == grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise from_rpc_error(self.stage, error) from None
                gone = ReplicaGone(f"it went away ({error.code().name})", f"{error.code().name}: {error.details()}")
                last = gone.reason
                await self._lost(replica, gone)
        raise self._none_answered(tried, last)

    async def check_health(self) -> bool:
        """True when at least one replica reports SERVING (from the watches; a replica not heard from yet gets up
        to HEALTH_TIMEOUT_S to report)."""
        self._watch_all()
        if not any(r.serving for r in self.replicas) and any(r.serving is None for r in self.replicas):
            with contextlib.suppress(TimeoutError):
                async with self._health_changed:
                    await asyncio.wait_for(self._health_changed.wait_for(
                        lambda: any(r.serving for r in self.replicas) or all(r.serving is not None
                                                                              for r in self.replicas)),
                        HEALTH_TIMEOUT_S)
        return any(r.serving for r in self.replicas)

    def serving_now(self) -> bool:
        """Whether a replica reports SERVING now, as the watches last said (starting any not yet running); no wait,
        no call: the gateway's own gRPC health reads this a few times a second."""
        self._watch_all()
        return any(r.serving for r in self.replicas)

    async def serving_within(self, timeout_s: float = HEALTH_TIMEOUT_S) -> bool:
        """Whether a replica reports SERVING, waiting up to `timeout_s` for one to (a replica coming back reports
        within its reconnect back-off)."""
        self._watch_all()
        if not any(r.serving for r in self.replicas):
            with contextlib.suppress(TimeoutError):
                async with self._health_changed:
                    await asyncio.wait_for(
                        self._health_changed.wait_for(lambda: any(r.serving for r in self.replicas)), timeout_s)
        return any(r.serving for r in self.replicas)

    async def close(self) -> None:
        watchers = [replica.watcher for replica in self.replicas if replica.watcher is not None]
        for watcher in watchers:
            watcher.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)
        await asyncio.gather(*(replica.channel.close() for replica in self.replicas))
