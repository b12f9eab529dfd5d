"""What the REST API derives from the stages' outputs, in the gateway: an image in the format the client asked
(the decoder makes PNGs), and a finished video's thumbnail and spritesheet (OpenAI's `download_content` variants).

CPU work on small inputs (one image, or a video's frames at its own size): callers run it off the event loop.
"""

from __future__ import annotations

import io
import math
import os

import av
from PIL import Image

IMAGE_FORMATS = {"png": ("PNG", "image/png"), "jpeg": ("JPEG", "image/jpeg"), "webp": ("WEBP", "image/webp")}
# OpenAI's output_compression default; for JPEG and WebP it is the encoder's quality (100: the least loss).
DEFAULT_COMPRESSION = 100
THUMBNAIL_QUALITY = 80
SPRITESHEET_FRAMES = 16
SPRITESHEET_TILE_WIDTH = 256        # frames wider than this are scaled down in the sheet
SPRITESHEET_QUALITY = 85


def encode_image(png: bytes, output_format: str, compression: int | None = None) -> tuple[bytes, str]:
    """The decoder's PNG as `output_format` (png | jpeg | webp): (bytes, mime type). PNG passes through as is."""
    pil_format, mime_type = IMAGE_FORMATS[output_format]
    if output_format == "png":
        return png, mime_type
    image = Image.open(io.BytesIO(png))
    if output_format == "jpeg" and image.mode != "RGB":     # JPEG has no alpha
        image = image.convert("RGB")
    out = io.BytesIO()
    image.save(out, pil_format, quality=DEFAULT_COMPRESSION if compression is None else compression)
    return out.getvalue(), mime_type


def _frame_count(path: str | os.PathLike) -> int:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        if stream.frames:
            return stream.frames
        return sum(1 for _ in container.decode(stream))     # a container that does not record it


def _frames(path: str | os.PathLike, wanted: set[int]) -> list[Image.Image]:
    """The frames at the `wanted` indices (in order), decoded once and stopping after the last."""
    last = max(wanted)
    frames = []
    with av.open(str(path)) as container:
        for index, frame in enumerate(container.decode(container.streams.video[0])):
            if index in wanted:
                frames.append(frame.to_image())
            if index >= last:
                break
    return frames


def thumbnail(video: str | os.PathLike) -> bytes:
    """The video's first frame (the poster frame a player shows), as WebP."""
    frame = _frames(video, {0})[0]
    out = io.BytesIO()
    frame.save(out, "WEBP", quality=THUMBNAIL_QUALITY)
    return out.getvalue()


def spritesheet(video: str | os.PathLike, frames: int = SPRITESHEET_FRAMES) -> bytes:
    """Up to `frames` frames spread evenly over the video, left to right then top to bottom in a near-square grid
    (scrubbing previews), as JPEG."""
    total = _frame_count(video)
    count = max(1, min(frames, total))
    picked = sorted({round(i * (total - 1) / max(count - 1, 1)) for i in range(count)})
    images = _frames(video, set(picked))
    width, height = images[0].size
    scale = min(1.0, SPRITESHEET_TILE_WIDTH / width)
    tile = (max(1, round(width * scale)), max(1, round(height * scale)))
    columns = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    sheet = Image.new("RGB", (tile[0] * columns, tile[1] * rows))
    for i, image in enumerate(images):
        sheet.paste(image.convert("RGB").resize(tile), ((i % columns) * tile[0], (i // columns) * tile[1]))
    out = io.BytesIO()
    sheet.save(out, "JPEG", quality=SPRITESHEET_QUALITY)
    return out.getvalue()
