"""`--dit-offload` (services/denoiser/offload.py): the flag reaches the engine from `serve denoiser` and `up`, the
combinations it does not take are refused at start-up naming the flags, and on CPU (where the hooks are installed but
move nothing) the engine's outputs are bit for bit those without it, for the tiny Wan and FLUX models, with step
caching and in a batch too. The blocks' pinned memory packs into few buffers (PyTorch rounds each pinned allocation
up to a power of two), and bench/offload.py's CPU smoke mode runs. That the blocks really live on the host between
calls, and the device holds less, is checked on a GPU (tests/gpu/test_offload_on_accelerator.py)."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import subprocess
import sys

import pytest
import torch
from diffusers.hooks import HookRegistry

from services.common.models import resolve_model_dir
from services.common.platform import PLATFORMS
from services.common.stage import stage_parser
from services.common.tiny.flux import write_tiny_flux
from services.common.tiny_model import write_tiny_model
from services.denoiser.batching import BatchOptions, Member, denoise_together
from services.denoiser.cache import StepCache
from services.denoiser.compile import CompileOptions
from services.denoiser.engine import DenoiserEngine
from services.denoiser.offload import (
    ALIGN,
    ARENA_BYTES,
    GROUP_HOOK,
    OffloadOptions,
    block_lists,
    check_offload,
    load_device,
    pack,
    pin_packed,
    split_bytes,
)
from services.families.base import Sampling

WAN = Sampling("w", 48, 32, 5, 3, 5.0, 1)          # CFG: cond + uncond each step
FLUX = Sampling("f", 64, 32, 1, 3, 3.5, 2)         # guidance-embedded: one forward each step


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory):
    return resolve_model_dir(write_tiny_model(tmp_path_factory.mktemp("offload") / "wan"))


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    return resolve_model_dir(write_tiny_flux(tmp_path_factory.mktemp("offload") / "flux"))


def conditioning(engine: DenoiserEngine, params: Sampling, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    shapes = engine.denoising.warmup_conditioning(params, 16)
    return {name: torch.randn(tensor.shape, generator=generator) for name, tensor in shapes.items()}


# Flags and refusals --------------------------------------------------------------------------------------------


def test_the_flag_is_off_by_default_and_reaches_the_engine_options():
    from services.denoiser.server import SPEC

    parser = stage_parser(SPEC)
    assert SPEC.engine_options(parser.parse_args([]))["offload"] is None
    assert SPEC.engine_options(parser.parse_args(["--dit-offload"]))["offload"] == OffloadOptions()
    assert "--dit-offload" in parser.format_help()


def test_up_passes_dit_offload_to_the_denoiser_alone():
    from diffmesh import cli

    args = cli.build_parser().parse_args(["up", "--model", "m", "--dit-offload"])
    assert "--dit-offload" in cli.denoiser_speed_flags(args)
    plain = cli.build_parser().parse_args(["up", "--model", "m"])
    assert "--dit-offload" not in cli.denoiser_speed_flags(plain)


def test_offload_with_compile_or_in_a_gang_is_refused_naming_the_flags():
    with pytest.raises(ValueError, match="--dit-offload with --compile"):
        check_offload(OffloadOptions(), compile="default")
    with pytest.raises(ValueError, match=r"--dit-offload needs one device: a gang \(--devices 2\)"):
        check_offload(OffloadOptions(), world_size=2)
    check_offload(None, compile="default", world_size=4)        # off: nothing to refuse
    check_offload(OffloadOptions(), world_size=1)


def test_the_engine_refuses_compile_before_loading_anything(wan_dir):
    with pytest.raises(ValueError, match="--dit-offload with --compile"):
        DenoiserEngine(wan_dir, PLATFORMS["cpu"], compile=CompileOptions(backend="eager"), offload=OffloadOptions())


@pytest.mark.parametrize("flags, message", [
    (["--devices", "2"], "--dit-offload needs one device: a gang (--devices 2)"),
    (["--compile"], "--dit-offload with --compile"),
])
def test_serve_denoiser_refuses_at_start_up_in_one_line(flags, message, wan_dir, capfd):
    from services.denoiser import server

    with pytest.raises(SystemExit) as exit_:
        server.main(["--model", str(wan_dir.path), "--device", "cpu", "--dit-offload", *flags])
    assert exit_.value.code == 1
    assert message in capfd.readouterr().err


def test_weights_load_on_the_host_when_offloading():
    device = torch.device("cuda", 0)     # a name only: nothing is allocated
    assert load_device(device, OffloadOptions()) == torch.device("cpu")
    assert load_device(device, None) == device


# The engine on CPU ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engines(wan_dir, flux_dir):
    """(resident, offloaded) engines per family."""
    return {family: (DenoiserEngine(model, PLATFORMS["cpu"]), DenoiserEngine(model, PLATFORMS["cpu"],
                                                                             offload=OffloadOptions()))
            for family, model in (("wan", wan_dir), ("flux", flux_dir))}


@pytest.mark.parametrize("family, params", [("wan", WAN), ("flux", FLUX)])
def test_offloaded_denoise_equals_resident_bit_for_bit(engines, family, params):
    resident, offloaded = engines[family]
    tensors = conditioning(resident, params, 5)
    expected = resident.denoise(params, tensors)
    assert torch.equal(offloaded.denoise(params, tensors), expected)
    assert torch.equal(offloaded.denoise(params, tensors), expected)      # and again, after the first forward


@pytest.mark.parametrize("family", ["wan", "flux"])
def test_every_block_has_diffusers_offload_hook_and_the_rest_stays_resident(engines, family):
    resident, offloaded = engines[family]
    transformer = offloaded.denoising.transformer
    blocks = [block for blocks in block_lists(transformer) for block in blocks]
    assert len(blocks) >= 2 and not hasattr(resident.denoising.transformer, "_diffusers_hook")
    for block in blocks:
        hook = HookRegistry.check_if_exists_or_initialize(block).get_hook(GROUP_HOOK)
        assert hook is not None and hook.group.modules == [block]                   # one block per group
        assert (hook.group.onload_device, hook.group.offload_device) == (offloaded.device, torch.device("cpu"))
        assert hook.group.stream is None                                            # CPU: no side stream
    top = HookRegistry.check_if_exists_or_initialize(transformer).get_hook(GROUP_HOOK)
    assert top.group.offload_device == top.group.onload_device == offloaded.device   # the non-block part: resident
    resident_bytes, streamed_bytes = split_bytes(transformer)
    assert streamed_bytes == sum(p.numel() * p.element_size() for b in blocks for p in b.parameters())
    assert resident_bytes + streamed_bytes == sum(p.numel() * p.element_size() for p in transformer.parameters()) + \
        sum(b.numel() * b.element_size() for b in transformer.buffers())


def test_step_caching_on_an_offloaded_engine_equals_it_resident(engines):
    resident, offloaded = engines["wan"]
    params = dataclasses.replace(WAN, num_inference_steps=6, cache=StepCache("first_block", threshold=2.0))
    tensors = conditioning(resident, params, 6)
    expected = resident.denoise(params, tensors)
    assert resident.last_cache.skipped > 0                 # some forwards really skipped blocks
    assert torch.equal(offloaded.denoise(params, tensors), expected)
    assert offloaded.last_cache.skipped == resident.last_cache.skipped
    assert torch.equal(offloaded.denoise(WAN, conditioning(resident, WAN, 5)),
                       resident.denoise(WAN, conditioning(resident, WAN, 5)))      # hooks removed, offload stays


def test_a_batch_on_an_offloaded_engine_equals_its_members_solo(wan_dir, engines):
    resident, _ = engines["wan"]
    batched = DenoiserEngine(wan_dir, PLATFORMS["cpu"], batching=BatchOptions(max_batch=4), offload=OffloadOptions())
    members = [Member(dataclasses.replace(WAN, request_id=rid, seed=seed), conditioning(resident, WAN, 10 + seed))
               for rid, seed in (("a", 1), ("b", 2))]
    denoise_together(batched, members)
    for m in members:
        assert m.error is None and torch.equal(m.result, resident.denoise(m.params, m.tensors)), m.params.request_id


# Pinned memory, packed -------------------------------------------------------------------------------------------


def test_pack_is_first_fit_decreasing_and_never_overfills_a_bin():
    sizes = [135, 50, 50, 50, 50, 10, 10, 300, 1]
    bins = pack(sizes, 200)
    assert sorted(i for members in bins for i in members) == list(range(len(sizes)))      # each tensor once
    assert bins[0] == [7]                                                                  # too large: alone
    assert all(sum(sizes[i] for i in members) <= 200 for members in bins[1:])
    assert len(bins) == 3                              # 356 bytes besides the large one: two bins, the fewest


def test_packed_tensors_keep_their_values_as_aligned_views_of_shared_buffers():
    module = torch.nn.Sequential(torch.nn.Linear(5, 3).to(torch.bfloat16), torch.nn.LayerNorm(3))
    module.register_buffer("steps", torch.arange(7))
    tensors = [*module.parameters(), *module.buffers()]
    before = [t.detach().clone() for t in tensors]
    pin_packed(tensors, pinned=False)
    storage = tensors[0].untyped_storage().data_ptr()
    for tensor, value in zip(tensors, before, strict=True):
        assert torch.equal(tensor, value) and tensor.dtype == value.dtype and tensor.shape == value.shape
        assert tensor.untyped_storage().data_ptr() == storage                  # one buffer for these few
        assert (tensor.data_ptr() - storage) % ALIGN == 0
    assert isinstance(module[0].weight, torch.nn.Parameter)


def test_wan_14b_blocks_packed_pin_about_their_size_where_one_by_one_they_would_pin_half_again():
    from diffusers import WanTransformer3DModel

    with torch.device("meta"):
        model = WanTransformer3DModel(num_layers=40, num_attention_heads=40, attention_head_dim=128, ffn_dim=13824,
                                      text_dim=4096, freq_dim=256, cross_attn_norm=True,
                                      qk_norm="rms_norm_across_heads", eps=1e-6)
    tensors = [t for blocks in block_lists(model) for t in blocks.parameters()]
    sizes = [-(-t.numel() * 2 // ALIGN) * ALIGN for t in tensors]         # bf16
    pinned = sum(1 << (sum(sizes[i] for i in members) - 1).bit_length() for members in pack(sizes, ARENA_BYTES))
    one_by_one = sum(1 << (size - 1).bit_length() for size in sizes)      # the pinned allocator's power-of-two rounding
    assert sum(sizes) > 26 * 2**30
    assert pinned < sum(sizes) + ARENA_BYTES and one_by_one > 1.5 * sum(sizes)


def test_the_benchmark_runs_its_cpu_smoke_mode_and_finds_the_outputs_identical(tmp_path):
    root = pathlib.Path(__file__).resolve().parents[2]
    out = tmp_path / "offload.json"
    done = subprocess.run([sys.executable, str(root / "bench" / "offload.py"), "--device", "cpu", "--tiny",
                           "--repeats", "1", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["identical"] and report["max_abs_difference"] == 0 and report["outputs_finite"]
    assert report["tiny"] and report["config"]["num_layers"] == 2
