"""The denoiser gang on the other Wan variants, through its real gRPC service: each layout returns the one-device
latents (relative L2 <= 1e-5), as tests/integration/test_gang.py checks Wan2.1 T2V.

- Wan2.1 I2V: image cross-attention (CLIP embeddings before the text in attn2; add_k_proj / add_v_proj /
  norm_added_k sharded under TP) and the condition latents concatenated to the input, in Ulysses, Ring,
  CFG-parallel and TP gangs.
- Wan2.2 A14B T2V and I2V: two experts, both loaded through the plan; the steps cross the boundary.
- Wan2.2 TI2V-5B: one timestep per token; with an image its first frame's tokens have timestep 0, so a rank
  that embedded another rank's timesteps would show.

Every request's tensors are what the gateway sends: made once with the encoder and decoder engines. The reference
is the one-device DenoiserEngine (what a one-device denoiser server runs) in this process. Token counts divide
by no sequence degree here, so padding is exercised everywhere.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest
import torch
from PIL import Image

from diffmesh.v1 import denoiser_pb2
from services.common.images import encode_png
from services.common.models import resolve_model_dir
from services.common.platform import set_platform
from services.common.tensors import TensorAssembler, iter_chunks
from services.common.tiny import write_tiny
from services.decoder.engine import ConditionParams, DecoderEngine
from services.denoiser.engine import DenoiseParams, DenoiserEngine
from services.encoder.engine import EncodeParams, EncoderEngine
from tests.integration.test_gang import LAYOUTS, REL_L2_TOLERANCE, DenoiserProcess, relative_l2

PROMPT, NEGATIVE = "a red fox running through snow", "blurry"


@dataclasses.dataclass(frozen=True)
class Request:
    params: dict
    image: bool = False       # with a conditioning image (its embeddings and VAE latents travel too)


# Token counts (latent frames x patches high x patches wide): none divides by 2.
REQUESTS = {
    # 48x48 px, 9 frames -> 3x3x3 = 27 tokens, guided: CFG-parallel splits the branches
    "wan-i2v": {"guided-27-tokens": Request(dict(width=48, height=48, num_frames=9, num_inference_steps=3,
                                                 guidance_scale=5.0, seed=7), image=True),
                # 48x16 px, one frame, two outputs, unguided -> 1x1x3 = 3 tokens each: CFG ranks split the outputs
                "unguided-x2": Request(dict(width=48, height=16, num_frames=1, num_inference_steps=2,
                                            guidance_scale=1.0, seed=3, num_outputs=2), image=True)},
    # 80x48 px, 9 frames -> 3x3x5 = 45 tokens; 3 steps at flow_shift 3: 999 (transformer) | 857, 600 (transformer_2)
    "wan2.2": {"guided-45-tokens": Request(dict(width=80, height=48, num_frames=9, num_inference_steps=3,
                                                guidance_scale=4.0, guidance_scale_2=2.0, seed=5))},
    # Wan2.2 I2V A14B: the condition concatenated, no image embeddings, both experts (boundary 0.9: 999 | 857, 600)
    "wan2.2-i2v": {"guided-45-tokens": Request(dict(width=80, height=48, num_frames=9, num_inference_steps=3,
                                                    guidance_scale=4.0, guidance_scale_2=2.0, seed=6), image=True)},
    # 96x32 px, 9 frames -> 3x1x3 = 9 tokens (16x VAE), as text-to-video and with an image
    "wan2.2-ti2v": {"guided-9-tokens": Request(dict(width=96, height=32, num_frames=9, num_inference_steps=3,
                                                    guidance_scale=5.0, seed=9)),
                    "image-9-tokens": Request(dict(width=96, height=32, num_frames=9, num_inference_steps=2,
                                                   guidance_scale=5.0, seed=4), image=True)},
}

GANGS = [("wan-i2v", layout) for layout in ("ulysses2", "ring2", "cfg2", "tp2")] + \
        [("wan2.2", layout) for layout in ("ulysses2", "tp2")] + [("wan2.2-i2v", "ulysses2")] + \
        [("wan2.2-ti2v", layout) for layout in ("ulysses2", "ring2")]


@dataclasses.dataclass
class Prepared:
    model_dir: object
    tensors: dict[str, dict[str, torch.Tensor]]     # request name -> what the gateway sends the denoiser
    reference: dict[str, torch.Tensor]              # request name -> the one-device latents


def picture(width: int = 56, height: int = 40, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return encode_png(Image.fromarray(pixels))


def sampling(name: str, params: dict) -> DenoiseParams:
    return DenoiseParams(request_id=name, **params)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Per family: the tiny directory, each request's tensors and the one-device latents (made on first use)."""
    platform = set_platform("cpu")

    @functools.cache
    def prepare(family: str) -> Prepared:
        model_dir = write_tiny(tmp_path_factory.mktemp(family) / f"{family}-tiny", family)
        model = resolve_model_dir(model_dir)
        encoder, decoder, denoiser = EncoderEngine(model, platform), DecoderEngine(model, platform), \
            DenoiserEngine(model, platform)
        tensors, reference = {}, {}
        for name, request in REQUESTS[family].items():
            p, image = request.params, picture() if request.image else b""
            found = encoder.encode(EncodeParams(name, PROMPT, NEGATIVE, guidance_scale=p["guidance_scale"],
                                                image=image))
            if request.image:
                found.update(decoder.encode_condition(ConditionParams(name, image, p["width"], p["height"],
                                                                      p["num_frames"])))
            tensors[name] = found
            reference[name] = denoiser.denoise(sampling(name, p), found)
            run = denoiser.denoising.start(sampling(name, p), found, denoiser.device)
            if getattr(run, "boundary", None) is not None:
                # The steps cross the boundary: both experts run, in the gang as on one device.
                assert (run.timesteps >= run.boundary).any() and (run.timesteps < run.boundary).any()
        return Prepared(model_dir, tensors, reference)

    return prepare


