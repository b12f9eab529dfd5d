"""One generation through the mesh, top to bottom: validate -> encode -> denoise -> decode -> outputs.

Each served model has its own route (its encoder, denoiser and decoder pools) and its limits, which its
denoiser describes from the model's family: the gateway does no family arithmetic. The gateway never decodes
tensors: conditioning and latents pass from stage to stage as the chunks they arrived in (each stage
validates what it receives), so the gateway stays light whatever the tensor sizes. Live previews are the one
exception, being small by design (uint8 at latent resolution): the gateway encodes them, so the denoiser's loop
spends no time encoding images.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import logging
import math
import time
from collections.abc import AsyncIterator

import numpy as np
from PIL import Image

from diffmesh.v1 import decoder_pb2, denoiser_pb2, encoder_pb2, tensor_pb2
from services.common.errors import DeadlineExceeded, Internal, InvalidArgument, NotFound, Unavailable
from services.common.images import check_image
from services.common.limits import (
    MAX_STEPS,
    check_fps,
    check_frames,
    check_guidance,
    check_outputs,
    check_preview_every,
    check_seed,
    check_side,
    check_steps,
    check_text,
)
from services.denoiser.cache import StepCache, cache_to_proto, check_cache
from services.families.limits import Limits
from services.families.wire import limits_from_proto
from services.gateway.stages import RESTARTED, StagePool

logger = logging.getLogger(__name__)

MAX_PROMPT_CHARS = 8192
DESCRIBE_TIMEOUT_S = 10.0
# Output pixels (width x height x frames x n) one request may ask for: 1280x720, 161 frames (10 s at 16 fps).
# Each side and the frame count are bounded on their own, but their product decides the decoder's memory.
DEFAULT_MAX_OUTPUT_PIXELS = 1280 * 720 * 161
FORMATS = ("auto", "png", "mp4", "none")
FORMAT_ENUM = {
    "auto": decoder_pb2.MEDIA_FORMAT_AUTO,
    "png": decoder_pb2.MEDIA_FORMAT_PNG,
    "mp4": decoder_pb2.MEDIA_FORMAT_MP4,
    "none": decoder_pb2.MEDIA_FORMAT_NONE,
}
# Share of the whole request each stage's progress covers (the denoising loop dominates).
ENCODE_SHARE, DENOISE_SHARE = 0.05, 0.85


@dataclasses.dataclass(frozen=True)
class Defaults:
    """The gateway's own defaults, over every model's (None: the model's, from its limits)."""

    width: int | None = None
    height: int | None = None
    num_inference_steps: int | None = None


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    model: str
    prompt: str
    negative_prompt: str = ""
    width: int = 832
    height: int = 480
    num_frames: int = 1
    num_inference_steps: int = 50
    guidance_scale: float = 5.0
    true_cfg_scale: float = 1.0
    guidance_scale_2: float | None = None
    seed: int = 0
    n: int = 1
    format: str = "auto"
    fps: int = 16
    return_latents: bool = False
    return_frames: bool = False
    timeout_s: float | None = None
    image: bytes = dataclasses.field(default=b"", repr=False)   # encoded conditioning image (image-to-video)
    owner: str = ""     # who submitted it (an API key's id when keys are on): only they see and cancel the job
    preview_every: int = 0   # a PreviewEvent per output every this many denoising steps (before the last); 0: none
    cache: StepCache | None = None   # step caching (services/denoiser/cache.py); None: off, today's output

    def validate(self, limits: Limits, max_output_pixels: int = DEFAULT_MAX_OUTPUT_PIXELS,
                 max_steps: int = MAX_STEPS) -> None:
        """Reject what the model's stages could not serve, naming the field, before any stage is called."""
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise InvalidArgument("prompt", "must not be empty")
        check_text("prompt", self.prompt, MAX_PROMPT_CHARS)
        check_text("negative_prompt", self.negative_prompt, MAX_PROMPT_CHARS)
        check_side("width", self.width, limits.size_multiple, limits.max_side)
        check_side("height", self.height, limits.size_multiple, limits.max_side)
        if not limits.makes_video and self.num_frames != 1:
            raise InvalidArgument("num_frames", f"{self.num_frames}, but {self.model} makes images: num_frames is 1")
        if limits.makes_video:
            check_frames(self.num_frames, limits.frame_multiple, limits.max_frames)
        check_steps(self.num_inference_steps, max_steps)
        check_preview_every(self.preview_every, self.num_inference_steps)
        check_cache(self.cache, limits.family)     # the fields, and what the model's family takes
        check_guidance(self.guidance_scale)
        check_guidance(self.true_cfg_scale, "true_cfg_scale")
        if self.guidance_scale_2 is not None:
            check_guidance(self.guidance_scale_2, "guidance_scale_2")
            if limits.experts < 2:
                raise InvalidArgument("guidance_scale_2", f"{self.model} has one transformer; guidance_scale_2 "
                                      "sets the second expert's scale (Wan2.2 A14B)")
        check_outputs(self.n)
        if self.format not in FORMATS:
            raise InvalidArgument("format", f"{self.format!r} is not one of {FORMATS}")
        if self.format == "png" and self.num_frames != 1:
            raise InvalidArgument("format", "png holds one frame; use mp4 for num_frames > 1")
        check_fps(self.fps)
        output_pixels = self.width * self.height * self.num_frames * self.n
        if output_pixels > max_output_pixels:
            raise InvalidArgument(
                "size", f"{self.width}x{self.height} x {self.num_frames} frames x n={self.n} is {output_pixels} "
                "pixels, "
                f"over this gateway's limit of {max_output_pixels} (--max-output-pixels)")
        check_seed(self.seed)
        if limits.needs_image and not self.image:
            raise InvalidArgument("image", f"{self.model} ({limits.task}) needs a conditioning image")
        if self.image and not limits.takes_image:
            raise InvalidArgument("image", f"{self.model} ({limits.task}) takes no conditioning image")
        if self.image:
            check_image(self.image, "image")



@dataclasses.dataclass(frozen=True)
class ProgressEvent:
    stage: str
    step: int
    total_steps: int
    fraction: float                 # whole request, 0..1


@dataclasses.dataclass(frozen=True)
class MediaEvent:
    index: int
    mime_type: str
    data: bytes


@dataclasses.dataclass(frozen=True)
class PreviewEvent:
    """A live preview of one output (the denoiser's latent -> RGB projection), encoded here: small, at latent
    resolution."""

    index: int
    step: int
    total_steps: int
    width: int
    height: int
    mime_type: str
    data: bytes = dataclasses.field(repr=False)


PREVIEW_MIME_TYPE = "image/png"


def preview_images(preview, n: int) -> list[PreviewEvent]:
    """A LatentPreview's uint8 [n, h, w, 3] as one PNG per output; [] (with a warning) for one that is not that: a
    preview is extra, so a malformed one from a stage costs the client that preview, never the result."""
    # Checked and read with numpy alone: the tensor codec would bring torch into the gateway for these bytes.
    message = preview.image
    shape = list(message.shape)
    if (message.dtype != "uint8" or len(shape) != 4 or shape[0] != n or shape[3] != 3 or min(shape) < 1
            or len(message.data) != math.prod(shape)):
        logger.warning("dropping a preview of %s %s (%d bytes) from the denoiser: expected uint8 [%d, h, w, 3]",
                       message.dtype, shape, len(message.data), n)
        return []
    events = []
    for index, pixels in enumerate(np.frombuffer(message.data, dtype=np.uint8).reshape(shape)):
        out = io.BytesIO()
        # compress_level 1: these are looked at once and replaced; zlib's default level costs several times more.
        Image.fromarray(pixels, "RGB").save(out, format="PNG", compress_level=1)
        events.append(PreviewEvent(index, preview.step, preview.total_steps, pixels.shape[1], pixels.shape[0],
                                   PREVIEW_MIME_TYPE, out.getvalue()))
    return events


@dataclasses.dataclass(frozen=True)
class TensorEvent:
    """A returned tensor, still as its wire chunks (the gateway does not decode tensors)."""

    name: str
    chunks: list[tensor_pb2.TensorChunk]


Event = ProgressEvent | PreviewEvent | MediaEvent | TensorEvent


@dataclasses.dataclass
class ModelRoute:
    """One served model: its stage pools, and its limits once its denoiser has described them."""

    name: str
    encoder: StagePool
    denoiser: StagePool
    decoder: StagePool
    limits: Limits | None = None

    @property
    def pools(self) -> dict[str, StagePool]:
        return {"encoder": self.encoder, "denoiser": self.denoiser, "decoder": self.decoder}

    async def describe(self) -> Limits:
        """The model's limits, asked of its denoiser once (a stage that is down answers 503 naming it)."""
        if self.limits is None:
            reply = await self.denoiser.unary(lambda stub, kw: stub.Describe(denoiser_pb2.DescribeRequest(), **kw),
                                              f"describe-{self.name}", DESCRIBE_TIMEOUT_S)
            if reply.id != self.name:     # a misconfigured route: the addresses go to the log, not to clients
                logger.error("the denoiser at %s serves %r, but the gateway routes %r to it", self.denoiser.addresses,
                             reply.id, self.name)
                raise Internal(f"the denoiser stage serves {reply.id!r}, but the gateway routes {self.name!r} to it")
            self.limits = limits_from_proto(reply.limits)
        return self.limits


async def collect(stream: AsyncIterator) -> list:
    """A stage stream's responses; what a failed attempt sent is dropped when the pool starts the call over."""
    items: list = []
    async for item in stream:
        if item is RESTARTED:
            items.clear()
        else:
            items.append(item)
    return items


async def gather_or_cancel(calls: list) -> list:
    """Run the calls at once; the first failure cancels the others (no stage works on for a failed request)."""
    tasks = [asyncio.ensure_future(call) for call in calls]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()


class MeshPipeline:
    def __init__(self, routes: list[ModelRoute], max_output_pixels: int = DEFAULT_MAX_OUTPUT_PIXELS,
                 max_steps: int = MAX_STEPS) -> None:
        if not routes:
            raise ValueError("the gateway needs at least one model")
        self.routes = {route.name: route for route in routes}
        self.max_output_pixels = max_output_pixels
        self.max_steps = max_steps

    @property
    def model_names(self) -> list[str]:
        return list(self.routes)

    def route(self, model: str) -> ModelRoute:
        if model not in self.routes:
            raise NotFound(f"model {model[:128]!r} not found; available: {self.model_names}")
        return self.routes[model]

    async def limits(self, model: str) -> Limits:
        return await self.route(model).describe()

    async def validate(self, request: GenerationRequest) -> None:
        request.validate(await self.limits(request.model), self.max_output_pixels, self.max_steps)

    async def check_serving(self, model: str) -> None:
        """Unavailable naming the first of the model's stages with no replica serving: a new request is refused
        at once rather than accepted to wait (an accepted one waits for a restarting stage, see jobs.py)."""
        for stage, pool in self.route(model).pools.items():
            if not await pool.serving_within():
                raise Unavailable(stage, f"no replica is serving ({len(pool.replicas)} configured)")

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Event]:
        # Validated once, when the job was submitted (GatewayService.submit).
        route = self.route(request.model)
        deadline = time.monotonic() + request.timeout_s if request.timeout_s else None

        def remaining() -> float | None:
            if deadline is None:
                return None
            left = deadline - time.monotonic()
            if left <= 0:
                raise DeadlineExceeded(f"request {request.request_id} ran past its {request.timeout_s:.0f}s deadline")
            return left

        # 1. Encode the prompt (the negative prompt when guidance needs it, the image when there is one), and the
        # conditioning image through the VAE on the decoder, at once: the two stages do not wait on each other.
        encode_request = encoder_pb2.EncodeRequest(
            request_id=request.request_id, model=request.model, prompt=request.prompt,
            negative_prompt=request.negative_prompt, guidance_scale=request.guidance_scale,
            true_cfg_scale=request.true_cfg_scale, image=request.image,
        )
        calls = [collect(route.encoder.stream(lambda stub, kw: stub.Encode(encode_request, **kw),
                                              request.request_id, remaining()))]
        if request.image:
            condition_request = decoder_pb2.EncodeImageRequest(
                request_id=request.request_id, model=request.model, image=request.image, width=request.width,
                height=request.height, num_frames=request.num_frames)
            calls.append(collect(route.decoder.stream(lambda stub, kw: stub.EncodeImage(condition_request, **kw),
                                                      request.request_id, remaining())))
        embeddings = [chunk for chunks in await gather_or_cancel(calls) for chunk in chunks]
        yield ProgressEvent("encode", 1, 1, ENCODE_SHARE)

        # 2. Denoise: one progress event per step (a preview after every preview_every-th), then the latents. If the
        # replica goes away the pool starts the call over on another (RESTARTED): the steps and previews repeat, and
        # the latents are collected afresh.
        denoise_params = denoiser_pb2.DenoiseParams(
            request_id=request.request_id, model=request.model, width=request.width, height=request.height,
            num_frames=request.num_frames, num_inference_steps=request.num_inference_steps,
            guidance_scale=request.guidance_scale, seed=request.seed, num_outputs=request.n,
            true_cfg_scale=request.true_cfg_scale, guidance_scale_2=request.guidance_scale_2,
            preview_every=request.preview_every, cache=cache_to_proto(request.cache),
        )

        def denoise_requests():
            yield denoiser_pb2.DenoiseRequest(params=denoise_params)
            for chunk in embeddings:
                yield denoiser_pb2.DenoiseRequest(tensor=chunk)

        latents: list[tensor_pb2.TensorChunk] = []
        async for event in route.denoiser.stream(
            lambda stub, kw: stub.Denoise(denoise_requests(), **kw), request.request_id, remaining()
        ):
            if event is RESTARTED:
                latents.clear()
            elif event.WhichOneof("item") == "progress":
                p = event.progress
                fraction = ENCODE_SHARE + DENOISE_SHARE * p.step / max(p.total_steps, 1)
                yield ProgressEvent("denoise", p.step, p.total_steps, fraction)
            elif event.WhichOneof("item") == "preview":
                for preview in await asyncio.to_thread(preview_images, event.preview, request.n):
                    yield preview
            else:
                latents.append(event.tensor)
        if not latents or not latents[-1].last:
            raise Internal(f"denoiser ended request {request.request_id} without complete latents")
        if request.return_latents:
            yield TensorEvent("latents", latents)

        # 3. Decode to files (and frames when asked). On a restart the partial pieces and frames start over; a
        # file already passed on is not passed on again (the retry decodes the same bytes).
        decode_params = decoder_pb2.DecodeParams(
            request_id=request.request_id, model=request.model, format=FORMAT_ENUM[request.format],
            fps=request.fps, return_frames=request.return_frames,
        )

        def decode_requests():
            yield decoder_pb2.DecodeRequest(params=decode_params)
            for chunk in latents:
                yield decoder_pb2.DecodeRequest(tensor=chunk)

        media: dict[int, list[bytes]] = {}
        frames: list[tensor_pb2.TensorChunk] = []
        emitted: set[int] = set()
        async for response in route.decoder.stream(
            lambda stub, kw: stub.Decode(decode_requests(), **kw), request.request_id, remaining()
        ):
            if response is RESTARTED:
                media.clear()
                frames.clear()
            elif response.WhichOneof("item") == "media":
                piece = response.media
                media.setdefault(piece.index, []).append(piece.data)
                if piece.last:
                    data = b"".join(media.pop(piece.index))
                    if piece.index not in emitted:
                        emitted.add(piece.index)
                        yield MediaEvent(piece.index, piece.mime_type, data)
            else:
                frames.append(response.tensor)
        if frames:
            yield TensorEvent("frames", frames)
        yield ProgressEvent("decode", 1, 1, 1.0)

    def _pools(self) -> dict[str, StagePool]:
        """Every pool, named "stage" for one model and "model/stage" for several."""
        several = len(self.routes) > 1
        return {(f"{route.name}/{stage}" if several else stage): pool
                for route in self.routes.values() for stage, pool in route.pools.items()}

    async def health(self) -> dict[str, bool]:
        """Whether each stage has a SERVING replica (checked concurrently, so one slow stage costs one timeout)."""
        pools = self._pools()
        results = await asyncio.gather(*(pool.check_health() for pool in pools.values()))
        return dict(zip(pools, results, strict=True))

    async def close(self) -> None:
        for pool in self._pools().values():
            await pool.close()
