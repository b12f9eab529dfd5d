"""The mesh returns what diffusers' own WanPipeline returns, through the real services.

Same model directory, prompt, negative prompt, seed, size, frames, steps and guidance: the final latents and
the decoded frames from the gateway equal WanPipeline's (float32 on CPU, max abs difference <= 1e-5).
"""

from __future__ import annotations

import io

import imageio_ffmpeg
import numpy as np
import pytest
import torch
from diffusers import WanPipeline
from PIL import Image

from diffmesh.client import GatewayClient
from diffmesh.v1 import decoder_pb2, gateway_pb2

TOLERANCE = 1e-5
CASES = [
    pytest.param(dict(num_frames=1, width=48, height=32, guidance_scale=5.0, n=1), id="image-guided"),
    pytest.param(dict(num_frames=5, width=32, height=32, guidance_scale=4.5, n=1), id="video-5-frames"),
    pytest.param(dict(num_frames=9, width=32, height=48, guidance_scale=1.0, n=2), id="video-unguided-n2"),
]


@pytest.fixture(scope="module")
def pipeline(model_dir) -> WanPipeline:
    pipe = WanPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("case", CASES)
def test_mesh_latents_and_frames_equal_wan_pipeline(mesh, pipeline, case):
    prompt, negative, seed, steps = "a red fox running through snow", "blurry, low quality", 1234, 4
    client = GatewayClient(mesh.grpc_address)
    request = gateway_pb2.GenerateRequest(
        prompt=prompt, negative_prompt=negative, seed=seed, num_inference_steps=steps,
        width=case["width"], height=case["height"], num_frames=case["num_frames"],
        guidance_scale=case["guidance_scale"], n=case["n"], return_latents=True, return_frames=True,
    )
    result = client.generate(request, timeout=300)

    reference = dict(prompt=prompt, negative_prompt=negative, height=case["height"], width=case["width"],
                     num_frames=case["num_frames"], num_inference_steps=steps,
                     guidance_scale=case["guidance_scale"], num_videos_per_prompt=case["n"])
    ref_latents = pipeline(**reference, generator=torch.Generator().manual_seed(seed), output_type="latent").frames
    ref_frames = pipeline(**reference, generator=torch.Generator().manual_seed(seed), output_type="np").frames

    latents, frames = result.tensors["latents"], result.tensors["frames"].numpy()
    assert latents.shape == ref_latents.shape and latents.dtype == torch.float32
    assert frames.shape == ref_frames.shape == (case["n"], case["num_frames"], case["height"], case["width"], 3)
    assert (latents - ref_latents).abs().max().item() <= TOLERANCE
    assert np.abs(frames - ref_frames).max() <= TOLERANCE
    assert result.seed == seed and len(result.media) == case["n"]


def test_png_pixels_are_the_reference_frame_rounded(mesh, pipeline):
    client = GatewayClient(mesh.grpc_address)
    result = client.generate(gateway_pb2.GenerateRequest(
        prompt="a lighthouse", seed=5, num_inference_steps=3, width=64, height=32, num_frames=1,
        format=decoder_pb2.MEDIA_FORMAT_PNG), timeout=300)
    ref = pipeline(prompt="a lighthouse", height=32, width=64, num_frames=1, num_inference_steps=3,
                   guidance_scale=5.0, generator=torch.Generator().manual_seed(5), output_type="np").frames
    (mime, data), = result.media
    image = Image.open(io.BytesIO(data))
    assert mime == "image/png" and image.size == (64, 32) and image.mode == "RGB"
    expected = (np.clip(ref[0, 0], 0, 1) * 255).round().astype(np.uint8)
    assert np.array_equal(np.asarray(image), expected)


def test_mp4_has_the_requested_frame_count(mesh, tmp_path):
    client = GatewayClient(mesh.grpc_address)
    result = client.generate(gateway_pb2.GenerateRequest(prompt="waves", seed=1, num_inference_steps=2,
                                                         width=48, height=32, num_frames=13, fps=8), timeout=300)
    (mime, data), = result.media
    path = tmp_path / "clip.mp4"
    path.write_bytes(data)
    frames, seconds = imageio_ffmpeg.count_frames_and_secs(str(path))
    assert mime == "video/mp4" and frames == 13
    assert abs(seconds - 13 / 8) < 0.2
