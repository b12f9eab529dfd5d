"""Why one GPU's transformer forward differs between diffmesh and the peer script: the same forward timed on
several builds of the model with the same inputs, in one process, on one GPU. It backs what the README says of
bench/gang.py's one-GPU row against the peer's: the peer builds its model all in bf16, diffmesh's loader keeps
Wan's rope, norms and modulation in float32 as diffusers' from_pretrained does.

  peer            WanTransformer3DModel(...).to(bfloat16), as shared/peers/diffusers_cp.py builds it
  from_pretrained the model directory loaded as diffmesh loads it (diffusers keeps some modules in float32)
  all_bf16        the same directory, then every parameter cast to bfloat16
  diffmesh        the directory as the denoiser runs it (from_pretrained, its self-attention processor)

    python bench/peer_parity.py --model /tmp/wan2.1-1.3b-shapes
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import statistics
import sys

import diffusers
import torch
from diffusers import WanTransformer3DModel

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from services.families.wan_attention import install_self_attention  # noqa: E402


def timed_forward(model, inputs: dict, warmup: int, repeats: int) -> list[float]:
    runs = []
    with torch.inference_mode():
        for index in range(warmup + repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            model(**inputs, return_dict=False)
            end.record()
            torch.cuda.synchronize()
            if index >= warmup:
                runs.append(round(start.elapsed_time(end), 1))
    return runs


def kernel_totals(model, inputs: dict, top: int) -> dict[str, float]:
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        model(**inputs, return_dict=False)
        torch.cuda.synchronize()
    totals = sorted(((e.key, e.device_time_total / 1e3) for e in prof.key_averages()), key=lambda kv: -kv[1])
    return {name[:90]: round(ms, 2) for name, ms in totals[:top]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="/tmp/wan2.1-1.3b-shapes")
    parser.add_argument("--size", default="720x1280")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--kernels", type=int, default=0, help="also list the top N kernels of each build")
    parser.add_argument("--out", default=str(pathlib.Path(__file__).resolve().parent / "results"))
    args = parser.parse_args()
    height, width = (int(v) for v in args.size.split("x"))
    generator = torch.Generator("cuda").manual_seed(1)
    inputs = {
        "hidden_states": torch.randn(1, 16, 21, height // 8, width // 8, device="cuda", dtype=torch.bfloat16,
                                     generator=generator),
        "timestep": torch.full((1,), 500, device="cuda", dtype=torch.long),
        "encoder_hidden_states": torch.randn(1, 512, 4096, device="cuda", dtype=torch.bfloat16, generator=generator),
    }

    def peer():
        torch.manual_seed(0)
        with torch.device("cuda"):
            return WanTransformer3DModel(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960,
                                         num_layers=30).to(torch.bfloat16).eval()

    def from_pretrained():
        return WanTransformer3DModel.from_pretrained(args.model, subfolder="transformer",
                                                     torch_dtype=torch.bfloat16).to("cuda").eval()

    def all_bf16():
        return from_pretrained().to(torch.bfloat16)

    def diffmesh():
        model = from_pretrained()
        install_self_attention(model)
        return model

    rows = []
    # The peer's build again at the end shows how far the GPU itself drifted during the run.
    for name, build in (("peer", peer), ("from_pretrained", from_pretrained), ("all_bf16", all_bf16),
                        ("diffmesh", diffmesh), ("peer", peer)):
        model = build()
        float32 = sorted({n.rsplit(".", 1)[0].split(".")[-1] for n, p in model.named_parameters()
                          if p.dtype == torch.float32})
        runs = timed_forward(model, inputs, args.warmup, args.repeats)
        row = {"build": name, "forward_ms": statistics.median(runs), "runs_ms": runs, "float32_modules": float32}
        if args.kernels:
            row["kernels_ms"] = kernel_totals(model, inputs, args.kernels)
        print(json.dumps(row), flush=True)
        rows.append(row)
        del model
        torch.cuda.empty_cache()
    now = datetime.datetime.now(datetime.timezone.utc)
    report = {"benchmark": "peer_parity", "date": now.isoformat(timespec="seconds"),
              "device": torch.cuda.get_device_name(), "torch": torch.__version__, "diffusers": diffusers.__version__,
              "size": args.size, "frames": 81, "warmup": args.warmup, "repeats": args.repeats, "builds": rows}
    path = pathlib.Path(args.out) / f"peer-parity-cuda-{now:%Y-%m-%d}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
