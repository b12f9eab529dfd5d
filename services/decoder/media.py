"""Encoding decoded frames as files: PNG for one frame, H.264 MP4 for video.

PNG through Pillow; MP4 through imageio-ffmpeg, which ships its own ffmpeg binary, so no system ffmpeg is
needed. yuv420p + faststart make the file play in browsers and stream from the start.
"""

from __future__ import annotations

import io
import os
import tempfile

import imageio_ffmpeg
import numpy as np
from PIL import Image

DEFAULT_FPS = 16  # Wan2.1's native frame rate


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """float frames in 0..1 -> uint8, rounding as diffusers' numpy_to_pil does."""
    return (np.clip(frames, 0.0, 1.0) * 255).round().astype(np.uint8)


def encode_png(frame: np.ndarray) -> bytes:
    """One uint8 frame [H, W, 3] -> PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format="PNG")
    return buffer.getvalue()


def encode_mp4(frames: np.ndarray, fps: int = DEFAULT_FPS) -> bytes:
    """uint8 frames [F, H, W, 3] -> H.264 MP4 bytes. H and W must be even (ours are multiples of 16)."""
    num_frames, height, width, _ = frames.shape
    # ffmpeg's mp4 muxer needs a seekable output, so write a temporary file rather than a pipe.
    fd, path = tempfile.mkstemp(suffix=".mp4")
    os.close(fd)
    try:
        writer = imageio_ffmpeg.write_frames(
            path,
            (width, height),
            fps=fps,
            codec="libx264",
            pix_fmt_out="yuv420p",
            macro_block_size=1,
            quality=8,
            output_params=["-movflags", "+faststart"],
            ffmpeg_log_level="error",
        )
        writer.send(None)  # prime the generator
        for frame in frames:
            writer.send(np.ascontiguousarray(frame))
        writer.close()
        with open(path, "rb") as f:
            return f.read()
    finally:
        os.unlink(path)
