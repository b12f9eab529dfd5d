"""Model families: everything specific to one kind of model, behind one seam (see base.py).

A model directory's `model_index.json["_class_name"]` (e.g. `WanPipeline`, `FluxPipeline`) picks its family,
once, when a stage loads it. Adding a family is one module here (its parts), its entry in FAMILIES, a tiny
model writer in services/common/tiny_model.py and an equality test against its diffusers pipeline.
"""

from __future__ import annotations

from services.common.models import ModelDir
from services.families.base import Family
from services.families.flux import FluxFamily
from services.families.wan import WanFamily
from services.families.wan_i2v import WanI2VFamily

FAMILIES: tuple[Family, ...] = (WanFamily(), WanI2VFamily(), FluxFamily())


def family_for(model: ModelDir) -> Family:
    """The family serving this directory, from its pipeline class; a clear error for one none serves."""
    class_name = model.pipeline_class_name
    for family in FAMILIES:
        if class_name in family.pipeline_classes:
            return family
    served = sorted(name for family in FAMILIES for name in family.pipeline_classes)
    raise UnsupportedModel(f"{model.path}: pipeline {class_name or '(none)'!r} is not served by diffmesh; "
                           f"served pipelines: {served}")


class UnsupportedModel(ValueError):
    """Raised at start-up: a stage cannot serve a directory whose family it does not know."""


__all__ = ["FAMILIES", "Family", "UnsupportedModel", "family_for"]