def request_messages(name: str, params: dict, tensors: dict[str, torch.Tensor]):
    yield denoiser_pb2.DenoiseRequest(params=denoiser_pb2.DenoiseParams(request_id=name, **params))
    for tensor_name, tensor in tensors.items():
        for chunk in iter_chunks(tensor_name, tensor):
            yield denoiser_pb2.DenoiseRequest(tensor=chunk)


def denoise(stub, name: str, params: dict, tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    assembler, steps = TensorAssembler(), 0
    for event in stub.Denoise(request_messages(name, params, tensors), timeout=120):
        if event.WhichOneof("item") == "progress":
            steps += 1
        else:
            assembler.add(event.tensor)
    return assembler.finish()["latents"], steps


def test_the_requests_carry_what_each_variant_is_conditioned_on(prepared):
    """So that the equalities below cover the image cross-attention and the image path's per-token timesteps."""
    i2v = prepared("wan-i2v").tensors["guided-27-tokens"]
    assert {"image_embeds", "condition_latents", "negative_prompt_embeds"} <= set(i2v)
    ti2v = prepared("wan2.2-ti2v").tensors
    assert "condition_latents" in ti2v["image-9-tokens"] and "condition_latents" not in ti2v["guided-9-tokens"]


@pytest.mark.parametrize("family,layout", GANGS, ids=[f"{family}-{layout}" for family, layout in GANGS])
def test_gang_returns_the_single_device_latents(prepared, tmp_path, family, layout):
    ready = prepared(family)
    gang = DenoiserProcess(ready.model_dir, tmp_path, LAYOUTS[layout])
    try:
        for name, request in REQUESTS[family].items():
            latents, steps = denoise(gang.stub, name, request.params, ready.tensors[name])
            assert steps == request.params["num_inference_steps"], name
            assert latents.shape == ready.reference[name].shape, name
            error = relative_l2(latents, ready.reference[name])
            assert error <= REL_L2_TOLERANCE, f"{family} {layout} {name}: relative L2 error {error:.2e}"
    finally:
        assert gang.stop() == 0, "".join(gang.log[-30:])
