"""Conditioning images in: what the gateway and the stages accept, and the error naming the field otherwise."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from services.common.errors import InvalidArgument
from services.common.images import MAX_IMAGE_BYTES, check_image, decode_image


def encoded(fmt: str, mode: str = "RGB", size=(7, 5)) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(out, format=fmt)
    return out.getvalue()


@pytest.mark.parametrize("fmt,mode", [("PNG", "RGB"), ("PNG", "RGBA"), ("PNG", "L"), ("JPEG", "RGB"),
                                      ("WEBP", "RGB")])
def test_png_jpeg_and_webp_are_read_as_rgb(fmt, mode):
    data = encoded(fmt, mode)
    assert check_image(data) == (7, 5)
    image = decode_image(data)
    assert image.mode == "RGB" and image.size == (7, 5)


@pytest.mark.parametrize("data,reason", [
    (b"", "is empty"),
    (b"not an image at all", "not a PNG, JPEG or WebP image"),
    (encoded("PNG")[:40], "not a PNG, JPEG or WebP image"),        # truncated inside the header
    (encoded("PNG", size=(56, 40))[:60], "not a PNG, JPEG or WebP image"),   # a whole header, the data cut
    (encoded("GIF", "P"), "not a PNG, JPEG or WebP image"),        # a format the stages do not take
    (b"\x89PNG" + b"\0" * MAX_IMAGE_BYTES, "over the limit"),
])
def test_anything_else_is_invalid_argument_naming_the_field(data, reason):
    for read in (check_image, decode_image):
        with pytest.raises(InvalidArgument) as raised:
            read(data, "input_reference")
        assert raised.value.field == "input_reference" and reason in raised.value.message
