"""Diagnostic: does VAE tiling cost time where memory is no problem? FLUX.1's AutoencoderKL (its config, random
weights) decoding one 1024x1024 image, untiled vs tiled, time and peak memory. python3
bench/diagnostics/decode_time.py [--size 1024]"""

from __future__ import annotations

import argparse
import time

import torch
from diffusers import AutoencoderKL

FLUX_VAE = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                layers_per_block=2, norm_num_groups=32, sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159,
                use_quant_conv=False, use_post_quant_conv=False)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=1024)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    vae = AutoencoderKL(**FLUX_VAE).to(device, dtype).eval()
    latents = torch.randn(1, 16, args.size // 8, args.size // 8, device=device, dtype=dtype)
    for tiled in (False, True, False):
        vae.enable_tiling() if tiled else vae.disable_tiling()
        times = []
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        for _ in range(3):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            with torch.inference_mode():
                vae.decode(latents, return_dict=False)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(round(time.perf_counter() - start, 4))
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
        print(f"tiled={tiled!s:5} {args.size}x{args.size}: {times} s, peak {peak:.2f} GiB")


if __name__ == "__main__":
    main()
