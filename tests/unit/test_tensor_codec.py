"""Tests for services.common.tensors: the torch <-> diffmesh.v1 wire codec and its validation."""

from __future__ import annotations

import asyncio

import pytest
import torch

from diffmesh.v1 import denoiser_pb2, tensor_pb2
from services.common import tensors
from services.common.errors import InvalidArgument
from services.common.tensors import (
    MAX_RANK,
    MAX_TENSOR_BYTES,
    TensorAssembler,
    expected_nbytes,
    from_proto,
    iter_chunks,
    iter_media_chunks,
    receive_params_and_tensors,
    to_proto,
)

ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "uint8": 1, "int64": 8, "bool": 1}
DTYPE_NAMES = list(ITEMSIZE)


def _sample(dtype_name: str, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Deterministic values that exercise each dtype (negatives, fractions, both booleans)."""
    dtype = tensors.DTYPES[dtype_name]
    generator = torch.Generator().manual_seed(seed)
    numel = 1
    for d in shape:
        numel *= d
    if dtype == torch.bool:
        values = torch.randint(0, 2, (numel,), generator=generator).bool()
    elif dtype == torch.uint8:
        values = torch.randint(0, 256, (numel,), generator=generator).to(torch.uint8)
    elif dtype == torch.int64:
        values = torch.randint(-(2**62), 2**62, (numel,), generator=generator, dtype=torch.int64)
    else:
        values = (torch.randn(numel, generator=generator) * 100).to(dtype)
    return values.reshape(shape)


def _cases() -> list:
    cases = []
    for name in DTYPE_NAMES:
        cases.append(pytest.param(name, lambda n=name: _sample(n, (3, 5)), id=f"{name}-2d"))
        cases.append(pytest.param(name, lambda n=name: _sample(n, ()), id=f"{name}-0d"))
        cases.append(pytest.param(name, lambda n=name: _sample(n, (0, 4)), id=f"{name}-empty"))
        cases.append(
            pytest.param(name, lambda n=name: _sample(n, (4, 6)).t(), id=f"{name}-transposed")
        )
    return cases


def _assert_identical(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype
    assert tuple(got.shape) == tuple(want.shape)
    # Bitwise comparison, so NaN payloads and -0.0 would also be caught.
    assert torch.equal(got.contiguous().reshape(-1).view(torch.uint8), want.contiguous().reshape(-1).view(torch.uint8))
    assert torch.equal(got, want)


def _reassemble(chunks, allowed=None) -> dict[str, torch.Tensor]:
    assembler = TensorAssembler(allowed)
    for chunk in chunks:
        assembler.add(chunk)
    return assembler.finish()


# --- round trips -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("dtype_name", "make"), _cases())
def test_to_proto_from_proto_round_trip_is_exact(dtype_name, make):
    tensor = make()
    message = to_proto(tensor)
    assert message.dtype == dtype_name
    assert list(message.shape) == list(tensor.shape)
    assert len(message.data) == tensor.numel() * ITEMSIZE[dtype_name]
    _assert_identical(from_proto(message), tensor)


@pytest.mark.parametrize(("dtype_name", "make"), _cases())
def test_chunk_stream_round_trip_is_exact(dtype_name, make):
    tensor = make()
    chunks = list(iter_chunks("x", tensor, chunk_bytes=7))
    assert chunks[-1].last and not any(c.last for c in chunks[:-1])
    assert chunks[0].dtype == dtype_name and list(chunks[0].shape) == list(tensor.shape)
    assert all(c.name == "x" for c in chunks)
    result = _reassemble(chunks, allowed=["x"])
    assert set(result) == {"x"}
    _assert_identical(result["x"], tensor)


def test_proto_message_survives_serialization():
    tensor = _sample("bfloat16", (2, 3, 4))
    wire = to_proto(tensor).SerializeToString()
    _assert_identical(from_proto(tensor_pb2.Tensor.FromString(wire)), tensor)


@pytest.mark.parametrize("dtype_name", DTYPE_NAMES)
def test_tensor_spanning_several_chunks_reassembles_exactly(dtype_name):
    tensor = _sample(dtype_name, (5, 7, 3), seed=1)
    nbytes = tensor.numel() * ITEMSIZE[dtype_name]
    chunk_bytes = 16
    chunks = list(iter_chunks("latents", tensor, chunk_bytes=chunk_bytes))
    assert len(chunks) == -(-nbytes // chunk_bytes) > 2
    assert all(len(c.data) == chunk_bytes for c in chunks[:-1])
    assert sum(len(c.data) for c in chunks) == nbytes
    # Only the first chunk carries dtype and shape.
    assert all(c.dtype == "" and list(c.shape) == [] for c in chunks[1:])
    # Chunks survive serialization too, as they would on a stream.
    wire = [tensor_pb2.TensorChunk.FromString(c.SerializeToString()) for c in chunks]
    _assert_identical(_reassemble(wire)["latents"], tensor)


def test_assembler_returns_each_tensor_when_its_last_chunk_arrives():
    a, b = _sample("float32", (4, 4)), _sample("int64", (3,))
    assembler = TensorAssembler(["a", "b"])
    results = [assembler.add(c) for c in [*iter_chunks("a", a, chunk_bytes=16), *iter_chunks("b", b, chunk_bytes=8)]]
    completed = [r for r in results if r is not None]
    assert [name for name, _ in completed] == ["a", "b"]
    assert results[-1][0] == "b"
    assert assembler.pending is None
    out = assembler.finish()
    _assert_identical(out["a"], a)
    _assert_identical(out["b"], b)


def test_empty_tensor_travels_as_one_last_chunk():
    chunks = list(iter_chunks("e", torch.empty((0, 3), dtype=torch.float16), chunk_bytes=4))
    assert len(chunks) == 1 and chunks[0].last and chunks[0].data == b""
    assert list(chunks[0].shape) == [0, 3]


def test_bfloat16_travels_as_two_bytes_per_element():
    tensor = torch.tensor([1.0, -2.5, 3.140625, 65280.0], dtype=torch.bfloat16)
    message = to_proto(tensor)
    assert message.dtype == "bfloat16"
    assert len(message.data) == tensor.numel() * 2
    # The bytes are the bf16 bit patterns themselves, little-endian (not a float32 upcast).
    assert message.data == tensor.view(torch.int16).numpy().astype("<i2").tobytes()
    chunk_bytes = sum(len(c.data) for c in iter_chunks("t", tensor, chunk_bytes=3))
    assert chunk_bytes == tensor.numel() * 2


def test_wire_bytes_are_little_endian_row_major():
    tensor = torch.tensor([[1, 2], [3, 256]], dtype=torch.int64).t()  # non-contiguous: [[1, 3], [2, 256]]
    data = to_proto(tensor).data
    assert data == b"".join(v.to_bytes(8, "little", signed=True) for v in (1, 3, 2, 256))


def test_unsupported_dtype_is_refused_on_send():
    with pytest.raises(InvalidArgument) as info:
        to_proto(torch.zeros(2, dtype=torch.float64))
    assert info.value.field == "tensor.dtype"
    assert "float64" in info.value.message


# --- from_proto validation ----------------------------------------------------------------------------------


def test_from_proto_rejects_unknown_dtype():
    with pytest.raises(InvalidArgument) as info:
        from_proto(tensor_pb2.Tensor(dtype="complex64", shape=[1], data=b"\0" * 8), field="latents")
    assert info.value.field == "latents.dtype"
    assert "complex64" in info.value.message
    assert info.value.message.startswith("latents.dtype: ")


@pytest.mark.parametrize("delta", [-1, 1], ids=["short", "long"])
def test_from_proto_rejects_byte_count_mismatch(delta):
    data = b"\0" * (2 * 3 * 4 + delta)
    with pytest.raises(InvalidArgument) as info:
        from_proto(tensor_pb2.Tensor(dtype="float32", shape=[2, 3], data=data), field="prompt_embeds")
    assert info.value.field == "prompt_embeds.data"
    assert f"{len(data)} bytes" in info.value.message
    assert "24 bytes" in info.value.message


def test_from_proto_rejects_negative_dimension():
    with pytest.raises(InvalidArgument) as info:
        from_proto(tensor_pb2.Tensor(dtype="float32", shape=[-1, 4], data=b""))
    assert info.value.field == "tensor.shape"
    assert "negative" in info.value.message


def test_from_proto_rejects_rank_over_max():
    with pytest.raises(InvalidArgument) as info:
        from_proto(tensor_pb2.Tensor(dtype="uint8", shape=[1] * (MAX_RANK + 1), data=b"\0"))
    assert info.value.field == "tensor.shape"
    assert f"rank {MAX_RANK + 1}" in info.value.message


def test_rank_at_max_is_accepted():
    tensor = torch.zeros([1] * MAX_RANK, dtype=torch.uint8)
    _assert_identical(from_proto(to_proto(tensor)), tensor)


def test_from_proto_rejects_size_over_limit_without_allocating():
    # 2^20 x 2^20 float32 = 4 TiB: only the shape is sent, so nothing of that size may be allocated.
    shape = [1 << 20, 1 << 20]
    with pytest.raises(InvalidArgument) as info:
        from_proto(tensor_pb2.Tensor(dtype="float32", shape=shape, data=b""))
    assert info.value.field == "tensor.shape"
    assert str(MAX_TENSOR_BYTES) in info.value.message


def test_size_limit_is_inclusive_and_exact():
    assert expected_nbytes("uint8", [MAX_TENSOR_BYTES]) == MAX_TENSOR_BYTES
    with pytest.raises(InvalidArgument):
        expected_nbytes("uint8", [MAX_TENSOR_BYTES + 1])
    with pytest.raises(InvalidArgument):
        expected_nbytes("float16", [MAX_TENSOR_BYTES // 2 + 1])


# --- TensorAssembler validation -----------------------------------------------------------------------------


def test_assembler_rejects_unknown_dtype_in_first_chunk():
    with pytest.raises(InvalidArgument) as info:
        TensorAssembler().add(tensor_pb2.TensorChunk(name="x", dtype="float8", shape=[1], data=b"\0", last=True))
    assert info.value.field == "x.dtype"


def test_assembler_rejects_oversized_shape_before_any_bytes():
    with pytest.raises(InvalidArgument) as info:
        TensorAssembler().add(tensor_pb2.TensorChunk(name="x", dtype="int64", shape=[1 << 31, 1 << 10], last=False))
    assert info.value.field == "x.shape"


def test_assembler_rejects_chunk_of_second_tensor_before_first_completes():
    chunks = list(iter_chunks("a", _sample("float32", (8,)), chunk_bytes=8))
    assembler = TensorAssembler(["a", "b"])
    assembler.add(chunks[0])
    intruder = next(iter_chunks("b", _sample("float32", (2,))))
    with pytest.raises(InvalidArgument) as info:
        assembler.add(intruder)
    assert info.value.field == "tensor.name"
    assert "'b'" in info.value.message and "'a'" in info.value.message


def test_assembler_finish_rejects_stream_ending_mid_tensor():
    chunks = list(iter_chunks("latents", _sample("float16", (10,)), chunk_bytes=4))
    assembler = TensorAssembler()
    for chunk in chunks[:-1]:
        assert assembler.add(chunk) is None
    assert assembler.pending == "latents"
    with pytest.raises(InvalidArgument) as info:
        assembler.finish()
    assert info.value.field == "latents.data"
    assert "ended" in info.value.message


def test_assembler_rejects_name_not_allowed():
    with pytest.raises(InvalidArgument) as info:
        TensorAssembler(["prompt_embeds"]).add(next(iter_chunks("evil", torch.zeros(1))))
    assert info.value.field == "tensor.name"
    assert "'evil'" in info.value.message


def test_assembler_rejects_unnamed_chunk():
    with pytest.raises(InvalidArgument) as info:
        TensorAssembler().add(tensor_pb2.TensorChunk(dtype="uint8", shape=[1], data=b"\0", last=True))
    assert info.value.field == "tensor.name"


def test_assembler_rejects_same_tensor_sent_twice():
    tensor = _sample("uint8", (4,))
    assembler = TensorAssembler(["x"])
    for chunk in iter_chunks("x", tensor):
        assembler.add(chunk)
    with pytest.raises(InvalidArgument) as info:
        assembler.add(next(iter_chunks("x", tensor)))
    assert info.value.field == "tensor.name"
    assert "twice" in info.value.message


def test_assembler_rejects_too_many_bytes_as_soon_as_they_arrive():
    assembler = TensorAssembler()
    # float32[2] holds 8 bytes; 12 arrive in a chunk that is not even the last one.
    with pytest.raises(InvalidArgument) as info:
        assembler.add(tensor_pb2.TensorChunk(name="x", dtype="float32", shape=[2], data=b"\0" * 12, last=False))
    assert info.value.field == "x.data"
    assert "more than the 8 bytes" in info.value.message


def test_assembler_rejects_too_many_bytes_spread_over_chunks():
    assembler = TensorAssembler()
    assembler.add(tensor_pb2.TensorChunk(name="x", dtype="float32", shape=[2], data=b"\0" * 6, last=False))
    with pytest.raises(InvalidArgument) as info:
        assembler.add(tensor_pb2.TensorChunk(name="x", data=b"\0" * 6, last=False))
    assert info.value.field == "x.data"


def test_assembler_rejects_too_few_bytes_at_last_chunk():
    assembler = TensorAssembler()
    with pytest.raises(InvalidArgument) as info:
        assembler.add(tensor_pb2.TensorChunk(name="x", dtype="int64", shape=[3], data=b"\0" * 16, last=True))
    assert info.value.field == "x.data"
    assert "16 bytes" in info.value.message and "(24)" in info.value.message


# --- media chunks --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 3 * 1024 + 5, 2 * 1024])
def test_media_chunks_reassemble_and_mark_only_the_last(monkeypatch, size):
    monkeypatch.setattr(tensors, "CHUNK_BYTES", 1024)
    data = bytes((i * 31 + 7) % 256 for i in range(size))
    chunks = list(iter_media_chunks(3, "video/mp4", data))
    assert len(chunks) == max(1, -(-size // 1024))
    assert b"".join(c.data for c in chunks) == data
    assert [c.last for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert all(c.index == 3 and c.mime_type == "video/mp4" for c in chunks)


# --- receive_params_and_tensors ------------------------------------------------------------------------------


async def _stream(messages):
    for message in messages:
        yield message


def _params() -> denoiser_pb2.DenoiseRequest:
    return denoiser_pb2.DenoiseRequest(params=denoiser_pb2.DenoiseParams(request_id="r1", width=64, height=32))


def test_receive_params_and_tensors_accepts_params_then_tensors():
    embeds = _sample("bfloat16", (1, 6, 8))
    messages = [_params(), *(denoiser_pb2.DenoiseRequest(tensor=c) for c in iter_chunks("prompt_embeds", embeds, 20))]
    params, received = asyncio.run(receive_params_and_tensors(_stream(messages), ["prompt_embeds"]))
    assert params.request_id == "r1" and params.width == 64
    assert set(received) == {"prompt_embeds"}
    _assert_identical(received["prompt_embeds"], embeds)


def test_receive_params_and_tensors_rejects_stream_not_starting_with_params():
    chunk = next(iter_chunks("prompt_embeds", torch.zeros(2)))
    messages = [denoiser_pb2.DenoiseRequest(tensor=chunk), _params()]
    with pytest.raises(InvalidArgument) as info:
        asyncio.run(receive_params_and_tensors(_stream(messages), ["prompt_embeds"]))
    assert info.value.field == "params"
    assert "first message" in info.value.message


def test_receive_params_and_tensors_rejects_params_twice():
    with pytest.raises(InvalidArgument) as info:
        asyncio.run(receive_params_and_tensors(_stream([_params(), _params()]), ["prompt_embeds"]))
    assert info.value.field == "params"
    assert "twice" in info.value.message


def test_receive_params_and_tensors_rejects_empty_stream():
    with pytest.raises(InvalidArgument) as info:
        asyncio.run(receive_params_and_tensors(_stream([]), ["prompt_embeds"]))
    assert info.value.field == "params"


def test_receive_params_and_tensors_rejects_stream_ending_mid_tensor():
    chunks = list(iter_chunks("prompt_embeds", _sample("float32", (16,)), chunk_bytes=16))
    messages = [_params(), *(denoiser_pb2.DenoiseRequest(tensor=c) for c in chunks[:-1])]
    with pytest.raises(InvalidArgument) as info:
        asyncio.run(receive_params_and_tensors(_stream(messages), ["prompt_embeds"]))
    assert info.value.field == "prompt_embeds.data"


def test_a_streams_tensors_together_are_bounded_before_any_bytes():
    assembler = TensorAssembler(["a", "b"], max_bytes=64)
    for chunk in iter_chunks("a", torch.zeros(12, dtype=torch.float32)):    # 48 bytes: within
        assembler.add(chunk)
    with pytest.raises(InvalidArgument) as info:                            # 48 + 20 > 64, declared only
        assembler.add(tensor_pb2.TensorChunk(name="b", dtype="float32", shape=[5], last=False))
    assert info.value.field == "b.shape" and "64-byte limit" in info.value.message


def test_assembled_tensor_is_writable_and_owns_its_memory():
    tensor = _sample("bfloat16", (3, 5))
    assembler = TensorAssembler()
    for chunk in iter_chunks("t", tensor, chunk_bytes=7):
        result = assembler.add(chunk)
    name, received = result
    _assert_identical(received, tensor)
    received.add_(1)                    # no read-only buffer underneath
    assert assembler.received == tensor.numel() * 2


def test_discard_drops_a_partial_tensor():
    assembler = TensorAssembler()
    assembler.add(tensor_pb2.TensorChunk(name="x", dtype="uint8", shape=[1 << 20], data=b"\0" * 10, last=False))
    assembler.discard()
    assert assembler.tensors == {} and assembler._buffer is None
