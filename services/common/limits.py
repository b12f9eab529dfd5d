"""Request limits and their checks, shared by the gateway (which rejects early, before any stage works) and
the stages (which can be called directly, so check again). One definition keeps the two from drifting."""

from __future__ import annotations

import math
import re

from services.common.errors import InvalidArgument

MAX_STEPS = 200
MAX_SIDE = 4096
MAX_FRAMES = 1025
MAX_OUTPUTS = 10
MAX_FPS = 120
# Seeds are 32-bit: the families draw the first latents from torch's CPU generator, whose Mersenne Twister keeps only
# the low 32 bits of manual_seed's value (7 and 7 + 2**32 draw the same noise), as the diffusers pipelines the mesh
# equals do. Refusing wider seeds keeps "a different seed, a different image" true.
MAX_SEED = 2**32 - 1
# A request id goes into every log line and into gRPC metadata: printable, no spaces or separators, bounded.
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def check_side(field: str, value: int, multiple: int, max_side: int = MAX_SIDE) -> None:
    if value % multiple or not multiple <= value <= max_side:
        raise InvalidArgument(field, f"{value} must be a multiple of {multiple} in {multiple}..{max_side}")


def check_frames(num_frames: int, temporal: int = 4, max_frames: int = MAX_FRAMES) -> None:
    if (num_frames - 1) % temporal or not 1 <= num_frames <= max_frames:
        raise InvalidArgument("num_frames", f"{num_frames} must be of the form {temporal}k+1 in 1..{max_frames}")


def check_steps(num_inference_steps: int, max_steps: int = MAX_STEPS) -> None:
    if not 1 <= num_inference_steps <= max_steps:
        raise InvalidArgument("num_inference_steps", f"{num_inference_steps} is outside 1..{max_steps}")


def check_guidance(guidance_scale: float, field: str = "guidance_scale") -> None:
    if not math.isfinite(guidance_scale) or guidance_scale < 0:
        raise InvalidArgument(field, f"{guidance_scale} must be finite and >= 0")


def check_outputs(n: int) -> None:
    if not 1 <= n <= MAX_OUTPUTS:
        raise InvalidArgument("n", f"{n} is outside 1..{MAX_OUTPUTS}")


def check_preview_every(preview_every: int, num_inference_steps: int) -> None:
    """0 (off), or a preview every k steps with k at most the steps (a larger k would never send one)."""
    if not 0 <= preview_every <= num_inference_steps:
        raise InvalidArgument("preview_every", f"{preview_every} is outside 0..{num_inference_steps} "
                              "(num_inference_steps; 0 turns previews off)")


def check_fps(fps: int) -> None:
    if not 1 <= fps <= MAX_FPS:
        raise InvalidArgument("fps", f"{fps} is outside 1..{MAX_FPS}")


def check_seed(seed: int) -> None:
    if not 0 <= seed <= MAX_SEED:
        raise InvalidArgument("seed", f"{seed} is outside 0..{MAX_SEED} (seeds are 32-bit)")


def check_text(field: str, text: str, max_chars: int) -> None:
    """Bounded, and encodable as UTF-8 (what protobuf strings are): a lone surrogate such as JSON's "\\ud800" is
    legal in a Python str but in no message, so it is refused here rather than failing a stage call."""
    if len(text) > max_chars:
        raise InvalidArgument(field, f"{len(text)} characters, over the limit of {max_chars}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise InvalidArgument(field, f"holds a lone surrogate at character {error.start}, which is not "
                              "Unicode text") from None


def check_request_id(request_id: str, field: str = "x-request-id") -> str:
    """The id as given when it is safe to log and to pass on as metadata; its value is never echoed."""
    if not isinstance(request_id, str) or not REQUEST_ID.fullmatch(request_id):
        raise InvalidArgument(field, f"must be 1..128 characters of letters, digits and . _ : - "
                              f"(pattern {REQUEST_ID.pattern})")
    return request_id
