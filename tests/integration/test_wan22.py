"""Wan2.2 through the mesh returns what diffusers' own WanPipeline and WanImageToVideoPipeline return.

One mesh (real `diffmesh up` processes) serves three tiny Wan2.2 directories: an A14B-style one (`transformer`
for high noise, `transformer_2` for low noise, switching at `boundary_ratio`; `guidance_scale_2` for the
low-noise expert), a TI2V-5B-style `WanPipeline` one (`expand_timesteps`: one timestep per token; the Wan2.2
VAE: 48 latent channels, 16x spatial), and TI2V-5B saved as a `WanImageToVideoPipeline`. The request's `model`
picks one. Same directory, prompt, seed, size, frames and steps: latents and frames equal WanPipeline's (CPU
float32, max abs <= 1e-5); with a conditioning image, on either TI2V directory, WanImageToVideoPipeline's
(loading the same directory), as diffusers runs TI2V-5B's image-to-video.

Directories the project did not write (other configs, sharded weights, another scheduler, an older
model_index.json) are checked at the engine level.
"""

from __future__ import annotations

import io
import json
import math
import pathlib
import time

import grpc
import httpx
import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKLWan,
    FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler,
    WanImageToVideoPipeline,
    WanPipeline,
    WanTransformer3DModel,
)
from PIL import Image

from diffmesh.client import GatewayClient
from diffmesh.v1 import gateway_pb2
from services.common.images import encode_png
from services.common.tiny.wan22 import (
    BOUNDARY_RATIO,
    write_tiny_wan22,
    write_tiny_wan22_ti2v,
    write_tiny_wan22_ti2v_i2v,
)
from tests.integration.conftest import start_mesh, stop_mesh

TOLERANCE = 1e-5
PROMPT, NEGATIVE, SEED = "a red fox running through snow", "blurry, low quality", 1234
A14B, TI2V = "wan2.2-a14b-tiny", "wan2.2-ti2v-tiny"     # the directory names: the mesh's model ids
TI2V_I2V = "wan2.2-ti2v-i2v-tiny"                        # TI2V-5B saved as a WanImageToVideoPipeline

CASES = [
    # 4 steps at flow_shift 3: timesteps 999, 900 (transformer) | 750, 500 (transformer_2, guidance_scale_2)
    pytest.param(dict(model=A14B, width=32, height=32, num_frames=5, steps=4, guidance_scale=5.0,
                      guidance_scale_2=2.0, n=1), id="a14b-guided-own-guidance_scale_2"),
    # guidance_scale_2 unset: the low-noise expert takes guidance_scale (999 | 857, 600)
    pytest.param(dict(model=A14B, width=48, height=32, num_frames=9, steps=3, guidance_scale=4.0,
                      guidance_scale_2=None, n=2), id="a14b-guided-default-guidance_scale_2-n2"),
    # 10 steps put t = 875 exactly on the boundary: it is the high-noise expert's (t >= boundary)
    pytest.param(dict(model=A14B, width=32, height=32, num_frames=1, steps=10, guidance_scale=3.0,
                      guidance_scale_2=4.0, n=1), id="a14b-a-step-on-the-boundary"),
    pytest.param(dict(model=TI2V, width=32, height=64, num_frames=5, steps=3, guidance_scale=5.0,
                      guidance_scale_2=None, n=2), id="ti2v-guided-n2"),
    pytest.param(dict(model=TI2V, width=64, height=32, num_frames=9, steps=3, guidance_scale=1.0,
                      guidance_scale_2=None, n=2), id="ti2v-unguided-n2"),
]


@pytest.fixture(scope="module")
def wan22_dirs(tmp_path_factory) -> dict[str, pathlib.Path]:
    root = tmp_path_factory.mktemp("wan22")
    # Another seed for the WanImageToVideoPipeline directory: other weights, so each equality is its directory's.
    return {A14B: write_tiny_wan22(root / A14B), TI2V: write_tiny_wan22_ti2v(root / TI2V),
            TI2V_I2V: write_tiny_wan22_ti2v_i2v(root / TI2V_I2V, seed=1)}


