"""The denoiser gang on GPUs: per-step time, speedup, peak memory and error of every layout, against
diffusers' single-GPU transformer and diffusers' own context parallelism timed in the same run.

Model: Wan2.1-T2V-1.3B's transformer config (30 layers, 12 heads x 128, ffn 8960), random weights in bf16,
written once by bench/wan_shapes_model.py and loaded by the gang exactly as the server loads it (TP ranks read
only their shard). Inputs: 81 frames (21 latent frames) at 480x832 and 720x1280, 512 text tokens.

Per layout and size, rank 0 reports:
  forward_ms      one transformer forward (what diffusers' peers time); not for cfg layouts
  guided_step_ms  one guided noise prediction (cond + uncond + combine), the denoiser's real step
  *_loop_ms       the same, averaged over calls run back to back as the denoising loop runs them
  speedup         one GPU's time / this layout's (forward for SP/TP, guided step for CFG-parallel)
  peak_gib        the largest per-device peak across ranks
  rel_err         relative L2 error of the output against the one-GPU output

    python bench/gang.py --gpus 4                        # every layout that fits, both sizes
    python bench/gang.py --gpus 2 --sizes 480 --layouts 1,ulysses2,cfg2
    python bench/gang.py --layouts ulysses4 --exchanges collective,copy-engine   # Ulysses on both transports
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform as host
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.ranks import bind_to_driver, free_port, run_ranks  # noqa: E402
from services.denoiser.gang.exchange import EXCHANGE_ENV  # noqa: E402

SIZES = {480: (480, 832), 720: (720, 1280)}
FRAMES = 81
TEXT_TOKENS = 512
GUIDANCE = 5.0

# name -> layout flags (devices = product)
LAYOUTS = {
    "1": {},
    "ulysses2": {"ulysses": 2}, "ring2": {"ring": 2}, "tp2": {"tp": 2}, "cfg2": {"cfg": 2},
    "ulysses4": {"ulysses": 4}, "ring4": {"ring": 4}, "tp4": {"tp": 4},
    "ulysses2-ring2": {"ulysses": 2, "ring": 2}, "cfg2-ulysses2": {"cfg": 2, "ulysses": 2},
}


def parse_size(text: str) -> tuple[int, int]:
    """'480' / '720' (Wan's sizes) or 'HxW'."""
    if "x" in text:
        height, width = (int(v) for v in text.split("x"))
        return height, width
    return SIZES[int(text)]


def layout_size(flags: dict) -> int:
    size = 1
    for degree in flags.values():
        size *= degree
    return size


# The worker: one rank of a gang ---------------------------------------------------------------------------


def warm_up(fn, sync, agree, calls: int, seconds: float) -> None:
    """At least `calls` calls and, with `seconds`, until that long has passed on rank 0: GPUs slow down as they
    heat under their power limit, so a layout that runs right after another on a GPU it shares would otherwise
    start with that GPU hot and the rest cool. `agree(go)` returns rank 0's decision to every rank (the ranks run
    collectives together, so they must make the same number of calls)."""
    started = time.perf_counter()
    done = 0
    while done < calls or agree(seconds > 0 and time.perf_counter() - started < seconds):
        fn()
        done += 1
        if done >= calls:
            sync()


def timed(fn, sync, barrier, warmup: int, repeats: int) -> tuple[float, list[float]]:
    for _ in range(warmup):
        fn()
    runs = []
    for _ in range(repeats):
        sync()
        barrier()
        started = time.perf_counter()
        fn()
        sync()
        runs.append((time.perf_counter() - started) * 1000)
    return statistics.median(runs), runs


def looped(fn, sync, barrier, repeats: int) -> float:
    """Mean ms of `repeats` calls back to back, as the denoising loop runs its steps: the host queues the next
    call while the device still runs the last, so no launch latency or start skew between ranks is counted."""
    sync()
    barrier()
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - started) * 1000 / repeats


