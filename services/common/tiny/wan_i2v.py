"""Tiny random-weight Wan image-to-video models (`WanImageToVideoPipeline`), offline, in seconds.

- `write_tiny_wan_i2v`: Wan2.1 I2V — a CLIP vision image encoder (and its image processor) feeding the
  transformer's image cross-attention; the transformer takes 36 channels (16 latent + 4 mask + 16 condition).
- `write_tiny_wan22_i2v`: Wan2.2 I2V A14B — no image encoder, two transformers switching at boundary_ratio.

The text encoder, tokenizer, VAE and scheduler are the tiny Wan2.1 T2V model's (services/common/tiny_model.py).
"""

from __future__ import annotations

import os
import pathlib

import torch

from services.common import tiny_model as t2v

IMAGE_SIZE = 32            # CLIP vision's input side: the processor resizes and crops every image to it
IMAGE_HIDDEN = 16          # CLIP vision's width: the transformer's image_dim
BOUNDARY_RATIO = 0.9       # with the tiny scheduler's 3-4 test steps, both experts run


def _build_image_encoder():
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(hidden_size=IMAGE_HIDDEN, intermediate_size=32, num_hidden_layers=2,
                              num_attention_heads=2, image_size=IMAGE_SIZE, patch_size=8, projection_dim=IMAGE_HIDDEN)
    encoder = CLIPVisionModel(config).eval()
    processor = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                   crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    return encoder, processor


def _build_i2v_transformer(image_dim: int | None):
    from diffusers import WanTransformer3DModel

    heads, head_dim = 4, 12
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim,
        in_channels=36, out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=1024,
        image_dim=image_dim, added_kv_proj_dim=heads * head_dim if image_dim else None,
    )
    t2v._variance_preserving_init(model)
    with torch.no_grad():
        for block in model.blocks:
            block.attn2.norm_q.weight.fill_(t2v._CROSS_ATTN_QK_GAIN)
            block.attn2.norm_k.weight.fill_(t2v._CROSS_ATTN_QK_GAIN)
    return model.eval()


def _save(pipe, path: str | os.PathLike) -> pathlib.Path:
    out = pathlib.Path(path)
    out.mkdir(parents=True, exist_ok=True)
    with t2v._quiet_progress_bars():
        pipe.save_pretrained(out, safe_serialization=True)
    return out


def write_tiny_wan_i2v(path: str | os.PathLike, seed: int = 0) -> pathlib.Path:
    """Wan2.1 I2V in diffusers format; the same seed gives the same weights."""
    from diffusers import WanImageToVideoPipeline

    tokenizer = t2v._build_tokenizer()
    with t2v._BUILD_LOCK:
        with t2v._seeded(seed * 10 + 1):
            text_encoder = t2v._build_text_encoder(len(tokenizer))
        with t2v._seeded(seed * 10 + 4):
            transformer = _build_i2v_transformer(IMAGE_HIDDEN)
        with t2v._seeded(seed * 10 + 3):
            vae = t2v._build_vae()
        with t2v._seeded(seed * 10 + 5):
            image_encoder, image_processor = _build_image_encoder()
    pipe = WanImageToVideoPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
                                   scheduler=t2v._build_scheduler(), image_processor=image_processor,
                                   image_encoder=image_encoder, transformer=transformer)
    return _save(pipe, path)


def write_tiny_wan22_i2v(path: str | os.PathLike, seed: int = 0) -> pathlib.Path:
    """Wan2.2 I2V A14B in diffusers format: two experts, no image encoder."""
    from diffusers import WanImageToVideoPipeline

    tokenizer = t2v._build_tokenizer()
    with t2v._BUILD_LOCK:
        with t2v._seeded(seed * 10 + 1):
            text_encoder = t2v._build_text_encoder(len(tokenizer))
        with t2v._seeded(seed * 10 + 6):
            transformer = _build_i2v_transformer(None)
        with t2v._seeded(seed * 10 + 7):
            transformer_2 = _build_i2v_transformer(None)
        with t2v._seeded(seed * 10 + 3):
            vae = t2v._build_vae()
    pipe = WanImageToVideoPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
                                   scheduler=t2v._build_scheduler(), transformer=transformer,
                                   transformer_2=transformer_2, boundary_ratio=BOUNDARY_RATIO)
    return _save(pipe, path)
