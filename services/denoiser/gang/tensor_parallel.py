"""Tensor parallelism for Wan transformer blocks: heads and the feed-forward width split across the TP
group, Megatron style. q/k/v and the first FFN projection are column-parallel (each rank computes its
slice of the outputs); the attention output and second FFN projection are row-parallel (partial sums,
all-reduced). The q/k RMSNorms span all heads, so their mean square is all-reduced too.

Each rank reads only its own slices from the safetensors files, so a TP-4 rank holds a quarter of the
block weights, from loading on.
"""

from __future__ import annotations

import contextlib
import json
import logging
import pathlib

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from accelerate import init_empty_weights
from safetensors import safe_open

from services.denoiser.axes import AxisGroup

logger = logging.getLogger(__name__)


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


# How each sharded parameter is sliced: (dimension split, or None when every rank keeps it whole).
def _shard_blocks(model: nn.Module, tp: AxisGroup) -> dict[str, int | None]:
    """Swap each block's layers for their sharded forms (on the meta device); returns the slicing plan."""
    plan: dict[str, int | None] = {}
    degree = tp.size
    for index, block in enumerate(model.blocks):
        prefix = f"blocks.{index}"
        for name in ("attn1", "attn2"):
            attn = getattr(block, name)
            if attn.add_k_proj is not None:
                raise ValueError("tensor parallelism does not support image-conditioned (I2V) attention layers")
            for projection in ("to_q", "to_k", "to_v"):
                linear = getattr(attn, projection)
                setattr(attn, projection, nn.Linear(linear.in_features, linear.out_features // degree))
                plan[f"{prefix}.{name}.{projection}.weight"] = 0
                plan[f"{prefix}.{name}.{projection}.bias"] = 0
            for norm_name in ("norm_q", "norm_k"):
                norm = getattr(attn, norm_name)
                total = norm.weight.shape[0]
                setattr(attn, norm_name, ShardedRMSNorm(total // degree, total, norm.eps or 1e-6, tp))
                plan[f"{prefix}.{name}.{norm_name}.weight"] = 0
            out = attn.to_out[0]
            attn.to_out[0] = RowParallelLinear(out.in_features // degree, out.out_features, tp)
            plan[f"{prefix}.{name}.to_out.0.weight"] = 1
            plan[f"{prefix}.{name}.to_out.0.bias"] = None
            attn.heads //= degree
        first, second = block.ffn.net[0].proj, block.ffn.net[2]
        block.ffn.net[0].proj = nn.Linear(first.in_features, first.out_features // degree)
        plan[f"{prefix}.ffn.net.0.proj.weight"] = 0
        plan[f"{prefix}.ffn.net.0.proj.bias"] = 0
        block.ffn.net[2] = RowParallelLinear(second.in_features // degree, second.out_features, tp)
        plan[f"{prefix}.ffn.net.2.weight"] = 1
        plan[f"{prefix}.ffn.net.2.bias"] = None
    return plan


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


def load_sharded_transformer(model_class: type, folder: pathlib.Path, tp: AxisGroup, dtype: torch.dtype,
                             device: torch.device) -> nn.Module:
    """Build the transformer with its blocks sharded across `tp`, reading only this rank's slices.

    Dtypes follow diffusers' from_pretrained: floating weights in `dtype`, except the modules the class keeps
    in float32 (`_keep_in_fp32_modules`: norms, time embedding, modulation tables)."""
    config = model_class.load_config(folder)
    with init_empty_weights(include_buffers=False):
        model = model_class.from_config(config)
    plan = _shard_blocks(model, tp)
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