def worker(args: argparse.Namespace) -> int:
    import torch
    import torch.distributed as dist

    from services.common.models import resolve_model_dir
    from services.common.platform import set_platform
    from services.denoiser.gang.distributed import Gang
    from services.denoiser.gang.engine import gang_engine
    from services.denoiser.gang.layout import GangLayout
    from services.families.base import StepCall
    from services.families.wan import BRANCH_KWARGS

    bind_to_driver()
    flags = LAYOUTS[args.layout]
    layout = GangLayout(**flags)
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    platform = set_platform(args.device)
    if layout.world_size == 1 and "MASTER_ADDR" not in os.environ:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.master_port))
    gang = Gang(layout, platform, rank, local_rank)
    started = time.perf_counter()
    engine = gang_engine(resolve_model_dir(args.model), platform, torch.bfloat16, gang)
    load_s = time.perf_counter() - started
    device = engine.device
    denoising = engine.denoising                 # the Wan family's: its transformer and its shapes
    transformer = denoising.transformer
    ulysses = getattr(transformer, "processors", [None])[0]
    ulysses = getattr(ulysses, "ulysses", None)
    exchange = {"CollectiveExchange": "collective", "CopyEngineExchange": "copy-engine"}.get(
        type(ulysses).__name__)                  # what ran, which a fallback may make differ from what was asked

    def barrier() -> None:
        gang.barrier()

    def agree(go: bool) -> bool:
        decision = torch.tensor([int(go)])
        dist.broadcast(decision, src=0, group=gang.control)
        return bool(decision.item())

    rows = []
    for size in args.sizes:
        height, width = parse_size(size)
        generator = torch.Generator().manual_seed(1)
        latents = torch.randn(1, denoising.latent_channels, (args.frames - 1) // 4 + 1, height // 8, width // 8,
                              generator=generator)
        text = torch.randn(1, TEXT_TOKENS, denoising.text_dim, generator=generator)
        negative = torch.randn(1, TEXT_TOKENS, denoising.text_dim, generator=generator)
        latents, text, negative = (t.to(device, torch.bfloat16) for t in (latents, text, negative))
        timestep = torch.full((1,), 500.0, device=device)
        platform.empty_cache()
        platform.reset_peak_memory()

        def forward(latents=latents, timestep=timestep, text=text):
            return transformer(hidden_states=latents, timestep=timestep, encoder_hidden_states=text)[0]

        # The step as the denoising loop hands it to the gang's noise predictor (Wan's WanRun.step_call).
        cond = dict(hidden_states=latents, timestep=timestep, encoder_hidden_states=text)
        step = StepCall(transformer, cond, {**cond, "encoder_hidden_states": negative}, GUIDANCE, BRANCH_KWARGS)

        def guided(step=step):
            return engine.predict_noise(step)

        row = {"layout": args.layout, "devices": layout.world_size, "size": f"{args.frames}x{height}x{width}",
               "load_s": round(load_s, 1), "exchange": exchange}
        if args.gpu_label is not None:
            row["gpu"] = args.gpu_label
        with torch.inference_mode():
            warm_up(guided, platform.synchronize, agree, 1, args.warmup_s)
            if layout.cfg == 1:
                row["forward_ms"], runs = timed(forward, platform.synchronize, barrier, args.warmup, args.repeats)
                row["forward_runs_ms"] = [round(r, 1) for r in runs]
                row["forward_loop_ms"] = round(looped(forward, platform.synchronize, barrier, args.repeats), 1)
                output = forward()
            row["guided_step_ms"], runs = timed(guided, platform.synchronize, barrier, args.warmup, args.repeats)
            row["guided_runs_ms"] = [round(r, 1) for r in runs]
            row["guided_loop_ms"] = round(looped(guided, platform.synchronize, barrier, args.repeats), 1)
            guided_output = guided()
        # The copy-engine exchange's symmetric buffer is not the caching allocator's, so it is added apart.
        exchange_bytes = getattr(ulysses, "buffer_bytes", 0)
        peak = torch.tensor([platform.max_memory_allocated() / 2**30, exchange_bytes / 2**30], device=device)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        row["peak_gib"] = round(float(peak[0]), 2)
        if exchange_bytes:
            row["exchange_buffer_gib"] = round(float(peak[1]), 2)
        if rank == 0:
            reference_dir = pathlib.Path(args.reference_dir)
            reference_dir.mkdir(parents=True, exist_ok=True)
            outputs = {"guided": guided_output.float().cpu()}
            if layout.cfg == 1:
                outputs["forward"] = output.float().cpu()
            for name, value in outputs.items():
                path = reference_dir / f"{name}-{size}.pt"
                if args.layout == "1":
                    if args.gpu_label in (None, "0"):        # one reference, however many GPUs ran alone
                        torch.save(value, path)
                elif path.exists():
                    reference = torch.load(path)
                    row[f"rel_err_{name}"] = float((value - reference).norm() / reference.norm())
            print("RESULT " + json.dumps(row), flush=True)
        rows.append(row)
    gang.close()
    return 0


