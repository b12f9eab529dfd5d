"""gRPC server start-up shared by every stage: aio server, health, reflection, error mapping, draining.

A stage's `serve()` builds its servicer and calls `run_server`, which reports SERVING only once the model is
loaded and, on SIGTERM/SIGINT, flips health to NOT_SERVING, still answers for a short drain delay (so watching
gateways move away first), then refuses new calls and lets in-flight requests finish (`grace`).
"""

from __future__ import annotations

import asyncio
import datetime
import functools
import inspect
import ipaddress
import logging
import os
import signal
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from services.common import logs, metrics, tracing
from services.common.errors import Internal, InvalidArgument, MeshError, ResourceExhausted, device_out_of_memory
from services.common.grpc_guard import (
    DEFAULT_HANDSHAKE_TIMEOUT_S,
    DEFAULT_IDLE_TIMEOUT_S,
    DecodeGuard,
    server_options,
)
from services.common.lifeline import end_with_parent
from services.common.limits import check_request_id
from services.common.logs import request_context
from services.common.reflection import enable_reflection
from services.common.tls import TlsFiles, server_credentials

logger = logging.getLogger(__name__)

REQUEST_ID_KEY = "x-request-id"
# Tensors move as ~1 MiB chunks, so messages stay small; 16 MiB leaves room for one big prompt or PNG chunk.
MAX_MESSAGE_BYTES = 16 << 20
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]


def request_id_from(context: grpc.aio.ServicerContext) -> str:
    """The caller's `x-request-id` once checked (InvalidArgument naming it otherwise: it goes into every log line and
    on to the next stage's metadata), or a new one."""
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_KEY:
            return check_request_id(value if isinstance(value, str) else "", REQUEST_ID_KEY)
    return uuid.uuid4().hex[:16]


def _message_request_id(request: Any) -> str:
    """A request message's own `request_id` field when it holds a valid id ("" otherwise: no such field, a
    client stream, or a bad value, which the handler rejects naming the field)."""
    value = getattr(request, "request_id", "")
    if not value or not isinstance(value, str):
        return ""
    try:
        return check_request_id(value, "request_id")
    except InvalidArgument:
        return ""


async def _checked_request_id(request: Any, context: grpc.aio.ServicerContext) -> str:
    """The id this call logs under and echoes in its initial metadata: the message's own `request_id` (it is what
    the call's work goes by), else the caller's `x-request-id`, else a new one."""
    try:
        request_id = _message_request_id(request) or request_id_from(context)
    except InvalidArgument as error:
        await context.abort_with_status(refusal(error))
        raise   # abort_with_status always raises; this keeps type checkers sure the id is a str
    await context.send_initial_metadata(((REQUEST_ID_KEY, request_id),))
    return request_id


def status_of(error: MeshError) -> grpc.Status:
    """The error as a rich gRPC status: its code and message, and for a bad field a google.rpc.BadRequest field
    violation in the details, so clients find the field without parsing the message."""
    status = status_pb2.Status(code=error.grpc_code.value[0], message=error.message)
    if isinstance(error, InvalidArgument):
        violation = error_details_pb2.BadRequest.FieldViolation(field=error.field, description=error.reason)
        status.details.add().Pack(error_details_pb2.BadRequest(field_violations=[violation]))
    retry_after_s = getattr(error, "retry_after_s", None)
    if retry_after_s is not None:
        delay = duration_pb2.Duration()
        delay.FromTimedelta(datetime.timedelta(seconds=retry_after_s))
        status.details.add().Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    return rpc_status.to_status(status)


# Codes that mean the request was refused rather than failed while served: counted as rejections.
REFUSED_CODES = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
                           grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAUTHENTICATED,
                           grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNAVAILABLE})


def refusal(error: MeshError) -> grpc.Status:
    """status_of(error), counted in diffmesh_rejections_total when its code is a refusal (reason: the field of a
    bad argument, the stage that is unavailable)."""
    if error.grpc_code in REFUSED_CODES:
        reason = getattr(error, "field", None) or getattr(error, "stage", None) or ""
        metrics.rejected(logs.service_name(), error.grpc_code.name, reason)
    return status_of(error)


def _as_mesh_error(error: BaseException) -> BaseException:
    """The error the client should see: a MeshError as raised, a device out of memory as RESOURCE_EXHAUSTED (its
    message and PyTorch's go to the log), anything else as it is (INTERNAL)."""
    exhausted = device_out_of_memory(error, logs.service_name())
    if exhausted is not None:
        logger.warning("%s (%s)", exhausted.message, str(error).splitlines()[0][:300])
        return exhausted
    return error


