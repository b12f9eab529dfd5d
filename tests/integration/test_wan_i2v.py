"""Wan image-to-video through the real services: the mesh returns what diffusers' WanImageToVideoPipeline returns.

One `diffmesh up` serves Wan2.1 I2V (a CLIP vision image encoder in the encoder stage) and Wan2.2 I2V A14B (two
experts, no image encoder); the conditioning image's VAE encode runs on the decoder stage. Same directory, image,
prompt, seed, size, frames and steps: latents and frames equal the pipeline's (CPU float32, <= 1e-5). The image
arrives by gRPC (`GenerateRequest.image`) and by REST (`input_reference` as a multipart file, as the OpenAI SDK
sends it, or a JSON data URL); what no model can use is a 400 naming the field.
"""

from __future__ import annotations

import base64
import io
import time

import grpc
import httpx
import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKLWan,
    UniPCMultistepScheduler,
    WanImageToVideoPipeline,
    WanTransformer3DModel,
)
from PIL import Image
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel

from diffmesh.client import GatewayClient
from diffmesh.v1 import gateway_pb2
from services.common.images import encode_png
from services.common.models import resolve_model_dir
from services.common.platform import set_platform
from services.common.tiny.wan_i2v import write_tiny_wan22_i2v, write_tiny_wan_i2v
from services.common.tiny_model import _build_tokenizer
from services.decoder.engine import ConditionParams, DecodeParams, DecoderEngine
from services.denoiser.engine import DenoiseParams, DenoiserEngine
from services.encoder.engine import EncodeParams, EncoderEngine
from tests.integration.conftest import start_mesh, stop_mesh

TOLERANCE = 1e-5
PROMPT, NEGATIVE = "a red fox running through snow", "blurry"