# The driver: every layout, then the peers ------------------------------------------------------------------


def gang_rows(argv: list[str], world: int, env: dict | None = None, port: int | None = None,
              timeout: float = 1200) -> list[dict]:
    """Run `world` ranks of `argv` (bench/ranks.py); return rank 0's RESULT rows, or one error row."""
    run = run_ranks(argv, world, env, port=port, capture=True, timeout=timeout)
    rows = [json.loads(line[len("RESULT "):]) for line in run.output.splitlines() if line.startswith("RESULT ")]
    if not run.ok or not rows:
        tail = "\n".join(run.output.splitlines()[-15:])
        why = f"timed out after {timeout:.0f} s" if run.timed_out else f"exit codes {run.codes}"
        return [{"error": why, "log_tail": tail}]
    return rows


def run_alone_on_every_gpu(argv: list[str], gpus: int) -> list[dict]:
    """The one-GPU layout on each of `gpus` GPUs at once, one independent process each: GPUs of one host differ by
    a few percent under their power limit, and a gang runs at its slowest one's pace, so GPU 0 alone is not a fair
    "one GPU". Returns GPU 0's rows, each with every GPU's times added (`per_gpu_*`)."""
    from concurrent.futures import ThreadPoolExecutor

    ports: list[int] = []
    while len(ports) < gpus:
        port = free_port()
        if port not in ports:
            ports.append(port)
    with ThreadPoolExecutor(gpus) as pool:
        runs = list(pool.map(lambda i: gang_rows([*argv, "--gpu-label", str(i)], 1, {"CUDA_VISIBLE_DEVICES": str(i)},
                                                 port=ports[i]),
                             range(gpus)))
    rows = runs[0]
    for row in rows:
        if "error" in row:
            continue
        same_size = [next((r for r in run if r.get("size") == row["size"] and "error" not in r), None) for run in runs]
        for key in ("forward_ms", "guided_step_ms"):
            if key in row:
                row[f"per_gpu_{key}"] = [round(r[key], 1) if r else None for r in same_size]
    return rows


PEERS = {"1": (1, "ulysses"), "ulysses2": (2, "ulysses"), "ulysses4": (4, "ulysses"), "ring2": (2, "ring")}


def peer_runs(names: str, gpus: int) -> list[tuple[int, str]]:
    """The peer runs asked for (comma-separated PEERS names) that fit the visible GPUs: (world size, mode)."""
    runs = [PEERS[name] for name in names.split(",")]
    return [(world, mode) for world, mode in runs if world <= gpus]


