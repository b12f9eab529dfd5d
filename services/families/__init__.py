"""Model families: everything specific to one kind of model, behind one seam (see base.py).

A model directory's `model_index.json["_class_name"]` (e.g. `WanPipeline`, `FluxPipeline`) picks its family,
once, when a stage loads it. Adding a family is one module here (its parts), its entry in FAMILIES, a tiny
model writer in services/common/tiny_model.py and an equality test against its diffusers pipeline.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from services.common.models import ModelDir
    from services.families.base import Family


@functools.cache
def families() -> tuple[Family, ...]:
    """Every family, imported on first use: the gateway imports this package for `Limits` alone, and the
    families' diffusers imports cost a process seconds of start-up."""
    from services.families.flux import FluxFamily
    from services.families.wan import WanFamily
    from services.families.wan_i2v import WanI2VFamily

    return (WanFamily(), WanI2VFamily(), FluxFamily())


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
