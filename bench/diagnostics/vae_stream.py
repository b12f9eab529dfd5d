"""Diagnostic: where can a Wan2.1 480x832x81 decode + MP4 go faster? Wan2.1's AutoencoderKLWan (its default config,
random bf16 weights) decodes [1, 16, 21, 60, 104] latents:

- whole: `vae.decode`, then uint8 to the host, then `media.encode_mp4` (what the decoder does today);
- streamed: diffusers' own per-latent-frame loop (AutoencoderKLWan._decode), each chunk of frames to the host as
  uint8 and into a `media.Mp4Writer` on another thread while the VAE decodes the next chunk;
- each again with cudnn.benchmark on;
- with --compile, both again with the VAE's decoder forward compiled (inductor, static shapes: three graphs, the
  first latent frame, the second, and every later one, which its causal cache makes alike), the compile's time and
  the frames' difference from the eager decode.

Prints times and whether the streamed pixels equal the whole decode's. python3 bench/diagnostics/vae_stream.py
[--compile]
"""

from __future__ import annotations

import argparse
import pathlib
import queue
import sys
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import AutoencoderKLWan  # noqa: E402

from services.decoder import media  # noqa: E402


def to_pixels(video: torch.Tensor) -> np.ndarray:
    """[1, 3, f, H, W] in -1..1 -> uint8 [f, H, W, 3] on the host, as the decoder rounds."""
    frames = (video / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 4, 1).float()[0]
    return (frames * 255).round().to(torch.uint8).cpu().numpy()


def whole(vae: AutoencoderKLWan, latents: torch.Tensor) -> tuple[dict, np.ndarray, bytes]:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    video = vae.decode(latents, return_dict=False)[0]
    torch.cuda.synchronize()
    t1 = time.perf_counter()
    pixels = to_pixels(video)
    t2 = time.perf_counter()
    data = media.encode_mp4(pixels)
    t3 = time.perf_counter()
    return {"decode_s": round(t1 - t0, 3), "to_host_s": round(t2 - t1, 3), "mp4_s": round(t3 - t2, 3),
            "total_s": round(t3 - t0, 3)}, pixels, data


def streamed(vae: AutoencoderKLWan, latents: torch.Tensor) -> tuple[dict, np.ndarray, bytes]:
    _, _, frames, height, width = latents.shape
    writer = media.Mp4Writer(width * 8, height * 8)
    chunks: queue.Queue = queue.Queue()
    kept: list[np.ndarray] = []

    def encode() -> None:
        while (chunk := chunks.get()) is not None:
            writer.add(chunk)
            kept.append(chunk)

    thread = threading.Thread(target=encode)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    thread.start()
    vae.clear_cache()
    x = vae.post_quant_conv(latents)
    for i in range(frames):
        vae._conv_idx = [0]
        out = vae.decoder(x[:, :, i:i + 1], feat_cache=vae._feat_map, feat_idx=vae._conv_idx, first_chunk=i == 0)
        chunks.put(to_pixels(torch.clamp(out, -1.0, 1.0)))
    vae.clear_cache()
    t1 = time.perf_counter()
    chunks.put(None)
    thread.join()
    data = writer.finish()
    writer.close()
    t2 = time.perf_counter()
    return {"decode_and_to_host_s": round(t1 - t0, 3), "mp4_tail_s": round(t2 - t1, 3),
            "total_s": round(t2 - t0, 3)}, np.concatenate(kept), data


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--compile", action="store_true", help="also time the decoder's forward compiled")
    args = parser.parse_args()
    device = torch.device("cuda")
    vae = AutoencoderKLWan().to(device, torch.bfloat16).eval()
    latents = torch.randn(1, 16, 21, 60, 104, device=device, dtype=torch.bfloat16)
    with torch.inference_mode():
        for benchmark in (False, True):
            torch.backends.cudnn.benchmark = benchmark
            for _ in range(2):
                w, whole_pixels, whole_file = whole(vae, latents)
                s, stream_pixels, stream_file = streamed(vae, latents)
                print(f"cudnn.benchmark={benchmark} whole {w} streamed {s} pixels equal "
                      f"{np.array_equal(whole_pixels, stream_pixels)} files equal {whole_file == stream_file}",
                      flush=True)
        if args.compile:
            vae.decoder.forward = torch.compile(vae.decoder.forward, dynamic=False)
            started = time.perf_counter()
            _, first_pixels, _ = whole(vae, latents)
            print(f"compiled: first decode (the compile) {time.perf_counter() - started:.1f} s", flush=True)
            for _ in range(2):
                w, pixels, _ = whole(vae, latents)
                s, _, _ = streamed(vae, latents)
                diff = np.abs(pixels.astype(np.int16) - whole_pixels.astype(np.int16))
                print(f"compiled whole {w} streamed {s} pixels max abs diff {int(diff.max())} "
                      f"mean {float(diff.mean()):.4f} (of 255)", flush=True)


if __name__ == "__main__":
    main()