def driver(args: argparse.Namespace) -> int:
    from services.common.platform import select_platform

    device_platform = select_platform(args.device)
    gpus = args.gpus or device_platform.device_count()
    model = pathlib.Path(args.model)
    if not (model / "model_index.json").exists():
        subprocess.run([sys.executable, str(ROOT / "bench" / "wan_shapes_model.py"), str(model), "--device",
                        device_platform.kind], check=True)
    chosen = args.layouts.split(",") if args.layouts else list(LAYOUTS)
    chosen = [name for name in chosen if layout_size(LAYOUTS[name]) <= gpus]
    if "1" in chosen:
        chosen.remove("1")
    if not args.no_single:
        chosen.insert(0, "1")                   # the reference every other layout is compared with
    sizes = ",".join(args.sizes)
    results, peers = [], []
    # The peers first, so a run cut short still has them to compare with.
    if not args.skip_peers and device_platform.kind == "cuda":
        for size in [s for s in args.sizes if s in ("480", "720")]:
            for world, mode in peer_runs(args.peers, gpus):
                rows = gang_rows([str(ROOT / "bench" / "peers" / "diffusers_cp.py")], world,
                                 {"MODE": mode, "SIZE": str(size)})
                for row in rows:
                    row.update(peer="diffusers", requested_mode=mode, devices=world, size_key=size)
                    print(json.dumps(row), flush=True)
                peers.extend(rows)
                write_report(args, device_platform, gpus, model, results, peers)

    runs = [(name, exchange) for name in chosen
            for exchange in (args.exchanges if "ulysses" in LAYOUTS[name] else [None])]
    for name, exchange in runs:
        world = layout_size(LAYOUTS[name])
        started = time.monotonic()
        argv = [__file__, "worker", "--layout", name, "--model", str(model), "--sizes", sizes,
                "--reference-dir", args.reference_dir, "--warmup", str(args.warmup), "--warmup-s", str(args.warmup_s),
                "--repeats", str(args.repeats), "--device", device_platform.kind, "--frames", str(args.frames)]
        if name == "1" and gpus > 1 and device_platform.kind == "cuda" and not args.single_on_gpu0:
            rows = run_alone_on_every_gpu(argv, gpus)
        else:
            rows = gang_rows(argv, world, {EXCHANGE_ENV: exchange} if exchange else None)
        for row in rows:
            row.setdefault("layout", name)
            row.setdefault("exchange", exchange)
            print(json.dumps(row), flush=True)
        results.extend(rows)
        print(f"# {name} {exchange or ''}: {time.monotonic() - started:.0f}s", flush=True)
        write_report(args, device_platform, gpus, model, results, peers)

    path = write_report(args, device_platform, gpus, model, results, peers)
    print(f"wrote {path}")
    print_table(results, peers)
    return 0


def write_report(args, device_platform, gpus: int, model: pathlib.Path, results: list[dict],
                 peers: list[dict]) -> pathlib.Path:
    """Write (or rewrite, after each layout, so a run cut short still leaves its numbers) the results file."""
    import diffusers
    import torch

    single = {row["size"]: row for row in results if row.get("layout") == "1" and "error" not in row}
    for row in results:
        base = single.get(row.get("size"))
        if not base or "error" in row:
            continue
        if "forward_ms" in row:
            row["speedup"] = round(base["forward_ms"] / row["forward_ms"], 2)
        if "forward_loop_ms" in row and "forward_loop_ms" in base:
            row["loop_speedup"] = round(base["forward_loop_ms"] / row["forward_loop_ms"], 2)
        row["guided_speedup"] = round(base["guided_step_ms"] / row["guided_step_ms"], 2)
        for key, speedup in (("forward_ms", "speedup_vs_mean_gpu"), ("guided_step_ms", "guided_speedup_vs_mean_gpu")):
            alone = [ms for ms in base.get(f"per_gpu_{key}", []) if ms]
            if alone and key in row:
                row[speedup] = round(statistics.mean(alone) / row[key], 3)

    now = datetime.datetime.now(datetime.timezone.utc)
    report = {
        "benchmark": "gang", "date": now.isoformat(timespec="seconds"), "device": device_platform.device_name(),
        "gpus": gpus, "platform": device_platform.kind, "dtype": "bfloat16", "python": host.python_version(),
        "torch": torch.__version__, "diffusers": diffusers.__version__,
        "model": str(model), "frames": args.frames,
        "text_tokens": TEXT_TOKENS, "guidance_scale": GUIDANCE, "warmup": args.warmup, "warmup_s": args.warmup_s,
        "repeats": args.repeats,
        "results": results, "peers": peers,
    }
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"gang-{device_platform.kind}-{gpus}gpu{args.tag}-{now:%Y-%m-%d}.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    return path


