"""Tensor parallelism for any family's transformer, Megatron style: a family's shard function (its ParallelPlan's
TP loader, in its services/families/ module) swaps the layers it splits for their sharded forms with the
helpers here and says how each parameter is sliced; `load_sharded_transformer` then reads only this rank's slices.

Column-parallel projections (q/k/v, the first FFN projection) compute a slice of the outputs on each rank;
row-parallel ones (the attention output, the second FFN projection) sum partial products with an all-reduce.
RMSNorms that span all heads all-reduce their mean square. A TP-4 rank holds a quarter of the sharded weights,
from loading on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import pathlib
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from accelerate import init_empty_weights
from safetensors import safe_open

from services.denoiser.axes import AxisGroup

logger = logging.getLogger(__name__)



@dataclasses.dataclass(frozen=True)
class Packed:
    """A dimension that concatenates blocks split independently (FLUX's single-stream proj_out reads
    [attention output, MLP hidden], each column-parallel on its own): each rank takes its share of every block,
    in order, which is the order of its own activations."""

    dim: int
    blocks: tuple[int, ...]


# Parameter name -> the dimension split across the TP group (or a Packed one), or None when every rank keeps it
# whole.
ShardPlan = dict[str, int | Packed | None]
# (the model, built on the meta device; the TP axis) -> its plan, once its layers are swapped for sharded ones
ShardFunction = Callable[[nn.Module, AxisGroup], ShardPlan]


class RowParallelLinear(nn.Module):
    """y = all_reduce(x_shard @ W_shard^T) + b: the input features are split across the group."""

    def __init__(self, in_features: int, out_features: int, group: AxisGroup) -> None:
        super().__init__()
        self.group = group
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        partial = F.linear(x, self.weight)
        dist.all_reduce(partial, group=self.group.group)
        return partial + self.bias


class ShardedRMSNorm(nn.Module):
    """RMSNorm over a feature axis split across the group: the sum of squares is all-reduced."""

    def __init__(self, local_features: int, total_features: int, eps: float, group: AxisGroup) -> None:
        super().__init__()
        self.group = group
        self.total_features = total_features
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(local_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        upcast = x.float()
        square_sum = upcast.pow(2).sum(-1, keepdim=True)
        dist.all_reduce(square_sum, group=self.group.group)
        normed = upcast * torch.rsqrt(square_sum / self.total_features + self.eps)
        return normed.type_as(x) * self.weight


# Swapping one layer for its sharded form. `path` is the replaced module's name in the model's state dict.

def shard_columns(parent: nn.Module, name: str, path: str, tp: AxisGroup, plan: ShardPlan) -> None:
    """parent.<name> (an nn.Linear) -> this rank's slice of its output features."""
    linear = getattr(parent, name)
    setattr(parent, name, nn.Linear(linear.in_features, linear.out_features // tp.size, bias=linear.bias is not None))
    plan[f"{path}.weight"] = 0
    if linear.bias is not None:
        plan[f"{path}.bias"] = 0


def shard_rows(parent: nn.Module, name: str, path: str, tp: AxisGroup, plan: ShardPlan) -> None:
    """parent.<name> (an nn.Linear with a bias) -> a RowParallelLinear on this rank's slice of its inputs."""
    linear = getattr(parent, name)
    setattr(parent, name, RowParallelLinear(linear.in_features // tp.size, linear.out_features, tp))
    plan[f"{path}.weight"] = 1
    plan[f"{path}.bias"] = None


def shard_packed_rows(parent: nn.Module, name: str, path: str, tp: AxisGroup, plan: ShardPlan,
                      blocks: tuple[int, ...]) -> None:
    """parent.<name> (an nn.Linear with a bias, its inputs the concatenation of `blocks`, each split across the
    group) -> a RowParallelLinear on this rank's share of every block."""
    linear = getattr(parent, name)
    if sum(blocks) != linear.in_features:
        raise ValueError(f"{path}: blocks {blocks} do not add up to its {linear.in_features} input features")
    setattr(parent, name, RowParallelLinear(linear.in_features // tp.size, linear.out_features, tp))
    plan[f"{path}.weight"] = Packed(1, tuple(blocks))
    plan[f"{path}.bias"] = None


def shard_rms_norm(parent: nn.Module, name: str, path: str, tp: AxisGroup, plan: ShardPlan,
                   default_eps: float = 1e-6) -> None:
    """parent.<name> (an RMSNorm over features that column-parallel layers split) -> a ShardedRMSNorm."""
    norm = getattr(parent, name)
    total = norm.weight.shape[0]
    setattr(parent, name, ShardedRMSNorm(total // tp.size, total, norm.eps or default_eps, tp))
    plan[f"{path}.weight"] = 0


def _checkpoint_files(folder: pathlib.Path) -> dict[str, pathlib.Path]:
    """Parameter name -> the safetensors file holding it (single-file or sharded checkpoints)."""
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    single = folder / "diffusion_pytorch_model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(f"no safetensors weights in {folder} (tensor parallelism reads slices of them)")
    with safe_open(single, framework="pt") as f:
        return {name: single for name in f.keys()}


def _packed_slice(tensor_slice, split: Packed, tp: AxisGroup) -> torch.Tensor:
    """This rank's share of each block of a Packed dimension, concatenated."""
    pieces, offset = [], 0
    for block in split.blocks:
        share = block // tp.size
        index = [slice(None)] * len(tensor_slice.get_shape())
        index[split.dim] = slice(offset + tp.index * share, offset + (tp.index + 1) * share)
        pieces.append(tensor_slice[tuple(index)])
        offset += block
    return torch.cat(pieces, dim=split.dim)


def load_sharded_transformer(model_class: type, folder: pathlib.Path, tp: AxisGroup, dtype: torch.dtype,
                             device: torch.device, *, shard: ShardFunction) -> nn.Module:
    """Build the transformer with the layers `shard` splits sharded across `tp`, reading only this rank's slices.

    Dtypes follow diffusers' from_pretrained: floating weights in `dtype`, except the modules the class keeps
    in float32 (`_keep_in_fp32_modules`: norms, time embedding, modulation tables)."""
    config = model_class.load_config(folder)
    # The sharded layers are built on the meta device too: every parameter is then assigned from the checkpoint.
    with init_empty_weights(include_buffers=False):
        model = model_class.from_config(config)
        plan = shard(model, tp)
    keep_fp32 = tuple(getattr(model_class, "_keep_in_fp32_modules", None) or ())
    files = _checkpoint_files(folder)
    state: dict[str, torch.Tensor] = {}
    expected = dict(model.named_parameters())
    handles = {}
    with contextlib.ExitStack() as open_files:
        for name, parameter in expected.items():
            if name not in files:
                raise KeyError(f"{name} is missing from the checkpoint in {folder}")
            path = files[name]
            if path not in handles:
                handles[path] = open_files.enter_context(safe_open(path, framework="pt"))
            handle = handles[path]
            tensor_slice = handle.get_slice(name)
            split = plan.get(name)
            if split is None:
                tensor = tensor_slice[:]
            elif isinstance(split, Packed):
                tensor = _packed_slice(tensor_slice, split, tp)
            else:
                size = parameter.shape[split]
                start = tp.index * size
                index = [slice(None)] * len(tensor_slice.get_shape())
                index[split] = slice(start, start + size)
                tensor = tensor_slice[tuple(index)]
            if tuple(tensor.shape) != tuple(parameter.shape):
                raise ValueError(f"{name}: checkpoint slice {tuple(tensor.shape)} != expected {tuple(parameter.shape)}")
            if tensor.is_floating_point():
                fp32 = any(module in name.split(".") for module in keep_fp32)
                tensor = tensor.to(torch.float32 if fp32 else dtype)
            state[name] = tensor.to(device)
    model.load_state_dict(state, strict=False, assign=True)
    model.to(device)
    loaded = sum(t.numel() for t in state.values())
    logger.info("tensor-parallel rank %d of %d loaded %.1f M parameters", tp.index, tp.size, loaded / 1e6)
    return model.eval().requires_grad_(False)
