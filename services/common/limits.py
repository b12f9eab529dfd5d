"""Request limits and their checks, shared by the gateway (which rejects early, before any stage works) and
the stages (which can be called directly, so check again). One definition keeps the two from drifting."""

from __future__ import annotations

import math

from services.common.errors import InvalidArgument

MAX_STEPS = 200
MAX_SIDE = 4096
MAX_FRAMES = 1025
MAX_OUTPUTS = 10


def check_side(field: str, value: int, multiple: int, max_side: int = MAX_SIDE) -> None:
    if value % multiple or not multiple <= value <= max_side:
        raise InvalidArgument(field, f"{value} must be a multiple of {multiple} in {multiple}..{max_side}")


def check_frames(num_frames: int, temporal: int = 4, max_frames: int = MAX_FRAMES) -> None:
    if (num_frames - 1) % temporal or not 1 <= num_frames <= max_frames:
        raise InvalidArgument("num_frames", f"{num_frames} must be of the form {temporal}k+1 in 1..{max_frames}")


def check_steps(num_inference_steps: int) -> None:
    if not 1 <= num_inference_steps <= MAX_STEPS:
        raise InvalidArgument("num_inference_steps", f"{num_inference_steps} is outside 1..{MAX_STEPS}")


def check_guidance(guidance_scale: float, field: str = "guidance_scale") -> None:
    if not math.isfinite(guidance_scale) or guidance_scale < 0:
        raise InvalidArgument(field, f"{guidance_scale} must be finite and >= 0")


def check_outputs(n: int) -> None:
    if not 1 <= n <= MAX_OUTPUTS:
        raise InvalidArgument("n", f"{n} is outside 1..{MAX_OUTPUTS}")
