"""Wan2.2 text-to-video through the mesh returns what diffusers' own WanPipeline returns.

One mesh (real `diffmesh up` processes) serves two tiny Wan2.2 directories: an A14B-style one (`transformer`
for high noise, `transformer_2` for low noise, switching at `boundary_ratio`; `guidance_scale_2` for the
low-noise expert) and a TI2V-5B-style one used as text-to-video (`expand_timesteps`: one timestep per token;
the Wan2.2 VAE: 48 latent channels, 16x spatial). The request's `model` picks one. Same directory, prompt,
seed, size, frames and steps: latents and frames equal WanPipeline's (CPU float32, max abs <= 1e-5).

Directories the project did not write (other configs, sharded weights, another scheduler, an older
model_index.json) are checked at the engine level.
"""

from __future__ import annotations

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
    WanPipeline,
    WanTransformer3DModel,
)

from diffmesh.client import GatewayClient
from diffmesh.v1 import gateway_pb2
from services.common.tiny.wan22 import BOUNDARY_RATIO, write_tiny_wan22, write_tiny_wan22_ti2v
from tests.integration.conftest import start_mesh, stop_mesh

TOLERANCE = 1e-5
PROMPT, NEGATIVE, SEED = "a red fox running through snow", "blurry, low quality", 1234
A14B, TI2V = "wan2.2-a14b-tiny", "wan2.2-ti2v-tiny"     # the directory names: the mesh's model ids

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
    return {A14B: write_tiny_wan22(root / A14B), TI2V: write_tiny_wan22_ti2v(root / TI2V)}


@pytest.fixture(scope="module")
def wan22_mesh(wan22_dirs):
    running = start_mesh(wan22_dirs[A14B], extra=["--model", str(wan22_dirs[TI2V])])
    yield running
    code = stop_mesh(running)
    assert code == 0, "diffmesh up did not stop cleanly:\n" + "".join(running.log[-30:])


@pytest.fixture(scope="module")
def pipelines(wan22_dirs) -> dict[str, WanPipeline]:
    pipes = {name: WanPipeline.from_pretrained(path) for name, path in wan22_dirs.items()}
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
    return pipes


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
    assert set(models) == {A14B, TI2V}
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
        channels = 16 if kind == "a14b" else 48

        def transformer(layers: int, heads: int, seed: int) -> WanTransformer3DModel:
            return scaled(WanTransformer3DModel(
                patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=8, in_channels=channels,
                out_channels=channels, text_dim=24, freq_dim=64, ffn_dim=40, num_layers=layers,
                cross_attn_norm=True, qk_norm="rms_norm_across_heads"), seed)

        if kind == "a14b":
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
