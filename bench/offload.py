"""`--dit-offload` against resident weights: peak device memory, forward time, and the outputs' difference.

A Wan2.1-14B-shaped transformer (40 layers, 40 heads x 128, ffn 13824; random weights built on the device, in the
engine's dtypes: bf16 but the modules diffusers keeps in float32, with diffmesh's own self-attention processor)
forwards 480x832x81 latents (16x21x60x104, 512 text tokens) fully resident, then moved to the host and offloaded
by the engine's own `offload_blocks` (services/denoiser/offload.py) with the process capped to 24 GiB of device
memory (torch.cuda.set_per_process_memory_fraction), so a run that needed more would fail rather than report.
Reports, for each: the device memory the weights take once loaded, the peak during a forward
(torch.cuda.max_memory_allocated), the median forward time; the offloaded output's max abs difference from the
resident one (checked before any timing; expected 0: the same kernels on the same weights); and the host-to-device
bandwidth from pinned memory, which bounds how fast the blocks can stream. Writes
bench/results/offload-<device>-<date>.json.

    python3 bench/offload.py --device cuda                  # a few minutes on one H200 (well under 6)
    python3 bench/offload.py --device cpu --tiny            # a smoke run of the script (tiny shapes, no file)
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import statistics
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import diffusers  # noqa: E402
import torch  # noqa: E402

from services.common.attention import current_attention  # noqa: E402
from services.common.platform import set_platform  # noqa: E402
from services.denoiser.offload import OffloadOptions, offload_blocks, split_bytes  # noqa: E402

GIB = 2**30
# Wan2.1-T2V-14B's transformer config (its transformer/config.json).
WAN_14B = dict(num_layers=40, num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, in_channels=16,
               out_channels=16, text_dim=4096, freq_dim=256, patch_size=(1, 2, 2), cross_attn_norm=True,
               qk_norm="rms_norm_across_heads", eps=1e-6)
TINY = dict(WAN_14B, num_layers=2, num_attention_heads=2, attention_head_dim=16, ffn_dim=64, text_dim=32, freq_dim=16)
LATENTS, TEXT_TOKENS = (1, 16, 21, 60, 104), 512          # 480x832x81
TINY_LATENTS = (1, 16, 3, 8, 8)


def build(config: dict, device: torch.device) -> torch.nn.Module:
    """Random weights on `device` (initialised there: seconds for 14B, where CPU init takes minutes), in the dtypes
    the engine loads them in: bf16, but the modules diffusers' from_pretrained keeps in float32."""
    from diffusers import WanTransformer3DModel

    from services.families.wan_attention import install_self_attention

    torch.manual_seed(0)
    with torch.device(device):
        model = WanTransformer3DModel(**config)
    keep = set(model._keep_in_fp32_modules or ())
    for name, tensor in (*model.named_parameters(), *model.named_buffers()):
        if tensor.is_floating_point() and not keep.intersection(name.split(".")):
            tensor.data = tensor.data.to(torch.bfloat16)
    install_self_attention(model)
    return model.eval().requires_grad_(False)


def inputs(config: dict, device: torch.device, tiny: bool) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(TINY_LATENTS if tiny else LATENTS, generator=generator)
    return {"hidden_states": latents.to(device, torch.bfloat16),
            "timestep": torch.tensor([500.0], device=device),
            "encoder_hidden_states": torch.randn(1, TEXT_TOKENS, config["text_dim"], generator=generator).to(
                device, torch.bfloat16)}


def forward(model, kwargs) -> torch.Tensor:
    with torch.inference_mode(), current_attention().scope():
        return model(**kwargs, return_dict=False)[0]


def timed(platform, model, kwargs, repeats: int) -> list[float]:
    """`repeats` forwards, each in milliseconds, synchronised before and after."""
    times = []
    for _ in range(repeats):
        platform.synchronize()
        started = time.perf_counter()
        forward(model, kwargs)
        platform.synchronize()
        times.append((time.perf_counter() - started) * 1e3)
    return times


