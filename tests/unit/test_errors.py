"""Tests for services.common.errors: MeshError -> gRPC code / HTTP status, and gRPC errors -> MeshError."""

from __future__ import annotations

import grpc
import pytest

from services.common import errors
from services.common.errors import (
    Cancelled,
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    MeshError,
    NotFound,
    ResourceExhausted,
    Unavailable,
    from_rpc_error,
)


class FakeRpcError(grpc.RpcError):
    """What a failed stub call raises: an RpcError with code() and details()."""

    def __init__(self, code: grpc.StatusCode, details: str | None) -> None:
        super().__init__()
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str | None:
        return self._details


def test_invalid_argument_is_400_and_prefixes_the_field():
    error = InvalidArgument("width", "must be a multiple of 16")
    assert error.grpc_code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.http_status == 400
    assert error.field == "width"
    assert error.message == "width: must be a multiple of 16"
    assert str(error) == error.message
    assert isinstance(error, MeshError)


@pytest.mark.parametrize(
    ("cls", "code", "status"),
    [
        (NotFound, grpc.StatusCode.NOT_FOUND, 404),
        (ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
        (DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED, 504),
        (Cancelled, grpc.StatusCode.CANCELLED, 499),
        (Internal, grpc.StatusCode.INTERNAL, 500),
    ],
)
def test_error_class_maps_to_grpc_code_and_http_status(cls, code, status):
    error = cls("something happened")
    assert error.grpc_code == code
    assert error.http_status == status
    assert error.message == "something happened"
    assert isinstance(error, MeshError)


def test_unavailable_is_503_and_names_the_stage():
    error = Unavailable("denoiser", "connection refused")
    assert error.grpc_code == grpc.StatusCode.UNAVAILABLE
    assert error.http_status == 503
    assert error.stage == "denoiser"
    assert "denoiser" in error.message
    assert "connection refused" in error.message


def test_http_status_table_agrees_with_error_classes():
    for cls in (InvalidArgument, NotFound, ResourceExhausted, Unavailable, DeadlineExceeded, Cancelled, Internal):
        assert errors.HTTP_STATUS_BY_GRPC.get(cls.grpc_code, 500) == cls.http_status, cls.__name__


def test_rpc_unavailable_becomes_unavailable_naming_the_stage():
    mapped = from_rpc_error("decoder", FakeRpcError(grpc.StatusCode.UNAVAILABLE, "failed to connect"))
    assert type(mapped) is Unavailable
    assert mapped.stage == "decoder"
    assert "decoder" in mapped.message and "failed to connect" in mapped.message
    assert mapped.http_status == 503


def test_rpc_invalid_argument_keeps_the_field():
    mapped = from_rpc_error("encoder", FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT, "width: bad"))
    assert type(mapped) is InvalidArgument
    assert mapped.field == "width"
    assert mapped.message == "width: bad"
    assert mapped.http_status == 400


def test_rpc_invalid_argument_without_field_is_attributed_to_the_stage():
    mapped = from_rpc_error("encoder", FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT, "bad things"))
    assert type(mapped) is InvalidArgument
    assert mapped.field == "encoder"
    assert "bad things" in mapped.message


def test_rpc_unknown_becomes_unavailable():
    mapped = from_rpc_error("denoiser", FakeRpcError(grpc.StatusCode.UNKNOWN, "Exception iterating responses"))
    assert type(mapped) is Unavailable
    assert mapped.stage == "denoiser"
    assert mapped.http_status == 503


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (grpc.StatusCode.NOT_FOUND, NotFound),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, ResourceExhausted),
        (grpc.StatusCode.DEADLINE_EXCEEDED, DeadlineExceeded),
        (grpc.StatusCode.CANCELLED, Cancelled),
        (grpc.StatusCode.INTERNAL, Internal),
    ],
)
def test_rpc_codes_with_meaning_keep_their_class_and_name_the_stage(code, cls):
    mapped = from_rpc_error("denoiser", FakeRpcError(code, "details here"))
    assert type(mapped) is cls
    assert mapped.message == "denoiser: details here"


def test_rpc_error_without_details_uses_the_code_name():
    mapped = from_rpc_error("decoder", FakeRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, None))
    assert type(mapped) is DeadlineExceeded
    assert mapped.message == "decoder: deadline_exceeded"


def test_bare_rpc_error_without_code_becomes_unavailable():
    mapped = from_rpc_error("encoder", grpc.RpcError())
    assert type(mapped) is Unavailable
    assert mapped.stage == "encoder"
