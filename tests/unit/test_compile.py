"""`--compile`: the repeated blocks go through torch.compile (dynamo traces diffmesh's own attention processors
too), warm-up sizes compile at start-up, and an un-warmed size still runs, saying so. On CPU the test compiles with
dynamo's `eager` backend (tracing without code generation: seconds, not minutes); the GPU benchmark
(bench/compile.py) uses inductor and reports the difference from eager."""

from __future__ import annotations

import argparse
import logging

import pytest
import torch

from services.common.models import resolve_model_dir
from services.common.platform import PLATFORMS
from services.common.tiny_model import write_tiny_model
from services.denoiser.compile import (
    CompileOptions,
    add_compile_arguments,
    blocks_compiled,
    compile_from_args,
    parse_sizes,
)
from services.denoiser.engine import DenoiserEngine
from services.encoder.engine import EncodeParams, EncoderEngine
from services.families.base import Sampling


def test_flags():
    parser = add_compile_arguments(argparse.ArgumentParser())
    assert compile_from_args(parser.parse_args([])) is None
    options = compile_from_args(parser.parse_args(["--compile", "--warmup-sizes", "832x480x81,64x32"]))
    assert options == CompileOptions(mode=None, backend="inductor", warmup_sizes=((832, 480, 81), (64, 32, 1)))
    assert compile_from_args(parser.parse_args(["--compile=max-autotune"])).mode == "max-autotune"
    with pytest.raises(ValueError, match="--warmup-sizes needs --compile"):
        compile_from_args(parser.parse_args(["--warmup-sizes", "32x32"]))
    with pytest.raises(argparse.ArgumentTypeError, match="not WIDTHxHEIGHT"):
        parse_sizes("32by32")


def test_tuning_flag_gives_inductor_its_options_for_these_compiles_only():
    parser = add_compile_arguments(argparse.ArgumentParser())
    options = compile_from_args(parser.parse_args(["--compile", "--compile-tuning"]))
    assert options.tuning and options.mode is None
    kwargs = options.torch_compile_kwargs()
    assert kwargs["options"]["coordinate_descent_tuning"] is True and "mode" not in kwargs
    # torch.compile checks inductor's option names when it wraps (an unknown one raises): these are current.
    torch.compile(lambda x: x + 1, **kwargs)
    assert not torch._inductor.config.coordinate_descent_tuning        # scoped to the compile, not the process
    assert "options" not in CompileOptions().torch_compile_kwargs()
    assert "options" not in CompileOptions(backend="eager", tuning=True).torch_compile_kwargs()  # inductor's only
    with pytest.raises(ValueError, match="--compile-tuning needs --compile"):
        compile_from_args(parser.parse_args(["--compile-tuning"]))
    with pytest.raises(ValueError, match="--compile-tuning with --compile=max-autotune: torch.compile takes a mode"):
        compile_from_args(parser.parse_args(["--compile=max-autotune", "--compile-tuning"]))


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    model = resolve_model_dir(write_tiny_model(tmp_path_factory.mktemp("compile") / "wan"))
    tensors = EncoderEngine(model, PLATFORMS["cpu"]).encode(EncodeParams("r", "a cat", "", 5.0))
    return model, tensors


def test_compiled_blocks_equal_eager_and_warm_up_at_start(wan, caplog):
    model, tensors = wan
    torch._dynamo.reset()
    params = Sampling("r", 32, 32, 1, 2, 5.0, 7)
    eager = DenoiserEngine(model, PLATFORMS["cpu"]).denoise(params, tensors)
    with caplog.at_level(logging.INFO, logger="services.denoiser.engine"):
        engine = DenoiserEngine(model, PLATFORMS["cpu"],
                                compile=CompileOptions(backend="eager", warmup_sizes=((32, 32, 1),)))
        transformer = engine.denoising.transformer
        assert blocks_compiled(transformer)
        # Each block's forward is compiled, not its __call__: a cache's hooks wrap the compiled code (cache.py).
        assert all(vars(block)["forward"]._torchdynamo_orig_callable.__func__ is type(block).forward
                   for block in transformer.blocks)
        assert "compiled 32x32x1" in caplog.text
        caplog.clear()
        compiled = engine.denoise(params, tensors)
        assert "not in --warmup-sizes" not in caplog.text             # warmed up: no compile on the request
        other = engine.denoise(Sampling("r2", 48, 32, 1, 2, 5.0, 7), tensors)
        assert "compiling the blocks for 48x32x1" in caplog.text       # not warmed up: still served, and said
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    assert other.shape[-1] == 48 // 8


def test_a_warm_up_size_the_model_cannot_take_fails_start_up(wan):
    model, _ = wan
    with pytest.raises(ValueError, match="--warmup-sizes 33x32x1: width"):
        DenoiserEngine(model, PLATFORMS["cpu"], compile=CompileOptions(backend="eager", warmup_sizes=((33, 32, 1),)))


def test_up_passes_compile_tuning_to_the_denoiser():
    from diffmesh import cli

    args = cli.build_parser().parse_args(["up", "--model", "m", "--compile", "--compile-tuning"])
    assert cli.denoiser_speed_flags(args) == ["--compile=default", "--compile-tuning"]
    denoiser = add_compile_arguments(argparse.ArgumentParser())
    assert compile_from_args(denoiser.parse_args(cli.denoiser_speed_flags(args))).tuning