def host_to_device_gib_s(device: torch.device, nbytes: int = GIB) -> float | None:
    """Pinned host -> device copy bandwidth, the rate the blocks stream at most."""
    if device.type != "cuda":
        return None
    source = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    target = torch.empty(nbytes, dtype=torch.uint8, device=device)
    target.copy_(source, non_blocking=True)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(3):
        target.copy_(source, non_blocking=True)
    torch.cuda.synchronize()
    return round(3 * nbytes / GIB / (time.perf_counter() - started), 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes: a smoke run of the script")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cap-gib", type=float, default=24.0, help="device memory cap for the offloaded run")
    parser.add_argument("--record-stream", action="store_true", help="offload with record_stream (offload.py)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    platform = set_platform(args.device)
    device = platform.device(0)
    cuda = device.type == "cuda"
    config = TINY if args.tiny else WAN_14B
    report = {
        "benchmark": "Wan2.1-14B-shaped transformer, one forward at 480x832x81: resident against --dit-offload",
        "date": datetime.date.today().isoformat(), "device": platform.device_name(0),
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                     "cuda": torch.version.cuda if cuda else None},
        "tiny": args.tiny, "config": config, "latents": list(TINY_LATENTS if args.tiny else LATENTS),
        "text_tokens": TEXT_TOKENS, "repeats": args.repeats, "record_stream": args.record_stream,
    }

    # 1. Resident: the whole transformer on the device.
    started = time.perf_counter()
    platform.reset_peak_memory()
    model = build(config, device)
    platform.synchronize()
    report["build_s"] = round(time.perf_counter() - started, 1)
    kwargs = inputs(config, device, args.tiny)
    resident_weights = platform.memory_allocated()
    platform.reset_peak_memory()
    resident_out = forward(model, kwargs).float().cpu()       # also the warm-up: kernels, allocator
    resident_ms = timed(platform, model, kwargs, args.repeats)
    report["resident"] = {"weights_on_device_gib": round(resident_weights / GIB, 2),
                          "peak_gib": round(platform.max_memory_allocated() / GIB, 2),
                          "forward_ms": round(statistics.median(resident_ms), 1),
                          "forward_ms_each": [round(t, 1) for t in resident_ms]}
    print(json.dumps({"resident": report["resident"]}), flush=True)

    # 2. Offloaded: on the host first (as the engine loads it), then the engine's own offload, under the cap.
    started = time.perf_counter()
    model.to("cpu")
    platform.empty_cache()
    report["h2d_pinned_gib_s"] = host_to_device_gib_s(device)
    offload_blocks(model, device, OffloadOptions(record_stream=args.record_stream))
    report["offload_setup_s"] = round(time.perf_counter() - started, 1)
    resident_bytes, streamed_bytes = split_bytes(model)
    report["resident_gib"], report["streamed_gib"] = round(resident_bytes / GIB, 2), round(streamed_bytes / GIB, 2)
    if cuda:
        platform.empty_cache()
        torch.cuda.set_per_process_memory_fraction(args.cap_gib * GIB / torch.cuda.get_device_properties(device)
                                                   .total_memory, device)
        report["cap_gib"] = args.cap_gib
    offloaded_weights = platform.memory_allocated()
    platform.reset_peak_memory()
    # The first offloaded forward (the warm-up, and the one that traces the blocks' order) is checked before timing.
    offloaded_out = forward(model, kwargs).float().cpu()
    difference = (offloaded_out - resident_out).abs().max().item()
    print(json.dumps({"max_abs_difference": difference}), flush=True)
    offloaded_ms = timed(platform, model, kwargs, args.repeats)
    report["offloaded"] = {"weights_on_device_gib": round(offloaded_weights / GIB, 2),
                           "peak_gib": round(platform.max_memory_allocated() / GIB, 2),
                           "forward_ms": round(statistics.median(offloaded_ms), 1),
                           "forward_ms_each": [round(t, 1) for t in offloaded_ms]}
    report["max_abs_difference"] = difference
    report["identical"] = torch.equal(offloaded_out, resident_out)
    report["outputs_finite"] = bool(torch.isfinite(resident_out).all())
    report["slowdown"] = round(report["offloaded"]["forward_ms"] / report["resident"]["forward_ms"], 3)
    report["notes"] = ("random weights in the engine's dtypes; the first forward of each is untimed (warm-up, and "
                       "for offload the one that traces the blocks' order) and its output is the one compared; "
                       "peaks are PyTorch's allocator (weights + activations), not the CUDA context")
    print(json.dumps(report, indent=2), flush=True)
    if not report["identical"]:
        print(f"offloaded output differs from resident: max abs {difference}", file=sys.stderr)
    if not args.tiny or args.out:
        name = f"offload-{platform.kind}-{report['date']}.json"
        out = pathlib.Path(args.out) if args.out else ROOT / "bench" / "results" / name
        if out.is_dir():
            out = out / name
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {out}")
    return 0 if report["identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