@pytest.fixture(scope="module")
def wan22_mesh(wan22_dirs):
    running = start_mesh(wan22_dirs[A14B], extra=["--model", str(wan22_dirs[TI2V]),
                                                  "--model", str(wan22_dirs[TI2V_I2V])])
    yield running
    code = stop_mesh(running)
    assert code == 0, "diffmesh up did not stop cleanly:\n" + "".join(running.log[-30:])


def load_pipelines(pipeline_class, dirs: dict[str, pathlib.Path], names: tuple[str, ...]) -> dict:
    pipes = {name: pipeline_class.from_pretrained(dirs[name]) for name in names}
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
    return pipes


@pytest.fixture(scope="module")
def pipelines(wan22_dirs) -> dict[str, WanPipeline]:
    return load_pipelines(WanPipeline, wan22_dirs, (A14B, TI2V))


def reference(pipe: WanPipeline, case: dict, output_type: str, **overrides):
    kwargs = dict(prompt=PROMPT, negative_prompt=NEGATIVE, height=case["height"], width=case["width"],
                  num_frames=case["num_frames"], num_inference_steps=case["steps"],
                  guidance_scale=case["guidance_scale"], guidance_scale_2=case["guidance_scale_2"],
                  num_videos_per_prompt=case["n"])
    kwargs.update(overrides)
    return pipe(**kwargs, generator=torch.Generator().manual_seed(SEED), output_type=output_type).frames


def test_the_tiny_directories_are_wan22_shaped(wan22_dirs, pipelines):
    a14b, ti2v = pipelines[A14B], pipelines[TI2V]
    assert a14b.config.boundary_ratio == BOUNDARY_RATIO and a14b.transformer_2 is not None
    assert not a14b.config.expand_timesteps
    assert ti2v.config.expand_timesteps and ti2v.config.boundary_ratio is None and ti2v.transformer_2 is None
    assert ti2v.vae.config.z_dim == ti2v.transformer.config.in_channels == 48
    assert ti2v.vae.config.scale_factor_spatial == 16 and ti2v.vae.config.is_residual
    i2v = WanImageToVideoPipeline.from_pretrained(wan22_dirs[TI2V_I2V])
    assert json.loads((wan22_dirs[TI2V_I2V] / "model_index.json").read_text())["_class_name"] == \
        "WanImageToVideoPipeline"
    assert i2v.config.expand_timesteps and i2v.image_encoder is None and i2v.transformer.config.image_dim is None
    assert i2v.vae.config.z_dim == i2v.transformer.config.in_channels == i2v.transformer.config.out_channels == 48


@pytest.mark.parametrize("case", CASES)
def test_mesh_latents_and_frames_equal_wan_pipeline(wan22_mesh, pipelines, case):
    pipe = pipelines[case["model"]]
    client = GatewayClient(wan22_mesh.grpc_address)
    request = gateway_pb2.GenerateRequest(
        model=case["model"], prompt=PROMPT, negative_prompt=NEGATIVE, seed=SEED,
        num_inference_steps=case["steps"], width=case["width"], height=case["height"],
        num_frames=case["num_frames"], guidance_scale=case["guidance_scale"], n=case["n"],
        return_latents=True, return_frames=True,
    )
    if case["guidance_scale_2"] is not None:
        request.guidance_scale_2 = case["guidance_scale_2"]
    result = client.generate(request, timeout=300)

    ref_latents = reference(pipe, case, "latent")
    ref_frames = reference(pipe, case, "np")
    latents, frames = result.tensors["latents"], result.tensors["frames"].numpy()
    assert latents.shape == ref_latents.shape and latents.dtype == torch.float32
    assert latents.shape[1] == pipe.transformer.config.in_channels
    assert frames.shape == ref_frames.shape == (case["n"], case["num_frames"], case["height"], case["width"], 3)
    assert (latents - ref_latents).abs().max().item() <= TOLERANCE
    assert np.abs(frames - ref_frames).max() <= TOLERANCE
    assert result.seed == SEED and len(result.media) == case["n"]
    if pipe.config.boundary_ratio is not None:
        # The steps cross the boundary: both experts ran.
        boundary = pipe.config.boundary_ratio * pipe.scheduler.config.num_train_timesteps
        timesteps = pipe.scheduler.timesteps
        assert (timesteps >= boundary).any() and (timesteps < boundary).any()
        if case["steps"] == 10:
            assert (timesteps == boundary).any()
    if case["guidance_scale_2"] is not None:
        # Not vacuous: with guidance_scale_2 defaulted the pipeline gives other latents.
        defaulted = reference(pipe, case, "latent", guidance_scale_2=None)
        assert (latents - defaulted).abs().max().item() > 1e-3


