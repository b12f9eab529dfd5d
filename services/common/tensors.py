"""Tensor codec: torch tensors <-> diffmesh.v1.Tensor / TensorChunk streams.

Wire format is raw little-endian row-major bytes (KServe v2 raw contents). Every received tensor is validated
before a byte of it is interpreted: known dtype, bounded rank and size, byte count = numel x itemsize.
"""

from __future__ import annotations

import math
import sys
from collections.abc import AsyncIterator, Iterable, Iterator

import torch

from diffmesh.v1 import tensor_pb2
from services.common.errors import InvalidArgument
from services.common.memory import release_memory

# About 1 MiB: gRPC Python on loopback moves 1 MiB stream chunks ~3x faster than one big message (DESIGN.md).
CHUNK_BYTES = 1 << 20
MAX_RANK = 8
# Bound on what one stream may declare (one tensor, and all of a stream's tensors together), checked on each tensor's
# first chunk before a byte of it is buffered, so a corrupt or hostile shape cannot make a stage allocate without
# limit. The largest tensor the gateway sends at its default --max-output-pixels (1280x720x161) is the decoder's
# latents, about 38 MB; 1 GiB leaves room for gateways configured far beyond that.
MAX_TENSOR_BYTES = 1 << 30
# After a stream that carried this much (received or refused), freed memory goes back to the OS (memory.py): blocks
# below glibc's 32 MiB mmap threshold would otherwise stay resident.
RELEASE_AFTER_BYTES = 8 << 20

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "uint8": torch.uint8,
    "int64": torch.int64,
    "bool": torch.bool,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}

if sys.byteorder != "little":  # the wire is little-endian; every platform we target is too
    raise ImportError("diffmesh's tensor codec assumes a little-endian host")


def _dtype_name(tensor: torch.Tensor) -> str:
    try:
        return DTYPE_NAMES[tensor.dtype]
    except KeyError:
        raise InvalidArgument("tensor.dtype",
                              f"unsupported dtype {tensor.dtype}; use one of {sorted(DTYPES)}") from None


def _raw_bytes(tensor: torch.Tensor) -> bytes:
    # View as uint8 so bfloat16 (which numpy lacks) travels as its own two bytes.
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes()


