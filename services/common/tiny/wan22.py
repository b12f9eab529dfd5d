"""Offline writers of tiny, random-weight Wan2.2 text-to-video models (diffusers `WanPipeline` format).

* :func:`write_tiny_wan22` -- Wan2.2 A14B's shape: two transformers, `transformer` (high noise) and
  `transformer_2` (low noise), switching at `boundary_ratio` (0.875, as A14B ships), UniPC with flow_shift 3.
* :func:`write_tiny_wan22_ti2v` -- Wan2.2 TI2V-5B's shape used as text-to-video: one transformer with 48
  latent channels, `expand_timesteps=True` (one timestep per token), and the Wan2.2 VAE (`is_residual`,
  `patch_size=2` on 12 pixel channels, 48 latent channels, 16x spatial, 4x temporal), UniPC with flow_shift 5.
  Saved as a `WanPipeline`, as the real TI2V-5B ships; diffusers runs its image-to-video by loading the same
  directory into `WanImageToVideoPipeline`.
* :func:`write_tiny_wan22_ti2v_i2v` -- the same weights saved as a `WanImageToVideoPipeline` (expand_timesteps,
  no image encoder): TI2V-5B's image-to-video, as a directory of that pipeline.

They reuse the Wan2.1 writer's tokenizer, text encoder, initialisation and seeding
(services/common/tiny_model.py), so they write in seconds and the same seed gives byte-identical files.
"""

from __future__ import annotations

import math
import os
import pathlib

from services.common import tiny_model as wan21

__all__ = ["BOUNDARY_RATIO", "write_tiny_wan22", "write_tiny_wan22_ti2v", "write_tiny_wan22_ti2v_i2v"]

BOUNDARY_RATIO = 0.875        # Wan2.2 A14B's: transformer for t >= 875, transformer_2 below
A14B_FLOW_SHIFT = 3.0         # Wan2.2-T2V-A14B-Diffusers' scheduler config
TI2V_FLOW_SHIFT = 5.0         # Wan2.2-TI2V-5B-Diffusers' scheduler config
TI2V_Z_DIM = 48
_A14B_COMPONENTS = ("scheduler", "text_encoder", "tokenizer", "transformer", "transformer_2", "vae")

# The Wan2.2 VAE in miniature: the real one's structure (residual blocks, 2x2 pixel patches so 12 channels in
# and out, three spatial downsamples, so 2 * 8 = 16x spatial, two of them temporal: 4x) with few channels.
_TI2V_VAE = dict(
    base_dim=8,
    decoder_base_dim=8,
    z_dim=TI2V_Z_DIM,
    dim_mult=[1, 1, 1, 1],
    num_res_blocks=1,
    temperal_downsample=[False, True, True],
    is_residual=True,
    in_channels=12,
    out_channels=12,
    patch_size=2,
    scale_factor_temporal=4,
    scale_factor_spatial=16,
    # 48 per-channel statistics, fixed and varied (the real ones are data; any fixed values exercise the same
    # de-normalisation).
    latents_mean=[round(0.25 * math.sin(i), 4) for i in range(TI2V_Z_DIM)],
    latents_std=[round(1.0 + 0.5 * math.cos(i), 4) for i in range(TI2V_Z_DIM)],
)


def _save(pipe, out: pathlib.Path, components: tuple[str, ...]) -> pathlib.Path:
    with wan21._quiet_progress_bars():
        pipe.save_pretrained(out, safe_serialization=True)
    wan21._make_readable(out, components)
    return out


def write_tiny_wan22(path: str | os.PathLike, seed: int = 0) -> pathlib.Path:
    """Write a tiny Wan2.2 A14B-style T2V model (two experts, boundary_ratio 0.875) to ``path``."""
    from diffusers import WanPipeline

    out = pathlib.Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = wan21._build_tokenizer()
    # Seeds as the Wan2.1 writer spaces them; transformer_2 takes the next free slot, so the two experts differ.
    with wan21._BUILD_LOCK:
        with wan21._seeded(seed * 10 + 1):
            text_encoder = wan21._build_text_encoder(len(tokenizer))
        with wan21._seeded(seed * 10 + 2):
            transformer = wan21._build_transformer()
        with wan21._seeded(seed * 10 + 3):
            vae = wan21._build_vae()
        with wan21._seeded(seed * 10 + 4):
            transformer_2 = wan21._build_transformer()
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
                       scheduler=wan21._build_scheduler(A14B_FLOW_SHIFT), transformer=transformer,
                       transformer_2=transformer_2, boundary_ratio=BOUNDARY_RATIO)
    return _save(pipe, out, _A14B_COMPONENTS)


def _ti2v_parts(seed: int) -> dict:
    """TI2V-5B's components in miniature, for either pipeline class (the same seed: the same weights)."""
    tokenizer = wan21._build_tokenizer()
    with wan21._BUILD_LOCK:
        with wan21._seeded(seed * 10 + 1):
            text_encoder = wan21._build_text_encoder(len(tokenizer))
        with wan21._seeded(seed * 10 + 2):
            transformer = wan21._build_transformer(in_channels=TI2V_Z_DIM, out_channels=TI2V_Z_DIM)
        with wan21._seeded(seed * 10 + 3):
            vae = wan21._build_vae(**_TI2V_VAE)
    return dict(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
                scheduler=wan21._build_scheduler(TI2V_FLOW_SHIFT), transformer=transformer, expand_timesteps=True)


def write_tiny_wan22_ti2v(path: str | os.PathLike, seed: int = 0) -> pathlib.Path:
    """Write a tiny Wan2.2 TI2V-5B-style model (expand_timesteps, the Wan2.2 VAE) to ``path``, as a WanPipeline."""
    from diffusers import WanPipeline

    out = pathlib.Path(path)
    out.mkdir(parents=True, exist_ok=True)
    return _save(WanPipeline(**_ti2v_parts(seed)), out, wan21._COMPONENTS)


def write_tiny_wan22_ti2v_i2v(path: str | os.PathLike, seed: int = 0) -> pathlib.Path:
    """The same tiny TI2V-5B saved as a `WanImageToVideoPipeline` (expand_timesteps, no image encoder)."""
    from diffusers import WanImageToVideoPipeline

    out = pathlib.Path(path)
    out.mkdir(parents=True, exist_ok=True)
    return _save(WanImageToVideoPipeline(**_ti2v_parts(seed)), out, wan21._COMPONENTS)
