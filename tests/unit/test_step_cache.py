"""Step caching per request (services/denoiser/cache.py): off is today's output bit for bit, before and after a
cached request; first_block / taylorseer / magcache skip forwards and stay close; bad options name their field; in
a 2-rank gloo gang whose ranks' local first_block metrics disagree, both ranks still take one decision per step."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from services.common.errors import InvalidArgument
from services.common.models import resolve_model_dir
from services.common.platform import PLATFORMS
from services.common.tiny.flux import write_tiny_flux
from services.common.tiny_model import write_tiny_model
from services.denoiser.axes import AxisGroup
from services.denoiser.cache import Agreement, StepCache, check_cache
from services.denoiser.engine import DenoiserEngine
from services.denoiser.gang.launcher import free_port
from services.encoder.engine import EncodeParams, EncoderEngine
from services.families.base import Sampling

STEPS = 8


def _served(path, write, guidance):
    model = resolve_model_dir(write(path))
    tensors = EncoderEngine(model, PLATFORMS["cpu"]).encode(EncodeParams("r", "a cat", "", guidance))
    engine = DenoiserEngine(model, PLATFORMS["cpu"])
    params = Sampling("r", 32, 32, 1, STEPS, guidance, 7)
    return engine, params, tensors, engine.denoise(params, tensors), str(model.path)


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    return _served(tmp_path_factory.mktemp("cache") / "wan", write_tiny_model, 5.0)     # CFG: cond + uncond


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    return _served(tmp_path_factory.mktemp("cache") / "flux", write_tiny_flux, 3.5)     # guidance-embedded


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    peak = b.abs().max().item()
    return 10 * torch.log10(peak ** 2 / (a - b).pow(2).mean()).item()


@pytest.mark.parametrize("family", ["wan", "flux"])
def test_caching_off_is_todays_output_before_and_after_a_cached_request(family, request):
    engine, params, tensors, uncached, _ = request.getfixturevalue(family)
    engine.denoise(dataclasses.replace(params, cache=StepCache("first_block", threshold=2.0)), tensors)
    assert engine.last_cache.skipped > 0
    # The hooks are gone: the model's own forward again, bit for bit.
    assert not any(m.is_cache_enabled for m in engine.denoising.transformers)
    assert torch.equal(engine.denoise(params, tensors), uncached)


@pytest.mark.parametrize("family, cache", [
    ("wan", StepCache("first_block", threshold=2.0)),
    ("flux", StepCache("first_block", threshold=0.3)),
    ("wan", StepCache("taylorseer", interval=2, warmup_steps=2)),
    ("flux", StepCache("taylorseer", interval=2, warmup_steps=2)),
    ("flux", StepCache("magcache", threshold=0.5)),
])
def test_a_cache_skips_forwards_and_stays_close(family, cache, request, caplog):
    engine, params, tensors, uncached, _ = request.getfixturevalue(family)
    with caplog.at_level("INFO", logger="services.denoiser.engine"):
        cached = engine.denoise(dataclasses.replace(params, cache=cache), tensors)
    run = engine.last_cache
    branches = 2 if family == "wan" else 1
    assert run.forwards == STEPS * branches
    assert 0 < run.skipped < run.forwards
    assert f"skipped {run.skipped} of {run.forwards} transformer forwards" in caplog.text
    assert not torch.equal(cached, uncached)
    assert _psnr(cached, uncached) > 15, _psnr(cached, uncached)


def test_cfg_branches_keep_their_own_cache_state(wan):
    engine, params, tensors, *_ = wan
    engine.denoise(dataclasses.replace(params, cache=StepCache("first_block", threshold=2.0)), tensors)
    names = [name for name, *_ in engine.last_cache.decisions]
    assert names == ["cond", "uncond"] * STEPS


@pytest.mark.parametrize("cache, field", [
    (StepCache("teacache"), "cache.method"),
    (StepCache("fastest"), "cache.method"),
    (StepCache("first_block", threshold=-1.0), "cache.threshold"),
    (StepCache("first_block", threshold=float("nan")), "cache.threshold"),
    (StepCache("taylorseer", threshold=0.1), "cache.threshold"),
    (StepCache("taylorseer", interval=0), "cache.interval"),
    (StepCache("first_block", interval=2), "cache.interval"),
    (StepCache("first_block", mag_ratios=(1.0,)), "cache.mag_ratios"),
])
def test_bad_options_name_their_field(cache, field):
    with pytest.raises(InvalidArgument) as error:
        check_cache(cache)
    assert error.value.field == field


def test_a_method_the_family_cannot_take_names_it(wan):
    engine, params, tensors, *_ = wan
    with pytest.raises(InvalidArgument) as error:
        engine.check(dataclasses.replace(params, cache=StepCache("magcache")))
    assert error.value.field == "cache.method" and "mag_ratios" in error.value.message
    check_cache(StepCache("magcache"), "flux")                          # diffusers ships FLUX's ratios
    check_cache(StepCache("magcache", mag_ratios=(1.0, 0.9)), "wan")    # or the request brings them


# A 2-rank gang. Each rank holds the whole tiny Wan (as a gang's ranks hold their own share of the sequence) and
# gets a different prompt scale, so the ranks' local first_block metrics differ: alone, they would skip different
# steps. Agreed, they must skip the same ones.
THRESHOLD = 1.0


def _rank(rank: int, port: int, model_path: str, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), HF_HUB_OFFLINE="1")
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        model = resolve_model_dir(model_path)
        tensors = EncoderEngine(model, PLATFORMS["cpu"]).encode(EncodeParams("r", "a cat", "", 5.0))
        tensors = {name: value * (1.0 + 3.0 * rank) for name, value in tensors.items()}   # rank-dependent metric
        engine = DenoiserEngine(model, PLATFORMS["cpu"])
        engine.cache_agreement = Agreement(sequence=AxisGroup(dist.group.WORLD, [0, 1], rank))
        params = Sampling("r", 32, 32, 1, STEPS, 5.0, 7 + rank, cache=StepCache("first_block", threshold=THRESHOLD))
        engine.denoise(params, tensors)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as out:
            json.dump({"decisions": engine.last_cache.decisions, "skipped": engine.last_cache.skipped}, out)
    finally:
        dist.destroy_process_group()


def test_a_gang_takes_one_agreed_decision_per_step_when_local_metrics_disagree(wan, tmp_path):
    model_path = wan[-1]
    mp.start_processes(_rank, args=(free_port(), model_path, str(tmp_path)), nprocs=2, start_method="spawn")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    agreed = [[(name, computed) for name, _, _, computed in r["decisions"]] for r in ranks]
    local = [[alone for _, _, alone, _ in r["decisions"]] for r in ranks]
    assert len(agreed[0]) == 2 * STEPS
    assert agreed[0] == agreed[1]                          # one decision per step and branch, on both ranks
    assert local[0] != local[1]                            # ... though alone they would have differed
    assert ranks[0]["skipped"] == ranks[1]["skipped"] > 0


# The front doors: REST's `cache` object, gRPC's CacheConfig and the stored job all carry the same StepCache, and the
# gateway refuses a bad one naming its field before any stage works.
def test_the_option_travels_through_rest_grpc_and_the_job_store():
    from diffmesh.v1 import gateway_pb2
    from services.denoiser.cache import cache_from_proto, cache_to_proto
    from services.gateway.pipeline import GenerationRequest
    from services.gateway.rest import ImageGenerationRequest, VideoRequest
    from services.gateway.store import decode_request, encode_request

    body = ImageGenerationRequest.model_validate({"prompt": "a cat", "cache": {"method": "first_block",
                                                                               "threshold": 0.1}})
    cache = body.cache.step_cache()
    assert cache == StepCache("first_block", threshold=0.1)
    assert VideoRequest.model_validate({"prompt": "a cat"}).cache is None                      # off by default
    message = gateway_pb2.GenerateRequest(prompt="a cat", cache=cache_to_proto(cache))
    assert message.HasField("cache") and cache_from_proto(message.cache) == cache
    assert not gateway_pb2.GenerateRequest(prompt="a cat").HasField("cache")
    request = GenerationRequest(request_id="r", model="m", prompt="a cat",
                                cache=StepCache("magcache", threshold=0.2, mag_ratios=(1.0, 0.9)))
    assert decode_request(*encode_request(request)) == request


@pytest.mark.parametrize("cache, family, field", [
    (StepCache("teacache"), "flux", "cache.method"),
    (StepCache("first_block", threshold=0.0), "flux", "cache.threshold"),
    (StepCache("magcache"), "wan", "cache.method"),
])
def test_the_gateway_refuses_a_bad_cache_naming_the_field(cache, family, field):
    from services.families.base import Limits
    from services.gateway.pipeline import GenerationRequest

    limits = Limits(family=family, task="text-to-image", size_multiple=16, max_side=4096, frame_multiple=0,
                    max_frames=1, default_width=64, default_height=64, default_frames=1, default_steps=8,
                    default_guidance_scale=3.5)
    request = GenerationRequest(request_id="r", model="m", prompt="a cat", width=64, height=64,
                                num_inference_steps=8, cache=cache)
    with pytest.raises(InvalidArgument) as error:
        request.validate(limits)
    assert error.value.field == field
