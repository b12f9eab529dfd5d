"""Ulysses' exchanges on the GPUs' copy engines, through symmetric memory: for ranks of one host (CUDA).

Why not NCCL's all-to-all: it runs as kernels on the SMs, so it cannot start while the attention kernel holds every
SM (cuDNN's is persistent), and it slows the GEMMs it does overlap. A copy engine moves memory over NVLink with no
SM at all. Here each rank pushes every peer's share of q, k, v and the attention output straight into that peer's
receive buffer, already in the layout the next kernel reads (2D copies slice the heads, so no permute kernels run
on either side), then raises a flag in the peer's memory with a stream memory operation. The reader's stream waits
on its flags in the GPU's front end, again with no SM. The numbers are those of the all-to-all: only the transport
changes.

Written here because no library offers it: torch's symmetric memory gives the buffers and the peers' addresses,
but its signals are kernels, and NCCL's all-to-all is SM-based. The driver calls come from NVIDIA's own bindings
(cuda-bindings).

Flags count per exchange ("epoch", one per self-attention call) and only grow, so nothing is ever reset:
  ready[kind][src] = e   src's share of kind (q, k, v, out) for epoch e is in my buffer
  read[kind][src] = e    src has finished reading what I sent it for epoch e (q/k/v together, and out), so the
                         next epoch may overwrite it
A rank that dies leaves its peers' streams waiting on a flag; the next NCCL collective then times out and the
watchdog ends the gang, as with any lost rank.
"""

from __future__ import annotations

import logging
import warnings

import torch
import torch.distributed as dist

from services.denoiser.axes import AxisGroup

logger = logging.getLogger(__name__)

KINDS = ("q", "k", "v", "out")
READY = {kind: i for i, kind in enumerate(KINDS)}
READ_QKV, READ_OUT = len(KINDS), len(KINDS) + 1
FLAG_BYTES = 4
ALIGN = 4096


def _align(size: int) -> int:
    return -(-size // ALIGN) * ALIGN


class _Driver:
    """The three CUDA driver calls the exchange needs, errors raised with their names."""

    def __init__(self) -> None:
        from cuda.bindings import driver
        self._cu = driver
        self._success = driver.CUresult.CUDA_SUCCESS
        self._device_memory = driver.CUmemorytype.CU_MEMORYTYPE_DEVICE

    def _check(self, result, call: str) -> None:
        error = result[0]
        if error != self._success:
            raise RuntimeError(f"{call} failed: {self._cu.cuGetErrorName(error)[1]!r}")

    def wait_at_least(self, stream: int, address: int, value: int) -> None:
        # GEQ compares as (int32)(*address - value) >= 0, so the counters may wrap.
        self._check(self._cu.cuStreamWaitValue32(self._cu.CUstream(stream), self._cu.CUdeviceptr(address),
                                                 value & 0xFFFFFFFF, 0), "cuStreamWaitValue32")

    def write(self, stream: int, address: int, value: int) -> None:
        # Default flags: the write is fenced after the stream's earlier work, so the data is visible first.
        self._check(self._cu.cuStreamWriteValue32(self._cu.CUstream(stream), self._cu.CUdeviceptr(address),
                                                  value & 0xFFFFFFFF, 0), "cuStreamWriteValue32")

    def copy_2d(self, stream: int, dst: int, dst_pitch: int, src: int, src_pitch: int, width: int,
                height: int) -> None:
        copy = self._cu.CUDA_MEMCPY2D()
        copy.srcMemoryType = self._device_memory
        copy.srcDevice = self._cu.CUdeviceptr(src)
        copy.srcPitch = src_pitch
        copy.dstMemoryType = self._device_memory
        copy.dstDevice = self._cu.CUdeviceptr(dst)
        copy.dstPitch = dst_pitch
        copy.WidthInBytes = width
        copy.Height = height
        self._check(self._cu.cuMemcpy2DAsync(copy, self._cu.CUstream(stream)), "cuMemcpy2DAsync")


def _rendezvous(tensor: torch.Tensor, group: dist.ProcessGroup):
    import torch.distributed._symmetric_memory as symm_mem

    # PyTorch before 2.9 wants the group registered first; later versions warn that it is no longer needed.
    if not symm_mem.is_symm_mem_enabled_for_group(group.group_name):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            symm_mem.enable_symm_mem_for_group(group.group_name)
    return symm_mem.rendezvous(tensor, group)


def unavailable_reason(ulysses: AxisGroup, control: dist.ProcessGroup) -> str | None:
    """Why this Ulysses group cannot use copy engines (None: it can). Collective over `control` (gloo; every gang
    rank calls it), so all ranks decide alike. Needs CUDA, cuda-bindings and symmetric memory on every rank, and
    every rank able to reach its peers' devices (one host, peers visible, peer access) under a device index of its
    own (symmetric memory tells devices apart by index): ranks pinned to one device each, as one rank per pod runs,
    use the collective."""
    reason = None
    try:
        import cuda.bindings.driver  # noqa: F401
        import torch.distributed._symmetric_memory  # noqa: F401
    except ImportError as error:
        reason = f"{error.name} is not installed"
    if reason is None and not torch.cuda.is_available():
        reason = "no CUDA device"
    index = torch.cuda.current_device() if reason is None else None
    device = str(torch.cuda.get_device_properties(index).uuid) if reason is None else None
    ranks: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, (reason, device, index), group=control)
    reasons = sorted({ranks[rank][0] for rank in ulysses.ranks if ranks[rank][0]})
    if not reasons and len({ranks[rank][2] for rank in ulysses.ranks}) < ulysses.size:
        reasons = ["two Ulysses ranks use the same device index"]

    reaches_peers = False
    if not reasons:
        visible = {str(torch.cuda.get_device_properties(i).uuid): i for i in range(torch.cuda.device_count())}
        current = torch.cuda.current_device()
        peers = [ranks[rank][1] for rank in ulysses.ranks]
        reaches_peers = all(uuid in visible and (visible[uuid] == current
                                                 or torch.cuda.can_device_access_peer(current, visible[uuid]))
                            for uuid in peers)
    everyone: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, reaches_peers, group=control)
    if reasons:
        return "; ".join(reasons)
    if not all(everyone[rank] for rank in ulysses.ranks):
        return "a Ulysses rank cannot reach its peers' devices (another host, or devices hidden from it)"
    return None


