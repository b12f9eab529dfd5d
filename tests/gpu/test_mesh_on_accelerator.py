"""The mesh on an accelerator: same numbers as WanPipeline on that device, and a bf16 run that works.

Runs only where torch sees a CUDA or XPU device (marker `gpu`); skipped elsewhere, never counted as passed.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import WanPipeline

from diffmesh.client import GatewayClient
from diffmesh.v1 import gateway_pb2
from services.common.platform import is_available
from tests.integration.conftest import start_mesh, stop_mesh

ACCELERATOR = next((kind for kind in ("xpu", "cuda") if is_available(kind)), None)
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(ACCELERATOR is None, reason="no accelerator")]
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def fp32_mesh(model_dir):
    running = start_mesh(model_dir, ["--device", ACCELERATOR, "--dtype", "float32"])
    yield running
    assert stop_mesh(running) == 0


@pytest.mark.parametrize("num_frames", [1, 9])
def test_accelerator_mesh_equals_wan_pipeline_on_the_same_device(fp32_mesh, model_dir, num_frames):
    kwargs = dict(prompt="a red fox in snow", negative_prompt="blurry", height=64, width=96,
                  num_frames=num_frames, num_inference_steps=4, guidance_scale=5.0)
    result = GatewayClient(fp32_mesh.grpc_address).generate(gateway_pb2.GenerateRequest(
        **kwargs, seed=3, return_latents=True, return_frames=True), timeout=300)
    pipe = WanPipeline.from_pretrained(model_dir).to(ACCELERATOR)
    pipe.set_progress_bar_config(disable=True)
    ref_latents = pipe(**kwargs, generator=torch.Generator().manual_seed(3), output_type="latent").frames
    ref_frames = pipe(**kwargs, generator=torch.Generator().manual_seed(3), output_type="np").frames
    latent_error = (result.tensors["latents"] - ref_latents.float().cpu()).abs().max().item()
    frame_error = float(np.abs(result.tensors["frames"].numpy() - ref_frames).max())
    print(f"{ACCELERATOR} fp32 frames={num_frames}: max|latents diff|={latent_error:.3g} "
          f"max|frames diff|={frame_error:.3g}")
    assert latent_error <= TOLERANCE and frame_error <= TOLERANCE


def test_accelerator_mesh_in_bfloat16_equals_wan_pipeline_in_bfloat16(model_dir):
    kwargs = dict(prompt="a lighthouse", negative_prompt="dark", height=64, width=128, num_frames=5,
                  num_inference_steps=4, guidance_scale=5.0)
    running = start_mesh(model_dir, ["--device", ACCELERATOR])  # auto dtype: bfloat16 on accelerators
    try:
        result = GatewayClient(running.grpc_address).generate(gateway_pb2.GenerateRequest(
            **kwargs, seed=1, return_frames=True), timeout=300)
    finally:
        assert stop_mesh(running) == 0
    pipe = WanPipeline.from_pretrained(model_dir, dtype=torch.bfloat16).to(ACCELERATOR)
    pipe.set_progress_bar_config(disable=True)
    ref_frames = pipe(**kwargs, generator=torch.Generator().manual_seed(1), output_type="np").frames
    frame_error = float(np.abs(result.tensors["frames"].numpy() - ref_frames).max())
    print(f"{ACCELERATOR} bf16: max|frames diff|={frame_error:.3g}")
    assert frame_error <= TOLERANCE
    (mime, data), = result.media
    assert mime == "video/mp4" and len(data) > 0