def test_both_models_are_listed_with_their_limits(wan22_mesh):
    stub = wan22_mesh.gateway_stub()
    models = {m.id: m.limits for m in stub.ListModels(gateway_pb2.ListModelsRequest(), timeout=10).models}
    assert set(models) == {A14B, TI2V, TI2V_I2V}
    assert models[A14B].size_multiple == 16 and models[TI2V].size_multiple == 32
    assert models[TI2V].default_width % 32 == 0 and models[TI2V].default_height % 32 == 0
    assert models[TI2V].default_fps == 24 and models[A14B].default_fps == 16


def test_rest_videos_carries_guidance_scale_2(wan22_mesh):
    """POST /v1/videos with guidance_scale_2 makes the mp4 gRPC makes with it, not the one without."""
    fields = dict(prompt=PROMPT, negative_prompt=NEGATIVE, seed=SEED, num_inference_steps=4, num_frames=5,
                  guidance_scale=5.0)
    client = GatewayClient(wan22_mesh.grpc_address)

    def grpc_mp4(**extra) -> bytes:
        request = gateway_pb2.GenerateRequest(model=A14B, width=32, height=32, fps=16, **fields, **extra)
        (mime, data), = client.generate(request, timeout=300).media
        assert mime == "video/mp4"
        return data

    with httpx.Client(base_url=wan22_mesh.http_url, timeout=120) as http:
        reply = http.post("/v1/videos", json={"model": A14B, "size": "32x32", "fps": 16, "guidance_scale_2": 2.0,
                                              **fields})
        assert reply.status_code == 200, reply.text
        video_id, deadline = reply.json()["id"], time.monotonic() + 240
        while (job := http.get(f"/v1/videos/{video_id}").json())["status"] not in ("completed", "failed"):
            assert time.monotonic() < deadline, job
            time.sleep(0.2)
        assert job["status"] == "completed", job
        rest_mp4 = http.get(f"/v1/videos/{video_id}/content").content
    assert rest_mp4 == grpc_mp4(guidance_scale_2=2.0)
    assert rest_mp4 != grpc_mp4()


# Image-to-video on TI2V-5B (`expand_timesteps`): the image's VAE latent is the first latent frame, whose tokens
# get timestep 0. diffusers runs it with WanImageToVideoPipeline, on a directory of that pipeline or on the
# WanPipeline directory TI2V-5B ships as; the mesh takes the image on either (optional on the WanPipeline one).

