"""Two families behind one gateway: `diffmesh up --model WAN --model FLUX ...` serves Wan2.1 text-to-video (the
default) and FLUX.1 text-to-image side by side, each request routed to its model's stages and answered
with its own family's diffusers output, over gRPC and REST."""

from __future__ import annotations

import base64
import io
import time

import httpx
import imageio_ffmpeg
import numpy as np
import pytest
import torch
from diffusers import WanPipeline
from PIL import Image

from diffmesh.client import GatewayClient
from diffmesh.v1 import gateway_pb2
from tests.integration.conftest import FLUX_DEV, FLUX_SCHNELL
from tests.integration.test_flux import NEGATIVE, PROMPT, SEED, STEPS, TOLERANCE, load_pipeline, reference

FLUX = FLUX_DEV


@pytest.fixture(scope="module")
def mixed_mesh(families_mesh):
    """The session's mesh: Wan2.1 T2V (the default), FLUX.1 dev and schnell (tests/integration/conftest.py)."""
    return families_mesh


@pytest.fixture(scope="module")
def http(mixed_mesh):
    with httpx.Client(base_url=mixed_mesh.http_url, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def wan(model_dir) -> WanPipeline:
    pipe = WanPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def flux(flux_dirs):
    return load_pipeline(flux_dirs[FLUX])


def wan_reference(wan: WanPipeline, **kwargs) -> tuple[torch.Tensor, np.ndarray]:
    latents = wan(**kwargs, generator=torch.Generator().manual_seed(SEED), output_type="latent").frames
    frames = wan(**kwargs, generator=torch.Generator().manual_seed(SEED), output_type="np").frames
    return latents, frames


def png_pixels(b64: str) -> np.ndarray:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert image.format == "PNG" and image.mode == "RGB"
    return np.asarray(image)


def rounded(frame: np.ndarray) -> np.ndarray:
    return (np.clip(frame, 0, 1) * 255).round().astype(np.uint8)


def test_models_lists_both_with_their_tasks(http, mixed_mesh, model_dir):
    body = http.get("/v1/models").json()
    expected = [(model_dir.name, "text-to-video"), (FLUX_DEV, "text-to-image"), (FLUX_SCHNELL, "text-to-image")]
    assert [(m["id"], m["task"]) for m in body["data"]] == expected
    assert mixed_mesh.model == model_dir.name           # the first --model is the default
    listed = mixed_mesh.gateway_stub().ListModels(gateway_pb2.ListModelsRequest(), timeout=30).models
    assert [(m.id, m.task) for m in listed] == expected


def test_grpc_wan_by_default_equals_wan_pipeline(mixed_mesh, wan):
    result = GatewayClient(mixed_mesh.grpc_address).generate(gateway_pb2.GenerateRequest(
        prompt=PROMPT, negative_prompt=NEGATIVE, seed=SEED, num_inference_steps=STEPS, width=32, height=32,
        num_frames=5, guidance_scale=4.5, return_latents=True, return_frames=True), timeout=300)
    ref_latents, ref_frames = wan_reference(wan, prompt=PROMPT, negative_prompt=NEGATIVE, height=32, width=32,
                                            num_frames=5, num_inference_steps=STEPS, guidance_scale=4.5)
    latents, frames = result.tensors["latents"], result.tensors["frames"].numpy()
    assert latents.shape == ref_latents.shape and frames.shape == ref_frames.shape == (1, 5, 32, 32, 3)
    assert (latents - ref_latents).abs().max().item() <= TOLERANCE
    assert np.abs(frames - ref_frames).max() <= TOLERANCE
    assert [mime for mime, _ in result.media] == ["video/mp4"]


def test_grpc_flux_by_name_equals_flux_pipeline(mixed_mesh, flux):
    result = GatewayClient(mixed_mesh.grpc_address).generate(gateway_pb2.GenerateRequest(
        model=FLUX, prompt=PROMPT, negative_prompt=NEGATIVE, true_cfg_scale=3.0, seed=SEED,
        num_inference_steps=STEPS, width=48, height=32, guidance_scale=3.5, n=2, return_latents=True,
        return_frames=True), timeout=300)
    ref_latents, ref_frames = reference(flux, width=48, height=32, guidance_scale=3.5, n=2, negative_prompt=NEGATIVE,
                                        true_cfg_scale=3.0)
    latents, frames = result.tensors["latents"], result.tensors["frames"].numpy()
    assert latents.shape == ref_latents.shape == (2, 16, 4, 6) and frames.shape == (2, 1, 32, 48, 3)
    assert (latents - ref_latents).abs().max().item() <= TOLERANCE
    assert np.abs(frames[:, 0] - ref_frames).max() <= TOLERANCE
    assert [mime for mime, _ in result.media] == ["image/png"] * 2


def test_rest_images_from_each_family_are_its_reference_rounded(http, wan, flux):
    body = {"prompt": "a lighthouse", "size": "48x32", "seed": SEED, "num_inference_steps": STEPS}
    wan_reply = http.post("/v1/images/generations", json=body)          # the default model: Wan, one frame
    flux_reply = http.post("/v1/images/generations", json={**body, "model": FLUX})
    assert wan_reply.status_code == 200 and flux_reply.status_code == 200, (wan_reply.text, flux_reply.text)
    _, wan_frames = wan_reference(wan, prompt="a lighthouse", height=32, width=48, num_frames=1,
                                  num_inference_steps=STEPS, guidance_scale=5.0)
    _, flux_frames = reference(flux, prompt="a lighthouse", width=48, height=32, guidance_scale=3.5)
    assert np.array_equal(png_pixels(wan_reply.json()["data"][0]["b64_json"]), rounded(wan_frames[0, 0]))
    assert np.array_equal(png_pixels(flux_reply.json()["data"][0]["b64_json"]), rounded(flux_frames[0]))


def test_rest_videos_serve_wan_and_refuse_flux(http, tmp_path):
    refused = http.post("/v1/videos", json={"model": FLUX, "prompt": "waves", "size": "32x32", "num_frames": 5})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "model", refused.text
    job = http.post("/v1/videos", json={"prompt": "waves", "size": "32x32", "num_frames": 5,
                                        "num_inference_steps": 2, "seed": 1}).json()
    deadline = time.monotonic() + 120
    while (state := http.get(f"/v1/videos/{job['id']}").json())["status"] not in ("completed", "failed"):
        assert time.monotonic() < deadline, state
        time.sleep(0.2)
    assert state["status"] == "completed", state
    path = tmp_path / "waves.mp4"
    path.write_bytes(http.get(f"/v1/videos/{job['id']}/content").content)
    assert imageio_ffmpeg.count_frames_and_secs(str(path))[0] == 5
