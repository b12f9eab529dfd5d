"""Stage pools: the gateway's view of each stage as a set of replicas.

Each call goes to the healthy replica with the fewest outstanding calls. A call that fails with UNAVAILABLE
before it produced anything is retried on another replica; stages are idempotent for a request + seed, so
that is safe. Errors leave here as MeshErrors naming the stage.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.errors import Unavailable, from_rpc_error
from services.common.server import CHANNEL_OPTIONS, REQUEST_ID_KEY

logger = logging.getLogger(__name__)

HEALTH_TIMEOUT_S = 2.0
# A stage that sends nothing for this long is taken as hung. Every stage speaks at least once a step (the
# denoiser streams a progress event per step), so this bounds one step, one encode or one VAE decode.
DEFAULT_STALL_TIMEOUT_S = 300.0
# Replicas found unhealthy are skipped for this long before being tried again.
UNHEALTHY_COOLDOWN_S = 5.0


@dataclasses.dataclass
class Replica:
    address: str
    channel: grpc.aio.Channel
    stub: object
    outstanding: int = 0
    unhealthy_until: float = 0.0

    @property
    def healthy(self) -> bool:
        return time.monotonic() >= self.unhealthy_until

    def mark_unhealthy(self) -> None:
        self.unhealthy_until = time.monotonic() + UNHEALTHY_COOLDOWN_S


class StagePool:
    def __init__(
        self,
        stage: str,
        addresses: list[str],
        stub_class: Callable[[grpc.aio.Channel], object],
        stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S,
    ) -> None:
        if not addresses:
            raise ValueError(f"no address given for the {stage} stage")
        self.stage = stage
        self.stall_timeout_s = stall_timeout_s
        self.replicas = [
            Replica(address, channel, stub_class(channel))
            for address in addresses
            for channel in [self._connect(address)]
        ]

    def _connect(self, address: str) -> grpc.aio.Channel:
        """The one place a channel to a replica is made (plaintext or TLS)."""
        return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)

    @property
    def addresses(self) -> list[str]:
        return [replica.address for replica in self.replicas]

    def _pick(self, tried: set[str]) -> Replica | None:
        candidates = [r for r in self.replicas if r.address not in tried]
        if not candidates:
            return None
        healthy = [r for r in candidates if r.healthy] or candidates
        return min(healthy, key=lambda r: r.outstanding)

    async def stream(
        self,
        call: Callable[[object, dict], AsyncIterator],
        request_id: str,
        timeout: float | None,
    ) -> AsyncIterator:
        """Yield the responses of `call(stub, kwargs)` from one replica, failing over while nothing has arrived.

        `call` must build a fresh request each time (a client stream cannot be replayed)."""
        tried: set[str] = set()
        last_failure = "no replica"
        while (replica := self._pick(tried)) is not None:
            tried.add(replica.address)
            replica.outstanding += 1
            produced = False
            rpc = call(replica.stub, {"metadata": ((REQUEST_ID_KEY, request_id),), "timeout": timeout})
            try:
                responses = rpc.__aiter__()
                while True:
                    try:
                        response = await asyncio.wait_for(responses.__anext__(), self.stall_timeout_s)
                    except StopAsyncIteration:
                        return
                    produced = True
                    yield response
            except asyncio.TimeoutError:
                rpc.cancel()
                replica.mark_unhealthy()
                last_failure = f"{replica.address} sent nothing for {self.stall_timeout_s:g}s"
                logger.warning("%s replica %s", self.stage, last_failure)
                if produced:
                    raise Unavailable(self.stage, last_failure) from None
            except grpc.RpcError as error:
                if error.code() == grpc.StatusCode.UNAVAILABLE and not produced:
                    replica.mark_unhealthy()
                    last_failure = f"{replica.address}: {error.details()}"
                    logger.warning("%s replica %s unavailable: %s", self.stage, replica.address, error.details())
                    continue
                raise from_rpc_error(self.stage, error) from None
            finally:
                rpc.cancel()  # no-op once the call has ended; stops it if our consumer went away mid-stream
                replica.outstanding -= 1
        raise Unavailable(self.stage, f"no replica of {self.addresses} answered (last: {last_failure})")

    async def unary(self, call: Callable[[object, dict], Awaitable], request_id: str, timeout: float | None):
        """The reply of a unary `call(stub, kwargs)`, failing over to another replica on UNAVAILABLE."""
        tried: set[str] = set()
        last_failure = "no replica"
        while (replica := self._pick(tried)) is not None:
            tried.add(replica.address)
            try:
                return await call(replica.stub, {"metadata": ((REQUEST_ID_KEY, request_id),), "timeout": timeout})
            except grpc.RpcError as error:
                if error.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise from_rpc_error(self.stage, error) from None
                replica.mark_unhealthy()
                last_failure = f"{replica.address}: {error.details()}"
        raise Unavailable(self.stage, f"no replica of {self.addresses} answered (last: {last_failure})")

    async def check_health(self) -> bool:
        """True when at least one replica reports SERVING."""
        results = await asyncio.gather(*(self._check(replica) for replica in self.replicas))
        return any(results)

    async def _check(self, replica: Replica) -> bool:
        stub = health_pb2_grpc.HealthStub(replica.channel)
        try:
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=HEALTH_TIMEOUT_S)
        except grpc.RpcError:
            replica.mark_unhealthy()
            return False
        serving = reply.status == health_pb2.HealthCheckResponse.SERVING
        if serving:
            replica.unhealthy_until = 0.0
        else:
            replica.mark_unhealthy()
        return serving

    async def close(self) -> None:
        await asyncio.gather(*(replica.channel.close() for replica in self.replicas))
