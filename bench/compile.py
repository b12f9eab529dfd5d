"""Compiled blocks (`--compile`) against eager: compile time, forward time, and the outputs' difference.

A Wan2.1-1.3B-shaped transformer (random bf16 weights, diffmesh's own attention processor, as the denoiser runs
it) forwards 480x832x81 latents eagerly, then with its 30 blocks regionally compiled by `compile_blocks`
(inductor, default mode). Reports the first compiled call (the compile), the steady forward time of each, and the
compiled output's difference from eager's in bf16. Writes bench/results/compile-<device>-<date>.json.

With `--quantize fp8` a second copy of the same transformer (the same seed: the same weights) has its block linears
quantized as the denoiser's `--quantize fp8` does (services/denoiser/quantize.py) and is compiled the same way: its
forward time and its output's difference from the bf16 eager output are reported too (random weights: the
difference says how far float8 rounding moves this forward, not how an image from trained weights looks). With
`--compile-tuning` both compile as the denoiser's `--compile-tuning` does (the file name ends in -tuned).

    python bench/compile.py --device cuda [--attention-backend NAME] [--quantize fp8] [--compile-tuning]
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import diffusers  # noqa: E402
import torch  # noqa: E402

from bench.attention import timed, wan_1_3b_at_480p  # noqa: E402
from services.common.attention import set_attention  # noqa: E402
from services.common.platform import set_platform  # noqa: E402
from services.denoiser.compile import CompileOptions, compile_blocks  # noqa: E402
from services.denoiser.quantize import METHODS, QuantizeOptions, quantize_blocks  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--mode", default=None, help="torch.compile mode (default: its default)")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--attention-backend", default=None,
                        help="as the denoiser's flag (default: the platform's choice)")
    parser.add_argument("--quantize", choices=METHODS, default=None,
                        help="also time a quantized, compiled copy (as the denoiser's flag)")
    parser.add_argument("--compile-tuning", action="store_true",
                        help="compile as the denoiser's --compile-tuning does (coordinate-descent tuning)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    platform = set_platform(args.device)
    device = platform.device(0)
    attention = set_attention(platform, args.attention_backend)
    model, inputs = wan_1_3b_at_480p(device)

    def forward() -> torch.Tensor:
        with attention.scope():
            return model(**inputs, return_dict=False)[0]

    with torch.inference_mode():
        eager_out = forward()
        eager_ms = timed(forward, warmup=1, iters=args.iters)
        options = CompileOptions(mode=args.mode, tuning=args.compile_tuning)
        compile_blocks(model, options)
        started = time.perf_counter()
        compiled_out = forward()
        platform.synchronize()
        compile_s = time.perf_counter() - started
        compiled_ms = timed(forward, warmup=1, iters=args.iters)
    diff = (compiled_out.float() - eager_out.float())
    quantized = {}
    if args.quantize:
        del model
        platform.empty_cache()
        model, inputs = wan_1_3b_at_480p(device)
        quantize_blocks(model, platform, device, QuantizeOptions(args.quantize), compiled=True)
        compile_blocks(model, options)
        with torch.inference_mode():
            started = time.perf_counter()
            quantized_out = forward()
            platform.synchronize()
            quantized_compile_s = time.perf_counter() - started
            quantized_ms = timed(forward, warmup=1, iters=args.iters)
        error = quantized_out.float() - eager_out.float()
        quantized = {"quantize": args.quantize, "quantized_compiled_forward_ms": round(quantized_ms, 2),
                     "quantized_first_compiled_call_s": round(quantized_compile_s, 1),
                     "quantized_max_abs_difference": float(error.abs().max()),
                     "quantized_relative_l2_difference": float(error.norm() / eager_out.float().norm())}
    report = {
        "benchmark": "regionally compiled Wan2.1-1.3B transformer vs eager, one forward at 480x832x81",
        "date": datetime.date.today().isoformat(), "device": platform.device_name(0),
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
        "mode": args.mode or "default", "compile_tuning": args.compile_tuning, "attention_backend": attention.name,
        "eager_forward_ms": round(eager_ms, 2), "compiled_forward_ms": round(compiled_ms, 2),
        "speedup": round(eager_ms / compiled_ms, 3), "first_compiled_call_s": round(compile_s, 1),
        "max_abs_difference": float(diff.abs().max()),
        "relative_l2_difference": float(diff.norm() / eager_out.float().norm()),
        **quantized,
        "notes": "random bf16 weights; attention as --attention-backend (or the platform default) picks it; "
                 "difference of bf16 outputs",
    }
    label = ("" if args.attention_backend is None else f"-{attention.name}") + (
        f"-{args.quantize}" if args.quantize else "") + ("-tuned" if args.compile_tuning else "")
    out = pathlib.Path(args.out or ROOT / "bench" / "results" / f"compile-{platform.kind}-{report['date']}{label}.json")
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
