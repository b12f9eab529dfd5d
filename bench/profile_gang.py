"""Where a gang step's time goes: torch.profiler over one transformer forward of one layout, on rank 0,
kernels summed by name (communication, copies, attention, GEMMs). A diagnostic for bench/gang.py.

    python bench/profile_gang.py --layout ulysses4 --size 720       # launches the ranks itself
"""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.gang import LAYOUTS, TEXT_TOKENS, layout_size, parse_size  # noqa: E402


def worker(args: argparse.Namespace) -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from services.common.models import resolve_model_dir
    from services.common.platform import set_platform
    from services.denoiser.gang.distributed import Gang
    from services.denoiser.gang.engine import GangDenoiserEngine
    from services.denoiser.gang.layout import GangLayout

    layout = GangLayout(**LAYOUTS[args.layout])
    rank = int(os.environ["RANK"])
    platform = set_platform(None)
    gang = Gang(layout, platform, rank, rank)
    engine = GangDenoiserEngine(resolve_model_dir(args.model), platform, torch.bfloat16, gang)
    height, width = parse_size(args.size)
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 16, 21, height // 8, width // 8, generator=generator).to(engine.device, torch.bfloat16)
    text = torch.randn(1, TEXT_TOKENS, engine.text_dim, generator=generator).to(engine.device, torch.bfloat16)
    timestep = torch.full((1,), 500.0, device=engine.device)

    def forward():
        return engine.transformer(hidden_states=latents, timestep=timestep, encoder_hidden_states=text)[0]

    with torch.inference_mode():
        forward()
        platform.synchronize()
        gang.barrier()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            forward()
            platform.synchronize()
    if rank == 0:
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=70))
    gang.close()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", nargs="?", default="launch", choices=["launch", "worker"])
    parser.add_argument("--layout", default="ulysses4")
    parser.add_argument("--size", default="720")
    parser.add_argument("--model", default="/tmp/wan2.1-1.3b-shapes")
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args()
    if args.role == "worker":
        worker(args)
        return 0
    from services.denoiser.gang.launcher import free_port

    world = layout_size(LAYOUTS[args.layout])
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(world)}
    argv = [sys.executable, __file__, "worker", "--layout", args.layout, "--size", args.size, "--model", args.model,
            "--rows", str(args.rows)]
    processes = [subprocess.Popen(argv, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(world)]
    return max(p.wait() for p in processes)


if __name__ == "__main__":
    sys.exit(main())