def print_table(results: list[dict], peers: list[dict]) -> None:
    print(f"{'layout':28} {'size':14} {'fwd ms':>9} {'guided ms':>10} {'speedup':>8} {'peak GiB':>9} {'rel err':>9}")
    for row in results:
        name = f"{row['layout']} {row.get('exchange') or ''}"
        if "error" in row:
            print(f"{name:28} ERROR {row['error']}")
            continue
        print(f"{name:28} {row['size']:14} {row.get('forward_ms', float('nan')):9.1f} "
              f"{row['guided_step_ms']:10.1f} {row.get('speedup', row.get('guided_speedup', 1.0)):8.2f} "
              f"{row['peak_gib']:9.2f} {row.get('rel_err_forward', row.get('rel_err_guided', 0.0)):9.2e}")
    for row in peers:
        if "error" in row:
            print(f"diffusers {row['requested_mode']}{row['devices']} size {row['size_key']}: ERROR")
        else:
            print(f"diffusers {row['mode']:8} x{row['world']} {row['size']}p: {row['step_ms']} ms, "
                  f"peak {row['peak_gib']} GiB")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("role", nargs="?", default="driver", choices=["driver", "worker"])
    parser.add_argument("--model", default="/tmp/wan2.1-1.3b-shapes", help="written on first use")
    parser.add_argument("--device", default=None)
    parser.add_argument("--gpus", type=int, default=None, help="default: every visible device")
    parser.add_argument("--layouts", default=None, help=f"comma-separated, from {','.join(LAYOUTS)}")
    parser.add_argument("--sizes", type=lambda s: s.split(","), default=["480", "720"], help="480, 720 or HxW")
    parser.add_argument("--frames", type=int, default=FRAMES)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--warmup-s", type=float, default=0.0,
                        help="before timing each layout, run guided steps this long, so every GPU it uses is as warm "
                             "as in sustained serving (0: just the --warmup calls)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-peers", action="store_true")
    parser.add_argument("--single-on-gpu0", action="store_true",
                        help="run the one-GPU layout on GPU 0 only (default on CUDA: on every GPU at once, each alone, "
                             "and report speedups against GPU 0 and against the GPUs' mean)")
    parser.add_argument("--gpu-label", default=None, help="worker: which GPU a one-GPU run is on (for its row)")
    parser.add_argument("--no-single", action="store_true",
                        help="skip the one-GPU reference (no speedup or error columns): for A/B runs of one layout")
    parser.add_argument("--peers", default=",".join(PEERS), help=f"diffusers runs, from {','.join(PEERS)}")
    parser.add_argument("--exchanges", type=lambda s: s.split(","), default=[None],
                        help="Ulysses layouts: run once per transport, from collective,copy-engine "
                             "(default: the platform's)")
    parser.add_argument("--reference-dir", default="/tmp/diffmesh-gang-reference")
    parser.add_argument("--layout", default="1", help="worker: the layout to run")
    parser.add_argument("--master-port", type=int, default=29511)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--tag", default="", help="appended to the results file name, e.g. -720p")
    args = parser.parse_args()
    return worker(args) if args.role == "worker" else driver(args)


if __name__ == "__main__":
    sys.exit(main())
