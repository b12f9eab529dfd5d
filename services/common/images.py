"""Conditioning images in: encoded bytes -> a checked RGB PIL image, with a clear error for anything else.

The gateway checks an image before accepting a job (so a bad upload is a 400, not a failed job), and each stage
that uses it decodes it again (stages can be called directly). PIL does the decoding; the bounds keep a small
file that declares a huge image (a decompression bomb) from making a stage allocate without limit.
"""

from __future__ import annotations

import io
import warnings

from PIL import Image

from services.common.errors import InvalidArgument

# Under the stages' 16 MiB message limit, with room for the rest of the request.
MAX_IMAGE_BYTES = 12 << 20
MAX_IMAGE_PIXELS = 8192 * 8192
FORMATS = ("PNG", "JPEG", "WEBP")


def decode_image(data: bytes, field: str = "image") -> Image.Image:
    """The image as RGB (as diffusers' pipelines convert it), or InvalidArgument naming `field`."""
    return _read(data, field, lambda image: image.load()).convert("RGB")


def check_image(data: bytes, field: str = "image") -> tuple[int, int]:
    """Cheap check that `data` is an image the stages can decode (header and structure, not every pixel), for
    the gateway to refuse a bad upload before accepting the job. Returns (width, height)."""
    # The format's own verify (Image.Image.verify itself checks nothing).
    return _read(data, field, lambda image: image.verify()).size


def _read(data: bytes, field: str, finish) -> Image.Image:
    """Open `data` as one of FORMATS within the bounds, then `finish` it (load every pixel, or only verify)."""
    if not data:
        raise InvalidArgument(field, "is empty")
    if len(data) > MAX_IMAGE_BYTES:
        raise InvalidArgument(field, f"{len(data)} bytes, over the limit of {MAX_IMAGE_BYTES}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS:
                raise InvalidArgument(field, f"{width}x{height} is over the limit of {MAX_IMAGE_PIXELS} pixels")
            finish(image)
    except InvalidArgument:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise InvalidArgument(field, f"not a PNG, JPEG or WebP image ({type(error).__name__})") from None
    return image


def encode_png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()
