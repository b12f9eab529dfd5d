"""A model family through the mesh against its own diffusers pipeline, in the same run, on one accelerator.

Starts the real mesh (`diffmesh up`: encoder, denoiser, decoder and gateway as separate processes) on a model
directory and, in the same process as this script, the family's diffusers pipeline on the same directory. Both
get the same prompt, seed, size, frames, steps and guidance, and the pipeline is handed the mesh's first latents
(the mesh draws them in float32 on the CPU; pipelines draw in their own dtype), so the outputs compare like with
like: their difference is reported (max abs, PSNR) before any time is. Reports end-to-end latency (median),
each stage's share from the gateway's progress events (encode, denoise, decode incl. media), the denoiser's
time per step, peak device memory of the pipeline and of each stage's process, and the versions.

    python bench/family_shapes.py flux-dev /tmp/flux --device cuda
    python bench/families.py --family flux --model /tmp/flux --size 1024x1024 --steps 50 --guidance 3.5
    python bench/family_shapes.py wan-i2v-14b /tmp/wan-i2v --device cuda
    python bench/families.py --family wan-i2v --model /tmp/wan-i2v --size 832x480 --frames 81 --steps 4
    python bench/wan_shapes_model.py /tmp/wan13 --device cuda
    python bench/families.py --family wan-t2v --model /tmp/wan13 --size 832x480 --frames 81 --steps 50 --guidance 5 \
        --mesh-flags="--compile --warmup-sizes 832x480x81"

`--mesh-flags` go to `diffmesh up` (a compiled denoiser, say); the pipeline runs as diffusers ships it, eager.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import math
import os
import pathlib
import platform
import shlex
import statistics
import subprocess
import sys
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import diffusers  # noqa: E402
import grpc  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers.utils.torch_utils import randn_tensor  # noqa: E402
from PIL import Image  # noqa: E402

from diffmesh.client import GatewayClient  # noqa: E402
from diffmesh.v1 import decoder_pb2, denoiser_pb2, gateway_pb2  # noqa: E402
from services.common.images import encode_png  # noqa: E402
from tests.integration.conftest import start_mesh, stop_mesh  # noqa: E402

PROMPT, NEGATIVE = "a red fox running through snow at dawn, cinematic", "blurry, low quality"


class GpuMemorySampler:
    """Peak device memory per process (nvidia-smi's per-process use: what each stage's allocator holds)."""

    def __init__(self, interval_s: float = 0.25) -> None:
        self.interval_s, self.peaks, self.stop = interval_s, {}, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(self.interval_s):
            try:
                out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory",
                                      "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                return
            for line in out.stdout.splitlines():
                pid, _, used = line.partition(",")
                if pid.strip().isdigit() and used.strip().isdigit():
                    key = int(pid)
                    self.peaks[key] = max(self.peaks.get(key, 0), int(used))

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


def stage_pids() -> dict[str, int]:
    """The mesh's stage processes by their module (diffmesh up starts them as `python -m services.X.server`)."""
    found = {}
    for entry in pathlib.Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().replace(b"\0", b" ").split()    # one string when retitled
        except OSError:
            continue
        for stage in ("encoder", "denoiser", "decoder", "gateway"):
            if f"services.{stage}.server".encode() in argv:
                found[stage] = int(entry.name)
    return found


def psnr(a: np.ndarray, b: np.ndarray) -> float | None:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return None if mse == 0 else 10 * math.log10(1.0 / mse)       # None: identical (JSON has no infinity)


