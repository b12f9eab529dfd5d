"""VAE decoding: latents -> frames in 0..1 -> PNG / MP4.

The model's family de-normalises, decodes and post-processes exactly as its pipeline does after its loop, so
the frames equal the pipeline's `output_type="np"`; this engine checks, and encodes the files. Two parts, which the
server runs apart: `decode_pixels` needs the VAE (latents -> frames on the device -> uint8 pixels on the host),
`encode_files` only the CPU (pixels -> PNG / MP4), so the VAE can take the next request meanwhile.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import torch

from services.common import metrics
from services.common.errors import InvalidArgument
from services.common.images import decode_image
from services.common.limits import MAX_FRAMES, MAX_SIDE
from services.common.models import ModelDir
from services.common.platform import Platform
from services.decoder import media
from services.decoder.tiling import VaeTiling
from services.families import family_for

logger = logging.getLogger(__name__)

FORMATS = ("auto", "png", "mp4", "none")


@dataclasses.dataclass(frozen=True)
class DecodeParams:
    request_id: str
    format: str = "auto"          # one of FORMATS
    fps: int = media.DEFAULT_FPS
    return_frames: bool = False


@dataclasses.dataclass(frozen=True)
class ConditionParams:
    """A conditioning image to encode with the VAE, for a video of this size and length."""

    request_id: str
    image: bytes
    width: int
    height: int
    num_frames: int


@dataclasses.dataclass(frozen=True)
class MediaItem:
    mime_type: str
    data: bytes


@dataclasses.dataclass(frozen=True)
class HostFrames:
    """A request's decoded frames on the host, what its files are made from: the device is done with them."""

    format: str                   # png | mp4 | none ("auto" resolved)
    pixels: np.ndarray | None     # uint8 [n, F, H, W, 3] for the files; None for "none"
    frames: np.ndarray | None     # float32 [n, F, H, W, 3] in 0..1, when asked for


@dataclasses.dataclass(frozen=True)
class Decoded:
    media: list[MediaItem]
    frames: np.ndarray | None     # float32 [n, F, H, W, 3] in 0..1, when asked for


class DecoderEngine:
    def __init__(self, model: ModelDir, platform: Platform, dtype: torch.dtype | None = None,
                 tiling: VaeTiling = VaeTiling(), device: torch.device | None = None) -> None:
        self.model_name = model.name
        self.device = device or platform.device()      # a gang rank's own device (services/decoder/gang.py)
        self.family = family_for(model)
        self.limits = self.family.limits(model)
        self.decoding = self.family.decoding(model, dtype or platform.default_dtype(), self.device)
        self.tiling = tiling
        logger.info("decoder loaded %s (%s family) on %s, VAE tiling %s", model.path, self.family.name,
                    self.device, tiling.mode)

    def check(self, params: DecodeParams, latents: torch.Tensor) -> None:
        if params.format not in FORMATS:
            raise InvalidArgument("format", f"{params.format!r} is not one of {FORMATS}")
        if not 1 <= params.fps <= 120:
            raise InvalidArgument("fps", f"{params.fps} is outside 1..120")
        if not latents.is_floating_point():
            raise InvalidArgument("latents", f"dtype {latents.dtype} is not a floating point type")
        self.decoding.check(latents)
        if params.format == "png" and latents.dim() == 5 and latents.shape[2] != 1:
            raise InvalidArgument("format", "png holds one frame; use mp4 for num_frames > 1")

    def check_condition(self, params: ConditionParams) -> None:
        # Refused here, at the boundary, not by the family's encode: a decoder gang's ranks must never start a
        # request that fails on them (services/decoder/gang.py).
        if not self.limits.takes_image:
            raise InvalidArgument("image", f"{self.model_name} ({self.limits.task}) takes no conditioning image")
        for field in ("width", "height"):
            value = getattr(params, field)
            if not 1 <= value <= MAX_SIDE:
                raise InvalidArgument(field, f"{value} is outside 1..{MAX_SIDE}")
        if not 1 <= params.num_frames <= MAX_FRAMES:
            raise InvalidArgument("num_frames", f"{params.num_frames} is outside 1..{MAX_FRAMES}")

    @torch.inference_mode()
    def encode_condition(self, params: ConditionParams) -> dict[str, torch.Tensor]:
        """The conditioning image through the VAE's encoder, as the model's pipeline prepares it."""
        self.check_condition(params)
        image = decode_image(params.image)
        with self.tiling.applied(self.decoding.vae, params.width * params.height), \
                metrics.phase("condition_encode", self.model_name):
            return self.decoding.encode_condition(image, params.width, params.height, params.num_frames)

    def decode(self, params: DecodeParams, latents: torch.Tensor) -> Decoded:
        """Latents -> files in one call: the VAE's part, then the CPU's."""
        return self.encode_files(params, self.decode_pixels(params, latents))

    @torch.inference_mode()
    def decode_pixels(self, params: DecodeParams, latents: torch.Tensor) -> HostFrames:
        """The part that needs the VAE: latents -> what the files are made from, on the host."""
        # 1. Check inputs
        self.check(params, latents)
        # 2. The family's decode: de-normalise, VAE decode, post-process as its pipeline does (on the device)
        frames = self.decode_frames(latents)                                         # [n, F, H, W, 3]
        # 3. To the host
        return self.to_host(params, frames)

    def decode_frames(self, latents: torch.Tensor) -> torch.Tensor:
        """Checked latents -> frames float32 [n, F, H, W, 3] in 0..1 on the device, tiled as the policy says."""
        frame_pixels = latents.shape[-2] * latents.shape[-1] * self.decoding.spatial_scale ** 2
        with self.tiling.applied(self.decoding.vae, frame_pixels), metrics.phase("decode", self.model_name):
            return self.decoding.decode(latents)

    def to_host(self, params: DecodeParams, frames: torch.Tensor) -> HostFrames:
        """Frames on the device -> uint8 pixels for the files (rounded as diffusers' numpy_to_pil does, on the device,
        so a quarter of the bytes cross) and the float frames when asked, on the host."""
        fmt = params.format
        if fmt == "auto":
            fmt = "png" if frames.shape[1] == 1 else "mp4"
        pixels = (frames * 255).round().to(torch.uint8).cpu().numpy() if fmt != "none" else None
        frames_out = frames.cpu().numpy() if params.return_frames else None
        return HostFrames(format=fmt, pixels=pixels, frames=frames_out)

    def encode_files(self, params: DecodeParams, frames: HostFrames) -> Decoded:
        """Host frames -> the files asked for (and the float frames when asked). CPU only: the server runs it on its
        file encoders' threads (services/decoder/encoders.py) while the VAE decodes the next request."""
        items: list[MediaItem] = []
        if frames.pixels is not None:
            with metrics.phase("media_encode", self.model_name, format=frames.format):
                for clip in frames.pixels:
                    if frames.format == "png":
                        items.append(MediaItem("image/png", media.encode_png(clip[0])))
                    else:
                        items.append(MediaItem("video/mp4", media.encode_mp4(clip, params.fps)))
        return Decoded(media=items, frames=frames.frames)