class CopyEngineExchange:
    """Ulysses' two exchanges for one gang, on copy engines. One instance serves every layer, in this order per
    self-attention: `start()`, `send(x, kind, heads)` for v, q, k (each returns a pending result), their `wait()`s,
    attention, `inputs_read()`, `heads_to_tokens(out)`, the output projection, `output_read()`."""

    def __init__(self, ulysses: AxisGroup) -> None:
        self.ulysses = ulysses
        self.degree, self.index = ulysses.size, ulysses.index
        self._driver = _Driver()
        # One stream per destination, so each waits only on its own peer's "read" flags. The copies themselves still
        # run one after another (a GPU's peer copies never overlap in the profiles), at about 330 GB/s: what NVLink
        # gives here with every GPU sending, since copy kernels and NCCL move no faster (bench/diagnostics/alltoall.py).
        self._streams = [torch.cuda.Stream() for _ in range(self.degree)]
        self._epoch = 0
        self._capacity = -1
        self._buffer: torch.Tensor | None = None
        self._handle = None                           # keeps the peers' mappings alive
        self._peer_buffers: list[torch.Tensor] = []   # every rank's buffer, addressable from this device
        self._peer_base: list[int] = []
        self._inputs_free = False

    @property
    def buffer_bytes(self) -> int:
        """Symmetric memory this rank holds for the exchange (outside PyTorch's caching allocator, so not in its
        memory statistics); 0 before the first exchange."""
        return 0 if self._buffer is None else self._buffer.numel()

    # Buffers ------------------------------------------------------------------------------------------------

    def _region_offset(self, kind: str) -> int:
        return _align(2 * len(KINDS) * self.degree * FLAG_BYTES) + READY[kind] * self._capacity

    def _flag_address(self, rank_base: int, flag: int, source: int) -> int:
        return rank_base + (flag * self.degree + source) * FLAG_BYTES

    def _reserve(self, region_bytes: int) -> None:
        """Every rank of the group calls this with the same size (their shapes agree), so reallocation is
        collective. The old buffer's work is finished first; flags of the new one start at zero."""
        if region_bytes <= self._capacity:
            return
        torch.cuda.synchronize()
        import torch.distributed._symmetric_memory as symm_mem

        self._capacity = _align(region_bytes)
        total = self._region_offset(KINDS[-1]) + self._capacity
        buffer = symm_mem.empty(total, dtype=torch.uint8, device=torch.device("cuda", torch.cuda.current_device()))
        handle = _rendezvous(buffer, self.ulysses.group)
        buffer[: self._region_offset(KINDS[0])].zero_()
        self._buffer = buffer
        self._handle = handle
        self._peer_buffers = [handle.get_buffer(rank, (total,), torch.uint8) for rank in range(self.degree)]
        self._peer_base = [peer.data_ptr() for peer in self._peer_buffers]
        self._epoch = 1                               # the epoch under way, counted again from the new flags' zero
        torch.cuda.synchronize()
        dist.barrier(group=self.ulysses.group)        # every rank's flags are zero before anyone writes them
        torch.cuda.synchronize()
        logger.info("Ulysses exchange on copy engines: %d ranks, %.1f MiB of symmetric memory per rank",
                    self.degree, total / 2**20)

    def _region(self, kind: str, shape: tuple[int, ...], dtype: torch.dtype, rank: int | None = None) -> torch.Tensor:
        """The receive buffer of `kind` on `rank` (default: this one), as a tensor of `shape`."""
        start = self._region_offset(kind)
        size = torch.Size(shape).numel() * dtype.itemsize
        buffer = self._buffer if rank is None else self._peer_buffers[rank]
        return buffer[start:start + size].view(dtype).view(shape)

    # One self-attention ---------------------------------------------------------------------------------------

    def start(self) -> None:
        self._epoch += 1
        self._inputs_free = False

    def send(self, x: torch.Tensor, kind: str, heads: int) -> "_Arrival":
        """Push x [B, s, h*d] (this rank's tokens, every head): peer p gets heads p*h/U.. as [B, U*s, h/U, d],
        this rank's tokens at block `index`."""
        batch, tokens, width = x.shape
        x = x.contiguous()
        self._reserve(x.numel() * x.element_size())
        share = width // self.degree                                  # h/U * d elements per token
        by_peer = x.view(batch, tokens, self.degree, share)
        rows = slice(self.index * tokens, (self.index + 1) * tokens)

        def pair(peer: int) -> tuple[torch.Tensor, torch.Tensor]:
            received = self._region(kind, (batch, self.degree * tokens, share), x.dtype, peer)
            return by_peer[:, :, peer], received[:, rows]

        self._push(x, kind, pair, None if self._inputs_free else READ_QKV)
        self._inputs_free = True
        return _Arrival(self, kind, (batch, self.degree * tokens, heads // self.degree, width // heads), x.dtype)

    def heads_to_tokens(self, out: torch.Tensor) -> torch.Tensor:
        """[B, U*s, h/U, d] -> [B, s, h, d]: peer p gets token block p of this rank's heads."""
        batch, block_tokens, local_heads, dim = out.shape
        out = out.contiguous()
        tokens, share = block_tokens // self.degree, local_heads * dim
        by_peer = out.view(batch, self.degree, tokens, share)
        columns = slice(self.index * share, (self.index + 1) * share)

        def pair(peer: int) -> tuple[torch.Tensor, torch.Tensor]:
            received = self._region("out", (batch, tokens, self.degree * share), out.dtype, peer)
            return by_peer[:, peer], received[:, :, columns]

        self._push(out, "out", pair, READ_OUT)
        return self._arrived("out", (batch, tokens, local_heads * self.degree, dim), out.dtype)

    def _push(self, tensor: torch.Tensor, kind: str, pair, read_flag: int | None) -> None:
        """Copy every peer's share (pair(peer) -> (source view, destination view in the peer's buffer), each
        [B, rows, width] with unit stride inside a row), then raise its ready flag for this epoch. `read_flag`:
        wait first until the peer has read what the previous epoch left there."""
        own = self._peer_base[self.index]
        for peer, stream in self._streams_after_current(tensor):
            if read_flag is not None:
                self._driver.wait_at_least(stream, self._flag_address(own, read_flag, peer), self._epoch - 1)
            source, destination = pair(peer)
            self._copy(stream, source, destination)
            self._driver.write(stream, self._flag_address(self._peer_base[peer], READY[kind], self.index),
                               self._epoch)

    def _copy(self, stream: int, source: torch.Tensor, destination: torch.Tensor) -> None:
        item = source.element_size()
        for b in range(source.shape[0]):
            self._driver.copy_2d(stream, destination[b].data_ptr(), destination.stride(1) * item,
                                 source[b].data_ptr(), source.stride(1) * item, source.shape[2] * item,
                                 source.shape[1])

    def _streams_after_current(self, tensor: torch.Tensor):
        """(peer, stream handle) for every destination, each stream ordered after the work queued so far and
        keeping `tensor`'s memory from reuse until its copies are done. Peers first, this rank's own share last."""
        queued = torch.cuda.Event()
        queued.record(torch.cuda.current_stream())
        for step in range(1, self.degree + 1):
            peer = (self.index + step) % self.degree
            stream = self._streams[peer]
            stream.wait_event(queued)
            tensor.record_stream(stream)
            yield peer, stream.cuda_stream

    def _arrived(self, kind: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        stream = torch.cuda.current_stream().cuda_stream
        own = self._peer_base[self.index]
        for source in range(self.degree):
            self._driver.wait_at_least(stream, self._flag_address(own, READY[kind], source), self._epoch)
        return self._region(kind, shape, dtype)

    def inputs_read(self) -> None:
        """After the last kernel that reads the received q, k, v has been queued."""
        self._tell_peers(READ_QKV)

    def output_read(self) -> None:
        """After the last kernel that reads heads_to_tokens' result has been queued."""
        self._tell_peers(READ_OUT)

    def _tell_peers(self, flag: int) -> None:
        stream = torch.cuda.current_stream().cuda_stream
        for peer in range(self.degree):
            self._driver.write(stream, self._flag_address(self._peer_base[peer], flag, self.index), self._epoch)


class _Arrival:
    """One tensor in flight; `wait()` makes the current stream wait for every share and returns the result,
    a view of the receive buffer that stays valid until the exchange's next epoch."""

    def __init__(self, exchange: CopyEngineExchange, kind: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self._exchange, self._kind, self._shape, self._dtype = exchange, kind, shape, dtype

    def wait(self) -> torch.Tensor:
        return self._exchange._arrived(self._kind, self._shape, self._dtype)