def expected_nbytes(dtype: str, shape: Iterable[int], field: str = "tensor") -> int:
    """Validate dtype and shape and return the byte count they imply."""
    if dtype not in DTYPES:
        raise InvalidArgument(f"{field}.dtype", f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    dims = list(shape)
    if len(dims) > MAX_RANK:
        raise InvalidArgument(f"{field}.shape", f"rank {len(dims)} exceeds the maximum of {MAX_RANK}")
    if any(d < 0 for d in dims):
        raise InvalidArgument(f"{field}.shape", f"negative dimension in {dims}")
    itemsize = torch.empty((), dtype=DTYPES[dtype]).element_size()
    nbytes = math.prod(dims) * itemsize
    if nbytes > MAX_TENSOR_BYTES:
        raise InvalidArgument(f"{field}.shape", f"{dims} is {nbytes} bytes, over the {MAX_TENSOR_BYTES}-byte limit")
    return nbytes


def _from_bytes(dtype: str, shape: list[int], data: bytes | bytearray) -> torch.Tensor:
    # bytearray is writable, so torch.frombuffer shares it without a copy or a read-only warning.
    buffer = data if isinstance(data, bytearray) else bytearray(data)
    if not buffer:
        return torch.empty(shape, dtype=DTYPES[dtype])
    return torch.frombuffer(buffer, dtype=torch.uint8).view(DTYPES[dtype]).reshape(shape)


def to_proto(tensor: torch.Tensor) -> tensor_pb2.Tensor:
    """Encode a whole tensor as one message (small tensors only; use iter_chunks for large ones)."""
    return tensor_pb2.Tensor(dtype=_dtype_name(tensor), shape=list(tensor.shape), data=_raw_bytes(tensor))


def from_proto(message: tensor_pb2.Tensor, field: str = "tensor") -> torch.Tensor:
    """Decode and validate a Tensor message. Raises InvalidArgument naming `field` when it is malformed."""
    shape = list(message.shape)
    nbytes = expected_nbytes(message.dtype, shape, field)
    if len(message.data) != nbytes:
        raise InvalidArgument(
            f"{field}.data", f"{len(message.data)} bytes do not match {message.dtype}{shape} ({nbytes} bytes)"
        )
    return _from_bytes(message.dtype, shape, message.data)


def iter_chunks(name: str, tensor: torch.Tensor, chunk_bytes: int = CHUNK_BYTES) -> Iterator[tensor_pb2.TensorChunk]:
    """Split a tensor into TensorChunks; the first carries dtype and shape, the last has last=True."""
    dtype, shape, data = _dtype_name(tensor), list(tensor.shape), _raw_bytes(tensor)
    view = memoryview(data)
    offsets = range(0, max(len(data), 1), chunk_bytes)
    for i, start in enumerate(offsets):
        piece = bytes(view[start : start + chunk_bytes])
        last = i == len(offsets) - 1
        if i == 0:
            yield tensor_pb2.TensorChunk(name=name, dtype=dtype, shape=shape, data=piece, last=last)
        else:
            yield tensor_pb2.TensorChunk(name=name, data=piece, last=last)


def iter_media_chunks(index: int, mime_type: str, data: bytes) -> Iterator[tensor_pb2.MediaChunk]:
    """Split an encoded file into MediaChunks of CHUNK_BYTES; the last has last=True."""
    offsets = range(0, max(len(data), 1), CHUNK_BYTES)
    for i, start in enumerate(offsets):
        yield tensor_pb2.MediaChunk(
            index=index, mime_type=mime_type, data=data[start : start + CHUNK_BYTES], last=i == len(offsets) - 1
        )


class TensorAssembler:
    """Reassembles named tensors from TensorChunks, validating as bytes arrive (not only at the end).

    Feed chunks in stream order with `add`; it returns (name, tensor) when a tensor completes, else None. Each
    tensor's bytes are copied into one buffer of its declared size, allocated at its first chunk but touched (made
    resident) only as bytes arrive; the tensor is a view of it, so nothing is copied twice or grown by doubling.
    """

    def __init__(self, allowed_names: Iterable[str] | None = None, max_bytes: int = MAX_TENSOR_BYTES) -> None:
        self._allowed = set(allowed_names) if allowed_names is not None else None
        self._max_bytes = max_bytes
        self._declared = 0              # bytes the stream's tensors declare, all together
        self.received = 0               # bytes that arrived
        self._name: str | None = None
        self._dtype = ""
        self._shape: list[int] = []
        self._expected = 0
        self._filled = 0
        self._buffer: torch.Tensor | None = None
        self.tensors: dict[str, torch.Tensor] = {}

    @property
    def pending(self) -> str | None:
        """Name of a tensor whose last chunk has not arrived yet."""
        return self._name

    def add(self, chunk: tensor_pb2.TensorChunk) -> tuple[str, torch.Tensor] | None:
        if self._name is None:
            self._start(chunk)
        elif chunk.name != self._name:
            raise InvalidArgument("tensor.name", f"chunk of {chunk.name!r} arrived before {self._name!r} was complete")
        size = len(chunk.data)
        self.received += size
        if self._filled + size > self._expected:
            raise InvalidArgument(
                f"{self._name}.data", f"more than the {self._expected} bytes that {self._dtype}{self._shape} holds"
            )
        if size:
            self._buffer.numpy()[self._filled : self._filled + size] = memoryview(chunk.data)
            self._filled += size
        if not chunk.last:
            return None
        name = self._name
        if self._filled != self._expected:
            raise InvalidArgument(
                f"{name}.data", f"{self._filled} bytes do not match {self._dtype}{self._shape} ({self._expected})"
            )
        tensor = self._buffer.view(DTYPES[self._dtype]).reshape(self._shape)
        self.tensors[name] = tensor
        self._name, self._buffer = None, None
        return name, tensor

    def _start(self, chunk: tensor_pb2.TensorChunk) -> None:
        if not chunk.name:
            raise InvalidArgument("tensor.name", "a tensor chunk must name its tensor")
        if self._allowed is not None and chunk.name not in self._allowed:
            raise InvalidArgument("tensor.name", f"unexpected tensor {chunk.name!r}; expected {sorted(self._allowed)}")
        if chunk.name in self.tensors:
            raise InvalidArgument("tensor.name", f"tensor {chunk.name!r} sent twice")
        self._expected = expected_nbytes(chunk.dtype, chunk.shape, chunk.name)
        if self._declared + self._expected > self._max_bytes:
            raise InvalidArgument(f"{chunk.name}.shape", f"{list(chunk.shape)} brings the stream's tensors to "
                                  f"{self._declared + self._expected} bytes, over the {self._max_bytes}-byte limit")
        self._declared += self._expected
        self._name, self._dtype, self._shape = chunk.name, chunk.dtype, list(chunk.shape)
        self._buffer, self._filled = torch.empty(self._expected, dtype=torch.uint8), 0

    def discard(self) -> None:
        """Drop everything held (a refused stream): the memory goes now, not when the error's traceback does."""
        self._buffer, self.tensors = None, {}

    def finish(self) -> dict[str, torch.Tensor]:
        """All completed tensors; raises if the stream ended in the middle of one."""
        if self._name is not None:
            raise InvalidArgument(f"{self._name}.data", "stream ended before the tensor's last chunk")
        return self.tensors


async def receive_params_and_tensors(
    requests: AsyncIterator, allowed_names: Iterable[str]
) -> tuple[object, dict[str, torch.Tensor]]:
    """Read a client stream whose first message carries `params` and the rest `tensor` chunks.

    Protocol invariant (both sides): params first, then each tensor's chunks contiguously.
    """
    params = None
    assembler = TensorAssembler(allowed_names)
    try:
        async for message in requests:
            kind = message.WhichOneof("item")
            if params is None:
                if kind != "params":
                    raise InvalidArgument("params", "the first message of the stream must carry params")
                params = message.params
            elif kind == "tensor":
                assembler.add(message.tensor)
            elif kind == "params":
                raise InvalidArgument("params", "params sent twice in one stream")
            else:
                raise InvalidArgument("tensor", "a message after params carried neither params nor a tensor chunk")
            del message     # a chunk's bytes are copied: let them go before the next one arrives
        if params is None:
            raise InvalidArgument("params", "the stream carried no params")
        return params, assembler.finish()
    except BaseException:
        assembler.discard()
        raise
    finally:
        if assembler.received >= RELEASE_AFTER_BYTES:
            release_memory()
