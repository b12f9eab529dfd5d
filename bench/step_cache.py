"""Step caching: the denoise loop uncached vs each method (services/denoiser/cache.py) at a documented setting.

Shapes: Wan2.1-1.3B at 480x832x81 (CFG: cond + uncond per step, guidance 5) and FLUX.1-dev at 1024x1024
(guidance-embedded: one forward per step), random bf16 weights, 50 steps by default. The loop is the denoiser's own
parts: the same noise predictor (predict.py, with its per-branch cache contexts) and `StepCacheRun`, a flow-match
Euler scheduler; the conditioning is random. Reports per method: the loop's time, the speed-up over uncached, the
transformer forwards skipped, and the final latents' difference from uncached on the same seed (max abs, PSNR).

What random weights show: the cost of each method's bookkeeping and the speed-up for the number of forwards it skips.
What they do not show: how many steps a trained checkpoint would skip at a threshold (first_block and magcache
decide from the model's residuals, which random weights do not resemble), nor image quality; the difference from
uncached here is a sanity check, not a quality figure. taylorseer skips by schedule, so its skip count is the same
as with trained weights.

With `--compile[=MODE]` the blocks are compiled as the denoiser's `--compile` compiles them (inductor;
$DIFFMESH_COMPILE_BACKEND overrides it, e.g. eager on CPU), uncached and every method timed compiled, each after a
two-step warm-up run of its own (TaylorSeer's compiles its own graphs, services/denoiser/compile.py); the result
file's name ends in -compiled.

    python3 bench/step_cache.py --device cuda            # results to bench/results/step-cache-<device>-<date>.json
    python3 bench/step_cache.py --device cuda --compile  # the same with compiled blocks
    python3 bench/step_cache.py --device cpu --small     # a smoke run of the script on CPU (tiny shapes)
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from services.denoiser.cache import StepCache, StepCacheRun  # noqa: E402
from services.denoiser.compile import COMPILE_BACKEND_ENV, CompileOptions, compile_blocks  # noqa: E402
from services.denoiser.predict import predict_on_one_device  # noqa: E402
from services.families.base import StepCall  # noqa: E402

# The documented settings: each method's commonly published setting (ParaAttention's FBC 0.08 for FLUX / Wan,
# TaylorSeer's interval 5 after 3 full steps; MagCache's FLUX ratios at 0.06).
METHODS = {
    "wan": [StepCache("first_block", threshold=0.08), StepCache("taylorseer", interval=5, warmup_steps=3)],
    "flux": [StepCache("first_block", threshold=0.08), StepCache("taylorseer", interval=5, warmup_steps=3),
             StepCache("magcache", threshold=0.06)],
}


def wan_model(device, small: bool):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    layers, heads, ffn = (2, 2, 64) if small else (30, 12, 8960)
    with torch.device(device):
        model = WanTransformer3DModel(num_attention_heads=heads, attention_head_dim=128 if not small else 16,
                                      ffn_dim=ffn, num_layers=layers, text_dim=4096 if not small else 32,
                                      freq_dim=256 if not small else 16).to(torch.bfloat16).eval()
    shape = (1, 16, 3, 8, 8) if small else (1, 16, 21, 60, 104)
    g = torch.Generator(device="cpu").manual_seed(1)
    text = 32 if small else 4096
    cond = torch.randn(1, 512, text, generator=g).to(device, torch.bfloat16)
    uncond = torch.randn(1, 512, text, generator=g).to(device, torch.bfloat16)

    def call(latents, t):
        inputs = {"hidden_states": latents.to(torch.bfloat16), "timestep": t.expand(1)}
        return StepCall(model, dict(inputs, encoder_hidden_states=cond), dict(inputs, encoder_hidden_states=uncond),
                        5.0, frozenset())
    return model, shape, call


def flux_model(device, small: bool):
    from diffusers import FluxTransformer2DModel
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

    torch.manual_seed(0)
    config = dict(num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
                  joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6)) if small else {}
    with torch.device(device):
        model = FluxTransformer2DModel(guidance_embeds=True, **config).to(torch.bfloat16).eval()
    side = 8 if small else 64           # latent side / 2 (1024 px / 8 / 2)
    g = torch.Generator(device="cpu").manual_seed(1)
    text, pooled = (32, 32) if small else (4096, 768)
    prompt = torch.randn(1, 512, text, generator=g).to(device, torch.bfloat16)
    pooled_embeds = torch.randn(1, pooled, generator=g).to(device, torch.bfloat16)
    image_ids = FluxPipeline._prepare_latent_image_ids(1, side, side, device, torch.bfloat16)
    text_ids = torch.zeros(512, 3, device=device, dtype=torch.bfloat16)
    guidance = torch.full([1], 3.5, device=device)

    def call(latents, t):
        return StepCall(model, dict(hidden_states=latents.to(torch.bfloat16), timestep=(t / 1000).expand(1),
                                    pooled_projections=pooled_embeds, encoder_hidden_states=prompt, txt_ids=text_ids,
                                    img_ids=image_ids, guidance=guidance), None, 1.0, frozenset())
    return model, (1, side * side, 64), call


def denoise(call, shape, steps: int, device) -> torch.Tensor:
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(steps, device=device)
    latents = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(7)).to(device)
    for t in scheduler.timesteps:
        noise = predict_on_one_device(call(latents, t))
        latents = scheduler.step(noise.float(), t, latents, return_dict=False)[0]
    return latents


def timed(fn, device) -> tuple[float, torch.Tensor]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started, out.float().cpu()


def difference(a: torch.Tensor, b: torch.Tensor) -> dict:
    mse = (a - b).pow(2).mean().item()
    peak = b.abs().max().item()
    return {"max_abs": (a - b).abs().max().item(),
            "psnr_db": None if mse == 0 else round(10 * math.log10(peak ** 2 / mse), 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--families", default="wan,flux")
    parser.add_argument("--small", action="store_true", help="tiny shapes: a smoke run of the script")
    parser.add_argument("--compile", nargs="?", const="default", default=None, metavar="MODE",
                        help="compile the blocks, as the denoiser's --compile (default: off)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    import diffusers

    report = {"date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name(device)
              if device.type == "cuda" else "cpu", "torch": torch.__version__, "diffusers": diffusers.__version__,
              "steps": args.steps, "small": args.small, "weights": "random bf16", "families": {}}
    compile = None if args.compile is None else CompileOptions(
        mode=None if args.compile == "default" else args.compile,
        backend=os.environ.get(COMPILE_BACKEND_ENV, "inductor"))
    report["compile"] = None if compile is None else {"mode": compile.mode, "backend": compile.backend}
    builders = {"wan": wan_model, "flux": flux_model}
    with torch.inference_mode():
        for family in args.families.split(","):
            model, shape, call = builders[family](device, args.small)
            if compile is not None:
                compile_blocks(model, compile)
            denoise(call, shape, 2, device)                                   # warm-up (kernels, allocator)
            seconds, uncached = timed(lambda: denoise(call, shape, args.steps, device), device)
            rows = {"uncached": {"s": round(seconds, 3)}}
            print(f"{family:5s} uncached {seconds:8.2f} s", flush=True)
            for cache in METHODS[family]:
                if compile is not None:
                    with StepCacheRun(cache, [model], family, 2):             # taylorseer's graphs compile here
                        denoise(call, shape, 2, device)
                run = StepCacheRun(cache, [model], family, args.steps)
                with run:
                    seconds_cached, cached = timed(lambda: denoise(call, shape, args.steps, device), device)
                rows[cache.describe()] = {"s": round(seconds_cached, 3), "speedup": round(seconds / seconds_cached, 2),
                                          "skipped_forwards": run.skipped, "forwards": run.forwards,
                                          **difference(cached, uncached)}
                print(f"{family:5s} {cache.describe():40s} {seconds_cached:8.2f} s  x{seconds / seconds_cached:.2f}  "
                      f"skipped {run.skipped}/{run.forwards}  {difference(cached, uncached)}", flush=True)
            report["families"][family] = rows
            del model
    compiled = "-compiled" if compile else ""
    name = f"step-cache-{report['device'].replace(' ', '-')}{compiled}-{report['date']}.json"
    out = pathlib.Path(args.out) if args.out else ROOT / "bench" / "results" / name
    if not args.small or args.out:
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
