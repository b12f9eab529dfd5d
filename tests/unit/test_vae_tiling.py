"""Tiled VAE decode: switched per request by frame size, and when on, the very frames diffusers' own tiled decode
gives (the tiny model's random VAE makes seams large, so the test shows the switch and the equality, not quality)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import WanPipeline

from services.common.models import resolve_model_dir
from services.common.platform import PLATFORMS
from services.common.tiny_model import write_tiny_model
from services.decoder.engine import DecodeParams, DecoderEngine
from services.decoder.tiling import VaeTiling

SIZE, FRAMES = 64, 1
TILE = {"tile_sample_min_height": 32, "tile_sample_min_width": 32, "tile_sample_stride_height": 24,
        "tile_sample_stride_width": 24}


def test_the_policy_tiles_by_frame_area_and_restores_the_vae():
    class Vae(torch.nn.Module):
        use_tiling = False

    vae = Vae()
    auto = VaeTiling("auto", above_pixels=1000)
    assert not auto.wanted(1000) and auto.wanted(1001)
    assert VaeTiling("on").wanted(1) and not VaeTiling("off").wanted(10**9)
    with auto.applied(vae, 5000) as tiled:
        assert tiled and vae.use_tiling
    assert vae.use_tiling is False
    with pytest.raises(ValueError, match="not one of"):
        VaeTiling("sometimes")


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    path = write_tiny_model(tmp_path_factory.mktemp("tiling") / "wan")
    pipe = WanPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    pipe.vae.enable_tiling(**TILE)

    def run(output_type: str):
        return pipe(prompt="a cat", height=SIZE, width=SIZE, num_frames=FRAMES, num_inference_steps=1,
                    generator=torch.Generator().manual_seed(0), output_type=output_type).frames

    return resolve_model_dir(path), run("latent"), run("np")


def decode(model, latents, tiling: VaeTiling) -> np.ndarray:
    engine = DecoderEngine(model, PLATFORMS["cpu"], tiling=tiling)
    for name, value in TILE.items():          # the same small tiles as the pipeline's (real VAEs use 256 px)
        setattr(engine.decoding.vae, name, value)
    return engine.decode(DecodeParams("r", format="none", return_frames=True), latents).frames


def test_a_tiled_decode_equals_the_pipelines_tiled_decode(wan):
    model, latents, tiled_reference = wan
    frames = decode(model, latents, VaeTiling("auto", above_pixels=SIZE * SIZE - 1))
    np.testing.assert_allclose(frames[0], tiled_reference[0], atol=1e-5, rtol=0)
    untiled = decode(model, latents, VaeTiling("auto", above_pixels=SIZE * SIZE))    # at the limit: untiled
    assert np.abs(untiled[0] - tiled_reference[0]).max() > 1e-3, "the switch did not change the decode"
    np.testing.assert_array_equal(untiled, decode(model, latents, VaeTiling("off")))
