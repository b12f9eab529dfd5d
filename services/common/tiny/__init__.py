"""Tiny random-weight model writers, one per family, for tests and the demo (no network, seconds each).

`diffmesh tiny-model DIR --family NAME` looks NAME up here. Each writer builds a diffusers-format directory
with the libraries' own classes and `save_pretrained`, so stages load it exactly as they load real weights.
"""

from __future__ import annotations

import importlib
import os
import pathlib
from collections.abc import Callable

# name -> "module:function"; each function is (path, seed=0) -> the written directory.
WRITERS = {
    "wan": "services.common.tiny_model:write_tiny_model",
    "flux": "services.common.tiny.flux:write_tiny_flux",
    "flux-schnell": "services.common.tiny.flux:write_tiny_flux_schnell",
    "wan-i2v": "services.common.tiny.wan_i2v:write_tiny_wan_i2v",
    "wan2.2-i2v": "services.common.tiny.wan_i2v:write_tiny_wan22_i2v",
    "wan2.2": "services.common.tiny.wan22:write_tiny_wan22",
    "wan2.2-ti2v": "services.common.tiny.wan22:write_tiny_wan22_ti2v",
    "wan2.2-ti2v-i2v": "services.common.tiny.wan22:write_tiny_wan22_ti2v_i2v",
}


def writer(family: str) -> Callable[..., pathlib.Path]:
    if family not in WRITERS:
        raise ValueError(f"no tiny-model writer for family {family!r}; known: {sorted(WRITERS)}")
    module, function = WRITERS[family].split(":")
    return getattr(importlib.import_module(module), function)


def write_tiny(path: str | os.PathLike, family: str = "wan", seed: int = 0) -> pathlib.Path:
    return writer(family)(path, seed=seed)
