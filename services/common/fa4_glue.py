"""FlashAttention 4 as PyTorch's flash SDPA kernel, whichever flash-attn-4 release is installed.

PyTorch ships the glue that routes its flash SDPA op to FA4 (`torch.nn.attention._fa4`, registered as "FA4"); it
unpacks `_flash_attn_fwd`'s result as `(out, lse)`, but flash-attn-4 returns more from 4.0.0b19 on (`p`, `row_max`,
and later `o_lo`), so the glue fails on any recent release ("too many values to unpack"). This module is the one
the glue is pointed at instead: FA4's two functions, the forward's result cut to the pair PyTorch expects. It is
written here because neither package carries an adapter and the glue takes any module path.
"""

from __future__ import annotations

import functools
import importlib
from typing import Any

import torch

FA4_MODULE = "flash_attn.cute.interface"
REGISTRY_NAME = "diffmesh-FA4"


def _flash_attn_fwd(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse, *_ = importlib.import_module(FA4_MODULE)._flash_attn_fwd(*args, **kwargs)
    return out, lse


def _flash_attn_bwd(*args: Any, **kwargs: Any) -> Any:
    return importlib.import_module(FA4_MODULE)._flash_attn_bwd(*args, **kwargs)


def offer() -> bool:
    """Put REGISTRY_NAME in PyTorch's flash-attention registry, backed by PyTorch's FA4 glue reading this module.
    False when this PyTorch has no FA4 glue (the registry then does not list the name)."""
    registry = torch.nn.attention
    if not hasattr(registry, "register_flash_attention_impl"):
        return False
    if REGISTRY_NAME in registry.list_flash_attention_impls():
        return True
    try:
        from torch.nn.attention import _fa4
    except ImportError:
        return False
    registry.register_flash_attention_impl(
        REGISTRY_NAME, register_fn=functools.partial(_fa4.register_flash_attention_fa4, module_path=__name__))
    return True