def picture(seed: int = 0, width: int = 56, height: int = 40) -> bytes:
    """A PNG of another size and aspect than the videos', so the pipeline's resize is part of what is compared."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return encode_png(Image.fromarray(pixels))


@pytest.fixture(scope="module")
def i2v_pipelines(wan22_dirs) -> dict[str, WanImageToVideoPipeline]:
    """The reference for both TI2V directories: WanImageToVideoPipeline.from_pretrained(the directory)."""
    return load_pipelines(WanImageToVideoPipeline, wan22_dirs, (TI2V_I2V, TI2V))


I2V_CASES = [   # n=1: diffusers' I2V repeats image embeds by prompt count only
    pytest.param(TI2V_I2V, dict(width=64, height=32, num_frames=9, steps=3, guidance_scale=5.0),
                 id="wan-image-to-video-pipeline-directory-guided"),
    pytest.param(TI2V, dict(width=32, height=64, num_frames=5, steps=3, guidance_scale=5.0),
                 id="wan-pipeline-directory-guided"),
    pytest.param(TI2V, dict(width=64, height=32, num_frames=9, steps=2, guidance_scale=1.0),
                 id="wan-pipeline-directory-unguided"),
]


@pytest.mark.parametrize("model,case", I2V_CASES)
def test_mesh_with_an_image_equals_wan_image_to_video_pipeline(wan22_mesh, i2v_pipelines, model, case):
    image, size = picture(), dict(width=case["width"], height=case["height"], num_frames=case["num_frames"])
    request = gateway_pb2.GenerateRequest(
        model=model, prompt=PROMPT, negative_prompt=NEGATIVE, seed=SEED, image=image,
        num_inference_steps=case["steps"], guidance_scale=case["guidance_scale"], return_latents=True,
        return_frames=True, **size)
    result = GatewayClient(wan22_mesh.grpc_address).generate(request, timeout=300)

    def reference_i2v(output_type: str):
        return i2v_pipelines[model](
            image=Image.open(io.BytesIO(image)), prompt=PROMPT, negative_prompt=NEGATIVE,
            num_inference_steps=case["steps"], guidance_scale=case["guidance_scale"], **size,
            generator=torch.Generator().manual_seed(SEED), output_type=output_type).frames

    ref_latents, ref_frames = reference_i2v("latent"), reference_i2v("np")
    latents, frames = result.tensors["latents"], result.tensors["frames"].numpy()
    assert latents.shape == ref_latents.shape and latents.shape[1] == 48
    assert frames.shape == ref_frames.shape == (1, case["num_frames"], case["height"], case["width"], 3)
    assert (latents - ref_latents).abs().max().item() <= TOLERANCE
    assert np.abs(frames - ref_frames).max() <= TOLERANCE
    assert ref_frames.std() > 0.05            # the frames carry signal, so their equality means something


def test_the_image_is_the_first_latent_frame_and_conditions_the_rest(wan22_mesh):
    """Not vacuous: another image gives another first latent frame and other later frames (denoised attending to
    the image's tokens at timestep 0), and no image (text-to-video) gives other latents again."""
    client = GatewayClient(wan22_mesh.grpc_address)
    base = dict(model=TI2V, prompt=PROMPT, seed=SEED, width=64, height=32, num_frames=9, num_inference_steps=2,
                guidance_scale=1.0, return_latents=True)
    first, other, none = (client.generate(gateway_pb2.GenerateRequest(image=image, **base), timeout=300)
                          .tensors["latents"] for image in (picture(seed=1), picture(seed=2), b""))
    assert (first[:, :, 0] - other[:, :, 0]).abs().max().item() > 1e-3
    assert (first[:, :, 1:] - other[:, :, 1:]).abs().max().item() > 1e-3
    assert (first - none).abs().max().item() > 1e-3


def test_the_image_tokens_get_timestep_zero_and_that_changes_the_prediction(wan22_dirs):
    """In-process, one step of the WanPipeline TI2V directory's run with condition_latents: the first latent
    frame is the condition and its tokens' timestep is 0, the others' t; at t for every token the transformer
    predicts otherwise, so the equality with diffusers above depends on the timestep-0 path."""
    from services.common.models import resolve_model_dir
    from services.common.platform import set_platform
    from services.denoiser.engine import DenoiserEngine
    from services.families.base import Sampling

    engine = DenoiserEngine(resolve_model_dir(wan22_dirs[TI2V]), set_platform("cpu"))
    assert "condition_latents" in engine.conditioning_names
    params = Sampling("t0", 64, 32, 9, 3, 1.0, SEED)
    generator = torch.Generator().manual_seed(0)
    tensors = {"prompt_embeds": torch.randn(1, 8, engine.denoising.text_dim, generator=generator),
               "condition_latents": torch.randn(1, 48, 1, 2, 4, generator=generator)}
    engine.check_conditioning(params, tensors)
    run = engine.denoising.start(params, tensors, torch.device("cpu"))
    t = run.timesteps[0]
    call = run.step_call(run.latents, t, 0)
    timestep, hidden = call.cond["timestep"], call.cond["hidden_states"]
    per_frame = (2 // 2) * (4 // 2)            # tokens per latent frame: (H/2) x (W/2) patches
    assert timestep.shape == (1, 3 * per_frame)
    assert (timestep[:, :per_frame] == 0).all() and (timestep[:, per_frame:] == t).all()
    assert torch.equal(hidden[:, :, :1], tensors["condition_latents"])
    assert torch.equal(hidden[:, :, 1:], run.latents[:, :, 1:])
    with torch.inference_mode():
        masked = call.model(**call.cond, return_dict=False)[0]
        every_token_at_t = call.model(**{**call.cond, "timestep": torch.full_like(timestep, float(t))},
                                      return_dict=False)[0]
    assert (masked - every_token_at_t).abs().max().item() > 1e-3


def test_models_say_which_take_an_image_and_the_others_refuse_one(wan22_mesh):
    body = httpx.get(f"{wan22_mesh.http_url}/v1/models", timeout=30).json()
    listed = {m["id"]: (m["task"], m["limits"]["needs_image"], m["limits"]["accepts_image"]) for m in body["data"]}
    assert listed == {A14B: ("text-to-video", False, False), TI2V: ("text-to-video", False, True),
                      TI2V_I2V: ("image-to-video", True, True)}
    refused = generate_error(wan22_mesh, model=A14B, image=picture())       # Wan2.2 A14B T2V: no image path
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.details().startswith("image: ") and "takes no conditioning image" in refused.details()
    missing = generate_error(wan22_mesh, model=TI2V_I2V, num_frames=5)
    assert missing.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert missing.details().startswith("image: ") and "needs a conditioning image" in missing.details()


def generate_error(mesh, **fields) -> grpc.RpcError:
    values = dict(prompt="a cat", width=32, height=32, num_frames=1, num_inference_steps=1)
    values.update(fields)
    with pytest.raises(grpc.RpcError) as raised:
        list(mesh.gateway_stub().Generate(gateway_pb2.GenerateRequest(**values), timeout=60))
    return raised.value


@pytest.mark.parametrize("field,size", [("width", dict(width=48, height=32)), ("height", dict(width=32, height=80))])
def test_ti2v_size_not_a_multiple_of_32_is_invalid(wan22_mesh, field, size):
    error = generate_error(wan22_mesh, model=TI2V, **size)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in error.details() and "32" in error.details() and "Traceback" not in error.details()


def test_guidance_scale_2_on_a_one_transformer_ti2v_is_invalid(wan22_mesh):
    error = generate_error(wan22_mesh, model=TI2V, guidance_scale_2=3.0)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "guidance_scale_2" in error.details() and "Traceback" not in error.details()


def test_guidance_scale_2_on_wan21_is_invalid(mesh):
    error = generate_error(mesh, guidance_scale_2=3.0)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "guidance_scale_2" in error.details() and "Traceback" not in error.details()


# Directories the project did not write: built here with the libraries' classes and configs unlike the tiny
# writers' (other widths, heads, layer counts, experts of different depth, another boundary_ratio and
# scheduler), saved in shards, and for the A14B one a model_index.json without `expand_timesteps`, as older
# diffusers versions wrote it.

WORDS = "a the red fox cat running through snow blurry low quality waves city night".split()


def foreign_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{word: i + 3 for i, word in enumerate(WORDS)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>")


def scaled(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Unit-variance linear/conv weights, so the outputs depend visibly on the inputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Conv3d)):
                m.weight.copy_(torch.randn(m.weight.shape, generator=generator) / math.sqrt(m.weight[0].numel()))
    return module.eval()


def write_foreign(path: pathlib.Path, kind: str) -> pathlib.Path:
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = foreign_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        text_encoder = UMT5EncoderModel(UMT5Config(
            vocab_size=len(tokenizer), d_model=24, d_kv=8, d_ff=40, num_layers=1, num_heads=3,
            relative_attention_num_buckets=4, feed_forward_proj="gated-gelu", pad_token_id=0,
            eos_token_id=1)).eval()
        channels = 48 if kind == "ti2v" else 16

        def transformer(layers: int, heads: int, seed: int) -> WanTransformer3DModel:
            return scaled(WanTransformer3DModel(
                patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=8, in_channels=channels,
                out_channels=channels, text_dim=24, freq_dim=64, ffn_dim=40, num_layers=layers,
                cross_attn_norm=True, qk_norm="rms_norm_across_heads"), seed)

        if kind == "wan21":
            # Wan2.1 T2V as another writer would save it: one transformer, another VAE width, FlowMatchEuler.
            vae = scaled(AutoencoderKLWan(base_dim=5, z_dim=16, dim_mult=[1, 1, 2, 1], num_res_blocks=1,
                                          temperal_downsample=[False, True, True]), 4)
            pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
                               scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), transformer=transformer(2, 3, 5))
        elif kind == "a14b":
            vae = scaled(AutoencoderKLWan(base_dim=4, z_dim=16, dim_mult=[1, 2, 1, 1], num_res_blocks=1,
                                          temperal_downsample=[False, True, True]), 3)
            pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
                               scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0),
                               transformer=transformer(3, 2, 1), transformer_2=transformer(1, 4, 2),
                               boundary_ratio=0.9)
        else:
            vae = scaled(AutoencoderKLWan(
                base_dim=6, decoder_base_dim=10, z_dim=48, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                temperal_downsample=[False, True, True], is_residual=True, in_channels=12, out_channels=12,
                patch_size=2, scale_factor_temporal=4, scale_factor_spatial=16,
                latents_mean=[0.1 * (i % 5) for i in range(48)], latents_std=[0.5 + 0.05 * i for i in range(48)]), 3)
            scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                flow_shift=7.0)
            pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                               transformer=transformer(2, 3, 1), expand_timesteps=True)
    pipe.save_pretrained(path, max_shard_size="50KB")
    if kind == "a14b":
        index_file = path / "model_index.json"
        index = json.loads(index_file.read_text())
        del index["expand_timesteps"]
        index_file.write_text(json.dumps(index, indent=2))
    return path


