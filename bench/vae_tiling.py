"""Tiled against untiled VAE decode at real video shapes: time, peak device memory, and the frames' difference.

Wan2.1's VAE (its default config, random bf16 weights: real weights cannot be downloaded here) decodes latents of
81 frames at 480x832 and 720x1280 through diffmesh's decoder engine with `--vae-tiling off` and `on` (diffusers'
tiled decode, its default 256-px tiles at stride 192). Random weights make the seams' difference meaningless for
image quality: it is reported, not judged. Writes bench/results/vae-tiling-<device>-<date>.json.

    python bench/vae_tiling.py --device cuda
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import diffusers  # noqa: E402
import torch  # noqa: E402
from diffusers import AutoencoderKLWan  # noqa: E402

from services.common.platform import set_platform  # noqa: E402

SHAPES = {"480x832x81": (480, 832, 81), "720x1280x81": (720, 1280, 81)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    platform = set_platform(args.device)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        # A model directory with only what the decoder reads: the VAE and a WanPipeline index.
        AutoencoderKLWan().to(torch.bfloat16).save_pretrained(f"{tmp}/vae")
        pathlib.Path(f"{tmp}/model_index.json").write_text(json.dumps(
            {"_class_name": "WanPipeline", "vae": ["diffusers", "AutoencoderKLWan"]}))
        # The family's limits read the transformer's patch and rotary sizes: Wan2.1's defaults, no weights.
        pathlib.Path(f"{tmp}/transformer").mkdir()
        pathlib.Path(f"{tmp}/transformer/config.json").write_text(json.dumps(
            {"_class_name": "WanTransformer3DModel", "patch_size": [1, 2, 2], "rope_max_seq_len": 1024}))
        from services.common.models import resolve_model_dir
        from services.decoder.engine import DecodeParams, DecoderEngine
        from services.decoder.tiling import VaeTiling

        model = resolve_model_dir(tmp)
        engines = {mode: DecoderEngine(model, platform, torch.bfloat16, tiling=VaeTiling(mode))
                   for mode in ("off", "on")}
        results = {}
        for name, (height, width, frames) in SHAPES.items():
            latents = torch.randn(1, 16, (frames - 1) // 4 + 1, height // 8, width // 8,
                                  generator=torch.Generator().manual_seed(1))
            outputs = {}
            for mode, engine in engines.items():
                engine.decode(DecodeParams("warmup", format="none"), latents[:, :, :2])
                platform.synchronize()
                platform.reset_peak_memory()
                base = platform.memory_allocated()
                started = time.perf_counter()
                decoded = engine.decode(DecodeParams(name, format="none", return_frames=True), latents)
                platform.synchronize()
                seconds = time.perf_counter() - started
                outputs[mode] = torch.from_numpy(decoded.frames)
                results.setdefault(name, {})[mode] = {
                    "seconds": round(seconds, 3),
                    "peak_gib_above_weights": round((platform.max_memory_allocated() - base) / 2**30, 2)}
                print(f"{name} tiling={mode}: {seconds:.2f} s, peak "
                      f"{results[name][mode]['peak_gib_above_weights']} GiB", flush=True)
                platform.empty_cache()
            diff = (outputs["on"] - outputs["off"]).abs()
            results[name]["max_abs_difference"] = float(diff.max())
            results[name]["mean_abs_difference"] = float(diff.mean())
    report = {
        "benchmark": "Wan VAE decode, tiled vs untiled (diffmesh decoder engine)",
        "date": datetime.date.today().isoformat(), "device": platform.device_name(0),
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
        "results": results,
        "notes": "random bf16 weights at Wan2.1's VAE config; frames in 0..1; difference says nothing of quality",
    }
    out = pathlib.Path(args.out or ROOT / "bench" / "results" / f"vae-tiling-{platform.kind}-{report['date']}.json")
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