class Case:
    """One family's request, for the mesh and for its pipeline."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.width, self.height = (int(v) for v in args.size.lower().split("x"))
        self.image = None
        if args.family == "wan-i2v":
            pixels = np.random.default_rng(0).integers(0, 256, (self.height, self.width, 3), dtype=np.uint8)
            self.image = encode_png(Image.fromarray(pixels))

    def request(self, return_frames: bool, cached: bool = False) -> gateway_pb2.GenerateRequest:
        a = self.args
        fields = dict(prompt=PROMPT, seed=a.seed, width=self.width, height=self.height, num_inference_steps=a.steps,
                      guidance_scale=a.guidance, return_frames=return_frames)
        if a.family == "flux":
            fields.update(format=decoder_pb2.MEDIA_FORMAT_PNG)
        else:
            fields.update(negative_prompt=NEGATIVE, num_frames=a.frames, format=decoder_pb2.MEDIA_FORMAT_MP4)
            if self.image is not None:
                fields.update(image=self.image)
        if cached:      # step caching on the mesh's side only: the pipeline runs uncached, the reference
            method, _, threshold = a.cache.partition(":")
            fields.update(cache=denoiser_pb2.CacheConfig(method=method, **(
                {"threshold": float(threshold)} if threshold else {})))
        return gateway_pb2.GenerateRequest(**fields)

    def pipeline(self, device: torch.device):
        cls = {"flux": diffusers.FluxPipeline, "wan-i2v": diffusers.WanImageToVideoPipeline,
               "wan-t2v": diffusers.WanPipeline}[self.args.family]
        dtype = torch.float32 if device.type == "cpu" else torch.bfloat16     # what the mesh's --dtype auto takes
        pipe = cls.from_pretrained(self.args.model, dtype=dtype).to(device)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def first_latents(self, pipe) -> torch.Tensor:
        """The mesh's first latents (float32, drawn on the CPU from the seed), in the form the pipeline takes."""
        generator = torch.Generator("cpu").manual_seed(self.args.seed)
        if self.args.family == "flux":
            channels = pipe.transformer.config.in_channels // 4
            scale = pipe.vae_scale_factor
            h, w = 2 * (self.height // (scale * 2)), 2 * (self.width // (scale * 2))
            noise = randn_tensor((1, channels, h, w), generator=generator, dtype=torch.float32)
            return pipe._pack_latents(noise, 1, channels, h, w)
        frames = (self.args.frames - 1) // pipe.vae_scale_factor_temporal + 1
        scale = pipe.vae_scale_factor_spatial
        shape = (1, pipe.vae.config.z_dim, frames, self.height // scale, self.width // scale)
        return randn_tensor(shape, generator=generator, dtype=torch.float32)

    def run_pipeline(self, pipe, latents: torch.Tensor) -> np.ndarray:
        a = self.args
        common = dict(prompt=PROMPT, height=self.height, width=self.width, num_inference_steps=a.steps,
                      guidance_scale=a.guidance, output_type="np", latents=latents.to(pipe.device))
        if a.family == "flux":
            return np.asarray(pipe(**common).images)[:, None]                       # [n, 1, H, W, 3]
        if self.image is not None:
            common.update(image=Image.open(io.BytesIO(self.image)))
        return pipe(**common, negative_prompt=NEGATIVE, num_frames=a.frames).frames


def timed_mesh_run(client: GatewayClient, request: gateway_pb2.GenerateRequest) -> dict:
    marks: dict[str, float] = {}
    steps: list[float] = []
    started = time.perf_counter()

    def on_progress(event) -> None:
        now = time.perf_counter() - started
        if event.progress.stage == "denoise":
            steps.append(now)
        else:
            marks[event.progress.stage] = now

    result = client.generate(request, on_progress=on_progress, timeout=3600)
    total = time.perf_counter() - started
    per_step = [b - a for a, b in zip(steps, steps[1:])]
    return {"total_s": total, "encode_s": marks["encode"], "denoise_s": steps[-1] - marks["encode"],
            "decode_and_media_s": marks["decode"] - steps[-1], "to_client_s": total - marks["decode"],
            "step_median_s": statistics.median(per_step) if per_step else steps[-1] - marks["encode"],
            "result": result}


def stage_medians(runs: list[dict]) -> dict[str, float]:
    return {key: round(statistics.median(r[key] for r in runs), 4)
            for key in ("encode_s", "denoise_s", "step_median_s", "decode_and_media_s", "to_client_s")}


def cached_report(runs: list[dict], frames: np.ndarray, uncached: np.ndarray, reference: np.ndarray,
                  uncached_s: float, pipeline_s: float) -> dict:
    """The cached requests' times, and their frames against the mesh's uncached ones and the pipeline's."""
    total = statistics.median(r["total_s"] for r in runs)
    return {"mesh_s": round(total, 3), "speedup_over_uncached_mesh": round(uncached_s / total, 3),
            "speedup_over_diffusers": round(pipeline_s / total, 3),
            "against_uncached_mesh": {"max_abs_frame_diff": float(np.abs(frames - uncached).max()),
                                      "psnr_db": psnr(frames, uncached)},
            "against_diffusers": {"max_abs_frame_diff": float(np.abs(frames - reference).max()),
                                  "psnr_db": psnr(frames, reference)},
            "stages_median_s": stage_medians(runs), "runs_s": [round(r["total_s"], 3) for r in runs]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=["flux", "wan-i2v", "wan-t2v"], required=True)
    parser.add_argument("--model", required=True, help="model directory (bench/family_shapes.py writes one)")
    parser.add_argument("--size", default="1024x1024", help="WIDTHxHEIGHT")
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=3.5)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--cache", default="", metavar="METHOD[:THRESHOLD]",
                        help="step caching (e.g. magcache:0.06) for a second set of the mesh's requests, after "
                        "the uncached ones; the pipeline stays uncached")
    parser.add_argument("--mesh-flags", default="", metavar="FLAGS",
                        help="more flags for `diffmesh up`, e.g. \"--compile --warmup-sizes 1024x1024\"")
    parser.add_argument("--label", default="", help="added to the results file's name")
    parser.add_argument("--start-timeout", type=float, default=900,
                        help="seconds the mesh may take to start (compiling --warmup-sizes included)")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu to smoke-test the script on a tiny model")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args()
    device = torch.device(args.device)
    accelerator = getattr(torch, device.type) if device.type != "cpu" else None
    sync = accelerator.synchronize if accelerator else (lambda: None)
    case = Case(args)

    with GpuMemorySampler() as sampler:
        # The mesh first, so the pipeline's weights are not in this process's memory while the stages load.
        # A compiled denoiser compiles its --warmup-sizes before it serves: Wan 480x832x81 with --quantize fp8
        # took 187 s on an H200 (2026-12-03), past the tests' start-up limit.
        mesh = start_mesh(pathlib.Path(args.model), ["--device", device.type, *shlex.split(args.mesh_flags)],
                          start_timeout_s=args.start_timeout)
        pids = stage_pids()
        client = GatewayClient(mesh.grpc_address)
        try:
            check = timed_mesh_run(client, case.request(return_frames=True))       # also the mesh's warm-up
            mesh_frames = check["result"].tensors["frames"].numpy()
            mesh_runs = [timed_mesh_run(client, case.request(return_frames=False)) for _ in range(args.repeats)]
        except grpc.RpcError as error:
            print(f"mesh request failed: {error.code().name}: {error.details()}", file=sys.stderr)
            stop_mesh(mesh)
            if os.environ.get("DIFFMESH_BENCH_MESH_LOG"):
                pathlib.Path(os.environ["DIFFMESH_BENCH_MESH_LOG"]).write_text("".join(mesh.log))
            return 1
        cached_frames, cached_runs, cached_error = None, [], None
        if args.cache:      # the same mesh, same seed: cached against uncached with nothing else changed
            try:
                check = timed_mesh_run(client, case.request(return_frames=True, cached=True))
                cached_frames = check["result"].tensors["frames"].numpy()
                cached_runs = [timed_mesh_run(client, case.request(return_frames=False, cached=True))
                               for _ in range(args.repeats)]
            except grpc.RpcError as error:      # reported; the uncached figures still stand
                cached_error = f"{error.code().name}: {error.details()}"
                print(f"cached mesh request failed: {cached_error}", file=sys.stderr)
        stage_peaks = {stage: sampler.peaks.get(pid) for stage, pid in pids.items()}
        client.close()
        stop_mesh(mesh)
        if os.environ.get("DIFFMESH_BENCH_MESH_LOG"):       # the services' own log, to see where time went
            pathlib.Path(os.environ["DIFFMESH_BENCH_MESH_LOG"]).write_text("".join(mesh.log))

    pipe = case.pipeline(device)
    latents = case.first_latents(pipe)
    reference = case.run_pipeline(pipe, latents)                                     # also the pipeline's warm-up
    pipe_runs = []
    if accelerator:
        accelerator.reset_peak_memory_stats()
    for _ in range(args.repeats):
        sync()
        started = time.perf_counter()
        case.run_pipeline(pipe, latents)
        sync()
        pipe_runs.append(time.perf_counter() - started)
    pipe_peak_gib = accelerator.max_memory_allocated() / 2**30 if accelerator else None

    mesh_total = statistics.median(r["total_s"] for r in mesh_runs)
    pipe_total = statistics.median(pipe_runs)
    now = datetime.datetime.now(datetime.timezone.utc)
    report = {
        "benchmark": "families", "family": args.family, "date": now.isoformat(timespec="seconds"),
        "device": accelerator.get_device_name() if accelerator else platform.processor() or "cpu",
        "python": platform.python_version(), "torch": torch.__version__,
        "diffusers": diffusers.__version__, "grpcio": grpc.__version__, "model": pathlib.Path(args.model).name,
        "weights": "random, bfloat16, at the real model's shapes (bench/family_shapes.py: text encoders 2 layers)",
        "size": args.size, "frames": 1 if args.family == "flux" else args.frames, "steps": args.steps,
        "guidance_scale": args.guidance, "repeats": args.repeats, "mesh_step_cache": args.cache or None,
        "mesh_flags": args.mesh_flags or None,
        "outputs": {"shape": list(mesh_frames.shape),
                    "max_abs_frame_diff": float(np.abs(mesh_frames - reference).max()),
                    "psnr_db": psnr(mesh_frames, reference),
                    "identical": bool(np.array_equal(mesh_frames, reference))},
        "mesh_s": round(mesh_total, 3), "diffusers_s": round(pipe_total, 3),
        "mesh_over_diffusers": round(mesh_total / pipe_total, 4),
        "mesh_stages_median_s": stage_medians(mesh_runs),
        "mesh_runs_s": [round(r["total_s"], 3) for r in mesh_runs],
        **({"mesh_cached": cached_report(cached_runs, cached_frames, mesh_frames, reference, mesh_total, pipe_total)}
           if cached_runs else {"mesh_cached_error": cached_error} if args.cache else {}),
        "diffusers_runs_s": [round(r, 3) for r in pipe_runs],
        "peak_memory_gib": {"diffusers_pipeline_allocated": None if pipe_peak_gib is None else round(pipe_peak_gib, 2),
                            **{f"mesh_{stage}_process": None if mib is None else round(mib / 1024, 2)
                               for stage, mib in stage_peaks.items()}},
    }
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    label = f"-{args.label}" if args.label else ""
    path = out / f"families-{args.family}{label}-{device.type}-{now:%Y-%m-%d}.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
