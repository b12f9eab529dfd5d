"""When the VAE decodes (and encodes) in tiles: diffusers' own tiled paths, switched per request by frame size.

Tiling bounds the VAE's memory by its tile, whatever the frame size, at the cost of blending seams between
overlapping tiles (frames differ slightly from an untiled decode). So it is used only where it pays: `auto` tiles
frames larger than `above_pixels` (default: larger than 1280x720), `on` always, `off` never. Below its tile size a
diffusers VAE decodes untiled even when tiling is on, so small outputs never change.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
from collections.abc import Iterator

import torch

logger = logging.getLogger(__name__)

MODES = ("auto", "on", "off")
DEFAULT_ABOVE_PIXELS = 1280 * 720


@dataclasses.dataclass(frozen=True)
class VaeTiling:
    mode: str = "auto"
    above_pixels: int = DEFAULT_ABOVE_PIXELS      # frame area (width x height) above which `auto` tiles

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"VAE tiling {self.mode!r} is not one of {MODES}")
        if self.above_pixels < 0:
            raise ValueError(f"--vae-tile-above {self.above_pixels} must be >= 0")

    def wanted(self, frame_pixels: int) -> bool:
        return self.mode == "on" or (self.mode == "auto" and frame_pixels > self.above_pixels)

    @contextlib.contextmanager
    def applied(self, vae: torch.nn.Module, frame_pixels: int) -> Iterator[bool]:
        """The VAE tiles inside (or not), as this policy says for frames of `frame_pixels`; restored after. The
        decoder runs one request at a time, so switching the model's flag per request is safe."""
        tiled = self.wanted(frame_pixels)
        before = getattr(vae, "use_tiling", False)
        vae.use_tiling = tiled
        if tiled:
            logger.info("VAE tiled for %d-pixel frames", frame_pixels)
        try:
            yield tiled
        finally:
            vae.use_tiling = before


def add_tiling_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vae-tiling", choices=MODES, default="auto",
                        help="tiled VAE decode/encode: auto (frames larger than --vae-tile-above), on, off")
    parser.add_argument("--vae-tile-above", type=int, default=DEFAULT_ABOVE_PIXELS, metavar="PIXELS",
                        help=f"frame area above which auto tiling starts (default {DEFAULT_ABOVE_PIXELS}: 1280x720)")


def tiling_from_args(args: argparse.Namespace) -> dict:
    return {"tiling": VaeTiling(args.vae_tiling, args.vae_tile_above)}
