"""Model families: everything specific to one kind of model, behind one seam (see base.py).

A model directory's `model_index.json["_class_name"]` (e.g. `WanPipeline`, `FluxPipeline`) picks its family,
once, when a stage loads it. Adding a family is one module here (its parts), its entry in FAMILIES, a tiny
model writer in services/common/tiny_model.py and an equality test against its diffusers pipeline.
"""

from __future__ import annotations

import functools
import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from services.common.models import ModelDir
    from services.families.base import Family


# Each family's module and class, in the order a model directory is matched against them.
FAMILY_CLASSES = (("services.families.wan", "WanFamily"), ("services.families.wan_i2v", "WanI2VFamily"),
                  ("services.families.flux", "FluxFamily"))
FAMILY_MODULES = tuple(module for module, _ in FAMILY_CLASSES)


@functools.cache
def families() -> tuple[Family, ...]:
    """Every family, imported on first use: the gateway imports this package for `Limits` alone, and the
    families' diffusers imports cost a process seconds of start-up (a gang's forkserver imports them once for all
    its ranks: FAMILY_MODULES)."""
    return tuple(getattr(importlib.import_module(module), name)() for module, name in FAMILY_CLASSES)


def __getattr__(name: str):
    if name == "FAMILIES":
        return families()
    if name == "Family":
        from services.families.base import Family

        return Family
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def family_for(model: ModelDir) -> Family:
    """The family serving this directory, from its pipeline class; a clear error for one none serves."""
    class_name = model.pipeline_class_name
    for family in families():
        if class_name in family.pipeline_classes:
            return family
    served = sorted(name for family in families() for name in family.pipeline_classes)
    raise UnsupportedModel(f"{model.path}: pipeline {class_name or '(none)'!r} is not served by diffmesh; "
                           f"served pipelines: {served}")


class UnsupportedModel(ValueError):
    """Raised at start-up: a stage cannot serve a directory whose family it does not know."""


__all__ = ["FAMILIES", "Family", "UnsupportedModel", "families", "family_for"]
