"""`--compile-vae`: the decoder compiles its VAE decoder's forward and warms up `--vae-warmup-sizes` before serving.
Traced by dynamo with the eager backend here (inductor's kernels are the GPU's business, bench/diagnostics/
vae_stream.py --compile): Wan's causal decoder traces whole, without a graph break, into its three graphs, the frames
are the uncompiled decoder's bit for bit, a warmed-up size compiles nothing on its request and another size says
that it waits; bad flags and sizes fail start-up naming them."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch

from services.common.models import resolve_model_dir
from services.common.platform import PLATFORMS
from services.common.tiny.flux import write_tiny_flux
from services.common.tiny_model import write_tiny_model
from services.decoder.compile import VaeCompile, add_vae_compile_arguments, check_vae_compile, vae_compile_from_args
from services.decoder.engine import DecodeParams, DecoderEngine

EAGER = VaeCompile(backend="eager")


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    return resolve_model_dir(write_tiny_model(tmp_path_factory.mktemp("vae-compile") / "wan"))


def frames_of(engine: DecoderEngine, latents: torch.Tensor) -> np.ndarray:
    return engine.decode(DecodeParams("r", return_frames=True), latents).frames


def test_the_compiled_wan_decoder_traces_whole_and_decodes_the_same_frames(wan, caplog):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    caplog.set_level("INFO", logger="services.decoder.engine")
    compiled = DecoderEngine(wan, PLATFORMS["cpu"], compile_vae=VaeCompile(backend="eager",
                                                                         warmup_sizes=((48, 32, 9),)))
    assert "VAE decoder compiled for 48x32x9 in" in caplog.text
    assert dict(torch._dynamo.utils.counters["graph_break"]) == {}
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 3   # first latent frame, second, the rest
    plain = DecoderEngine(wan, PLATFORMS["cpu"])
    latents = torch.randn((1, 16, 3, 4, 6), generator=torch.Generator().manual_seed(5))
    caplog.clear()
    assert np.array_equal(frames_of(compiled, latents), frames_of(plain, latents))
    assert "not in --vae-warmup-sizes" not in caplog.text                # warmed up: nothing to compile
    shorter = torch.randn((1, 16, 2, 4, 6), generator=torch.Generator().manual_seed(7))
    assert np.array_equal(frames_of(compiled, shorter), frames_of(plain, shorter))
    assert "not in --vae-warmup-sizes" not in caplog.text                # another length: the same graphs
    other = torch.randn((1, 16, 2, 4, 8), generator=torch.Generator().manual_seed(6))
    assert np.array_equal(frames_of(compiled, other), frames_of(plain, other))
    assert "compiling the VAE decoder for latents [1, 16, 2, 4, 8] (not in --vae-warmup-sizes): r waits" in caplog.text


def test_flux_warms_up_an_image_size(tmp_path, caplog):
    caplog.set_level("INFO", logger="services.decoder.engine")
    model = resolve_model_dir(write_tiny_flux(tmp_path / "flux"))
    DecoderEngine(model, PLATFORMS["cpu"], compile_vae=VaeCompile(backend="eager", warmup_sizes=((64, 32, 1),)))
    assert "VAE decoder compiled for 64x32x1 in" in caplog.text
    with pytest.raises(ValueError, match="--vae-warmup-sizes 64x32x5: num_frames: 5, but flux makes images"):
        DecoderEngine(model, PLATFORMS["cpu"], compile_vae=VaeCompile(backend="eager", warmup_sizes=((64, 32, 5),)))


def test_a_size_the_model_cannot_make_fails_start_up_naming_it(wan):
    with pytest.raises(ValueError, match="--vae-warmup-sizes 50x32x9: width: 50 must be a multiple of 16"):
        DecoderEngine(wan, PLATFORMS["cpu"], compile_vae=VaeCompile(backend="eager", warmup_sizes=((50, 32, 9),)))
    with pytest.raises(ValueError, match="--vae-warmup-sizes 48x32x8: num_frames: 8 must be of the form 4k\\+1"):
        DecoderEngine(wan, PLATFORMS["cpu"], compile_vae=VaeCompile(backend="eager", warmup_sizes=((48, 32, 8),)))


def test_flags_and_what_they_refuse():
    parser = argparse.ArgumentParser()
    add_vae_compile_arguments(parser)
    assert vae_compile_from_args(parser.parse_args([])) is None
    options = vae_compile_from_args(parser.parse_args(["--compile-vae", "--vae-warmup-sizes", "832x480x81"]))
    assert options == VaeCompile(backend="inductor", warmup_sizes=((832, 480, 81),))
    with pytest.raises(ValueError, match="--vae-warmup-sizes needs --compile-vae"):
        vae_compile_from_args(parser.parse_args(["--vae-warmup-sizes", "64x64"]))
    with pytest.raises(ValueError, match="--compile-vae with --devices 2: a decoder gang's row split"):
        check_vae_compile(parser.parse_args(["--compile-vae"]), 2)
    check_vae_compile(parser.parse_args(["--compile-vae"]), 1)


def test_up_passes_compile_vae_and_the_warmup_sizes_to_the_decoder():
    from diffmesh import cli

    args = cli.build_parser().parse_args(["up", "--model", "m", "--compile", "--compile-vae",
                                          "--warmup-sizes", "832x480x81"])
    assert cli.decoder_speed_flags(args) == ["--compile-vae", "--vae-warmup-sizes", "832x480x81"]
    assert "--compile-vae" not in cli.denoiser_speed_flags(args)
    assert cli.decoder_speed_flags(cli.build_parser().parse_args(["up", "--model", "m"])) == []
