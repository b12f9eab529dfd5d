"""Images streamed as server-sent events, as OpenAI's `images.generate(..., stream=True, partial_images=N)` reads
them: `image_generation.partial_image` events from the denoiser's live previews while it works, then one
`image_generation.completed` event with the final image.

`partial_images` N asks for N partial images during the denoise: the job previews every
k = ceil(num_inference_steps / (N + 1)) steps, which yields at most N evenly spaced previews before the last step
(fewer where the steps do not split evenly: 5 steps with N = 3 preview after steps 2 and 4). An explicit
`preview_every` sets k instead (all its previews are sent, up to N when N is given too). Each partial image is the
family's cheap latent -> RGB projection, scaled up to the requested size and encoded in the requested
output_format, so a client can show it in the final image's place.

Errors before the stream starts (validation, a full queue, a stage down) are ordinary JSON errors with their HTTP
status; once it has started, a failure is an `error` event in OpenAI's error shape (the SDK raises it as an
APIError), and the stream ends.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
import json
import logging
import math
import time
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import StreamingResponse
from PIL import Image

from services.common.errors import InvalidArgument, MeshError
from services.common.logs import request_context
from services.gateway import media_assets
from services.gateway.jobs import Job
from services.gateway.pipeline import GenerationRequest, MediaEvent, PreviewEvent
from services.gateway.service import GatewayService

logger = logging.getLogger(__name__)

PARTIAL_IMAGE = "image_generation.partial_image"
COMPLETED = "image_generation.completed"
DISCONNECT_POLL_S = 0.5
# An SSE comment this often while nothing else is sent: proxies keep the connection, and a client that has gone is
# noticed by the failed write even where the server does not report the disconnect.
KEEPALIVE_S = 15.0
# What the SDK's Usage requires; diffmesh counts no tokens.
NO_USAGE = {"input_tokens": 0, "input_tokens_details": {"image_tokens": 0, "text_tokens": 0}, "output_tokens": 0,
            "total_tokens": 0}


def preview_every_for(num_inference_steps: int, partial_images: int) -> int:
    """The preview cadence that gives `partial_images` previews during the denoise: previews come after steps k,
    2k, ... strictly before the last step, so k = ceil(steps / (N + 1)) gives floor((steps - 1) / k) <= N."""
    return math.ceil(num_inference_steps / (partial_images + 1)) if partial_images > 0 else 0


def sse(event: str, data: dict) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def partial_image(preview: PreviewEvent, width: int, height: int, output_format: str,
                  compression: int | None) -> bytes:
    """A preview scaled up to the requested size (bilinear: a smooth look rather than latent-sized blocks), in the
    requested format."""
    image = Image.open(io.BytesIO(preview.data)).convert("RGB").resize((width, height), Image.Resampling.BILINEAR)
    pil_format, _ = media_assets.IMAGE_FORMATS[output_format]
    out = io.BytesIO()
    if output_format == "png":
        image.save(out, pil_format, compress_level=1)     # replaced within seconds: speed over size
    else:
        image.save(out, pil_format, quality=media_assets.DEFAULT_COMPRESSION if compression is None else compression)
    return out.getvalue()


async def stream_images(service: GatewayService, body, generation: GenerationRequest,
                        request: Request) -> StreamingResponse:
    """The image route with `stream` (or `preview_every`) given: submit the job with previews, then answer SSE.
    `body` is rest.ImageGenerationRequest, `generation` the request built from it."""
    # 1. Check what streaming takes, before anything is accepted (a 400 naming the field, as JSON).
    if not body.stream:
        raise InvalidArgument("preview_every", "applies to images with stream=true (as partial images); a "
                              "non-streamed image request returns only the final image")
    if generation.n != 1:
        raise InvalidArgument("n", f"{generation.n}, but stream=true sends one image (its events carry no output "
                              "index); use n=1, or stream=false for several")
    if body.response_format == "url":
        raise InvalidArgument("response_format", "stream=true sends images inline as b64_json; leave "
                              "response_format out or set b64_json")
    limit = body.partial_images
    every = body.preview_every if body.preview_every is not None else \
        preview_every_for(generation.num_inference_steps, limit or 0)
    generation = dataclasses.replace(generation, preview_every=every)
    # 2. Submit (validated there: preview_every within 0..num_inference_steps, naming the field).
    with request_context(generation.request_id):
        job = await service.submit(generation, prefix="img")
    shape = {"size": f"{generation.width}x{generation.height}", "quality": body.quality or "auto",
             "background": "opaque", "output_format": body.output_format or "png"}
    events = job_events(service, job, request, generation, shape, body.output_compression, limit)
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def job_events(service: GatewayService, job: Job, request: Request, generation: GenerationRequest,
                     shape: dict, compression: int | None, limit: int | None) -> AsyncIterator[bytes]:
    """The job's previews and final image as SSE. Its events are pumped by a task of their own, so that waiting
    for the next one can time out to check whether the client is still there (and cancel the job if not) without
    cancelling the job's event stream itself."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump() -> None:
        try:
            async for event in service.events(job):
                queue.put_nowait(event)
            queue.put_nowait(done)
        except MeshError as error:
            queue.put_nowait(error)

    pumping = asyncio.create_task(pump(), name=f"sse-{job.id}")
    ended = False
    partials = 0
    quiet_since = time.monotonic()
    with request_context(generation.request_id):
        try:
            while True:
                try:
                    item = await asyncio.wait_for(queue.get(), DISCONNECT_POLL_S)
                except TimeoutError:
                    if await request.is_disconnected():
                        return       # the pump's cancellation (below) cancels the job
                    if time.monotonic() - quiet_since >= KEEPALIVE_S:
                        quiet_since = time.monotonic()
                        yield b": keep-alive\n\n"
                    continue
                if item is done:
                    ended = True
                    return
                if isinstance(item, MeshError):
                    ended = True
                    yield sse("error", {"type": "error", "error": {
                        "message": item.message, "type": "server_error" if item.http_status >= 500 else
                        "invalid_request_error", "param": getattr(item, "field", None),
                        "code": item.grpc_code.name.lower()}})
                    return
                if isinstance(item, PreviewEvent) and item.index == 0 and (limit is None or partials < limit):
                    data = await asyncio.to_thread(partial_image, item, generation.width, generation.height,
                                                   shape["output_format"], compression)
                    yield sse(PARTIAL_IMAGE, {"type": PARTIAL_IMAGE, "b64_json": b64(data),
                                              "partial_image_index": partials, **shape, "created_at": int(time.time()),
                                              "step": item.step, "total_steps": item.total_steps})
                    partials += 1
                    quiet_since = time.monotonic()
                elif isinstance(item, MediaEvent):
                    data, _ = await asyncio.to_thread(media_assets.encode_image, item.data, shape["output_format"],
                                                      compression)
                    yield sse(COMPLETED, {"type": COMPLETED, "b64_json": b64(data), **shape,
                                          "created_at": int(time.time()), "usage": NO_USAGE, "seed": generation.seed})
                    quiet_since = time.monotonic()
        finally:
            # Ended early (the client went: seen here, or by the server, which then cancels this generator):
            # cancelling the pump closes the job's event stream, which cancels the job (JobStore.events). After the
            # job's end it has nothing left to do.
            if not ended:
                logger.info("image stream closed before its job ended (the client went away): cancelling job %s",
                            job.id)
            pumping.cancel()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
