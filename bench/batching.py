"""Request batching in the denoiser (services/denoiser/batching.py): N requests run as one batch against the same N
one after another, through the denoiser engine as `diffmesh serve denoiser --max-batch N` runs them.

- FLUX.1 512x512, 28 steps, guidance 3.5 (embedded), at FLUX.1-dev's shapes (bench/family_shapes.py, random
  bf16 weights): 8 requests, each its own seed and prompt tensors. The issue's target: batched >= 2x faster than
  one after another.
- Wan2.1-1.3B 480x832x81 (bench/wan_shapes_model.py, random bf16 weights), guidance 5 (two branches): 2 videos
  batched against alone, fewer steps than a real run (--wan-steps, default 10: the time per step is what batching
  changes). The target: no slower than alone.

Before timing, each batched output is compared with its solo run on the same seed: the largest absolute difference
and relative L2 are reported (on CPU they are 0, tests/unit/test_batching.py; on a GPU GEMM kernels are chosen by
shape, so a batch is within rounding of solo, not bit-equal). Writes bench/results/batching-<device>-<date>.json
with device, versions and date.

With `--compile[=MODE]` the engine compiles its blocks as `--compile` does (inductor; $DIFFMESH_COMPILE_BACKEND
overrides it, e.g. eager on CPU); the warm-up compiles both batch sizes before timing, and the result file's name
ends in -compiled. `--quantize fp8` runs both with the block linears in float8 (lossy; the difference to solo is then
between two float8 runs), then the same requests one after another without it, in the same run: the speed-up over
that and the float8 outputs' difference from those bf16 ones are reported too.

    python3 bench/batching.py --device cuda [--compile] [--cases flux]
    python3 bench/batching.py --device cpu --tiny      # a check that it runs: the tiny test models, few steps
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform as host_platform
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from services.common.models import resolve_model_dir  # noqa: E402
from services.common.platform import PLATFORMS  # noqa: E402
from services.denoiser.batching import BatchOptions, Member, denoise_together  # noqa: E402
from services.denoiser.compile import COMPILE_BACKEND_ENV, CompileOptions  # noqa: E402
from services.denoiser.engine import DenoiserEngine  # noqa: E402
from services.denoiser.quantize import METHODS, QuantizeOptions  # noqa: E402
from services.families.base import Sampling  # noqa: E402


def conditioning(engine: DenoiserEngine, params: Sampling, seed: int, length: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    shapes = engine.denoising.warmup_conditioning(params, length)
    return {name: torch.randn(t.shape, generator=generator) for name, t in shapes.items()}


def synchronize(engine: DenoiserEngine) -> None:
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)


def shortened(members: list[Member]) -> list[Member]:
    """The same members on a 2-step run: a warm-up (kernels, compiles, allocator)."""
    return [Member(Sampling(m.params.request_id, m.params.width, m.params.height, m.params.num_frames, 2,
                            m.params.guidance_scale, m.params.seed), m.tensors) for m in members]


def one_after_another(engine: DenoiserEngine, members: list[Member]) -> tuple[float, list[torch.Tensor]]:
    synchronize(engine)
    started = time.perf_counter()
    outputs = [engine.denoise(m.params, m.tensors) for m in members]
    synchronize(engine)
    return time.perf_counter() - started, outputs


def case(engine: DenoiserEngine, params: list[Sampling], length: int) -> tuple[dict, list[Member]]:
    members = [Member(p, conditioning(engine, p, 1000 + p.seed, length)) for p in params]
    short = shortened(members)
    denoise_together(engine, short)
    engine.denoise(short[0].params, short[0].tensors)
    sequential_s, solo = one_after_another(engine, members)
    started = time.perf_counter()
    denoise_together(engine, members)
    synchronize(engine)
    batched_s = time.perf_counter() - started
    errors = [m.error for m in members if m.error is not None]
    if errors:
        raise RuntimeError(f"a batched member failed: {errors[0]}")
    diffs = [(m.result - s).abs().max().item() for m, s in zip(members, solo, strict=True)]
    rel = [float((m.result - s).norm() / s.norm()) for m, s in zip(members, solo, strict=True)]
    p = params[0]
    return {"requests": len(params), "width": p.width, "height": p.height, "frames": p.num_frames,
            "steps": p.num_inference_steps, "guidance_scale": p.guidance_scale,
            "one_after_another_s": round(sequential_s, 3), "batched_s": round(batched_s, 3),
            "speedup": round(sequential_s / batched_s, 3),
            "bit_equal_to_solo": all(torch.equal(m.result, s) for m, s in zip(members, solo, strict=True)),
            "max_abs_diff_to_solo": max(diffs), "max_relative_l2_to_solo": max(rel)}, members


def unquantized_reference(engine: DenoiserEngine, members: list[Member], batched_s: float) -> dict:
    """The same requests one after another without --quantize (the mesh without the feature), in the same run:
    what a batch of float8 requests is faster than, and how far its outputs are from the bf16 ones (lossy)."""
    engine.denoise(shortened(members)[0].params, members[0].tensors)
    seconds, outputs = one_after_another(engine, members)
    diffs = [(m.result.float() - out.float()) for m, out in zip(members, outputs, strict=True)]
    return {"unquantized_one_after_another_s": round(seconds, 3),
            "speedup_over_unquantized_solo": round(seconds / batched_s, 3),
            "max_abs_diff_to_unquantized_solo": max(float(d.abs().max()) for d in diffs),
            "max_relative_l2_to_unquantized_solo": max(float(d.norm() / out.float().norm())
                                                       for d, out in zip(diffs, outputs, strict=True))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="the tiny test models (a check that the script runs)")
    parser.add_argument("--flux-requests", type=int, default=8)
    parser.add_argument("--flux-steps", type=int, default=28)
    parser.add_argument("--wan-videos", type=int, default=2)
    parser.add_argument("--wan-steps", type=int, default=10)
    parser.add_argument("--models", default=None, help="where to write the model directories (default: a temp dir)")
    parser.add_argument("--compile", nargs="?", const="default", default=None, metavar="MODE",
                        help="compile the blocks, as the denoiser's --compile (default: off)")
    parser.add_argument("--quantize", choices=METHODS, default=None,
                        help="the block linears as float8, as the denoiser's --quantize (lossy; default: off)")
    parser.add_argument("--cases", default="flux,wan", help="which cases to run, comma-separated (default: both)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    chosen = set(args.cases.split(","))
    if not chosen <= {"flux", "wan"}:
        parser.error(f"--cases: pick from flux, wan (got {args.cases!r})")
    platform = PLATFORMS[args.device]
    work = pathlib.Path(args.models or tempfile.mkdtemp(prefix="batching-bench-"))
    if args.tiny:
        from services.common.tiny.flux import write_tiny_flux
        from services.common.tiny_model import write_tiny_model

        flux_dir, wan_dir = write_tiny_flux(work / "flux"), write_tiny_model(work / "wan")
        flux_size, wan_size, length = (64, 64, 1), (48, 32, 5), 16
    else:
        from bench.family_shapes import write_flux_dev
        from bench.wan_shapes_model import write as write_wan

        flux_dir, wan_dir = work / "flux-dev", work / "wan-1.3b"
        if "flux" in chosen and not flux_dir.exists():
            write_flux_dev(flux_dir, args.device)
        if "wan" in chosen and not wan_dir.exists():
            write_wan(wan_dir, args.device)
        flux_size, wan_size, length = (512, 512, 1), (832, 480, 81), 512
    compile = None if args.compile is None else CompileOptions(
        mode=None if args.compile == "default" else args.compile,
        backend=os.environ.get(COMPILE_BACKEND_ENV, "inductor"))
    report: dict = {"benchmark": "batching", "device": platform.describe() if hasattr(platform, "describe") else
                    args.device, "tiny": args.tiny, "date": datetime.date.today().isoformat(),
                    "compile": None if compile is None else {"mode": compile.mode, "backend": compile.backend},
                    "quantize": args.quantize,
                    "versions": {"torch": torch.__version__, "python": host_platform.python_version()}}
    if args.device == "cuda":
        report["device"] = torch.cuda.get_device_name()
    import diffusers

    report["versions"]["diffusers"] = diffusers.__version__
    cases = {}
    for name, model_dir, size, count, steps, guidance in (
            ("flux", flux_dir, flux_size, args.flux_requests, args.flux_steps, 3.5),
            ("wan", wan_dir, wan_size, args.wan_videos, args.wan_steps, 5.0)):
        if name not in chosen:
            continue
        engine = DenoiserEngine(resolve_model_dir(model_dir), platform, batching=BatchOptions(max_batch=count),
                                compile=compile, quantize=QuantizeOptions(args.quantize) if args.quantize else None)
        params = [Sampling(f"{name}-{i}", *size, steps, guidance, i) for i in range(count)]
        cases[name], members = case(engine, params, length)
        print(name, json.dumps(cases[name]), flush=True)
        del engine
        if args.device == "cuda":
            torch.cuda.empty_cache()
        if args.quantize:
            engine = DenoiserEngine(resolve_model_dir(model_dir), platform, compile=compile)
            cases[name].update(unquantized_reference(engine, members, cases[name]["batched_s"]))
            print(name, "unquantized", json.dumps(cases[name]), flush=True)
            del engine
            if args.device == "cuda":
                torch.cuda.empty_cache()
    report["cases"] = cases
    report["targets"] = {"flux_speedup_at_least": 2.0, "wan_speedup_at_least": 1.0,
                         **{f"{name}_met": cases[name]["speedup"] >= floor
                            for name, floor in (("flux", 2.0), ("wan", 1.0)) if name in cases},
                         # Quantized: also against the faster of the two solo baselines, bf16's where it is faster.
                         **{f"{name}_met_over_unquantized_solo": cases[name]["speedup_over_unquantized_solo"] >= floor
                            for name, floor in (("flux", 2.0), ("wan", 1.0))
                            if "speedup_over_unquantized_solo" in cases.get(name, {})}}
    suffix = ("-compiled" if compile else "") + (f"-{args.quantize}" if args.quantize else "") + (
        "" if chosen == {"flux", "wan"} else "-" + "-".join(sorted(chosen))) + ("-tiny" if args.tiny else "")
    out = pathlib.Path(args.out or ROOT / "bench" / "results" / f"batching-{args.device}{suffix}-{report['date']}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
