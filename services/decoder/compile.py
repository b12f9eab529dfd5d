"""A compiled VAE decoder, on request: `--compile-vae` compiles the VAE's decoder forward (static shapes), and
`--vae-warmup-sizes` decodes zero latents of the listed sizes at start-up so that no request waits for it.

Why: after the denoiser's last step a video's request waits for its VAE decode (Wan2.1 480x832x81 on an H200:
1.83 s of an end-to-end 45.5 s), made of small convolutions, norms and activations that inductor fuses. The
decoder's forward is what compiles, the unit every diffusers VAE calls per (tile of a) decode: Wan's per latent
frame, its causal cache passed in (three graphs: the first latent frame, the second, and every later one, which
the cache makes alike), FLUX's once per image. A size not warmed up still works: its first request compiles it,
and the log says so. A tiled decode compiles once per tile shape. Not in a decoder gang (`--devices N`): its row
split exchanges halo rows inside the decoder's convolutions, untried compiled.
"""

from __future__ import annotations

import argparse
import dataclasses
import os

import torch

from services.denoiser.compile import COMPILE_BACKEND_ENV, Size, parse_sizes


@dataclasses.dataclass(frozen=True)
class VaeCompile:
    backend: str = "inductor"                   # $DIFFMESH_COMPILE_BACKEND overrides it (eager in tests)
    warmup_sizes: tuple[Size, ...] = ()


def add_vae_compile_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("compiled VAE decoder")
    group.add_argument("--compile-vae", action="store_true",
                       help="compile the VAE's decoder (inductor, static shapes; default: off)")
    group.add_argument("--vae-warmup-sizes", type=parse_sizes, default=(), metavar="WxH[xF],...",
                       help="sizes decoded at start-up, before serving, so no request waits for the compile "
                       "(with --compile-vae; default: none)")


def vae_compile_from_args(args: argparse.Namespace) -> VaeCompile | None:
    if not getattr(args, "compile_vae", False):
        if getattr(args, "vae_warmup_sizes", ()):
            raise ValueError("--vae-warmup-sizes needs --compile-vae")
        return None
    return VaeCompile(backend=os.environ.get(COMPILE_BACKEND_ENV, "inductor"), warmup_sizes=args.vae_warmup_sizes)


def check_vae_compile(args: argparse.Namespace, devices: int) -> None:
    """Refuse what a compiled decoder does not combine with, naming the flags (start-up fails in one line)."""
    if getattr(args, "compile_vae", False) and devices > 1:
        raise ValueError(f"--compile-vae with --devices {devices}: a decoder gang's row split is untried compiled; "
                         "use one device")


def compile_vae_decoder(vae: torch.nn.Module, options: VaeCompile) -> None:
    """Compile the loaded VAE's decoder forward in place (its first call of each shape compiles)."""
    vae.decoder.forward = torch.compile(vae.decoder.forward, backend=options.backend, dynamic=False)
