"""Live previews: latents -> a small RGB image, cheaply, on the denoiser's device.

Not the VAE: a fixed linear map of the latent channels to RGB plus a bias (ComfyUI's `latent_rgb_factors`, a linear
fit of the colours the model's VAE decodes), one pixel per latent position. At Wan2.1's 480p shapes that is a
16 -> 3 map over 60x104 positions for the one frame shown: microseconds on a GPU, where a VAE decode of the same
latents costs seconds (bench/previews.py measures it against a denoise step).

A family declares its maps (`Family.latent_rgb`), one per latent channel count it serves, and the engine calls
`Family.preview`, so no stage code knows a family's numbers. Latents with a channel count no map fits (the tiny
random-weight test models, a VAE nobody has fitted factors for, e.g. Wan2.2's 48 channels here) take
`first_channels_rgb`: a deterministic stand-in that needs no fitted numbers and still shows structure emerging.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import torch


@dataclasses.dataclass(frozen=True)
class LatentRGB:
    """rgb = latents . factors + bias, in -1..1 (ComfyUI's convention, which is also how its tables are fitted):
    `factors[c]` is latent channel c's (R, G, B) weight."""

    factors: tuple[tuple[float, float, float], ...]
    bias: tuple[float, float, float] = (0.0, 0.0, 0.0)
    source: str = ""                 # where the numbers come from

    @property
    def channels(self) -> int:
        return len(self.factors)


def preview_frame(latents: torch.Tensor) -> torch.Tensor:
    """[n, C, T, h, w] -> the middle latent frame [n, C, h, w]; [n, C, h, w] as it is.

    The middle, not the first or the last: every step refines all frames at once, so no frame is "further along"
    than another, and the middle one is the most representative thumbnail. The first latent frame is also the odd
    one out: Wan's causal VAE packs one video frame into it (four into each later one), and in image-to-video it is
    the conditioning image, which the denoise never changes."""
    if latents.dim() == 5:
        return latents[:, :, latents.shape[2] // 2]
    if latents.dim() != 4:
        raise ValueError(f"latents of shape {list(latents.shape)} are neither [n, C, h, w] nor [n, C, T, h, w]")
    return latents


@functools.lru_cache(maxsize=16)
def _weights(projection: LatentRGB, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # Cached per device: building a small tensor on an accelerator is a blocking host-to-device copy, which would
    # wait for the step's queued kernels every preview.
    factors = torch.tensor(projection.factors, dtype=torch.float32).t().contiguous().to(device)   # [3, C]
    return factors, torch.tensor(projection.bias, dtype=torch.float32).to(device)


def linear_rgb(frame: torch.Tensor, projection: LatentRGB) -> torch.Tensor:
    """[n, C, h, w] -> uint8 [n, h, w, 3] through the fitted map, -1..1 scaled to 0..255 as ComfyUI's preview."""
    factors, bias = _weights(projection, frame.device)
    rgb = torch.nn.functional.linear(frame.float().movedim(1, -1), factors, bias)
    return ((rgb + 1.0) / 2.0).clamp(0, 1).mul(255).to(torch.uint8)


def first_channels_rgb(frame: torch.Tensor) -> torch.Tensor:
    """[n, C, h, w] -> uint8 [n, h, w, 3]: the first three channels (repeated when there are fewer), each
    stretched to 0..255 over its own min..max in that output. Deterministic, and with no fitted numbers it suits
    any channel count; colours mean nothing, shapes do."""
    rgb = frame[:, [c % frame.shape[1] for c in range(3)]].float()
    low = rgb.amin(dim=(2, 3), keepdim=True)
    span = (rgb.amax(dim=(2, 3), keepdim=True) - low).clamp_min(1e-6)
    return ((rgb - low) / span).mul(255).to(torch.uint8).movedim(1, -1)


def project(latents: torch.Tensor, projections: Sequence[LatentRGB]) -> torch.Tensor:
    """Latents in the decoder's layout ([n, C, h, w] or [n, C, T, h, w]) -> uint8 [n, h, w, 3] on their device:
    the map that fits their channel count, else `first_channels_rgb`."""
    frame = preview_frame(latents)
    for projection in projections:
        if projection.channels == frame.shape[1]:
            return linear_rgb(frame, projection)
    return first_channels_rgb(frame)
