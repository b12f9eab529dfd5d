"""Encoding decoded frames as files: PNG for one frame, H.264 MP4 for video.

PNG through Pillow; MP4 through PyAV, which links FFmpeg's libraries in-process. An ffmpeg subprocess fed by a
pipe (imageio-ffmpeg) was tried first and failed intermittently with a broken pipe when forked from the
threaded gRPC server; in-process encoding has no child to lose. yuv420p + faststart make the file play in
browsers and stream from the start.

CPU work only, on uint8 frames already on the host: the decoder runs it on its file encoders' threads
(services/decoder/encoders.py), after the VAE is free for the next request. Pillow and FFmpeg release the GIL.
"""

from __future__ import annotations

import io
import os
import tempfile

import av
import numpy as np
from PIL import Image

DEFAULT_FPS = 16  # Wan2.1's native frame rate


# zlib level 1 rather than Pillow's 6: on a smooth 1024x1024 image 77 ms against 383 ms for 18 % more bytes (noise
# compresses no better at any level), so the file no longer costs more than the VAE decode that made it (86 ms for
# FLUX.1's at 1024x1024 on an H200). The pixels are the same: PNG is lossless at every level.
PNG_COMPRESS_LEVEL = 1


def encode_png(frame: np.ndarray) -> bytes:
    """One uint8 frame [H, W, 3] -> PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def encode_mp4(frames: np.ndarray, fps: int = DEFAULT_FPS) -> bytes:
    """uint8 frames [F, H, W, 3] -> H.264 MP4 bytes. H and W must be even (ours are multiples of 16)."""
    _, height, width, _ = frames.shape
    writer = Mp4Writer(width, height, fps)
    try:
        writer.add(frames)
        return writer.finish()
    finally:
        writer.close()


class Mp4Writer:
    """An H.264 MP4 written a few frames at a time, so a video's encoding can run while its later frames are still
    being decoded (services/decoder/writer.py); `finish` flushes the encoder and returns the file's bytes. The
    same settings and the same frames give the same file as `encode_mp4` (it is this, given every frame at once)."""

    def __init__(self, width: int, height: int, fps: int = DEFAULT_FPS) -> None:
        # faststart rewrites the file after encoding, which needs a seekable path rather than a memory buffer.
        fd, self.path = tempfile.mkstemp(suffix=".mp4")
        os.close(fd)
        self.width, self.height = width, height
        self.container = av.open(self.path, mode="w", options={"movflags": "+faststart"})
        self.stream = self.container.add_stream("libx264", rate=fps)
        self.stream.width, self.stream.height, self.stream.pix_fmt = width, height, "yuv420p"
        # crf 18 is visually lossless; veryfast keeps encoding well under the VAE's own time.
        self.stream.options = {"crf": "18", "preset": "veryfast"}
        # Frame threads, as many as x264 picks (1.5 per core: "threads=3" in the file's x264 SEI on 2 cores).
        # 81x480x832 on 2 cores: 358 ms (smooth frames) and 1.18 s (noise) against 583 ms and 2.2 s with one
        # thread; 2, 3 or 4 threads do no better than x264's own pick.
        self.stream.thread_type, self.stream.thread_count = "AUTO", 0

    def add(self, frames: np.ndarray) -> None:
        """uint8 frames [f, H, W, 3], the next f of the video."""
        if frames.shape[1:] != (self.height, self.width, 3):
            raise ValueError(f"frames of shape {frames.shape[1:]} in a {self.height}x{self.width} video")
        for frame in frames:
            self.container.mux(self.stream.encode(yuv420p_frame(frame)))

    def finish(self) -> bytes:
        self.container.mux(self.stream.encode())  # flush the encoder's delayed frames
        self.container.close()
        with open(self.path, "rb") as f:
            return f.read()

    def close(self) -> None:
        """Drop the file (after `finish`, or instead of it when the request failed)."""
        try:
            self.container.close()
        except Exception:  # noqa: BLE001 - already closed by finish(), or broken by the failure being handled
            pass
        if os.path.exists(self.path):
            os.unlink(self.path)


# Rows padded to 64 bytes, as FFmpeg's own frames are and x264 expects: its AVX-512 code reads rows 64 bytes at a time.
# PyAV packs a frame's rows tightly, so at widths whose half is no multiple of 64 (Wan's 832: 416-byte chroma rows)
# x264 reads past the end of the frame's buffer, and on an AVX-512 host (AMD EPYC) the same 17 frames at 480x832 gave
# 14 different files in 16 encodes; padded, 16 of 16 were the same, at the same size and speed. Some run-to-run
# difference remains with AVX-512 (4 files in 30 encodes of 9 such frames, even on one thread; none with x264 held
# to AVX2): the files differ in x264's choices, not in quality. The conversion is swscale's, the one PyAV's
# encode() makes of RGB frames.
ROW_ALIGN = 64


def yuv420p_frame(rgb: np.ndarray) -> av.VideoFrame:
    """One uint8 frame [H, W, 3] (H, W even) as a yuv420p VideoFrame whose rows are padded to ROW_ALIGN bytes."""
    height, width, _ = rgb.shape
    tight = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24").reformat(format="yuv420p")
    planes = tight.to_ndarray()                          # [H * 3/2, W]: Y, then U and V at W/2 per row
    stride = -(-width // (2 * ROW_ALIGN)) * 2 * ROW_ALIGN
    padded = np.zeros((height * 3 // 2, stride), dtype=np.uint8)
    padded[:height, :width] = planes[:height]
    padded[height:].reshape(height, stride // 2)[:, :width // 2] = planes[height:].reshape(height, width // 2)
    return av.VideoFrame.from_numpy_buffer(padded, format="yuv420p", width=width)
