"""Where a gang step's time goes: torch.profiler over one transformer forward of one layout, on rank 0,
kernels summed by name (communication, copies, attention, GEMMs), then a timeline summary: how long the
device computed, how long it sat idle (and before which kind of kernel, i.e. what it waited for), and how much
communication ran alone (not hidden behind compute).
A diagnostic for bench/gang.py (docs/perf-log.md, 2026-11-21).

    python bench/diagnostics/profile_gang.py --layout ulysses4 --size 720     # starts its ranks with bench/ranks.py
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.gang import LAYOUTS, TEXT_TOKENS, layout_size, parse_size  # noqa: E402
from bench.ranks import bind_to_driver, run_ranks  # noqa: E402


def worker(args: argparse.Namespace) -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from services.common.models import resolve_model_dir
    from services.common.platform import set_platform
    from services.denoiser.gang.distributed import Gang
    from services.denoiser.gang.engine import gang_engine
    from services.denoiser.gang.layout import GangLayout

    layout = GangLayout(**LAYOUTS[args.layout])
    rank = int(os.environ["RANK"])
    platform = set_platform(None)
    gang = Gang(layout, platform, rank, rank)
    engine = gang_engine(resolve_model_dir(args.model), platform, torch.bfloat16, gang)
    transformer = engine.denoising.transformer       # the Wan family's
    height, width = parse_size(args.size)
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 16, 21, height // 8, width // 8, generator=generator).to(engine.device, torch.bfloat16)
    text = torch.randn(1, TEXT_TOKENS, engine.denoising.text_dim, generator=generator).to(engine.device,
                                                                                          torch.bfloat16)
    timestep = torch.full((1,), 500.0, device=engine.device)

    def forward():
        return transformer(hidden_states=latents, timestep=timestep, encoder_hidden_states=text)[0]

    with torch.inference_mode():
        forward()
        platform.synchronize()
        gang.barrier()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            forward()
            platform.synchronize()
    if rank == 0:
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=70))
    # Every rank's timeline: a rank that computes slower shows up as waiting in the others' communication.
    trace = pathlib.Path(args.trace or f"/tmp/profile-{args.layout}-{args.size}.json")
    trace = trace.with_name(f"{trace.stem}-rank{rank}{trace.suffix}")
    prof.export_chrome_trace(str(trace))
    print(json.dumps({"rank": rank, "layout": args.layout, "size": args.size,
                      **timeline(trace)}), flush=True)
    gang.close()


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(a, b) for a, b in merged]


def _length(intervals: list[tuple[float, float]]) -> float:
    return sum(b - a for a, b in intervals)


def _intersect(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    total, i, j = 0.0, 0, 0
    while i < len(a) and j < len(b):
        total += max(0.0, min(a[i][1], b[j][1]) - max(a[i][0], b[j][0]))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


KERNEL_KINDS = (("communication", ("nccl",)), ("attention", ("fmha", "flash", "cudnn", "attention")),
                ("gemm", ("gemm", "nvjet", "xmma", "cutlass")))


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    return next((kind for kind, marks in KERNEL_KINDS if any(mark in lowered for mark in marks)), "other")


def timeline(trace: pathlib.Path) -> dict:
    """Device time from a chrome trace, in ms: the span from first to last kernel, time with a compute kernel
    running, time with nothing running, and communication time with no compute beside it (exposed). Kernel time
    per kind, and each idle gap charged to the kind of kernel that ends it (a gap before attention is waiting for
    q/k/v; one before a GEMM that follows attention is waiting for the output), with the share of idle time in
    which the host had not yet launched the next kernel (host-bound)."""
    trace_events = json.loads(trace.read_text())["traceEvents"]
    events = sorted((e for e in trace_events if e.get("cat") == "kernel" and e.get("ph") == "X"),
                    key=lambda e: e["ts"])
    launches = {e["args"]["correlation"]: e["ts"] + e["dur"] for e in trace_events
                if e.get("cat") == "cuda_runtime" and "correlation" in e.get("args", {})}
    for e in events:
        e["kind"] = kernel_kind(e["name"])
    comm = _union([(e["ts"], e["ts"] + e["dur"]) for e in events if e["kind"] == "communication"])
    compute = _union([(e["ts"], e["ts"] + e["dur"]) for e in events if e["kind"] != "communication"])
    busy = _union(comm + compute)
    span = (busy[-1][1] - busy[0][0]) if busy else 0.0
    kernel_ms: dict[str, float] = {}
    gaps: dict[str, float] = {}
    host_bound, busy_until, previous_kind = 0.0, None, None
    for e in events:
        kind = e["kind"]
        kernel_ms[kind] = kernel_ms.get(kind, 0.0) + e["dur"] / 1e3
        if busy_until is not None and e["ts"] > busy_until:
            gap = e["ts"] - busy_until
            key = f"before {kind}" + (" after attention" if previous_kind == "attention" else "")
            gaps[key] = gaps.get(key, 0.0) + gap / 1e3
            launched = launches.get(e.get("args", {}).get("correlation"))
            if launched is not None and launched > busy_until:
                host_bound += min(gap, launched - busy_until) / 1e3
        busy_until = max(busy_until or 0.0, e["ts"] + e["dur"])
        previous_kind = kind
    # Copy-engine transfers (the copy-engine exchange's pushes): how long, how fast, and whether copies to
    # different peers ever ran at the same time.
    peer_copies = [(e["ts"], e["ts"] + e["dur"], e["args"].get("bytes", 0)) for e in trace_events
                   if e.get("cat") == "gpu_memcpy" and e.get("ph") == "X" and "toDevice" in e.get("args", {})]
    copies = {}
    if peer_copies:
        rates = sorted(size / (end - start) / 1e3 for start, end, size in peer_copies if end > start)
        union = _length(_union([(a, b) for a, b, _ in peer_copies]))
        copies = {"peer_copies": len(peer_copies),
                  "peer_copy_ms": round(sum(b - a for a, b, _ in peer_copies) / 1e3, 1),
                  "peer_copy_busy_ms": round(union / 1e3, 1), "median_gb_per_s": round(rates[len(rates) // 2], 1)}
    return {"span_ms": span / 1e3, "compute_ms": _length(compute) / 1e3, "idle_ms": (span - _length(busy)) / 1e3,
            **({"copies": copies} if copies else {}),
            "communication_ms": _length(comm) / 1e3,
            "communication_exposed_ms": (_length(comm) - _intersect(comm, compute)) / 1e3,
            "kernel_ms": {k: round(v, 1) for k, v in sorted(kernel_ms.items())},
            "idle_ms_by_next_kernel": {k: round(v, 2) for k, v in sorted(gaps.items(), key=lambda kv: -kv[1])},
            "idle_host_bound_ms": round(host_bound, 2)}


def _long_attention_calls(trace: pathlib.Path) -> list[dict]:
    """This rank's kernels in time order, each long attention call (self-attention: at least half the longest
    attention kernel; cross-attention over the 512 text tokens is far shorter) marked with its index."""
    kernels = sorted((e for e in json.loads(trace.read_text())["traceEvents"]
                      if e.get("cat") == "kernel" and e.get("ph") == "X"), key=lambda e: e["ts"])
    attention = [e["dur"] for e in kernels if kernel_kind(e["name"]) == "attention"]
    threshold = max(attention, default=0.0) / 2
    calls, last_gemm_end = [], None
    for index, e in enumerate(kernels):
        kind = kernel_kind(e["name"])
        if kind == "gemm":
            last_gemm_end = e["ts"] + e["dur"]
        elif kind == "attention" and e["dur"] >= threshold:
            calls.append({"start": e["ts"], "end": e["ts"] + e["dur"],
                          "last_gemm_end": e["ts"] if last_gemm_end is None else last_gemm_end,
                          "next_start": kernels[index + 1]["ts"] if index + 1 < len(kernels) else e["ts"] + e["dur"]})
    return calls


def across_ranks(traces: list[pathlib.Path]) -> dict:
    """What the ranks' timelines say together, call by call of self-attention (the ranks' trace clocks are the
    host's, so events on one host line up): every layer waits for the slowest GPU's attention (`imbalance_ms`:
    the sum over calls of slowest minus mean), the input exchange costs the time from the last rank's last
    projection to the last rank's attention start (norms and rotary included), and the output exchange the time
    from the last attention to finish to that rank's next kernel."""
    per_rank = [_long_attention_calls(trace) for trace in traces]
    calls = min(len(c) for c in per_rank)
    if calls == 0 or any(len(c) != calls for c in per_rank):
        return {"error": f"ranks saw different numbers of attention calls: {[len(c) for c in per_rank]}"}
    slowest_max = slowest_mean = input_ms = output_ms = 0.0
    slowest_rank = [0] * len(per_rank)
    spreads = []
    for i in range(calls):
        durations = [c[i]["end"] - c[i]["start"] for c in per_rank]
        slowest_max += max(durations)
        slowest_mean += sum(durations) / len(durations)
        spreads.append((max(durations) - min(durations)) / (sum(durations) / len(durations)))
        slowest_rank[durations.index(max(durations))] += 1
        input_ms += max(c[i]["start"] for c in per_rank) - max(c[i]["last_gemm_end"] for c in per_rank)
        last = max(per_rank, key=lambda c: c[i]["end"])
        output_ms += last[i]["next_start"] - last[i]["end"]
    return {"attention_calls": calls,
            "attention_ms": {"sum_of_slowest": round(slowest_max / 1e3, 1), "sum_of_mean": round(slowest_mean / 1e3, 1),
                             "per_rank": [round(sum(x["end"] - x["start"] for x in c) / 1e3, 1) for c in per_rank]},
            "imbalance_ms": round((slowest_max - slowest_mean) / 1e3, 1),
            "spread_pct": {"median": round(100 * sorted(spreads)[len(spreads) // 2], 1),
                           "max": round(100 * max(spreads), 1)},
            "calls_slowest_by_rank": slowest_rank,
            "input_phase_ms": round(input_ms / 1e3, 1), "output_phase_ms": round(output_ms / 1e3, 1)}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", nargs="?", default="launch", choices=["launch", "worker"])
    parser.add_argument("--layout", default="ulysses4")
    parser.add_argument("--size", default="720")
    parser.add_argument("--model", default="/tmp/wan2.1-1.3b-shapes")
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--trace", default=None,
                        help="chrome trace path; each rank writes NAME-rankR.json (default /tmp/profile-*.json)")
    args = parser.parse_args()
    if args.role == "worker":
        bind_to_driver()
        worker(args)
        return 0
    world = layout_size(LAYOUTS[args.layout])
    argv = [__file__, "worker", "--layout", args.layout, "--size", args.size, "--model", args.model,
            "--rows", str(args.rows)]
    if args.trace:
        argv += ["--trace", args.trace]
    code = 0 if run_ranks(argv, world).ok else 1
    if code == 0 and world > 1:
        trace = pathlib.Path(args.trace or f"/tmp/profile-{args.layout}-{args.size}.json")
        traces = [trace.with_name(f"{trace.stem}-rank{r}{trace.suffix}") for r in range(world)]
        print(json.dumps({"layout": args.layout, "size": args.size, "across_ranks": across_ranks(traces)}),
              flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
