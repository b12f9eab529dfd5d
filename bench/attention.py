"""Which attention kernel is the fastest exact one at each served shape, and is it the platform's default?

For every attention call shape the served models make (Wan2.1 self- and cross-attention at 480p and 720p, 81
frames; FLUX.1's joint attention at 1024² and 512²), times each kernel `--attention-backend` offers on this device
(PyTorch's SDPA kernels, and FlashAttention / xFormers / SageAttention when installed), as diffmesh calls them
(`AttentionChoice` inside its scope, entered once as the denoiser does per step; the wrapper's call cost is in
the numbers), and measures each one's error against
float32 math attention on a slice of the output (2 heads, the first 2,048 queries, against every key). Then a
whole Wan2.1-1.3B-shaped transformer forward (random bf16 weights, diffmesh's own self-attention processor)
under each SDPA kernel, so the choice is checked where it matters. Writes bench/results/attention-<device>-<date>.json.

    python bench/attention.py --device cuda
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import pathlib
import platform as host_platform
import statistics
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import diffusers  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from services.common.attention import EXTERNAL_KERNELS, FLASH_IMPLS, SDPA_KERNELS, resolve_attention  # noqa: E402
from services.common.platform import set_platform  # noqa: E402

# name -> (query tokens, key tokens, heads, head dim)
SHAPES = {
    "wan-480p-81f-self": (32760, 32760, 12, 128),      # 21 x 30 x 52 latent tokens
    "wan-480p-81f-cross": (32760, 512, 12, 128),       # against the 512 text tokens
    "wan-720p-81f-self": (75600, 75600, 12, 128),      # 21 x 45 x 80
    "flux-1024-joint": (4608, 4608, 24, 128),          # 4096 image + 512 text tokens
    "flux-512-joint": (1536, 1536, 24, 128),
}
# Exact kernels differ only by rounding; a kernel whose error is far above bf16's (e.g. a quantised one) is lossy.
EXACT_TOLERANCE = 2e-2
REFERENCE_QUERIES, REFERENCE_HEADS = 2048, 2


def timed(fn, warmup: int, iters: int) -> float:
    """Median milliseconds of `fn` over `iters` runs, timed with device events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def candidates(platform) -> list[str]:
    names = ["native", *(name for name in SDPA_KERNELS if name not in ("math", "overrideable"))]
    for name in (*EXTERNAL_KERNELS, *FLASH_IMPLS):
        try:
            resolve_attention(platform, name)
            names.append(name)
        except ValueError:
            pass            # not installed here
    return names


def bench_shape(platform, name: str, shape: tuple[int, int, int, int], device, iters: int) -> dict:
    queries, keys, heads, dim = shape
    generator = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(1, heads, queries, dim, device=device, dtype=torch.bfloat16, generator=generator)
    k = torch.randn(1, heads, keys, dim, device=device, dtype=torch.bfloat16, generator=generator)
    v = torch.randn(1, heads, keys, dim, device=device, dtype=torch.bfloat16, generator=generator)
    rows = slice(0, min(REFERENCE_QUERIES, queries))
    with sdpa_kernel(SDPBackend.MATH):
        reference = F.scaled_dot_product_attention(*(x[:, :REFERENCE_HEADS].float() for x in (q[:, :, rows], k, v)))
    flops = 4 * heads * queries * keys * dim
    results = {}
    for backend in candidates(platform):
        choice = resolve_attention(platform, backend)
        try:
            # One scope around many calls, as the denoiser enters it once per step around all its layers.
            with choice.scope():
                out = choice(q, k, v)
                ms = timed(functools.partial(choice, q, k, v), warmup=3, iters=iters)
        except (RuntimeError, ValueError) as error:     # e.g. no kernel for this shape, or a package's glue fails
            results[backend] = {"error": str(error).splitlines()[0][:200]}
            continue
        err = float((out[:, :REFERENCE_HEADS, rows].float() - reference).abs().max())
        results[backend] = {"ms": round(ms, 3), "tflops": round(flops / ms / 1e9, 1), "max_abs_error": err,
                            "exact": err <= EXACT_TOLERANCE and not choice.lossy}
        print(f"{name:22s} {backend:14s} {ms:8.3f} ms  {flops / ms / 1e9:6.1f} TFLOP/s  err {err:.2e}", flush=True)
    del q, k, v, reference
    torch.cuda.empty_cache()
    return results


