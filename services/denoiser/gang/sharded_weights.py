"""Weights sharded across a gang's ranks (`--shard-weights`, issue 15): each repeated transformer block's parameters
are split across the ranks that would otherwise each hold them whole, all-gathered just before the block runs and
freed right after it (FSDP-style, resharded after forward), so a model bigger than one device fits on a gang. The
rest of the model (patch and condition embeddings, output norm and projection: a few percent of the bytes) stays
replicated.

PyTorch's FSDP2 (`fully_shard`, one call per block) does the work. Checked on torch 2.13 before choosing it: it
runs on CPU ranks over gloo as on accelerators, under `torch.inference_mode` (the engine's loop) as under
`no_grad`, and gathers blocks that mix dtypes (Wan keeps its norms and modulation table in float32 beside bfloat16
weights): its one-dtype rule holds for trainable parameters only, and it all-gathers mixed ones as bytes. A gather
is a copy, so the gathered weights are the whole ones bit for bit, and a sharded gang computes what the same gang
unsharded does; on the CPU, bit for bit too except where a GEMM rounds by its weights' address (the gathered copies
are 64-byte aligned, a checkpoint's tensors sit where safetensors put them: 2e-7 relative for the tiny FLUX).

Each block is its own FSDP root (the gang's sequence-parallel forwards call the blocks, not the model's forward,
so a root above them would never run its hooks). `reshard_after_forward=True` is passed explicitly: a root left to
its default keeps its gathered weights after forward (for training's backward), which would hold the whole model.

Which ranks share a block: those that hold the same weights, every rank of the gang while tensor parallelism is off
(Ulysses, Ring and CFG ranks all hold the whole model). Tensor-parallel ranks hold different slices, so TP gangs
are refused at start-up (flags.py) rather than sharded over a subgroup nothing here tests.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from services.denoiser.blocks import repeated_blocks
from services.denoiser.gang.distributed import Gang

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ResidentWeights:
    """Parameter bytes a rank holds between forwards, of the model's whole."""

    resident: int           # bytes this rank's parameters occupy (sharded blocks' shards, padding included)
    total: int              # the whole model's parameter bytes
    blocks_resident: int    # of `resident`, the repeated blocks'
    blocks_total: int       # of `total`, the repeated blocks'

    def describe(self) -> str:
        return (f"weights: {self.resident} bytes resident of {self.total} "
                f"(blocks {self.blocks_resident} of {self.blocks_total})")


def shard_blocks(model: torch.nn.Module, gang: Gang) -> ResidentWeights:
    """Shard each repeated block of `model` (loaded whole, on the CPU or this rank's device) across the gang and put
    the rest on this rank's device. A block reaches the device whole only while it is being sharded, one at a
    time, so the device's peak is the shards, the replicated rest and one block. Every rank calls it, in the same
    order."""
    if gang.layout.tp != 1:
        raise ValueError(f"--shard-weights with tp {gang.layout.tp}: tensor-parallel ranks hold different slices")
    # The default group: every rank of the gang holds the same weights when tp is 1.
    mesh = DeviceMesh.from_group(dist.group.WORLD, gang.device.type)
    for block in repeated_blocks(model, "to shard (--shard-weights)"):
        whole_class = type(block)
        fully_shard(block, mesh=mesh, reshard_after_forward=True)
        _register_for_step_caching(type(block), whole_class)
    model.to(gang.device)       # the replicated rest (FSDP2 moved each block's shards there as it sharded them)
    return resident_weights(model)


def _register_for_step_caching(sharded_class: type, whole_class: type) -> None:
    """diffusers' step-cache hooks (services/denoiser/cache.py) look a block's metadata up by its exact class, which
    sharding made FSDP2's subclass of the block's own: they get the same metadata. A skipped block is still called
    (the hook replaces its forward), so its gather runs on every rank whatever the rank's cache decides."""
    from diffusers.hooks._helpers import TransformerBlockRegistry

    try:
        metadata = TransformerBlockRegistry.get(whole_class)
    except ValueError:          # a block no cache hook knows stays unknown
        return
    # A copy: register() sets the metadata's class, which its own class still needs.
    TransformerBlockRegistry.register(sharded_class, dataclasses.replace(metadata))


def resident_weights(model: torch.nn.Module) -> ResidentWeights:
    """What the model's parameters occupy on this rank now: between forwards, a sharded block's are its shards."""
    blocks = repeated_blocks(model, "to shard (--shard-weights)")
    return ResidentWeights(resident=_bytes(model, resident=True), total=_bytes(model, resident=False),
                           blocks_resident=sum(_bytes(block, resident=True) for block in blocks),
                           blocks_total=sum(_bytes(block, resident=False) for block in blocks))


def _bytes(module: torch.nn.Module, *, resident: bool) -> int:
    """The module's parameter bytes: the logical (whole) sizes, or what this rank's storages hold (a sharded
    parameter's padded local shard; storages shared by several parameters counted once)."""
    if not resident:
        return sum(p.numel() * p.element_size() for p in module.parameters())
    storages: dict[int, int] = {}
    for parameter in module.parameters():
        local = parameter.to_local() if isinstance(parameter, DTensor) else parameter
        storage = local.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    storages.pop(0, None)       # empty storages (a shard of nothing) have no address
    return sum(storages.values())


def log_resident_weights(gang: Gang, component: str, mine: ResidentWeights) -> None:
    """The leader logs every rank's count (followers log at WARNING only); every rank calls it."""
    everyone: list[ResidentWeights | None] = [None] * gang.world_size
    dist.all_gather_object(everyone, mine, group=gang.control)
    if gang.is_leader:
        for rank, weights in enumerate(everyone):
            logger.info("%s sharded over %d ranks: rank %d %s", component, gang.world_size, rank, weights.describe())