FOREIGN = [
    pytest.param("wan21", dict(width=64, height=32, num_frames=5, steps=3, guidance_scale=5.0, guidance_scale_2=None,
                               n=2), id="wan2.1-style"),
    # FlowMatchEuler at shift 5, 4 steps: 1000, 910 (transformer) | 717, 24 (transformer_2) at boundary 900
    pytest.param("a14b", dict(width=48, height=32, num_frames=5, steps=4, guidance_scale=4.0, guidance_scale_2=3.0,
                              n=1), id="a14b-style"),
    pytest.param("ti2v", dict(width=32, height=64, num_frames=5, steps=3, guidance_scale=5.0, guidance_scale_2=None,
                              n=2), id="ti2v-style"),
]


@pytest.mark.parametrize("kind,case", FOREIGN)
def test_engines_equal_wan_pipeline_on_a_directory_written_elsewhere(tmp_path, kind, case):
    from services.common.models import resolve_model_dir
    from services.common.platform import set_platform
    from services.decoder.engine import DecodeParams, DecoderEngine
    from services.denoiser.engine import DenoiserEngine
    from services.encoder.engine import EncodeParams, EncoderEngine
    from services.families.base import Sampling

    path = write_foreign(tmp_path / f"foreign-{kind}", kind)
    assert list((path / "transformer").glob("*.safetensors.index.json")), "expected sharded weights"
    platform = set_platform("cpu")
    model = resolve_model_dir(path)
    encoder, denoiser, decoder = EncoderEngine(model, platform), DenoiserEngine(model, platform), DecoderEngine(
        model, platform)
    tensors = encoder.encode(EncodeParams("foreign", PROMPT, NEGATIVE, case["guidance_scale"]))
    latents = denoiser.denoise(Sampling(
        "foreign", case["width"], case["height"], case["num_frames"], case["steps"], case["guidance_scale"], SEED,
        case["n"], guidance_scale_2=case["guidance_scale_2"]), tensors)
    frames = decoder.decode(DecodeParams("foreign", format="none", return_frames=True), latents).frames

    pipe = WanPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    ref_latents = reference(pipe, case, "latent")
    ref_frames = reference(pipe, case, "np")
    assert latents.shape == ref_latents.shape and frames.shape == ref_frames.shape
    assert (latents - ref_latents).abs().max().item() <= TOLERANCE
    assert np.abs(frames - ref_frames).max() <= TOLERANCE
    assert ref_frames.std() > 0.05            # the frames carry signal, so their equality means something
    if kind == "a14b":
        boundary = 0.9 * pipe.scheduler.config.num_train_timesteps
        assert (pipe.scheduler.timesteps >= boundary).any() and (pipe.scheduler.timesteps < boundary).any()