def wan_1_3b_at_480p(device) -> tuple[torch.nn.Module, dict]:
    """A Wan2.1-1.3B-shaped transformer (random bf16 weights, diffmesh's own self-attention processor, as the
    denoiser runs it) and the keyword arguments of one forward at 480x832x81 (shared with bench/compile.py)."""
    from diffusers import WanTransformer3DModel

    from services.families.wan_attention import install_self_attention

    torch.manual_seed(0)
    with torch.device(device):
        model = WanTransformer3DModel(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960,
                                      num_layers=30).to(torch.bfloat16).eval()
    install_self_attention(model)
    inputs = {"hidden_states": torch.randn(1, 16, 21, 60, 104, device=device, dtype=torch.bfloat16),
              "timestep": torch.tensor([500.0], device=device),
              "encoder_hidden_states": torch.randn(1, 512, 4096, device=device, dtype=torch.bfloat16)}
    return model, inputs


def bench_forward(platform, device, iters: int) -> dict:
    """One Wan2.1-1.3B-shaped transformer forward at 480x832x81 under each SDPA kernel."""
    model, inputs = wan_1_3b_at_480p(device)
    results = {}
    with torch.inference_mode():
        # PyTorch's SDPA kernels, and any installed replacement of its flash kernel (SDPA calls take it too).
        for backend in ["native", *(name for name in SDPA_KERNELS if name not in ("math", "overrideable")),
                        *(name for name in candidates(platform) if name in FLASH_IMPLS)]:
            choice = resolve_attention(platform, backend)

            def run():
                with choice.scope():
                    return model(**inputs, return_dict=False)[0]

            try:
                ms = timed(run, warmup=2, iters=iters)
            except (RuntimeError, ValueError) as error:
                results[backend] = {"error": str(error).splitlines()[0][:200]}
                continue
            results[backend] = {"ms": round(ms, 2)}
            print(f"wan-1.3b forward 480p  {backend:14s} {ms:8.2f} ms", flush=True)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    platform = set_platform(args.device)
    device = platform.device(0)
    default = resolve_attention(platform).name
    shapes = {name: bench_shape(platform, name, shape, device, args.iters) for name, shape in SHAPES.items()}
    verdict = {}
    for name, results in shapes.items():
        exact = {backend: r["ms"] for backend, r in results.items() if r.get("exact")}
        fastest = min(exact, key=exact.get)
        # Within 2 % counts as a tie: run-to-run noise on these kernels is about that.
        verdict[name] = {"fastest_exact": fastest, "default": default,
                         "default_ms": results.get(default, {}).get("ms"), "fastest_ms": exact[fastest],
                         "default_is_fastest": default in exact and exact[default] <= 1.02 * exact[fastest]}
    forward = bench_forward(platform, device, max(3, args.iters // 2))
    report = {
        "benchmark": "attention kernels at served shapes",
        "date": datetime.date.today().isoformat(),
        "device": platform.device_name(0),
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                     "cudnn": torch.backends.cudnn.version(), "python": host_platform.python_version()},
        "platform_default": default,
        "shapes": {name: {"q_k_heads_dim": SHAPES[name], "kernels": results} for name, results in shapes.items()},
        "verdict": verdict,
        "wan_1_3b_forward_480p_81f": forward,
        "notes": "random bf16 inputs; error against float32 math attention on 2 heads x the first 2048 queries; "
                 "times are medians of device-event timings, including diffmesh's dispatch wrapper",
    }
    out = pathlib.Path(args.out or ROOT / "bench" / "results" /
                       f"attention-{platform.kind}-{report['date']}.json")
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(verdict, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
