"""The denoiser refuses sizes its model cannot position, naming the field, instead of failing inside it."""

from __future__ import annotations

import json

import pytest
import torch

from services.common.errors import InvalidArgument
from services.common.models import resolve_model_dir
from services.common.platform import set_platform
from services.common.tiny_model import write_tiny_model
from services.denoiser.engine import DenoiseParams, DenoiserEngine


@pytest.fixture(scope="module")
def short_rope_engine(tmp_path_factory) -> DenoiserEngine:
    model_dir = write_tiny_model(tmp_path_factory.mktemp("model") / "tiny")
    config_file = model_dir / "transformer" / "config.json"
    config = json.loads(config_file.read_text())
    config["rope_max_seq_len"] = 32  # positions for 32 patches: 512 px with the 8x VAE and 2x2 patches
    config_file.write_text(json.dumps(config))
    return DenoiserEngine(resolve_model_dir(model_dir), set_platform("cpu"))


@pytest.mark.parametrize("field,width,height", [("width", 1024, 64), ("height", 64, 528)])
def test_size_beyond_the_rotary_range_is_invalid_argument(short_rope_engine, field, width, height):
    with pytest.raises(InvalidArgument) as raised:
        short_rope_engine.check(DenoiseParams("r", width, height, 1, 2, 5.0, 0))
    assert raised.value.field == field and "512" in raised.value.message


def test_size_within_the_rotary_range_denoises(short_rope_engine):
    params = DenoiseParams("r", 512, 64, 1, 1, 1.0, 0)
    short_rope_engine.check(params)
    embeds = torch.zeros(1, 8, short_rope_engine.denoising.text_dim)
    latents = short_rope_engine.denoise(params, {"prompt_embeds": embeds})
    assert latents.shape == (1, 16, 1, 8, 64)
