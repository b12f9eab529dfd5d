"""Transformer offload: `--dit-offload` keeps the transformer's blocks in pinned host memory and streams them to the
device one block at a time, the next block's copy overlapping the current block's compute.

Why: so a model larger than the device runs on it. Wan2.1-14B's transformer is 28 GB in bf16 and does not fit a
24 GiB card; offloaded, the device holds what is resident (embeddings, norms, the output projection: ~0.5 GB for
Wan-14B) and two blocks (the one computing, the next arriving: 2 x 0.7 GB) besides the activations. The price is
the host-to-device link: every forward copies every block once (28 GB: ~0.6 s at PCIe 5's ~50 GB/s), which hides
behind the compute wherever a block's compute outlasts its copy (a Wan-14B block at 480x832x81, 32,760 tokens,
computes ~42 TFLOP, about 0.1 s on an H200, against ~14 ms to copy it: estimates, which `bench/offload.py` measures
for real). At small sizes the copies dominate and a forward is slower.

The mechanism is diffusers' own (`diffusers.hooks.apply_group_offloading`, block level, one block per group, on a
side stream from pinned memory: the next block is prefetched while this one computes). The numbers do not change:
the same kernels run on the same weights, only where the weights live between calls differs. Two choices differ
from diffusers' defaults, each for a reason below: the non-block modules stay on the device (diffusers copies them
in and out around every forward), and `record_stream` is off. Loading puts the weights on the host first
(`load_device`), so the whole model never has to fit on the device, not even while loading.

On a CPU device the weights already live in host memory: the hooks are installed all the same (so CPU runs, and the
tests, take the same path) but move nothing, and the log says so. Not with `--compile` (compiling the blocks would
trace the offload hooks' copies into every block's graph; untried, refused at start-up), nor in a gang (`--devices >
1`: the ranks load their own copies or shards; refused at start-up). With `--max-batch` it works unchanged (a batch
is one forward like any other), and with step caching (of the blocks a cached step skips, only the one already
prefetched is copied in, and it stays on the device until the next forward).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging

import torch

logger = logging.getLogger(__name__)

# The name diffusers registers its group-offloading hook under (diffusers/hooks/group_offloading.py).
GROUP_HOOK = "group_offloading"
# The blocks' pinned host memory comes in buffers of this size (`pin_packed` says why), each tensor's start aligned.
ARENA_BYTES = 1 << 31
ALIGN = 512


@dataclasses.dataclass(frozen=True)
class OffloadOptions:
    # diffusers prefetches with streams only for one block per group (it forces 1 otherwise).
    blocks_per_group: int = 1
    # Off: after each block the host waits for its compute before releasing its weights, so the device holds at most
    # two blocks. With record_stream the host does not wait, runs as far ahead as the launch queue lets it (tens of
    # blocks), and every block it has queued keeps its weights on the device until the device catches up: the
    # memory saved would depend on how far ahead the host got. The wait costs one launch gap per block (tens of µs
    # against a Wan-14B block's ~0.1 s at 480p).
    record_stream: bool = False


def add_offload_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    group = parser.add_argument_group("transformer offload")
    group.add_argument("--dit-offload", action="store_true",
                       help="keep the transformer's blocks in pinned host memory and stream them to the device one "
                            "block at a time, the next one's copy overlapping this one's compute: for models larger "
                            "than the device (same outputs; slower where copies outlast compute). One device, "
                            "without --compile (default: off)")
    return parser


def offload_from_args(args: argparse.Namespace) -> OffloadOptions | None:
    return OffloadOptions() if getattr(args, "dit_offload", False) else None


def check_offload(options: OffloadOptions | None, *, compile: object = None, world_size: int = 1) -> None:
    """Refuse what offload does not combine with, naming the flags (a ValueError: start-up fails in one line)."""
    if options is None:
        return
    if compile:
        raise ValueError("--dit-offload with --compile: not available yet (compiling the blocks would trace the "
                         "offload hooks' copies into their graphs)")
    if world_size > 1:
        raise ValueError(f"--dit-offload needs one device: a gang (--devices {world_size}) loads the transformer "
                         "on each of its ranks its own way")


def load_device(device: torch.device, options: OffloadOptions | None) -> torch.device:
    """Where a transformer's weights land when loaded: the host when offloading (the device may not hold them all),
    else the device."""
    return torch.device("cpu") if options is not None else device


def block_lists(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer's block lists, as diffusers' block-level offloading finds them: its direct ModuleList and
    Sequential children (Wan: `blocks`; FLUX: `transformer_blocks`, `single_transformer_blocks`)."""
    return [child for child in transformer.children() if isinstance(child, (torch.nn.ModuleList, torch.nn.Sequential))]


