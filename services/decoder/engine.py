"""VAE decoding: latents -> frames in 0..1 -> PNG / MP4.

De-normalises with the VAE's latents_mean / latents_std and post-processes exactly as WanPipeline does after
its loop, so the frames equal `WanPipeline(output_type="np")`'s.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import torch
from diffusers.video_processor import VideoProcessor

from services.common.errors import InvalidArgument
from services.common.models import ModelDir
from services.common.platform import Platform
from services.decoder import media

logger = logging.getLogger(__name__)

FORMATS = ("auto", "png", "mp4", "none")


@dataclasses.dataclass(frozen=True)
class DecodeParams:
    request_id: str
    format: str = "auto"          # one of FORMATS
    fps: int = media.DEFAULT_FPS
    return_frames: bool = False


@dataclasses.dataclass(frozen=True)
class MediaItem:
    mime_type: str
    data: bytes


@dataclasses.dataclass(frozen=True)
class Decoded:
    media: list[MediaItem]
    frames: np.ndarray | None     # float32 [n, F, H, W, 3] in 0..1, when asked for


class DecoderEngine:
    def __init__(self, model: ModelDir, platform: Platform, dtype: torch.dtype | None = None) -> None:
        self.model_name = model.name
        self.device = platform.device()
        self.vae = model.load("vae", dtype=dtype or platform.default_dtype(), device=self.device)
        config = self.vae.config
        self.z_dim = int(config.z_dim)
        self.latents_mean = torch.tensor(config.latents_mean).view(1, self.z_dim, 1, 1, 1)
        self.latents_std = torch.tensor(config.latents_std).view(1, self.z_dim, 1, 1, 1)
        self.video_processor = VideoProcessor(vae_scale_factor=int(config.scale_factor_spatial))
        logger.info("decoder loaded %s on %s (%s)", model.path, self.device, self.vae.dtype)

    def check(self, params: DecodeParams, latents: torch.Tensor) -> None:
        if params.format not in FORMATS:
            raise InvalidArgument("format", f"{params.format!r} is not one of {FORMATS}")
        if not 1 <= params.fps <= 120:
            raise InvalidArgument("fps", f"{params.fps} is outside 1..120")
        if latents.dim() != 5 or latents.shape[1] != self.z_dim:
            raise InvalidArgument("latents", f"shape {list(latents.shape)} is not [n, {self.z_dim}, T, H, W]")
        if not latents.is_floating_point():
            raise InvalidArgument("latents", f"dtype {latents.dtype} is not a floating point type")
        if params.format == "png" and latents.shape[2] != 1:
            raise InvalidArgument("format", "png holds one frame; use mp4 for num_frames > 1")

    @torch.inference_mode()
    def decode(self, params: DecodeParams, latents: torch.Tensor) -> Decoded:
        # 1. Check inputs
        self.check(params, latents)
        # 2. De-normalise: the transformer works in the VAE's normalised latent space
        dtype = self.vae.dtype
        latents = latents.to(self.device, dtype)
        mean = self.latents_mean.to(self.device, dtype)
        # Cast, then invert, in the VAE's dtype: WanPipeline's `1.0 / tensor(std).to(dtype)` does exactly that,
        # and in bfloat16 inverting first gives different frames.
        inv_std = 1.0 / self.latents_std.to(self.device, dtype)
        latents = latents / inv_std + mean
        # 3. VAE decode
        video = self.vae.decode(latents, return_dict=False)[0]                       # [n, 3, F, H, W]
        # 4. Post-process as WanPipeline's VideoProcessor does (denormalize in the VAE's dtype, then float32),
        # but on the device: only uint8 pixels, and float frames when asked, cross to the CPU.
        if self.video_processor.config.do_normalize:
            video = self.video_processor.denormalize(video)
        frames = video.permute(0, 2, 3, 4, 1).float()                                # [n, F, H, W, 3]
        # 5. Encode files; pixels round as diffusers' numpy_to_pil does
        fmt = params.format
        if fmt == "auto":
            fmt = "png" if frames.shape[1] == 1 else "mp4"
        items: list[MediaItem] = []
        if fmt != "none":
            pixels = (frames * 255).round().to(torch.uint8).cpu().numpy()
            for clip in pixels:
                if fmt == "png":
                    items.append(MediaItem("image/png", media.encode_png(clip[0])))
                else:
                    items.append(MediaItem("video/mp4", media.encode_mp4(clip, params.fps)))
        frames_out = frames.cpu().numpy() if params.return_frames else None
        return Decoded(media=items, frames=frames_out)
