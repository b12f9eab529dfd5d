"""Tests for GenerationRequest.validate: what the gateway refuses before calling any stage."""

from __future__ import annotations

import dataclasses
import math

import pytest

from services.common.errors import InvalidArgument
from services.common.limits import MAX_SEED, check_request_id
from services.families.base import Limits
from services.gateway.pipeline import MAX_PROMPT_CHARS, GenerationRequest

# What the tiny Wan2.1 model's denoiser describes (16-pixel multiples, 4k+1 frames).
MODELS = Limits(family="wan", task="text-to-video", size_multiple=16, max_side=4096, frame_multiple=4,
                max_frames=1025, default_width=832, default_height=480, default_frames=81, default_steps=50,
                default_guidance_scale=5.0)
IMAGES = dataclasses.replace(MODELS, family="flux", task="text-to-image", frame_multiple=0, max_frames=1)
VALID = GenerationRequest(request_id="req-1", model="wan-tiny", prompt="a cat on a skateboard")


def test_valid_request_passes():
    VALID.validate(MODELS)


@pytest.mark.parametrize(
    "changes",
    [
        {"width": 16, "height": 4096},
        {"num_frames": 5, "format": "mp4"},
        {"num_frames": 1025, "width": 256, "height": 256},  # within the output-pixel limit too
        {"num_inference_steps": 1},
        {"num_inference_steps": 200},
        {"guidance_scale": 0.0},
        {"n": 10},
        {"format": "png"},
        {"format": "none", "num_frames": 9},
        {"prompt": "x" * MAX_PROMPT_CHARS},
        {"seed": 0},
        {"seed": 2**32 - 1},
        {"prompt": "emoji \U0001F98A and \u00e9"},        # non-ASCII is fine; only unencodable text is not
    ],
    ids=lambda c: ",".join(f"{k}={str(v)[:12]}" for k, v in c.items()),
)
def test_boundary_values_pass(changes):
    dataclasses.replace(VALID, **changes).validate(MODELS)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("width", 100),
        ("width", 0),
        ("width", 4112),  # a multiple of 16, over 4096
        ("height", 100),
        ("height", 0),
        ("height", 4112),
        ("num_frames", 2),
        ("num_frames", 0),
        ("num_frames", 4),
        ("num_frames", 1029),
        ("num_inference_steps", 0),
        ("num_inference_steps", 201),
        ("guidance_scale", -1.0),
        ("guidance_scale", math.nan),
        ("guidance_scale", math.inf),
        ("prompt", ""),
        ("prompt", "   \t\n "),
        ("prompt", "x" * (MAX_PROMPT_CHARS + 1)),
        ("negative_prompt", "x" * (MAX_PROMPT_CHARS + 1)),
        ("n", 0),
        ("n", 11),
        ("format", "gif"),
        ("fps", 0),
        ("seed", 2**63),
        ("seed", 2**32),                # seeds are 32-bit: torch's CPU generator ignores the bits above
        ("seed", -1),
        ("fps", 121),
        ("prompt", "a \ud800 cat"),      # a lone surrogate: legal in a str, in no UTF-8 message
        ("negative_prompt", "\udfff"),
    ],
    ids=lambda v: repr(v)[:16] if not isinstance(v, str) or len(v) < 16 else f"len{len(v)}",
)
def test_invalid_field_is_rejected_naming_it(field, value):
    request = dataclasses.replace(VALID, **{field: value})
    with pytest.raises(InvalidArgument) as info:
        request.validate(MODELS)
    assert info.value.field == field
    assert info.value.message.startswith(f"{field}: ")


def test_png_with_several_frames_is_rejected_naming_format():
    request = dataclasses.replace(VALID, format="png", num_frames=5)
    with pytest.raises(InvalidArgument) as info:
        request.validate(MODELS)
    assert info.value.field == "format"
    assert "mp4" in info.value.message


def test_an_image_model_refuses_frames_naming_num_frames():
    VALID.validate(IMAGES)
    with pytest.raises(InvalidArgument) as info:
        dataclasses.replace(VALID, num_frames=5, format="mp4").validate(IMAGES)
    assert info.value.field == "num_frames" and "images" in info.value.message


def test_the_models_own_size_multiple_and_max_side_apply():
    coarse = dataclasses.replace(MODELS, size_multiple=32, max_side=1024)
    dataclasses.replace(VALID, width=1024, height=64).validate(coarse)
    for field, value in (("width", 48), ("width", 1056), ("height", 16)):
        with pytest.raises(InvalidArgument) as info:
            dataclasses.replace(VALID, **{field: value}).validate(coarse)
        assert info.value.field == field and "32" in info.value.message


def test_output_pixels_over_the_gateway_limit_are_rejected_naming_size():
    big = dataclasses.replace(VALID, width=1280, height=720, num_frames=161, n=2)
    with pytest.raises(InvalidArgument) as raised:
        big.validate(MODELS)
    assert raised.value.field == "size" and "--max-output-pixels" in raised.value.message
    dataclasses.replace(big, n=1).validate(MODELS)  # 1280x720x161 is exactly the default limit
    with pytest.raises(InvalidArgument):
        dataclasses.replace(big, n=1).validate(MODELS, max_output_pixels=1280 * 720 * 81)


def test_guidance_scale_2_needs_a_second_expert():
    request = dataclasses.replace(VALID, guidance_scale_2=3.0)
    with pytest.raises(InvalidArgument) as info:
        request.validate(MODELS)
    assert info.value.field == "guidance_scale_2" and "one transformer" in info.value.message
    request.validate(dataclasses.replace(MODELS, experts=2))


def test_an_image_is_refused_only_where_the_model_neither_needs_nor_accepts_one():
    from PIL import Image

    from services.common.images import encode_png

    png = encode_png(Image.new("RGB", (8, 8)))
    with_image = dataclasses.replace(VALID, image=png)
    with pytest.raises(InvalidArgument) as info:
        with_image.validate(MODELS)
    assert info.value.field == "image" and "takes no conditioning image" in info.value.message
    optional = dataclasses.replace(MODELS, accepts_image=True)             # Wan2.2 TI2V-5B as a WanPipeline
    with_image.validate(optional)
    VALID.validate(optional)
    required = dataclasses.replace(MODELS, task="image-to-video", needs_image=True)
    with_image.validate(required)
    with pytest.raises(InvalidArgument) as info:
        VALID.validate(required)
    assert info.value.field == "image" and "needs a conditioning image" in info.value.message


@pytest.mark.parametrize("request_id", ["a", "req-1", "0f3c:job.7_x", "r" * 128])
def test_sane_request_ids_pass(request_id):
    assert check_request_id(request_id) == request_id


@pytest.mark.parametrize("request_id", ["", "a b", "a\nb", "r" * 129, "h\u00e9llo", "a/b", "a\x00", "x\r\nSet: y"])
def test_other_request_ids_are_refused_without_echoing_them(request_id):
    with pytest.raises(InvalidArgument) as info:
        check_request_id(request_id, "request_id")
    assert info.value.field == "request_id"
    assert info.value.reason.startswith("must be 1..128 characters")   # the same text whatever was sent


def test_torch_cpu_generator_keeps_only_the_low_32_bits_of_a_seed():
    # Why seeds are 32-bit: if this ever fails, wider seeds draw different noise and the limit can go.
    import torch

    def draw(seed: int) -> torch.Tensor:
        return torch.randn(16, generator=torch.Generator("cpu").manual_seed(seed))

    assert torch.equal(draw(7), draw(7 + 2**32)) and not torch.equal(draw(7), draw(8))
    assert MAX_SEED == 2**32 - 1
