"""FLUX.1 through the mesh returns what diffusers' own FluxPipeline returns.

One `diffmesh up` serves two tiny FLUX models, [dev] (guidance embedded; the default) and [schnell] (no guidance
embedding). Same directory, prompt, negative prompt, seed, size, steps and scales: the final latents (unpacked,
[n, 16, H/8, W/8]) and the decoded frames from the gateway equal FluxPipeline's (float32 on CPU, max abs
difference <= 1e-5), over gRPC and as REST PNGs. A directory this project did not write (other channel, layer,
head and VAE-level counts, other tokenizers, another scheduler shift) is checked the same way on the engines.
"""

from __future__ import annotations

import base64
import io
import pathlib

import grpc
import httpx
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from PIL import Image
from tokenizers import pre_tokenizers
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

from diffmesh.client import GatewayClient
from diffmesh.v1 import gateway_pb2
from services.common.errors import InvalidArgument
from services.common.models import resolve_model_dir
from services.common.platform import set_platform
from services.decoder.engine import DecodeParams, DecoderEngine
from services.denoiser.engine import DenoiserEngine
from services.encoder.engine import EncodeParams, EncoderEngine
from services.families.base import Sampling
from tests.integration.conftest import FLUX_DEV, FLUX_SCHNELL

TOLERANCE = 1e-5
PROMPT, NEGATIVE, SEED, STEPS = "a red fox running through snow", "blurry, low quality", 1234, 3
DEV, SCHNELL = FLUX_DEV, FLUX_SCHNELL

CASES = [
    pytest.param(dict(model=DEV, width=48, height=32, guidance_scale=3.5, n=1), id="dev-guidance-embedded"),
    pytest.param(dict(model=DEV, width=32, height=48, guidance_scale=2.0, n=1, negative_prompt=NEGATIVE,
                      true_cfg_scale=4.0), id="dev-true-cfg"),
    pytest.param(dict(model=DEV, width=32, height=32, guidance_scale=5.0, n=2), id="dev-n2"),
    # A negative prompt without true_cfg_scale > 1 runs no second branch, in the pipeline and the mesh.
    pytest.param(dict(model=DEV, width=32, height=32, guidance_scale=3.5, n=1, negative_prompt=NEGATIVE),
                 id="dev-negative-without-true-cfg"),
    pytest.param(dict(model=SCHNELL, width=48, height=48, guidance_scale=0.0, n=1), id="schnell"),
    pytest.param(dict(model=SCHNELL, width=32, height=48, guidance_scale=3.5, n=2, negative_prompt=NEGATIVE,
                      true_cfg_scale=2.5), id="schnell-true-cfg-n2"),
]


@pytest.fixture(scope="module")
def flux_mesh(families_mesh):
    """The session's Wan + FLUX mesh (tests/integration/conftest.py); every request here names its model."""
    return families_mesh


@pytest.fixture(scope="module")
def pipelines(flux_dirs) -> dict[str, FluxPipeline]:
    return {name: load_pipeline(path) for name, path in flux_dirs.items()}


@pytest.fixture(scope="module")
def http(flux_mesh):
    with httpx.Client(base_url=flux_mesh.http_url, timeout=120) as client:
        yield client


def load_pipeline(path: pathlib.Path) -> FluxPipeline:
    pipe = FluxPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference(pipe: FluxPipeline, *, width: int, height: int, guidance_scale: float, n: int = 1,
              negative_prompt: str = "", true_cfg_scale: float = 1.0, prompt: str = PROMPT, seed: int = SEED,
              steps: int = STEPS, frames: bool = True, **_) -> tuple[torch.Tensor, np.ndarray | None]:
    """FluxPipeline's final latents, unpacked as the mesh sends them (taken by its step-end callback after the
    last step), and its frames (`output_type="np"`). The mesh's empty negative prompt is the pipeline's None."""
    final: dict[str, torch.Tensor] = {}

    def keep_latents(_pipe, _index, _t, tensors: dict) -> dict:
        final["latents"] = tensors["latents"]
        return {}

    images = pipe(prompt=prompt, negative_prompt=negative_prompt or None, true_cfg_scale=true_cfg_scale,
                  height=height, width=width, num_inference_steps=steps, guidance_scale=guidance_scale,
                  num_images_per_prompt=n, generator=torch.Generator().manual_seed(seed),
                  output_type="np" if frames else "latent", callback_on_step_end=keep_latents).images
    latents = FluxPipeline._unpack_latents(final["latents"], height, width, pipe.vae_scale_factor)
    return latents, images if frames else None


