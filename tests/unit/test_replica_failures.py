"""Which failed stage calls mean "the replica went away" (retried on another) and which are the call's own."""

from __future__ import annotations

import grpc
import pytest
from grpc.aio import AioRpcError, Metadata

from services.gateway.stages import went_away


def error(code: grpc.StatusCode, details: str) -> AioRpcError:
    return AioRpcError(code, Metadata(), Metadata(), details)


@pytest.mark.parametrize("code, details", [
    (grpc.StatusCode.UNAVAILABLE, "Stream removed (Socket closed)"),        # SIGKILL of the replica mid-stream
    (grpc.StatusCode.UNAVAILABLE, "Cancelling all calls"),                  # its grace ran out while draining
    (grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses"),
    (grpc.StatusCode.UNKNOWN, "Stream removed"),
    (grpc.StatusCode.INTERNAL, "Received RST_STREAM with error code 2"),
    (grpc.StatusCode.UNKNOWN, "recvmsg:Connection reset by peer"),
])
def test_transport_failures_mean_the_replica_went_away(code, details):
    assert went_away(error(code, details))


@pytest.mark.parametrize("code, details", [
    (grpc.StatusCode.INTERNAL, "internal error (request_id=abc)"),          # the stage's own bug: would repeat
    (grpc.StatusCode.INVALID_ARGUMENT, "width: must be a multiple of 16"),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, "denoiser is at capacity"),        # busy, not gone: waited on, not failed
    (grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"),               # the request's own deadline
    (grpc.StatusCode.CANCELLED, "cancelled at step 3 of 8"),
    (grpc.StatusCode.UNKNOWN, "Unexpected error"),
])
def test_a_call_s_own_failure_is_not_retried(code, details):
    assert not went_away(error(code, details))
