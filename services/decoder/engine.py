"""VAE decoding: latents -> frames in 0..1 -> PNG / MP4.

The model's family de-normalises, decodes and post-processes exactly as its pipeline does after its loop, so
the frames equal the pipeline's `output_type="np"`; this engine checks, and encodes the files. Two parts, which the
server runs apart: `decode_pixels` needs the VAE (latents -> frames on the device -> uint8 pixels on the host, into
the request's `FileWriter` chunk by chunk as the family decodes them), the writer's `write` only the CPU (pixels ->
PNG / MP4, services/decoder/writer.py), on another thread: a video is encoded while its later frames decode, and
the VAE takes the next request while this one's last frames are encoded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch

from services.common import metrics
from services.common.errors import InvalidArgument
from services.common.images import decode_image
from services.common.limits import MAX_FRAMES, MAX_SIDE, check_frames, check_side
from services.common.models import ModelDir
from services.common.platform import Platform
from services.decoder import media
from services.decoder.compile import VaeCompile, compile_vae_decoder
from services.decoder.tiling import VaeTiling
from services.decoder.writer import FileWriter, MediaItem
from services.families import family_for

logger = logging.getLogger(__name__)

FORMATS = ("auto", "png", "mp4", "none")


@dataclasses.dataclass(frozen=True)
class DecodeParams:
    request_id: str
    format: str = "auto"          # one of FORMATS
    fps: int = media.DEFAULT_FPS
    return_frames: bool = False


@dataclasses.dataclass(frozen=True)
class ConditionParams:
    """A conditioning image to encode with the VAE, for a video of this size and length."""

    request_id: str
    image: bytes
    width: int
    height: int
    num_frames: int


@dataclasses.dataclass(frozen=True)
class Decoded:
    media: list[MediaItem]
    frames: np.ndarray | None     # float32 [n, F, H, W, 3] in 0..1, when asked for


class DecoderEngine:
    def __init__(self, model: ModelDir, platform: Platform, dtype: torch.dtype | None = None,
                 tiling: VaeTiling = VaeTiling(), device: torch.device | None = None,
                 compile_vae: VaeCompile | None = None) -> None:
        self.model_name = model.name
        self.device = device or platform.device()      # a gang rank's own device (services/decoder/gang.py)
        self.platform = platform
        self.family = family_for(model)
        self.limits = self.family.limits(model)
        self.decoding = self.family.decoding(model, dtype or platform.default_dtype(), self.device)
        self.tiling = tiling
        self.compiled_shapes: set[tuple[int, ...]] | None = None     # compiled_key()s the compiled decoder has seen
        logger.info("decoder loaded %s (%s family) on %s, VAE tiling %s", model.path, self.family.name,
                    self.device, tiling.mode)
        if compile_vae is not None:
            compile_vae_decoder(self.decoding.vae, compile_vae)
            self.compiled_shapes = set()
            logger.info("VAE decoder compiled (%s): each latent shape compiles at its first decode",
                        compile_vae.backend)
            self.warm_up(compile_vae.warmup_sizes)

    def warm_up(self, sizes: tuple[tuple[int, int, int], ...]) -> None:
        """Decode zero latents of each size (no files), so that their compile is done before serving; a size this
        model cannot make fails start-up naming it."""
        for width, height, frames in sizes:
            try:
                check_side("width", width, self.limits.size_multiple, self.limits.max_side)
                check_side("height", height, self.limits.size_multiple, self.limits.max_side)
                if self.limits.frame_multiple:
                    check_frames(frames, self.limits.frame_multiple, self.limits.max_frames)
                elif frames != 1:
                    raise InvalidArgument("num_frames", f"{frames}, but {self.model_name} makes images")
            except InvalidArgument as error:
                raise ValueError(f"--vae-warmup-sizes {width}x{height}x{frames}: {error.message}") from None
            latents = self.decoding.warmup_latents(width, height, frames)
            self.compiled_shapes.add(self.compiled_key(latents))          # compiled here, not by a request
            started = time.perf_counter()
            self.decode_pixels(DecodeParams("warmup", format="none"), latents, FileWriter("none"))
            self.platform.synchronize()
            logger.info("VAE decoder compiled for %dx%dx%d in %.1fs", width, height, frames,
                        time.perf_counter() - started)

    def check(self, params: DecodeParams, latents: torch.Tensor) -> None:
        if params.format not in FORMATS:
            raise InvalidArgument("format", f"{params.format!r} is not one of {FORMATS}")
        if not 1 <= params.fps <= 120:
            raise InvalidArgument("fps", f"{params.fps} is outside 1..120")
        if not latents.is_floating_point():
            raise InvalidArgument("latents", f"dtype {latents.dtype} is not a floating point type")
        self.decoding.check(latents)
        if params.format == "png" and latents.dim() == 5 and latents.shape[2] != 1:
            raise InvalidArgument("format", "png holds one frame; use mp4 for num_frames > 1")

    def check_condition(self, params: ConditionParams) -> None:
        # Refused here, at the boundary, not by the family's encode: a decoder gang's ranks must never start a
        # request that fails on them (services/decoder/gang.py).
        if not self.limits.takes_image:
            raise InvalidArgument("image", f"{self.model_name} ({self.limits.task}) takes no conditioning image")
        for field in ("width", "height"):
            value = getattr(params, field)
            if not 1 <= value <= MAX_SIDE:
                raise InvalidArgument(field, f"{value} is outside 1..{MAX_SIDE}")
        if not 1 <= params.num_frames <= MAX_FRAMES:
            raise InvalidArgument("num_frames", f"{params.num_frames} is outside 1..{MAX_FRAMES}")

    @torch.inference_mode()
    def encode_condition(self, params: ConditionParams) -> dict[str, torch.Tensor]:
        """The conditioning image through the VAE's encoder, as the model's pipeline prepares it."""
        self.check_condition(params)
        image = decode_image(params.image)
        with self.tiling.applied(self.decoding.vae, params.width * params.height), \
                metrics.phase("condition_encode", self.model_name):
            return self.decoding.encode_condition(image, params.width, params.height, params.num_frames)

    def file_writer(self, params: DecodeParams, latents: torch.Tensor) -> FileWriter:
        """The writer of this request's files ("auto": a PNG for one frame, else an MP4), for checked latents."""
        fmt = params.format
        if fmt == "auto":
            fmt = "mp4" if latents.dim() == 5 and latents.shape[2] > 1 else "png"
        return FileWriter(fmt, params.fps, self.model_name)

    def decode(self, params: DecodeParams, latents: torch.Tensor) -> Decoded:
        """Latents -> files in one call: the VAE's part, then the files (one after the other, on this thread)."""
        self.check(params, latents)
        files = self.file_writer(params, latents)
        frames = self.decode_pixels(params, latents, files)
        return Decoded(media=files.write(), frames=frames)

    @torch.inference_mode()
    def decode_pixels(self, params: DecodeParams, latents: torch.Tensor, files: FileWriter) -> np.ndarray | None:
        """The part that needs the VAE: latents -> pixels into `files`, chunk by chunk, then closed (aborted if the
        decode fails); the float frames [n, F, H, W, 3] on the host when asked for."""
        # 1. Check inputs
        self.check(params, latents)
        self.note_compile(latents, params.request_id)
        # 2. The family's decode, chunk by chunk: de-normalise, VAE decode, post-process as its pipeline does
        with self.decoding_scope(latents):
            # 3. To the host, each chunk into the files as it comes
            return self.deliver(params, files, lambda: self.decoding.decode_chunks(latents))

    def decode_frames(self, latents: torch.Tensor) -> torch.Tensor:
        """Checked latents -> frames float32 [n, F, H, W, 3] in 0..1 on the device, tiled as the policy says."""
        with self.decoding_scope(latents):
            return self.decoding.decode(latents)

    @contextlib.contextmanager
    def decoding_scope(self, latents: torch.Tensor) -> Iterator[None]:
        """A decode of these latents: the VAE tiled as the policy says for their frame size, timed as `decode`."""
        frame_pixels = latents.shape[-2] * latents.shape[-1] * self.decoding.spatial_scale ** 2
        with self.tiling.applied(self.decoding.vae, frame_pixels), metrics.phase("decode", self.model_name):
            yield

    @staticmethod
    def compiled_key(latents: torch.Tensor) -> tuple[int, ...]:
        """What the compiled decoder's graphs depend on: outputs and latent rows and columns (a video's length only
        repeats its per-latent-frame calls)."""
        return (latents.shape[0], *latents.shape[-2:])

    def note_compile(self, latents: torch.Tensor, request_id: str) -> None:
        """Say when a request waits for the compiled decoder to compile for its latents."""
        key = self.compiled_key(latents)
        if self.compiled_shapes is None or key in self.compiled_shapes:
            return
        logger.info("compiling the VAE decoder for latents %s (not in --vae-warmup-sizes): %s waits for it",
                    list(latents.shape), request_id)
        self.compiled_shapes.add(key)

    def deliver(self, params: DecodeParams, files: FileWriter,
                chunks: Callable[[], Iterable[torch.Tensor]]) -> np.ndarray | None:
        """Frames on the device, chunk by chunk -> uint8 pixels into `files` (rounded as diffusers' numpy_to_pil
        does, on the device, so a quarter of the bytes cross), then `files` closed; the float frames on the host
        when asked. Any failure aborts `files` (its `write` stops) and is raised; `files` aborted from elsewhere
        stops the decode at its next chunk (WriteAborted)."""
        kept: list[np.ndarray] = []
        try:
            for frames in chunks():                                                   # [n, f, H, W, 3]
                files.check_wanted()
                if files.format != "none":
                    files.add((frames * 255).round().to(torch.uint8).cpu().numpy())
                if params.return_frames:
                    kept.append(frames.cpu().numpy())
                files.check_wanted()            # before the next chunk is decoded
        except BaseException:
            files.abort()
            raise
        files.close()
        return np.concatenate(kept, axis=1) if kept else None