def test_the_cases_discriminate(pipelines):
    """Guidance, the negative prompt, the prompt and the seed each move the tiny models' latents far past the
    tolerance, so an equality below cannot pass by a mesh that drops one of them."""
    dev, schnell = pipelines[DEV], pipelines[SCHNELL]
    base = dict(width=32, height=32, guidance_scale=3.5, frames=False)
    latents = reference(dev, **base)[0]
    for changed in (dict(guidance_scale=1.0), dict(negative_prompt=NEGATIVE, true_cfg_scale=4.0),
                    dict(prompt="a blue whale"), dict(seed=SEED + 1)):
        assert (reference(dev, **{**base, **changed})[0] - latents).abs().max() > 1e-2, changed
    # schnell has no guidance input: its guidance_scale changes nothing, in the pipeline too
    assert torch.equal(reference(schnell, **base)[0], reference(schnell, **{**base, "guidance_scale": 1.0})[0])


@pytest.mark.parametrize("case", CASES)
def test_mesh_latents_and_frames_equal_flux_pipeline(flux_mesh, pipelines, case):
    client = GatewayClient(flux_mesh.grpc_address)
    fields = dict(model=case["model"], prompt=PROMPT, seed=SEED, num_inference_steps=STEPS, width=case["width"],
                  height=case["height"], guidance_scale=case["guidance_scale"], n=case["n"],
                  negative_prompt=case.get("negative_prompt", ""), return_latents=True, return_frames=True)
    if "true_cfg_scale" in case:
        fields["true_cfg_scale"] = case["true_cfg_scale"]
    result = client.generate(gateway_pb2.GenerateRequest(**fields), timeout=300)
    ref_latents, ref_frames = reference(pipelines[case["model"]], **case)

    latents, frames = result.tensors["latents"], result.tensors["frames"].numpy()
    n, height, width = case["n"], case["height"], case["width"]
    assert latents.shape == ref_latents.shape == (n, 16, height // 8, width // 8) and latents.dtype == torch.float32
    assert frames.shape == (n, 1, height, width, 3) and ref_frames.shape == (n, height, width, 3)
    assert (latents - ref_latents).abs().max().item() <= TOLERANCE
    assert np.abs(frames[:, 0] - ref_frames).max() <= TOLERANCE
    assert result.seed == SEED and [mime for mime, _ in result.media] == ["image/png"] * n


def test_rest_png_is_the_reference_frame_rounded(http, pipelines):
    body = {"model": DEV, "prompt": PROMPT, "size": "48x32", "seed": 5, "num_inference_steps": STEPS,
            "guidance_scale": 2.5, "negative_prompt": NEGATIVE, "true_cfg_scale": 3.0}
    reply = http.post("/v1/images/generations", json=body)
    assert reply.status_code == 200, reply.text
    (item,) = reply.json()["data"]
    image = Image.open(io.BytesIO(base64.b64decode(item["b64_json"])))
    _, ref = reference(pipelines[DEV], width=48, height=32, guidance_scale=2.5, negative_prompt=NEGATIVE,
                       true_cfg_scale=3.0, seed=5)
    assert image.format == "PNG" and image.size == (48, 32) and image.mode == "RGB"
    assert np.array_equal(np.asarray(image), (np.clip(ref[0], 0, 1) * 255).round().astype(np.uint8))


def test_models_lists_both_as_text_to_image(http, flux_mesh):
    body = http.get("/v1/models").json()
    flux = [m for m in body["data"] if m["id"] in (DEV, SCHNELL)]
    assert [m["id"] for m in flux] == [DEV, SCHNELL]
    limits = {m["id"]: m["limits"] for m in flux}
    assert {m["task"] for m in flux} == {"text-to-image"}
    assert limits[DEV]["guidance_embedding"] is True and limits[SCHNELL]["guidance_embedding"] is False
    assert all(lim["frame_multiple"] == 0 and lim["size_multiple"] == 16 and lim["true_cfg"] for lim in limits.values())
    listed = flux_mesh.gateway_stub().ListModels(gateway_pb2.ListModelsRequest(), timeout=30).models
    assert [(m.id, m.task) for m in listed if m.id in (DEV, SCHNELL)] == [(DEV, "text-to-image"),
                                                                          (SCHNELL, "text-to-image")]


@pytest.mark.parametrize("model", [DEV, SCHNELL])
def test_num_frames_other_than_1_is_rejected_naming_it(flux_mesh, http, model):
    stub = flux_mesh.gateway_stub()
    request = gateway_pb2.GenerateRequest(model=model, prompt="a cat", width=32, height=32, num_frames=5,
                                          num_inference_steps=1)
    with pytest.raises(grpc.RpcError) as raised:
        list(stub.Generate(request, timeout=30))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "num_frames" in raised.value.details()
    # REST's video endpoint refuses an image model outright, naming the model
    reply = http.post("/v1/videos", json={"model": model, "prompt": "a cat", "size": "32x32", "num_frames": 5})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "model", reply.text


@pytest.mark.parametrize("width,height,field", [(40, 32, "width"), (32, 24, "height")])
def test_size_not_a_multiple_of_16_is_rejected_naming_the_field(flux_mesh, http, width, height, field):
    stub = flux_mesh.gateway_stub()
    request = gateway_pb2.GenerateRequest(prompt="a cat", width=width, height=height, num_inference_steps=1)
    with pytest.raises(grpc.RpcError) as raised:
        list(stub.Generate(request, timeout=30))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in raised.value.details() and "16" in raised.value.details()
    reply = http.post("/v1/images/generations", json={"prompt": "a cat", "size": f"{width}x{height}"})
    error = reply.json()["error"]
    # REST names the body's field: "size" (the gateway maps width/height to it)
    assert reply.status_code == 400 and error["param"] in ("size", field) and "16" in error["message"], reply.text


# A directory the project did not write: built here with the libraries' classes, every config unlike the tiny
# writer's (a 3-level VAE, so 4x and sizes in multiples of 8; 8 latent channels; post-quant conv; 3 heads of 24;
# two double and two single blocks; character-level tokenizers; CLIP of 24 positions; another dynamic shift).

def write_foreign_flux(path: pathlib.Path) -> pathlib.Path:
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    clip_vocab = {token: i for i, token in enumerate(
        [*alphabet, *(symbol + "</w>" for symbol in alphabet), "<|startoftext|>", "<|endoftext|>"])}
    tokenizer = CLIPTokenizer(vocab=clip_vocab, merges=[], model_max_length=24)
    tokenizer_2 = T5TokenizerFast(vocab=[("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0),
                                         *((chr(c), -3.0) for c in range(33, 127))], extra_ids=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2024)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=24, intermediate_size=40, projection_dim=24, num_hidden_layers=1,
            num_attention_heads=2, max_position_embeddings=24, hidden_act="gelu",
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id))
        text_encoder_2 = T5EncoderModel(T5Config(
            vocab_size=len(tokenizer_2), d_model=40, d_kv=10, d_ff=48, num_layers=1, num_heads=4,
            relative_attention_num_buckets=16, feed_forward_proj="relu", pad_token_id=0, eos_token_id=1,
            decoder_start_token_id=0))
        transformer = FluxTransformer2DModel(
            in_channels=32, num_layers=2, num_single_layers=2, attention_head_dim=24, num_attention_heads=3,
            joint_attention_dim=40, pooled_projection_dim=24, guidance_embeds=True, axes_dims_rope=(8, 8, 8))
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
            block_out_channels=(8, 16, 16), layers_per_block=1, latent_channels=8, norm_num_groups=4,
            scaling_factor=0.5, shift_factor=-0.25, use_quant_conv=False, use_post_quant_conv=True)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=2.0, use_dynamic_shifting=True, base_shift=0.3, max_shift=0.9,
                                                base_image_seq_len=4, max_image_seq_len=64)
    FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                 text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def foreign_dir(tmp_path_factory) -> pathlib.Path:
    return write_foreign_flux(tmp_path_factory.mktemp("foreign") / "flux-foreign")