def _code_of(error: BaseException) -> str:
    if isinstance(error, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED.name
    return error.grpc_code.name if isinstance(error, MeshError) else grpc.StatusCode.INTERNAL.name


async def _abort(context: grpc.aio.ServicerContext, error: BaseException, request_id: str) -> None:
    if isinstance(error, MeshError):
        logger.info("request failed: %s %s", error.grpc_code.name, error.message)
        await context.abort_with_status(refusal(error))
    logger.exception("internal error")
    await context.abort(Internal("").grpc_code, f"internal error (request_id={request_id})")


def _served(servicer: Any, method: str, code: str, started: float) -> None:
    """A call's end: its access line (route: "Encoder/Encode") and its metrics."""
    elapsed = time.monotonic() - started
    metrics.rpc_served(logs.service_name(), method, code, elapsed)
    logs.log_access("grpc", method, f"{type(servicer).__name__.removesuffix('Servicer')}/{method}", code, elapsed)


def rpc_method(method: Callable) -> Callable:
    """Wrap a servicer method: bind the request id to the logs and map exceptions to status codes.

    Works for unary and server-streaming handlers alike. The client sees the MeshError's message, or
    INTERNAL with the request id; the traceback goes to the log, never to the client. The request id goes back
    in the initial metadata (`x-request-id`); each call ends with an access line (method, status code, duration)
    and is counted in diffmesh_grpc_requests_total. A client that cancels is an INFO line, not an error.
    """
    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream_wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext):
            started = time.monotonic()
            request_id = await _checked_request_id(request, context)
            with request_context(request_id):
                logger.info("%s called", method.__name__)    # which requests a server saw, as they arrive
                code = grpc.StatusCode.OK.name
                try:
                    async for item in method(self, request, context):
                        yield item
                except asyncio.CancelledError as error:
                    code = _code_of(error)
                    logger.info("%s cancelled by the client", method.__name__)
                    raise
                except Exception as error:  # noqa: BLE001 - the boundary: every error becomes a status
                    error = _as_mesh_error(error)
                    code = _code_of(error)
                    await _abort(context, error, request_id)
                finally:
                    _served(self, method.__name__, code, started)

        return stream_wrapper

    @functools.wraps(method)
    async def unary_wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext):
        started = time.monotonic()
        request_id = await _checked_request_id(request, context)
        with request_context(request_id):
            logger.info("%s called", method.__name__)
            code = grpc.StatusCode.OK.name
            try:
                return await method(self, request, context)
            except asyncio.CancelledError as error:
                code = _code_of(error)
                logger.info("%s cancelled by the client", method.__name__)
                raise
            except Exception as error:  # noqa: BLE001
                error = _as_mesh_error(error)
                code = _code_of(error)
                await _abort(context, error, request_id)
            finally:
                _served(self, method.__name__, code, started)

    return unary_wrapper


