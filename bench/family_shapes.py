"""Random-weight model directories at real models' shapes, for benchmarks on an accelerator.

Real weights cannot be downloaded here, so the benchmarks build these instead, with the libraries' own classes:

- `flux-dev`: FLUX.1-dev's transformer (FluxTransformer2DModel's defaults: 19 double + 38 single blocks, 24 heads
  x 128, guidance embedding), FLUX's VAE (16 latent channels, scaling 0.3611, shift 0.1159), CLIP-L's text
  encoder at its real size, and a T5 encoder with T5-XXL's 4096 width but 2 of its 24 layers.
- `wan-i2v-14b`: Wan2.1-I2V-14B's transformer (40 layers, 40 heads x 128, ffn 13824, 36 input channels, image
  cross-attention from 1280-wide CLIP features), a CLIP ViT-H/14 vision tower at its real size, the Wan VAE, and
  UMT5 with the real 4096 width but 2 layers.

The text encoders are cut to 2 layers as bench/wan_shapes_model.py does (their full depth costs minutes to
initialise and runs once per request); the benchmark says so in its results. Tokenizers are the offline tiny
ones (vocabulary size changes only the embedding tables). Weights are initialised on the device and saved in
bfloat16.

    python bench/family_shapes.py flux-dev /tmp/flux-dev-shapes --device cuda
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


def write_flux_dev(path: pathlib.Path, device: str) -> pathlib.Path:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from services.common.tiny.flux import _build_clip_tokenizer, _build_t5_tokenizer

    clip_tokenizer, t5_tokenizer = _build_clip_tokenizer(), _build_t5_tokenizer()
    with torch.device(device):
        transformer = FluxTransformer2DModel(guidance_embeds=True)         # the defaults are FLUX.1-dev's
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=[128, 256, 512, 512],
                            down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                            layers_per_block=2, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                            use_post_quant_conv=False, sample_size=1024)   # FLUX.1-dev's: its tile size
        clip = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(clip_tokenizer), hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
            num_attention_heads=12, projection_dim=768, max_position_embeddings=77, hidden_act="quick_gelu",
            bos_token_id=clip_tokenizer.bos_token_id, eos_token_id=clip_tokenizer.eos_token_id,
            pad_token_id=clip_tokenizer.pad_token_id))
        t5 = T5EncoderModel(T5Config(
            vocab_size=len(t5_tokenizer), d_model=4096, d_kv=64, d_ff=10240, num_layers=2, num_heads=64,
            feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
            pad_token_id=t5_tokenizer.pad_token_id, eos_token_id=t5_tokenizer.eos_token_id))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae.to(torch.bfloat16), text_encoder=clip.to(torch.bfloat16),
                        tokenizer=clip_tokenizer, text_encoder_2=t5.to(torch.bfloat16), tokenizer_2=t5_tokenizer,
                        transformer=transformer.to(torch.bfloat16))
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def write_wan_i2v_14b(path: pathlib.Path, device: str) -> pathlib.Path:
    from diffusers import AutoencoderKLWan, WanImageToVideoPipeline, WanTransformer3DModel
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        CLIPVisionModel,
        UMT5Config,
        UMT5EncoderModel,
    )

    from services.common.tiny_model import _build_scheduler, _build_tokenizer

    tokenizer = _build_tokenizer()
    with torch.device(device):
        transformer = WanTransformer3DModel(num_attention_heads=40, attention_head_dim=128, in_channels=36,
                                            out_channels=16, ffn_dim=13824, num_layers=40, image_dim=1280,
                                            added_kv_proj_dim=5120)
        text_encoder = UMT5EncoderModel(UMT5Config(
            vocab_size=len(tokenizer), d_model=4096, d_kv=64, d_ff=10240, num_layers=2, num_heads=64,
            feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, pad_token_id=0, eos_token_id=1))
        image_encoder = CLIPVisionModel(CLIPVisionConfig(
            hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16, image_size=224,
            patch_size=14, projection_dim=1024, hidden_act="gelu"))
        vae = AutoencoderKLWan()
    processor = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    pipe = WanImageToVideoPipeline(tokenizer=tokenizer, text_encoder=text_encoder.to(torch.bfloat16),
                                   vae=vae.to(torch.float32), scheduler=_build_scheduler(),
                                   image_processor=processor, image_encoder=image_encoder.to(torch.bfloat16),
                                   transformer=transformer.to(torch.bfloat16))
    pipe.save_pretrained(path, safe_serialization=True)
    return path


WRITERS = {"flux-dev": write_flux_dev, "wan-i2v-14b": write_wan_i2v_14b}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shape", choices=sorted(WRITERS))
    parser.add_argument("dir")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    started = time.monotonic()
    WRITERS[args.shape](pathlib.Path(args.dir), args.device)
    print(f"wrote {args.dir} in {time.monotonic() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