@pytest.fixture(scope="module")
def foreign_engines(foreign_dir):
    platform = set_platform("cpu")
    model = resolve_model_dir(foreign_dir)
    return EncoderEngine(model, platform), DenoiserEngine(model, platform), DecoderEngine(model, platform)


@pytest.mark.parametrize("case", [
    pytest.param(dict(width=24, height=40, guidance_scale=3.5, n=1), id="guidance-embedded"),
    pytest.param(dict(width=40, height=24, guidance_scale=2.0, n=2, negative_prompt=NEGATIVE, true_cfg_scale=3.0),
                 id="true-cfg-n2"),
])
def test_a_directory_not_written_here_equals_flux_pipeline(foreign_dir, foreign_engines, case):
    encoder, denoiser, decoder = foreign_engines
    tensors = encoder.encode(EncodeParams("foreign", PROMPT, case.get("negative_prompt", ""), case["guidance_scale"],
                                          case.get("true_cfg_scale", 1.0)))
    params = Sampling("foreign", case["width"], case["height"], 1, STEPS, case["guidance_scale"], SEED, case["n"],
                      case.get("true_cfg_scale", 1.0))
    latents = denoiser.denoise(params, tensors)
    frames = decoder.decode(DecodeParams("foreign", return_frames=True), latents).frames
    ref_latents, ref_frames = reference(load_pipeline(foreign_dir), **case)

    assert latents.shape == ref_latents.shape == (case["n"], 8, case["height"] // 4, case["width"] // 4)
    assert (latents - ref_latents).abs().max().item() <= TOLERANCE
    assert np.abs(frames[:, 0] - ref_frames).max() <= TOLERANCE


def test_a_directory_not_written_here_has_limits_from_its_configs(foreign_engines):
    encoder, denoiser, _ = foreign_engines
    limits = denoiser.limits
    assert (limits.task, limits.size_multiple, limits.default_width, limits.frame_multiple) == \
        ("text-to-image", 8, 512, 0)
    with pytest.raises(InvalidArgument, match="^width"):
        denoiser.check(Sampling("foreign", 20, 24, 1, 1, 3.5, 0))
    with pytest.raises(InvalidArgument, match="^max_sequence_length"):
        encoder.encode(EncodeParams("foreign", "a cat", max_sequence_length=513))
