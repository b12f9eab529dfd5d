"""Where one denoise step's time goes: the denoiser engine's own step (its loaded transformer, kernels and
attention choice) on a model directory, eager and with `--compile`'s blocks, under torch.profiler; prints the step
time and the kernels by total device time, grouped (GEMM, attention, elementwise/norm, copies, other).

Answers one question ("what is left to fuse?"); the figures go to docs/perf-log.md, not the README.

    python bench/diagnostics/forward_profile.py --model /tmp/flux --size 1024x1024
    python bench/diagnostics/forward_profile.py --model /tmp/wan13 --size 832x480 --frames 81 --guidance 5
"""

from __future__ import annotations

import argparse
import concurrent.futures
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from services.common.models import resolve_model_dir  # noqa: E402
from services.common.platform import set_platform  # noqa: E402
from services.denoiser.compile import CompileOptions  # noqa: E402
from services.denoiser.engine import DenoiserEngine  # noqa: E402
from services.families.base import Sampling  # noqa: E402

# Attention first: FlashAttention's kernels carry "cutlass" in their names too.
GROUPS = (("attention", ("flash", "fmha", "attention", "cudnn", "sdpa")),
          ("gemm", ("gemm", "sm90_xmma", "cutlass", "cublas", "nvjet", "matmul")),
          ("copy", ("copy", "memcpy", "memset", "cat")),
          ("elementwise/norm (triton: fused)", ("triton",)),
          ("elementwise/norm (eager)", ("elementwise", "reduce", "norm", "vectorized", "unrolled", "softmax")))


def group_of(name: str) -> str:
    lowered = name.lower()
    for group, keys in GROUPS:
        if any(key in lowered for key in keys):
            return group
    return "other"


def time_of(event) -> float:
    return event.device_time_total or event.self_cpu_time_total


def profile_step(engine: DenoiserEngine, params: Sampling, steps: int, in_thread: bool = False) -> None:
    """Time and profile one guided step; `in_thread`: on a worker thread, as the server's gRPC handlers run it."""
    if in_thread:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            return pool.submit(profile_step, engine, params, steps).result()
    tensors = engine.denoising.warmup_conditioning(params, engine.limits.max_sequence_length)
    run = engine.denoising.start(params, tensors, engine.device)
    call = run.step_call(run.latents, run.timesteps[0], 0)

    def step() -> torch.Tensor:
        with engine.attention.scope():
            return engine.predict_noise(call)

    with torch.inference_mode():
        for _ in range(2):
            step()
        engine.platform.synchronize()
        started = time.perf_counter()
        for _ in range(steps):
            step()
        engine.platform.synchronize()
        print(f"  one guided step: {(time.perf_counter() - started) / steps * 1000:.1f} ms")
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA if engine.device.type == "cuda"
                                                else torch.profiler.ProfilerActivity.CPU]) as prof:
            step()
            engine.platform.synchronize()
    kernels = [e for e in prof.key_averages() if time_of(e) > 0]
    total = sum(time_of(e) for e in kernels)
    by_group: dict[str, float] = {}
    for e in kernels:
        by_group[group_of(e.key)] = by_group.get(group_of(e.key), 0.0) + time_of(e)
    print(f"  device time {total / 1000:.1f} ms: " + ", ".join(
        f"{g} {t / 1000:.1f} ms ({t / total:.0%})" for g, t in sorted(by_group.items(), key=lambda kv: -kv[1])))
    for e in sorted(kernels, key=lambda e: -time_of(e))[:12]:
        print(f"    {time_of(e) / 1000:8.1f} ms  x{e.count:<5d} {group_of(e.key):<12} {e.key[:110]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--size", default="1024x1024")
    parser.add_argument("--frames", type=int, default=1)
    parser.add_argument("--guidance", type=float, default=3.5)
    parser.add_argument("--steps", type=int, default=5, help="steps timed (after two warm-up steps)")
    parser.add_argument("--modes", default="eager,compiled")
    parser.add_argument("--served", action="store_true",
                        help="as the denoiser serves: compiled blocks warmed up at start-up (--warmup-sizes), the "
                        "steps on a worker thread")
    parser.add_argument("--device", default="cuda", help="cuda; cpu only to smoke-test the script")
    args = parser.parse_args()
    platform = set_platform(args.device)
    width, height = (int(v) for v in args.size.lower().split("x"))
    params = Sampling("profile", width, height, args.frames, 50, args.guidance, 0)
    for mode in args.modes.split(","):
        warmup = ((width, height, args.frames),) if args.served and mode == "compiled" else ()
        compile = CompileOptions(warmup_sizes=warmup) if mode == "compiled" else None
        engine = DenoiserEngine(resolve_model_dir(args.model), platform, compile=compile)
        served = ", as served" if args.served else ""
        print(f"{pathlib.Path(args.model).name} {args.size}x{args.frames}, {mode}{served}, "
              f"attention {engine.attention.name}:")
        profile_step(engine, params, args.steps, in_thread=args.served)
        del engine
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
