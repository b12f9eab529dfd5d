"""Limits on the wire: `Limits` <-> diffmesh.v1.ModelLimits (field for field, the same names)."""

from __future__ import annotations

import dataclasses

from diffmesh.v1 import tensor_pb2
from services.families.limits import Limits


def limits_to_proto(limits: Limits) -> tensor_pb2.ModelLimits:
    return tensor_pb2.ModelLimits(**dataclasses.asdict(limits))


def limits_from_proto(message: tensor_pb2.ModelLimits) -> Limits:
    return Limits(**{field.name: getattr(message, field.name) for field in dataclasses.fields(Limits)})
