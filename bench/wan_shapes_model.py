"""Write a random-weight model directory with Wan2.1-T2V-1.3B's shapes, for benchmarks on an accelerator.

Real weights cannot be downloaded here, so benchmarks that need real compute build this instead: the 1.3B
transformer config (30 layers, 12 heads x 128, ffn 8960), the Wan VAE's own default config, the scheduler
Wan ships, and a UMT5 text encoder with the real 4096 width but only 2 layers (UMT5-XXL's 24 layers would
cost minutes to initialise and are timed separately by shared/peers/diffusers_wan_baseline.py). Weights are
initialised on the accelerator and saved in bfloat16.

    python bench/wan_shapes_model.py /tmp/wan2.1-1.3b-shapes --device cuda
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from diffusers import AutoencoderKLWan, WanPipeline, WanTransformer3DModel  # noqa: E402
from transformers import UMT5Config, UMT5EncoderModel  # noqa: E402

# The offline tokenizer and Wan's scheduler config are the tiny model's; only the network sizes differ.
from services.common.tiny_model import _build_scheduler, _build_tokenizer  # noqa: E402


def write(path: pathlib.Path, device: str, seed: int = 0) -> pathlib.Path:
    torch.manual_seed(seed)
    tokenizer = _build_tokenizer()
    with torch.device(device):
        text_encoder = UMT5EncoderModel(UMT5Config(
            vocab_size=len(tokenizer), d_model=4096, d_kv=64, d_ff=10240, num_layers=2, num_heads=64,
            feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, pad_token_id=0, eos_token_id=1,
        ))
        transformer = WanTransformer3DModel(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960,
                                            num_layers=30)
        vae = AutoencoderKLWan()
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder.to(torch.bfloat16), vae=vae.to(torch.bfloat16),
                       scheduler=_build_scheduler(), transformer=transformer.to(torch.bfloat16))
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    started = time.monotonic()
    write(pathlib.Path(args.dir), args.device)
    print(f"wrote {args.dir} in {time.monotonic() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
