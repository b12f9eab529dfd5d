"""A diffusers transformer's repeated blocks: the unit `--compile` compiles, `--shard-weights` shards and
`--quantize` quantizes."""

from __future__ import annotations

import torch


def diffusers_model(transformer: torch.nn.Module) -> torch.nn.Module:
    """The diffusers model itself: a gang rank's sequence-parallel wrapper holds it as `.model`."""
    return transformer if hasattr(transformer, "_repeated_blocks") else getattr(transformer, "model", transformer)


def repeated_blocks(model: torch.nn.Module, purpose: str) -> list[torch.nn.Module]:
    """The model's repeated blocks, by the class names diffusers declares in `_repeated_blocks`, matched through
    the bases: once sharded, a block is FSDP2's subclass of its own class (`FSDPWanTransformerBlock`), which
    matching by exact class name misses. `purpose` ("to compile (--compile)") ends the error when there are none."""
    names = tuple(getattr(model, "_repeated_blocks", None) or ())
    if not names:
        raise ValueError(f"{type(model).__name__} declares no repeated blocks {purpose}")
    blocks = [module for module in model.modules() if any(cls.__name__ in names for cls in type(module).__mro__)]
    if not blocks:
        raise ValueError(f"{type(model).__name__} has none of its {names} blocks {purpose}")
    return blocks
