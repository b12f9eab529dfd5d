"""What every gRPC server applies before a handler runs: messages that do not parse become INVALID_ARGUMENT naming
the field, and connections that sit idle or never finish their handshake are closed.

grpc.aio deserializes a request outside the handler: a DecodeError there reaches the client as UNKNOWN
"Unexpected <class 'DecodeError'>" for a unary request, and inside the handler as an INTERNAL error for a stream.
`DecodeGuard` wraps each method's deserializer so a message that does not parse is handed on as an `Undecodable`,
and each method's behaviour so that one is answered INVALID_ARGUMENT (with a google.rpc.BadRequest naming the
field, as every other bad field) before any servicer code sees it; client streams are checked message by message.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf import descriptor as descriptor_lib
from google.protobuf.message import DecodeError

from services.common.errors import InvalidArgument

# A connection with no call in flight for this long is sent GOAWAY (clients reconnect on their next call, in ms
# on loopback); gRPC's default keeps one forever.
DEFAULT_IDLE_TIMEOUT_S = 300.0
# A peer that opens TCP and does not finish the TLS / HTTP/2 handshake within this is dropped (gRPC's default: 120 s).
DEFAULT_HANDSHAKE_TIMEOUT_S = 10.0


def server_options(idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S,
                   handshake_timeout_s: float = DEFAULT_HANDSHAKE_TIMEOUT_S) -> list[tuple[str, int]]:
    """Connection limits for a server; the message size limits are CHANNEL_OPTIONS (server.py)."""
    return [
        ("grpc.max_connection_idle_ms", int(idle_timeout_s * 1000)),
        ("grpc.server_handshake_timeout_ms", int(handshake_timeout_s * 1000)),
        # Ping peers of a connection with calls in flight every minute; one that does not answer in 20 s is gone
        # (a client that vanished without a FIN would otherwise hold its stream, and a stage's admission slot).
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        # Let clients keep their own keepalive (down to one ping per 10 s, with or without calls) without the
        # server answering "too many pings" with GOAWAY.
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ]


@dataclasses.dataclass(frozen=True)
class Undecodable:
    """Stands for a request message that did not parse; carries the error the client is answered with."""

    error: InvalidArgument


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def bad_utf8_field(message: descriptor_lib.Descriptor, data: bytes, prefix: str = "") -> str | None:
    """The dotted name of the first string field in `data` (a serialized `message`) that is not UTF-8, if any.

    protobuf's own error does not say which field (upb: "String field had bad UTF-8"); walking the wire format
    (tag, then varint / fixed / length-delimited payload) finds it. Anything it cannot follow gives None."""
    pos = 0
    try:
        while pos < len(data):
            key, pos = _varint(data, pos)
            number, wire_type = key >> 3, key & 7
            if wire_type == 0:
                _, pos = _varint(data, pos)
            elif wire_type == 1:
                pos += 8
            elif wire_type == 5:
                pos += 4
            elif wire_type == 2:
                length, pos = _varint(data, pos)
                payload, pos = data[pos : pos + length], pos + length
                field = message.fields_by_number.get(number)
                if field is None:
                    continue
                if field.type == descriptor_lib.FieldDescriptor.TYPE_STRING:
                    try:
                        payload.decode("utf-8")
                    except UnicodeDecodeError:
                        return prefix + field.name
                elif field.type == descriptor_lib.FieldDescriptor.TYPE_MESSAGE:
                    inner = bad_utf8_field(field.message_type, payload, f"{prefix}{field.name}.")
                    if inner is not None:
                        return inner
            else:
                return None     # groups (proto2) or a corrupt tag
    except IndexError:
        return None
    return None


def decode_error(deserialize: Callable[[bytes], Any], data: bytes, error: DecodeError) -> InvalidArgument:
    """The client-facing error for `data` that `deserialize` (a message class's FromString) refused."""
    message_class = getattr(deserialize, "__self__", None)
    descriptor = getattr(message_class, "DESCRIPTOR", None)
    if descriptor is not None:
        field = bad_utf8_field(descriptor, bytes(data))
        if field is not None:
            return InvalidArgument(field, "is not valid UTF-8")
    name = descriptor.full_name if descriptor is not None else "request"
    reason = str(error).rpartition(": ")[2] or "does not parse"   # upb: "Error parsing message with type 'X': why"
    return InvalidArgument("request", f"is not a valid {name} message ({reason})")


class DecodeGuard(grpc.aio.ServerInterceptor):
    """Answers a request that does not parse with INVALID_ARGUMENT naming the field, for every method of the server
    (health and reflection included), unary requests and client streams alike."""

    def __init__(self, status_of: Callable[[InvalidArgument], grpc.Status]) -> None:
        self._status_of = status_of

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        return self.guard(handler)

    def guard(self, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        kind = next(name for name in ("unary_unary", "unary_stream", "stream_unary", "stream_stream")
                    if getattr(handler, name) is not None)
        behaviour = getattr(handler, kind)
        if not (inspect.iscoroutinefunction(behaviour) or inspect.isasyncgenfunction(behaviour)):
            return handler      # a sync handler (run in a thread) keeps grpc's own handling
        deserialize = handler.request_deserializer

        def tolerant_deserialize(data: bytes) -> Any:
            try:
                return deserialize(data)
            except DecodeError as error:
                return Undecodable(decode_error(deserialize, data, error))

        wrap = self._unary if kind.startswith("unary_") else self._streaming
        return handler._replace(request_deserializer=tolerant_deserialize, **{kind: wrap(behaviour)})

    def _unary(self, behaviour: Callable) -> Callable:
        status_of = self._status_of
        if inspect.isasyncgenfunction(behaviour):
            async def unary_in_stream_out(request, context):
                if isinstance(request, Undecodable):
                    await context.abort_with_status(status_of(request.error))
                # aclosing: if this stream is closed early, the handler's own cleanup runs now, not at collection.
                async with contextlib.aclosing(behaviour(request, context)) as responses:
                    async for response in responses:
                        yield response

            return unary_in_stream_out

        async def unary_in(request, context):
            if isinstance(request, Undecodable):
                await context.abort_with_status(status_of(request.error))
            return await behaviour(request, context)

        return unary_in

    def _streaming(self, behaviour: Callable) -> Callable:
        status_of = self._status_of

        async def checked(requests: AsyncIterator) -> AsyncIterator:
            # Raised inside the handler's own loop: rpc_method maps it like any bad field; a handler without
            # rpc_method (reflection) is answered by the except clauses below.
            async for request in requests:
                if isinstance(request, Undecodable):
                    raise request.error
                yield request

        if inspect.isasyncgenfunction(behaviour):
            async def stream_in_stream_out(requests, context):
                try:
                    async with contextlib.aclosing(behaviour(checked(requests), context)) as responses:
                        async for response in responses:
                            yield response
                except InvalidArgument as error:
                    await context.abort_with_status(status_of(error))

            return stream_in_stream_out

        async def stream_in(requests, context):
            try:
                return await behaviour(checked(requests), context)
            except InvalidArgument as error:
                await context.abort_with_status(status_of(error))

        return stream_in