def picture(width: int = 56, height: int = 40, seed: int = 0) -> bytes:
    """A PNG of another size than the video's, so the pipeline's resize is part of what is compared."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return encode_png(Image.fromarray(pixels))


@pytest.fixture(scope="module")
def i2v_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("i2v")
    return write_tiny_wan_i2v(root / "wan2.1-i2v-tiny"), write_tiny_wan22_i2v(root / "wan2.2-i2v-tiny")


@pytest.fixture(scope="module")
def i2v_mesh(i2v_dirs):
    wan21, wan22 = i2v_dirs
    running = start_mesh(wan21, ["--model", str(wan22)])
    yield running
    assert stop_mesh(running) == 0


def reference(model_dir, image: bytes, output_type: str, **kwargs):
    pipe = WanImageToVideoPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    seed = kwargs.pop("seed")
    return pipe(image=Image.open(io.BytesIO(image)), generator=torch.Generator().manual_seed(seed),
                output_type=output_type, **kwargs).frames


CASES = [
    pytest.param(0, dict(width=48, height=32, num_frames=5, num_inference_steps=3, guidance_scale=5.0),
                 id="wan2.1-guided"),
    pytest.param(0, dict(width=32, height=32, num_frames=1, num_inference_steps=2, guidance_scale=1.0),
                 id="wan2.1-one-frame-unguided"),
    pytest.param(1, dict(width=48, height=32, num_frames=5, num_inference_steps=4, guidance_scale=4.0,
                         guidance_scale_2=2.0), id="wan2.2-a14b-two-scales"),
]


@pytest.mark.parametrize("which,case", CASES)
def test_mesh_equals_wan_image_to_video_pipeline(i2v_mesh, i2v_dirs, which, case):
    model_dir, image = i2v_dirs[which], picture()
    client = GatewayClient(i2v_mesh.grpc_address)
    request = gateway_pb2.GenerateRequest(model=model_dir.name, prompt=PROMPT, negative_prompt=NEGATIVE, seed=11,
                                          image=image, return_latents=True, return_frames=True, **case)
    result = client.generate(request, timeout=300)
    kwargs = dict(prompt=PROMPT, negative_prompt=NEGATIVE, seed=11, **case)
    ref_latents = reference(model_dir, image, "latent", **kwargs)
    ref_frames = reference(model_dir, image, "np", **kwargs)
    latents, frames = result.tensors["latents"], result.tensors["frames"].numpy()
    assert latents.shape == ref_latents.shape
    assert frames.shape == ref_frames.shape == (1, case["num_frames"], case["height"], case["width"], 3)
    assert (latents - ref_latents).abs().max().item() <= TOLERANCE
    assert np.abs(frames - ref_frames).max() <= TOLERANCE


def test_the_image_conditions_the_video_and_the_second_expert_runs(i2v_mesh, i2v_dirs):
    """Two checks that the equality above could not pass by accident: another image gives another video, and
    Wan2.2's low-noise expert matters (diffusers without transformer_2's steps gives other frames)."""
    client = GatewayClient(i2v_mesh.grpc_address)
    base = dict(prompt=PROMPT, seed=3, width=32, height=32, num_frames=5, num_inference_steps=3,
                return_latents=True)
    first = client.generate(gateway_pb2.GenerateRequest(model=i2v_dirs[0].name, image=picture(seed=1), **base))
    other = client.generate(gateway_pb2.GenerateRequest(model=i2v_dirs[0].name, image=picture(seed=2), **base))
    assert (first.tensors["latents"] - other.tensors["latents"]).abs().max().item() > 1e-3

    wan22 = i2v_dirs[1]
    mesh_latents = client.generate(gateway_pb2.GenerateRequest(model=wan22.name, image=picture(), **base))
    pipe = WanImageToVideoPipeline.from_pretrained(wan22)
    pipe.set_progress_bar_config(disable=True)
    pipe.register_to_config(boundary_ratio=None)     # one expert for every step
    one_expert = pipe(image=Image.open(io.BytesIO(picture())), prompt=PROMPT, height=32, width=32, num_frames=5,
                      num_inference_steps=3, generator=torch.Generator().manual_seed(3), output_type="latent").frames
    assert (mesh_latents.tensors["latents"] - one_expert).abs().max().item() > 1e-3


def test_models_list_image_to_video_with_their_limits(i2v_mesh, i2v_dirs):
    body = httpx.get(f"{i2v_mesh.http_url}/v1/models", timeout=30).json()
    listed = {model["id"]: model for model in body["data"]}
    assert set(listed) == {d.name for d in i2v_dirs}
    for model in listed.values():
        assert model["task"] == "image-to-video" and model["limits"]["needs_image"] is True
        assert model["limits"]["size_multiple"] == 16 and model["limits"]["frame_multiple"] == 4
    assert httpx.get(f"{i2v_mesh.http_url}/v1/models/sdxl", timeout=30).status_code == 404


def wait_for(http: httpx.Client, video_id: str, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = http.get(f"/v1/videos/{video_id}").json()
        if job["status"] in ("completed", "failed"):
            return job
        time.sleep(0.2)
    raise AssertionError(f"video {video_id} did not finish: {job}")


def test_rest_takes_input_reference_as_a_file_and_as_a_data_url(i2v_mesh, i2v_dirs):
    image = picture()
    fields = {"prompt": PROMPT, "model": i2v_dirs[0].name, "size": "32x32", "num_frames": "5", "seed": "4",
              "num_inference_steps": "2"}
    with httpx.Client(base_url=i2v_mesh.http_url, timeout=120) as http:
        # multipart/form-data with the image as a file: what the OpenAI SDK's videos.create sends
        upload = http.post("/v1/videos", data=fields, files={"input_reference": ("ref.png", image, "image/png")})
        assert upload.status_code == 200, upload.text
        data_url = "data:image/png;base64," + base64.b64encode(image).decode("ascii")
        as_json = http.post("/v1/videos", json={**fields, "num_frames": 5, "seed": 4, "num_inference_steps": 2,
                                                "input_reference": data_url})
        assert as_json.status_code == 200, as_json.text
        videos = []
        for reply in (upload, as_json):
            assert wait_for(http, reply.json()["id"])["status"] == "completed"
            content = http.get(f"/v1/videos/{reply.json()['id']}/content")
            assert content.status_code == 200 and content.headers["content-type"] == "video/mp4"
            videos.append(content.content)
        assert videos[0] == videos[1]      # the same image, seed and sizes by either transport: the same video


@pytest.mark.parametrize("reference,problem", [
    (None, "needs a conditioning image"),
    (b"this is not an image", "not a PNG, JPEG or WebP image"),
    (picture()[:60], "not a PNG, JPEG or WebP image"),     # a truncated PNG
])
def test_rest_refuses_a_missing_or_broken_image_naming_input_reference(i2v_mesh, i2v_dirs, reference, problem):
    files = None if reference is None else {"input_reference": ("ref.png", reference, "image/png")}
    reply = httpx.post(f"{i2v_mesh.http_url}/v1/videos", data={"prompt": PROMPT, "model": i2v_dirs[0].name,
                                                               "size": "32x32", "num_frames": "5"},
                       files=files, timeout=60)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == "input_reference" and problem in error["message"]
    assert "Traceback" not in reply.text


def test_grpc_refuses_a_missing_or_broken_image_naming_image(i2v_mesh, i2v_dirs):
    client = GatewayClient(i2v_mesh.grpc_address)
    for image in (b"", b"GIF89a not really"):
        request = gateway_pb2.GenerateRequest(model=i2v_dirs[1].name, prompt=PROMPT, image=image, width=32,
                                              height=32, num_frames=5, num_inference_steps=2)
        with pytest.raises(grpc.RpcError) as raised:
            client.generate(request, timeout=60)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert raised.value.details().startswith("image: ")
    # The mesh keeps serving after the refusals.
    ok = client.generate(gateway_pb2.GenerateRequest(model=i2v_dirs[1].name, prompt=PROMPT, image=picture(),
                                                     width=32, height=32, num_frames=1, num_inference_steps=1))
    assert len(ok.media) == 1


def test_a_text_to_video_model_refuses_an_image(mesh):
    client = GatewayClient(mesh.grpc_address)
    with pytest.raises(grpc.RpcError) as raised:
        client.generate(gateway_pb2.GenerateRequest(prompt=PROMPT, image=picture(), width=32, height=32,
                                                    num_inference_steps=1), timeout=60)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.details().startswith("image: ") and "takes no conditioning image" in raised.value.details()


def write_foreign_i2v_model(path):
    """A Wan2.1 I2V directory built here with the libraries' classes, in a shape the tiny writer never uses
    (3 layers, 2 heads of 16, a wider CLIP vision with another image size, another scheduler shift)."""
    torch.manual_seed(123)
    tokenizer = _build_tokenizer()
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), d_model=24, d_kv=6, d_ff=48,
                                               num_layers=1, num_heads=4, relative_attention_num_buckets=8,
                                               feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1,
                                               decoder_start_token_id=0))
    vision = CLIPVisionModel(CLIPVisionConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=3,
                                              num_attention_heads=4, image_size=48, patch_size=16))
    processor = CLIPImageProcessor(size={"shortest_edge": 48}, crop_size={"height": 48, "width": 48})
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16,
                                        in_channels=36, out_channels=16, text_dim=24, freq_dim=64, ffn_dim=48,
                                        num_layers=3, image_dim=24, added_kv_proj_dim=32, rope_max_seq_len=512)
    vae = AutoencoderKLWan(base_dim=4, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        num_train_timesteps=1000, flow_shift=5.0)
    WanImageToVideoPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                            image_processor=processor, image_encoder=vision,
                            transformer=transformer).save_pretrained(path)
    return path


def test_engines_equal_the_pipeline_on_a_directory_the_project_did_not_write(tmp_path):
    model = resolve_model_dir(write_foreign_i2v_model(tmp_path / "foreign-i2v"))
    platform = set_platform("cpu")
    encoder, denoiser, decoder = EncoderEngine(model, platform), DenoiserEngine(model, platform), \
        DecoderEngine(model, platform)
    image, size = picture(70, 50, seed=5), dict(width=64, height=32, num_frames=5)
    tensors = encoder.encode(EncodeParams("r", PROMPT, NEGATIVE, guidance_scale=3.0, image=image))
    tensors.update(decoder.encode_condition(ConditionParams("r", image, **size)))
    latents = denoiser.denoise(DenoiseParams("r", size["width"], size["height"], size["num_frames"], 3, 3.0, 21),
                               tensors)
    frames = decoder.decode(DecodeParams("r", format="none", return_frames=True), latents).frames
    kwargs = dict(prompt=PROMPT, negative_prompt=NEGATIVE, seed=21, num_inference_steps=3, guidance_scale=3.0,
                  **size)
    assert (latents - reference(model.path, image, "latent", **kwargs)).abs().max().item() <= TOLERANCE
    assert np.abs(frames - reference(model.path, image, "np", **kwargs)).max() <= TOLERANCE