def is_loopback(host: str) -> bool:
    """True for an address only this host can reach (a name is resolved by nobody here: only localhost counts)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# After SIGTERM, how long a server still takes new calls while its health says NOT_SERVING (at most the grace).
DRAIN_DELAY_S = 1.0


class DrainingHealthServicer(health.aio.HealthServicer):
    """grpc's health servicer, whose Watch streams end when the server stops taking calls: each gateway keeps
    one open per replica, and left open they would hold `server.stop()` for the whole grace."""

    def __init__(self) -> None:
        super().__init__()
        self._ending = asyncio.Event()
        self.watchers = 0

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext) -> None:
        watch = asyncio.ensure_future(super().Watch(request, context))
        ending = asyncio.ensure_future(self._ending.wait())
        self.watchers += 1
        try:
            await asyncio.wait({watch, ending}, return_when=asyncio.FIRST_COMPLETED)
            if watch.done():
                watch.result()
        finally:
            self.watchers -= 1
            watch.cancel()
            ending.cancel()

    def end_watches(self) -> None:
        self._ending.set()


class StartupError(Exception):
    """A server cannot start (port taken, model missing, device unavailable): reported in one line, no traceback."""


def run_until_stopped(coroutine) -> None:
    """asyncio.run for a server's main; a StartupError exits 1 with its message instead of a traceback. A server
    started by `diffmesh up` or the gang launcher ends when that parent dies (lifeline)."""
    end_with_parent()
    try:
        asyncio.run(coroutine)
    except StartupError as error:
        logger.error("cannot start: %s", error)
        raise SystemExit(1) from None
    exit_at_once(0)


def exit_at_once(code: int) -> None:
    """End a server that has stopped cleanly without the interpreter's teardown: its last garbage collection over a
    loaded model's heap takes seconds (measured 3-5 s after `stopped` on a loaded 2-core machine), which every
    restart, rolling update and `diffmesh up` stop would wait for, with nothing left to do. What atexit would have
    done is done here: spans exported, logs and streams flushed."""
    tracing.flush()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


class AdmissionGate:
    """Runs at most `concurrency` requests at once with at most `max_queue` waiting; beyond that a request
    is refused at once with RESOURCE_EXHAUSTED rather than left to hang."""

    def __init__(self, stage: str, concurrency: int = 1, max_queue: int = 16) -> None:
        self._stage = stage
        self._semaphore = asyncio.Semaphore(concurrency)
        self.concurrency, self.max_queue = concurrency, max_queue
        self._capacity = concurrency + max_queue
        self._admitted = 0
        self._running = 0

    @property
    def in_flight(self) -> int:
        return self._admitted

    @property
    def running(self) -> int:
        return self._running

    @property
    def queued(self) -> int:
        return self._admitted - self._running

    async def __aenter__(self) -> "AdmissionGate":
        if self._admitted >= self._capacity:
            raise ResourceExhausted(f"{self._stage} is at capacity ({self._admitted} requests running or queued)")
        self._admitted += 1
        try:
            await self._semaphore.acquire()
        except BaseException:
            self._admitted -= 1
            raise
        self._running += 1
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._running -= 1
        self._semaphore.release()
        self._admitted -= 1


async def run_server(
    *,
    services: Sequence[tuple[Callable[[Any, grpc.aio.Server], None], Any, str]],
    host: str,
    port: int,
    grace_seconds: float = 30.0,
    on_started: Callable[[int], None] | None = None,
    stop_event: asyncio.Event | None = None,
    handle_signals: bool = True,
    on_stopping: Callable[[], None] | None = None,
    always_drain: bool = False,
    tls: TlsFiles | None = None,
    require_client_cert: bool = True,
    idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S,
    handshake_timeout_s: float = DEFAULT_HANDSHAKE_TIMEOUT_S,
    watch_health: Callable[[health.aio.HealthServicer], Awaitable[None]] | None = None,
) -> None:
    """Serve `services` = [(add_XServicer_to_server, servicer, full service name)] with health and reflection,
    until SIGTERM/SIGINT (unless `handle_signals` is false) or `stop_event`; then drain: `on_stopping()` and
    NOT_SERVING at once, new calls still taken for DRAIN_DELAY_S while anyone watches health, in-flight ones
    finished within `grace_seconds`. With `tls` holding a certificate the port serves TLS only; with its CA too (and
    `require_client_cert`), mutual TLS: a client without a certificate signed by the CA fails the handshake.
    `watch_health(servicer)`, when given, runs from SERVING until the drain and keeps the health statuses current
    (the gateway: NOT_SERVING while a model's stage has no replica serving); the drain's NOT_SERVING overrides it.
    Reflection answers in v1 and v1alpha."""
    # Every method answers a message that does not parse with INVALID_ARGUMENT; idle and half-open connections close.
    server = grpc.aio.server(options=CHANNEL_OPTIONS + server_options(idle_timeout_s, handshake_timeout_s),
                             interceptors=[DecodeGuard(refusal)])
    health_servicer = DrainingHealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [name for _, _, name in services]
    for add_to_server, servicer, _ in services:
        add_to_server(servicer, server)
    enable_reflection([*names, health.SERVICE_NAME], server)
    address = f"{host}:{port}"
    secure = tls is not None and tls.serves_tls
    if not secure and not is_loopback(host):
        logger.warning("serving plaintext gRPC on %s: anyone who can reach it can call it (see --tls-cert)", host)
    try:
        if secure:
            bound_port = server.add_secure_port(address, server_credentials(tls, require_client_cert))
        else:
            bound_port = server.add_insecure_port(address)
    except RuntimeError:
        bound_port = 0
    if bound_port == 0:
        raise StartupError(f"could not bind gRPC to {host}:{port} (in use, or not an address of this host)")
    await server.start()
    # With a watch_health, it owns every status from the start (it sets them before it first waits).
    health_watch = asyncio.ensure_future(watch_health(health_servicer)) if watch_health is not None else None
    for name in [*names, ""] if health_watch is None else []:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    mode = ("mutual TLS" if tls.ca and require_client_cert else "TLS") if secure else "plaintext"
    logger.info("serving %s on %s:%d (%s)", ", ".join(names), host, bound_port, mode)
    if on_started is not None:
        on_started(bound_port)

    stop = stop_event or asyncio.Event()
    if handle_signals:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    server_done = asyncio.ensure_future(server.wait_for_termination())
    stop_wait = asyncio.ensure_future(stop.wait())
    await asyncio.wait([server_done, stop_wait], return_when=asyncio.FIRST_COMPLETED)
    # NOT_SERVING at once, while still answering for a moment: the gateways watching this server's health move
    # their new calls elsewhere before it refuses any. Then no new calls; in-flight ones finish within the grace.
    if on_stopping is not None:
        on_stopping()
    if health_watch is not None:
        health_watch.cancel()
    await health_servicer.enter_graceful_shutdown()
    # The delay is for the clients watching; with none (a stage whose gateways have gone) there is no one to tell.
    # `always_drain`: the gateway, whose REST /health pollers cannot be counted.
    drain_s = min(DRAIN_DELAY_S, grace_seconds) if always_drain or health_servicer.watchers else 0.0
    logger.info("shutting down: NOT_SERVING; refusing new calls in %.1fs, in-flight ones get up to %.0fs",
                drain_s, grace_seconds)
    await asyncio.sleep(drain_s)
    health_servicer.end_watches()
    await server.stop(max(0.0, grace_seconds - drain_s))
    stop_wait.cancel()
    logger.info("stopped")
