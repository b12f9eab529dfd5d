"""What splitting the pipeline into services costs: one request through the mesh vs diffusers in-process.

Starts the real mesh (`diffmesh up`, four processes on loopback) on a model directory and, in the same run,
times `diffusers.WanPipeline` in this process on the same directory, with the same prompt, seed, size, frames,
steps and guidance. Both produce the decoded frames (the mesh also encodes a PNG/MP4; WanPipeline returns
arrays). The difference is the price of the gRPC hops, tensor transfer and file encoding. Every timed mesh
result is checked against the pipeline's frames so the benchmark cannot time garbage.

    python bench/mesh_latency.py                         # tiny model, CPU, a few sizes
    python bench/mesh_latency.py --device cuda --model DIR --cases 480x832x1 --steps 10
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import statistics
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import diffusers  # noqa: E402
import grpc  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import WanPipeline  # noqa: E402

from diffmesh.client import GatewayClient  # noqa: E402
from diffmesh.v1 import decoder_pb2, gateway_pb2  # noqa: E402
from services.common.platform import select_platform  # noqa: E402
from services.common.tiny_model import ensure_tiny_model  # noqa: E402
from tests.integration.conftest import start_mesh, stop_mesh  # noqa: E402

PROMPT, NEGATIVE, SEED, GUIDANCE = "a red fox running through snow", "blurry", 7, 5.0


def parse_case(text: str) -> tuple[int, int, int]:
    height, width, frames = (int(v) for v in text.lower().split("x"))
    return height, width, frames


def median_seconds(fn, repeats: int, sync) -> tuple[float, list[float]]:
    fn()  # warm-up
    runs = []
    for _ in range(repeats):
        sync()
        started = time.perf_counter()
        fn()
        sync()
        runs.append(time.perf_counter() - started)
    return statistics.median(runs), runs


def measure_case(pipe, client, sync, height: int, width: int, frames: int, steps: int, repeats: int) -> dict:
    common = dict(num_inference_steps=steps, height=height, width=width, num_frames=frames)

    def run_pipeline():
        return pipe(prompt=PROMPT, negative_prompt=NEGATIVE, guidance_scale=GUIDANCE, output_type="np",
                    generator=torch.Generator().manual_seed(SEED), **common).frames

    def run_mesh(return_frames: bool = False, media_format: int = decoder_pb2.MEDIA_FORMAT_AUTO):
        request = gateway_pb2.GenerateRequest(
            prompt=PROMPT, negative_prompt=NEGATIVE, guidance_scale=GUIDANCE, seed=SEED, width=width, height=height,
            num_frames=frames, num_inference_steps=steps, return_frames=return_frames, format=media_format)
        return client.generate(request, timeout=3600)

    reference = run_pipeline()
    mesh_frames = run_mesh(return_frames=True).tensors["frames"].numpy()
    max_diff = float(np.abs(mesh_frames - reference).max())
    pipe_s, pipe_runs = median_seconds(run_pipeline, repeats, sync)
    # The mesh without files does the same work as diffusers' arrays: its extra time is the price of the
    # split. With files (PNG / MP4, what clients get) it also pays for the encoding diffusers skips.
    bare_s, bare_runs = median_seconds(lambda: run_mesh(media_format=decoder_pb2.MEDIA_FORMAT_NONE), repeats,
                                       lambda: None)
    mesh_s, mesh_runs = median_seconds(run_mesh, repeats, lambda: None)
    return {"case": f"{height}x{width}x{frames}", "steps": steps, "diffusers_s": round(pipe_s, 4),
            "mesh_no_files_s": round(bare_s, 4), "mesh_with_files_s": round(mesh_s, 4),
            "split_overhead_s": round(bare_s - pipe_s, 4), "file_encoding_s": round(mesh_s - bare_s, 4),
            "mesh_no_files_over_diffusers": round(bare_s / pipe_s, 3), "max_abs_frame_diff": max_diff,
            "diffusers_runs_s": [round(r, 4) for r in pipe_runs],
            "mesh_no_files_runs_s": [round(r, 4) for r in bare_runs],
            "mesh_with_files_runs_s": [round(r, 4) for r in mesh_runs]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="diffusers model directory (default: the tiny model)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cases", default="64x64x1,256x256x1,128x128x17", help="HxWxFRAMES, comma-separated")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args()

    device_platform = select_platform(args.device)
    model_dir = pathlib.Path(args.model) if args.model else ensure_tiny_model()
    dtype = device_platform.default_dtype()
    pipe = WanPipeline.from_pretrained(model_dir, dtype=dtype).to(device_platform.device())
    pipe.set_progress_bar_config(disable=True)
    mesh = start_mesh(model_dir, ["--device", device_platform.kind])
    client = GatewayClient(mesh.grpc_address)
    results = []
    try:
        for case in args.cases.split(","):
            row = measure_case(pipe, client, device_platform.synchronize, *parse_case(case), args.steps, args.repeats)
            results.append(row)
            print(f"{row['case']:>14}  diffusers {row['diffusers_s']*1000:8.1f} ms   "
                  f"mesh {row['mesh_no_files_s']*1000:8.1f} ms ({row['split_overhead_s']*1000:+.1f})   "
                  f"+files {row['mesh_with_files_s']*1000:8.1f} ms   max|diff| {row['max_abs_frame_diff']:.2g}",
                  flush=True)
    except grpc.RpcError as error:
        print(f"mesh request failed: {error.code().name}: {error.details()}", file=sys.stderr)
        return 1
    finally:
        client.close()
        stop_mesh(mesh)

    now = datetime.datetime.now(datetime.timezone.utc)
    report = {
        "benchmark": "mesh_latency", "date": now.isoformat(timespec="seconds"),
        "device": device_platform.device_name(), "platform": device_platform.kind, "dtype": str(dtype),
        "cpu_count": os.cpu_count(), "load_avg_1m": os.getloadavg()[0], "python": platform.python_version(),
        "torch": torch.__version__, "diffusers": diffusers.__version__, "grpcio": grpc.__version__,
        "model": str(model_dir.name), "guidance_scale": GUIDANCE, "results": results,
    }
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"mesh_latency-{device_platform.kind}-{now:%Y-%m-%d}.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