def split_bytes(transformer: torch.nn.Module) -> tuple[int, int]:
    """(resident, streamed): bytes of the weights and buffers outside the blocks, and inside them."""
    streamed = {id(t): t for blocks in block_lists(transformer) for t in (*blocks.parameters(), *blocks.buffers())}
    every = {id(t): t for t in (*transformer.parameters(), *transformer.buffers())}
    total = sum(t.numel() * t.element_size() for t in every.values())
    moved = sum(t.numel() * t.element_size() for t in streamed.values())
    return total - moved, moved


def offload_blocks(transformer: torch.nn.Module, device: torch.device, options: OffloadOptions) -> torch.nn.Module:
    """Install block-level offloading on a transformer loaded on the host (`load_device`): its blocks stay in pinned
    host memory and stream to `device` one at a time; everything else moves to `device` and stays there.

    diffusers' block-level offloading also puts the modules outside the blocks (patch and text embeddings, the
    timestep MLP, rotary tables, the final norm and projection) in a group of their own, copied in before and out
    after every forward, synchronously and from pageable memory: ~0.5 GB per forward for Wan-14B, for ~2 % of the
    memory. That group is made resident here instead (its offload device set to the onload device, so diffusers'
    own hook still runs, prefetching the first block, and moves nothing)."""
    from diffusers.hooks import HookRegistry, apply_group_offloading

    streams = device.type != "cpu"     # a side stream for the copies: accelerators only (CPU has none, nor needs one)
    if streams:
        # diffusers keeps a tensor that is already pinned as it is (it pins the others itself, one by one).
        pin_packed(list({id(t): t for blocks in block_lists(transformer)
                         for t in (*blocks.parameters(), *blocks.buffers())}.values()))
    apply_group_offloading(transformer, onload_device=device, offload_device=torch.device("cpu"),
                           offload_type="block_level", num_blocks_per_group=options.blocks_per_group,
                           use_stream=streams, record_stream=streams and options.record_stream)
    top = HookRegistry.check_if_exists_or_initialize(transformer).get_hook(GROUP_HOOK)
    if top is None or top.group.offload_leader is not transformer:
        raise RuntimeError(f"{type(transformer).__name__}: diffusers' group offloading left no hook for the modules "
                           "outside the blocks (has diffusers changed?)")
    top.group.offload_device = device
    top.group.onload_()
    resident, streamed = split_bytes(transformer)
    count = sum(len(blocks) for blocks in block_lists(transformer))
    if streams:
        logger.info("--dit-offload: %s resident on %s, %s in %d blocks streamed from pinned host memory (about %s "
                    "of blocks on the device at a time)", _size(resident), device, _size(streamed), count,
                    _size(2 * streamed // max(count, 1)))
    else:
        logger.warning("--dit-offload on %s: the weights already live in host memory (%s, %d blocks); the offload "
                       "hooks are installed but move nothing", device, _size(resident + streamed), count)
    return transformer


def pin_packed(tensors: list[torch.Tensor], pinned: bool = True) -> None:
    """Move host tensors into pinned memory, packed into a few buffers of ARENA_BYTES; each tensor becomes a view.

    Pinned one by one (what diffusers does), they would cost half as much again: PyTorch's pinned allocator rounds
    every allocation up to a power of two, so a 135 MiB FFN weight takes 256 MiB, and Wan-14B's blocks (26.2 GiB, 1080
    tensors) would pin 40.0 GiB, FLUX.1's (22.1 GiB) 34.5 GiB. Packed, only the last buffer rounds up. Pinned buffer
    by buffer, the pageable copies freed as they go: the host holds the model plus one buffer at most, where
    pinning every block before releasing any (diffusers' order) would hold it twice. (`pinned=False`: the same
    packing in pageable memory, for machines without an accelerator.)"""
    sizes = [-(-t.numel() * t.element_size() // ALIGN) * ALIGN for t in tensors]
    for members in pack(sizes, ARENA_BYTES):
        arena = torch.empty(sum(sizes[i] for i in members), dtype=torch.uint8, pin_memory=pinned)
        offset = 0
        for i in members:
            tensor = tensors[i]
            view = arena[offset:offset + tensor.numel() * tensor.element_size()].view(tensor.dtype).view(tensor.shape)
            view.copy_(tensor.data)
            tensor.data = view
            offset += sizes[i]


def pack(sizes: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: the indices of `sizes` in bins of at most `capacity` (a larger size gets a bin alone)."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        fits = next((b for b, free in enumerate(room) if sizes[i] <= free), None)
        if fits is None:
            bins.append([i])
            room.append(capacity - sizes[i])
        else:
            bins[fits].append(i)
            room[fits] -= sizes[i]
    return bins


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"
