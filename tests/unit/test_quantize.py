"""`--quantize fp8` (services/denoiser/quantize.py): the flag reaches the engine from `serve denoiser` and `up`; the
layers it picks are the block linears float8 kernels take, not the embeddings, the norms' modulation or the output
layer; which devices have float8 matmuls is the platform layer's answer (CUDA by compute capability, XPU; CUDA and
XPU faked here); a device without them, and the flags it does not combine with, fail start-up in one line naming the
flag. That the float8 path runs and stays near bf16 is checked on a GPU (tests/gpu/test_quantize_on_accelerator.py).
"""

from __future__ import annotations

import pytest
import torch

from services.common.models import resolve_model_dir
from services.common.platform import PLATFORMS
from services.common.stage import stage_parser
from services.common.tiny.flux import write_tiny_flux
from services.common.tiny_model import write_tiny_model
from services.denoiser.engine import DenoiserEngine
from services.denoiser.offload import OffloadOptions
from services.denoiser.quantize import METHODS, QuantizeOptions, check_quantize, quantizable


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory):
    return resolve_model_dir(write_tiny_model(tmp_path_factory.mktemp("quantize") / "wan"))


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    return resolve_model_dir(write_tiny_flux(tmp_path_factory.mktemp("quantize") / "flux"))


def test_the_flag_is_off_by_default_and_reaches_the_engine_options():
    from services.denoiser.server import SPEC

    parser = stage_parser(SPEC)
    assert SPEC.engine_options(parser.parse_args([]))["quantize"] is None
    assert SPEC.engine_options(parser.parse_args(["--quantize", "fp8"]))["quantize"] == QuantizeOptions("fp8")
    with pytest.raises(SystemExit):
        parser.parse_args(["--quantize", "int3"])


def test_up_passes_quantize_to_the_denoiser_alone():
    from diffmesh import cli

    args = cli.build_parser().parse_args(["up", "--model", "m", "--quantize", "fp8"])
    assert cli.denoiser_speed_flags(args)[-2:] == ["--quantize", "fp8"]
    assert "--quantize" not in cli.denoiser_speed_flags(cli.build_parser().parse_args(["up", "--model", "m"]))
    up = next(action for action in cli.build_parser()._subparsers._group_actions[0].choices["up"]._actions
              if action.dest == "quantize")
    assert tuple(up.choices) == METHODS


@pytest.mark.parametrize(("family", "kept"), [
    ("wan", {"condition_embedder.time_embedder.linear_1", "condition_embedder.time_embedder.linear_2",
             "condition_embedder.time_proj", "condition_embedder.text_embedder.linear_1",
             "condition_embedder.text_embedder.linear_2", "proj_out"}),
    ("flux", {"time_text_embed.timestep_embedder.linear_1", "time_text_embed.timestep_embedder.linear_2",
              "time_text_embed.guidance_embedder.linear_1", "time_text_embed.guidance_embedder.linear_2",
              "time_text_embed.text_embedder.linear_1", "time_text_embed.text_embedder.linear_2", "context_embedder",
              "x_embedder", "transformer_blocks.0.norm1.linear", "transformer_blocks.0.norm1_context.linear",
              "single_transformer_blocks.0.norm.linear", "norm_out.linear", "proj_out"}),
])
def test_the_block_linears_are_quantized_and_the_rest_kept(family, kept, wan_dir, flux_dir):
    model = (wan_dir if family == "wan" else flux_dir).load("transformer", dtype=torch.float32, device="cpu")
    linears = {name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    picked = dict(quantizable(model))
    assert set(picked) == linears - kept
    assert all(name.startswith(("blocks.", "transformer_blocks.", "single_transformer_blocks.")) for name in picked)
    assert any(".attn" in name for name in picked) and any("ff" in name or "proj_mlp" in name for name in picked)


def test_a_linear_float8_kernels_cannot_take_is_kept():
    from services.denoiser.blocks import repeated_blocks

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.even, self.odd = torch.nn.Linear(32, 48), torch.nn.Linear(32, 40)

    class Model(torch.nn.Module):
        _repeated_blocks = ("Block",)

        def __init__(self) -> None:
            super().__init__()
            self.blocks = torch.nn.ModuleList([Block(), Block()])
            self.head = torch.nn.Linear(48, 32)

    assert len(repeated_blocks(Model(), "to quantize")) == 2
    assert [name for name, _ in quantizable(Model())] == ["blocks.0.even", "blocks.1.even"]
    with pytest.raises(ValueError, match="declares no repeated blocks to quantize"):
        quantizable(torch.nn.Linear(32, 32))


def test_which_devices_have_float8_matmuls_is_the_platforms_answer(monkeypatch):
    assert PLATFORMS["cpu"].float8_matmul_missing() == "the CPU has no float8 matmul kernel"
    assert PLATFORMS["xpu"].float8_matmul_missing() is None           # torchao's float8 serves Intel GPUs
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "NVIDIA A100")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=0: (8, 0))
    assert PLATFORMS["cuda"].float8_matmul_missing() == ("NVIDIA A100 has compute capability 8.0, float8 needs 8.9 "
                                                         "or later")
    for capability in ((8, 9), (9, 0), (10, 0)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=0, c=capability: c)
        assert PLATFORMS["cuda"].float8_matmul_missing() is None, capability


