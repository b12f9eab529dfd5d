"""The decode guard's field finder and messages: which string field of a message that does not parse is not UTF-8."""

from __future__ import annotations

import pytest
from google.protobuf.message import DecodeError

from diffmesh.v1 import denoiser_pb2, gateway_pb2, tensor_pb2
from services.common.grpc_guard import bad_utf8_field, decode_error

BAD = b"\xff\xfe"


def swap(message, good: bytes, bad: bytes = BAD) -> bytes:
    """`message` serialized, with the UTF-8 string `good` (same length as `bad`) replaced by `bad` on the wire."""
    data = message.SerializeToString()
    assert data.count(good) == 1
    return data.replace(good, bad)


@pytest.mark.parametrize("message,expected", [
    (gateway_pb2.GenerateRequest(prompt="zz", width=32, request_id="ok"), "prompt"),
    (gateway_pb2.GenerateRequest(prompt="a cat", negative_prompt="zz", seed=7), "negative_prompt"),
    (denoiser_pb2.DenoiseRequest(params=denoiser_pb2.DenoiseParams(request_id="zz", width=32)), "params.request_id"),
    (denoiser_pb2.DenoiseRequest(tensor=tensor_pb2.TensorChunk(name="zz", shape=[1, 2], data=b"\0" * 8)),
     "tensor.name"),
])
def test_the_field_holding_invalid_utf8_is_found_however_deep(message, expected):
    data = swap(message, b"zz")
    with pytest.raises(DecodeError):
        type(message).FromString(data)
    assert bad_utf8_field(type(message).DESCRIPTOR, data) == expected
    error = decode_error(type(message).FromString, data, DecodeError("Error parsing message: bad UTF-8"))
    assert error.field == expected and error.message == f"{expected}: is not valid UTF-8"


def test_bytes_fields_may_hold_anything():
    data = gateway_pb2.GenerateRequest(prompt="a", image=BAD).SerializeToString()
    assert bad_utf8_field(gateway_pb2.GenerateRequest.DESCRIPTOR, data) is None


@pytest.mark.parametrize("data", [b"\xff\xff\xff\xff", b"\x12\x7f", b"\x0a", b"\x80"])
def test_corrupt_wire_bytes_name_the_request_and_the_type(data):
    with pytest.raises(DecodeError) as raised:
        gateway_pb2.GenerateRequest.FromString(data)
    error = decode_error(gateway_pb2.GenerateRequest.FromString, data, raised.value)
    assert error.field == "request" and "diffmesh.v1.GenerateRequest" in error.message
