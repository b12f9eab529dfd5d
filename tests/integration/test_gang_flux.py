"""The denoiser gang on FLUX.1, through its real gRPC service: each layout returns the one-device latents (relative
L2 <= 1e-5), as tests/integration/test_gang.py checks Wan2.1.

FLUX's joint attention (text and image tokens together; the single-stream blocks carry them concatenated) with the
image tokens split and the text replicated (services/families/flux_attention.py), in Ulysses, Ring, CFG-parallel
(true CFG: a negative prompt with true_cfg_scale > 1) and TP gangs of [dev], and a Ulysses gang of [schnell] (no
guidance embedding). Image-token counts divide by no sequence degree (odd numbers of 2x2 patches), so padding is
exercised everywhere; the text is 7 tokens. The reference is the one-device DenoiserEngine (what a one-device
denoiser server runs) in this process.
"""

from __future__ import annotations

import functools

import pytest
import torch

from diffmesh.v1 import denoiser_pb2
from services.common.models import resolve_model_dir
from services.common.platform import set_platform
from services.common.tensors import TensorAssembler, iter_chunks
from services.common.tiny import write_tiny
from services.denoiser.engine import DenoiseParams, DenoiserEngine
from tests.integration.test_gang import LAYOUTS, REL_L2_TOLERANCE, DenoiserProcess, relative_l2

TEXT_TOKENS, TEXT_DIM, POOLED_DIM = 7, 32, 32      # the tiny FLUX's joint_attention_dim / pooled_projection_dim

REQUESTS = {
    # 48x48 px -> 3x3 = 9 image tokens; true CFG: two branches, which a CFG-parallel gang splits
    "true-cfg-9-tokens": (dict(width=48, height=48, num_frames=1, num_inference_steps=3, guidance_scale=3.5,
                               true_cfg_scale=4.0, seed=7), True),
    # 80x48 px -> 3x5 = 15 image tokens, three outputs, no negative: a CFG-parallel gang splits the outputs (2 + 1)
    "three-outputs-15-tokens": (dict(width=80, height=48, num_frames=1, num_inference_steps=2, guidance_scale=3.5,
                                     seed=3, num_outputs=3), False),
}
GANGS = [("flux", layout) for layout in ("ulysses2", "ring2", "cfg2", "tp2")] + [("flux-schnell", "ulysses2")]


def conditioning(seed: int, negative: bool) -> dict[str, torch.Tensor]:
    """What the encoder sends for a FLUX prompt (and a negative one): T5 token and CLIP pooled embeddings."""
    generator = torch.Generator().manual_seed(seed)
    names = ("prompt_embeds", "pooled_prompt_embeds") + (
        ("negative_prompt_embeds", "negative_pooled_prompt_embeds") if negative else ())
    shapes = {"prompt_embeds": (1, TEXT_TOKENS, TEXT_DIM), "pooled_prompt_embeds": (1, POOLED_DIM)}
    return {name: torch.randn(shapes[name.removeprefix("negative_")], generator=generator) for name in names}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Per family: the tiny directory and each request's one-device latents (made on first use)."""
    platform = set_platform("cpu")

    @functools.cache
    def prepare(family: str):
        model_dir = write_tiny(tmp_path_factory.mktemp(family) / f"{family}-tiny", family)
        denoiser = DenoiserEngine(resolve_model_dir(model_dir), platform)
        reference = {name: denoiser.denoise(DenoiseParams(request_id=name, **params),
                                            conditioning(params["seed"], negative))
                     for name, (params, negative) in REQUESTS.items()}
        # The negative branch moves the latents far past the tolerance, so CFG-parallel cannot pass by dropping it.
        params, _ = REQUESTS["true-cfg-9-tokens"]
        unguided = denoiser.denoise(DenoiseParams(request_id="no-negative", **params),
                                    conditioning(params["seed"], False))
        assert relative_l2(unguided, reference["true-cfg-9-tokens"]) > 1e-2
        return model_dir, reference

    return prepare


def denoise(stub, name: str, params: dict, tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    def messages():
        yield denoiser_pb2.DenoiseRequest(params=denoiser_pb2.DenoiseParams(request_id=name, **params))
        for tensor_name, tensor in tensors.items():
            for chunk in iter_chunks(tensor_name, tensor):
                yield denoiser_pb2.DenoiseRequest(tensor=chunk)

    assembler, steps = TensorAssembler(), 0
    for event in stub.Denoise(messages(), timeout=120):
        if event.WhichOneof("item") == "progress":
            steps += 1
        else:
            assembler.add(event.tensor)
    return assembler.finish()["latents"], steps


@pytest.mark.parametrize("family,layout", GANGS, ids=[f"{family}-{layout}" for family, layout in GANGS])
def test_gang_returns_the_single_device_latents(prepared, tmp_path, family, layout):
    model_dir, reference = prepared(family)
    gang = DenoiserProcess(model_dir, tmp_path, LAYOUTS[layout])
    try:
        for name, (params, negative) in REQUESTS.items():
            latents, steps = denoise(gang.stub, name, params, conditioning(params["seed"], negative))
            assert steps == params["num_inference_steps"], name
            assert latents.shape == reference[name].shape, name
            error = relative_l2(latents, reference[name])
            assert error <= REL_L2_TOLERANCE, f"{family} {layout} {name}: relative L2 error {error:.2e}"
    finally:
        assert gang.stop() == 0, "".join(gang.log[-30:])