def test_a_device_without_float8_fails_start_up_naming_the_flag_and_why(wan_dir):
    with pytest.raises(ValueError, match=r"^--quantize fp8 on cpu: the CPU has no float8 matmul kernel$"):
        DenoiserEngine(wan_dir, PLATFORMS["cpu"], quantize=QuantizeOptions("fp8"))


def test_the_combinations_not_taken_are_refused_naming_the_flags(wan_dir):
    with pytest.raises(ValueError, match=r"--quantize fp8 needs one device for now: a gang \(--devices 2\)"):
        check_quantize(QuantizeOptions(), world_size=2)
    with pytest.raises(ValueError, match="--quantize fp8 with --dit-offload: not available yet"):
        DenoiserEngine(wan_dir, PLATFORMS["cpu"], quantize=QuantizeOptions(), offload=OffloadOptions())
    check_quantize(None, world_size=4, offload=OffloadOptions())         # off: nothing to refuse


@pytest.mark.parametrize(("flags", "message"), [
    ([], "--quantize fp8 on cpu: the CPU has no float8 matmul kernel"),
    (["--devices", "2"], "--quantize fp8 needs one device for now: a gang (--devices 2)"),
    (["--dit-offload"], "--quantize fp8 with --dit-offload: not available yet"),
])
def test_serve_denoiser_refuses_at_start_up_in_one_line(flags, message, wan_dir, capfd):
    from services.denoiser import server

    with pytest.raises(SystemExit) as stopped:
        server.main(["--model", str(wan_dir.path), "--device", "cpu", "--quantize", "fp8", *flags])
    assert stopped.value.code == 1
    err = capfd.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("compiled", [False, True])
def test_start_up_warns_when_float8_runs_eager(compiled, wan_dir, monkeypatch, caplog):
    """Eager float8 is slower than bf16 (measured on an H200), so an uncompiled --quantize says so at start-up. The
    float8 kernels need a GPU: here a stand-in torchao takes the call, and the platform answers that it has them."""
    import sys
    import types

    from services.denoiser.compile import CompileOptions

    quantized = []
    stand_in = types.ModuleType("torchao.quantization")
    stand_in.PerRow = lambda: "per-row"
    stand_in.Float8DynamicActivationFloat8WeightConfig = lambda granularity, set_inductor_config: (
        granularity, set_inductor_config)
    stand_in.quantize_ = lambda model, config, filter_fn: quantized.append(config)
    monkeypatch.setitem(sys.modules, "torchao", types.ModuleType("torchao"))
    monkeypatch.setitem(sys.modules, "torchao.quantization", stand_in)
    monkeypatch.setattr(type(PLATFORMS["cpu"]), "float8_matmul_missing", lambda self, index=0: None)
    caplog.set_level("WARNING", logger="services.denoiser.quantize")
    DenoiserEngine(wan_dir, PLATFORMS["cpu"], quantize=QuantizeOptions("fp8"),
                   compile=CompileOptions(backend="eager") if compiled else None)
    # set_inductor_config=False: torchao leaves inductor's process-wide settings alone (--compile-tuning is ours)
    assert quantized == [("per-row", False)]
    warned = [r.getMessage() for r in caplog.records if "without --compile" in r.getMessage()]
    assert warned == ([] if compiled else ["--quantize fp8 without --compile: eager float8 runs slower than bf16 "
                                           "(each activation is quantized in a pass of its own; FLUX.1-dev 512x512 "
                                           "on an H200: 377 ms a step against 84), add --compile"])
