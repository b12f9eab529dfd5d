"""OpenAI-style REST shim over the gateway: images (synchronous), videos (jobs), models, health, metrics.

Errors follow OpenAI's shape, {"error": {"message", "type", "param", "code"}}, with the HTTP status that
matches the gRPC code (400, 404, 429, 503, ...). No traceback ever reaches a client.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import itertools
import logging
import math
from typing import Literal

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from services.common import tracing
from services.common.errors import InvalidArgument, MeshError, NotFound
from services.common.limits import check_fps, check_request_id
from services.common.logs import request_context
from services.denoiser.cache import StepCache
from services.gateway import access, media_assets, rest_stream
from services.gateway.config import parse_size
from services.gateway.http_limits import BodyLimit
from services.gateway.jobs import Job, JobStatus
from services.gateway.metrics import GatewayMetrics
from services.gateway.pipeline import MediaEvent
from services.gateway.rest_files import RangedFileResponse
from services.gateway.service import GatewayService

logger = logging.getLogger(__name__)

DISCONNECT_POLL_S = 0.5
REQUEST_ID_HEADER = "x-request-id"
NESTED_TOO_DEEPLY = "JSON nested too deeply"
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 409: "invalid_request_error", 413: "invalid_request_error",
               429: "rate_limit_error", 503: "service_unavailable", 504: "timeout"}


# A parameter this server does not know is refused (400 naming it), never silently ignored. OpenAI's own image
# parameters that select something diffmesh does not do are taken only with the values that ask for nothing
# (their defaults, or a level diffmesh meets anyway); `user` and `safety_identifier` are metadata: accepted.
OPENAI_IMAGE_CHOICES = {
    "background": (("auto", "opaque"), "images are opaque here; 'transparent' is not supported"),
    "quality": (("auto",), "there are no quality presets here; set num_inference_steps instead"),
    "moderation": (("auto", "low"), "diffmesh runs no moderation model; only 'auto' or 'low' can be honoured"),
    "style": ((), "there are no style presets here; describe the style in the prompt"),
}


class CacheOption(BaseModel):
    """Step caching for this request (services/denoiser/cache.py); the denoiser checks what the model takes."""
    model_config = ConfigDict(extra="forbid")

    method: str = Field(description="first_block, taylorseer or magcache (teacache is refused: not in diffusers)")
    threshold: float | None = Field(default=None, description="first_block (0.05), magcache (0.06)")
    interval: int | None = Field(default=None, description="taylorseer: steps between full forwards (5)")
    warmup_steps: int | None = Field(default=None, description="taylorseer: full forwards first (3)")
    mag_ratios: list[float] | None = Field(default=None, description="magcache: calibrated ratios (FLUX: built in)")

    def step_cache(self) -> StepCache:
        return StepCache(self.method, self.threshold, self.interval, self.warmup_steps, tuple(self.mag_ratios or ()))


class ImageGenerationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str
    model: str | None = None
    n: int | None = None
    size: str | None = Field(default=None, description="WIDTHxHEIGHT, multiples of the model's size_multiple; "
                             "auto (or none): the model's default size")
    response_format: Literal["b64_json", "url"] | None = None     # None: b64_json
    output_format: Literal["png", "jpeg", "webp"] | None = None   # None: png
    output_compression: int | None = Field(default=None, ge=0, le=100,
                                           description="JPEG/WebP quality, 0-100 (default 100)")
    stream: bool | None = None
    partial_images: int | None = Field(default=None, ge=0, le=3, description="with stream: partial images sent")
    background: str | None = None
    quality: str | None = None
    moderation: str | None = None
    style: str | None = None
    user: str | None = None
    safety_identifier: str | None = None
    negative_prompt: str | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    true_cfg_scale: float | None = None
    seed: int | None = None
    preview_every: int | None = Field(default=None, description="with stream: a partial image every this many "
                                      "steps (default: from partial_images)")
    cache: CacheOption | None = None      # step caching; none by default


def check_openai_choices(body: ImageGenerationRequest) -> None:
    """OpenAI's image options, each with only the values this server honours (OPENAI_IMAGE_CHOICES)."""
    for field, (honoured, reason) in OPENAI_IMAGE_CHOICES.items():
        value = getattr(body, field)
        if value is not None and value not in honoured:
            raise InvalidArgument(field, f"{value!r} is not supported: {reason}")
    if body.output_compression is not None and body.output_format in (None, "png"):
        raise InvalidArgument("output_compression", "applies to output_format jpeg or webp; PNG is lossless")
    if body.partial_images is not None and not body.stream:
        raise InvalidArgument("partial_images", "applies with stream=true")


class VideoRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str
    model: str | None = None
    size: str | None = Field(default=None, description="WIDTHxHEIGHT; auto (or none): the model's default size")
    seconds: float | str | None = Field(default=None, description="duration (default 4, as OpenAI's); frames = "
                                        "seconds x fps, as 4k+1")
    num_frames: int | None = Field(default=None, description="frames, 4k+1; wins over seconds")
    fps: int | None = None
    negative_prompt: str | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    guidance_scale_2: float | None = None
    seed: int | None = None
    preview_every: int | None = Field(default=None, description="a live preview every this many steps, the "
                                      "thumbnail variant while in progress (default 0: none)")
    cache: CacheOption | None = None      # step caching; none by default
    # The conditioning image (image-to-video): in JSON a data URL (data:image/png;base64,...) or OpenAI's
    # {"image_url": data URL}; in a multipart form (what the OpenAI SDK sends) a file, read into bytes before this
    # model is built, or the field input_reference[image_url].
    input_reference: str | bytes | dict[str, str] | None = Field(default=None, repr=False)


DEFAULT_VIDEO_SECONDS = "4"      # OpenAI's default clip length
# How long the SDK's create_and_poll waits between polls (it reads this header; without, it waits 1 s).
POLL_AFTER_MS = 500
# A stage with no replica serving is usually back within seconds (a restart, a roll-out).
UNAVAILABLE_RETRY_AFTER_S = 5
VIDEO_VARIANTS = ("video", "thumbnail", "spritesheet")
DEFAULT_PAGE, MAX_PAGE = 20, 100


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"), "param": param,
                      "code": code}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    response = JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)
    if status == 503 and "retry-after" not in response.headers:
        response.headers["Retry-After"] = str(UNAVAILABLE_RETRY_AFTER_S)
    return response


# Fields the REST API names differently from the gRPC one (and the stages): errors name the REST field.
REST_FIELDS = {"image": "input_reference", "width": "size", "height": "size"}


def mesh_error_response(error: MeshError) -> JSONResponse:
    field = getattr(error, "field", None)
    if field in REST_FIELDS:
        response = error_response(error.http_status, REST_FIELDS[field] + error.message[len(field):],
                                  REST_FIELDS[field])
    else:
        response = error_response(error.http_status, error.message, field)
    retry_after_s = getattr(error, "retry_after_s", None)
    if retry_after_s is not None:
        response.headers["Retry-After"] = str(max(1, math.ceil(retry_after_s)))   # whole seconds (RFC 9110)
    elif error.http_status == 429:
        response.headers["Retry-After"] = "1"
    if error.http_status == 401:
        response.headers["WWW-Authenticate"] = "Bearer"    # RFC 6750: what the client should send
    return response


def image_bytes(reference: str | bytes | dict[str, str] | None) -> bytes:
    """input_reference -> the encoded image: file bytes as uploaded, or a data URL's payload."""
    if reference is None or isinstance(reference, bytes):
        return reference or b""
    if isinstance(reference, dict):       # OpenAI's ImageInputReferenceParam
        unknown = sorted(set(reference) - {"image_url"})
        if unknown:
            raise InvalidArgument(f"input_reference.{unknown[0]}", "is not supported here (no files API); send the "
                                  "image as a file or a data URL in input_reference.image_url")
        reference = reference.get("image_url") or ""
    header, sep, payload = reference.partition(",")
    if not sep or not header.startswith("data:") or not header.endswith(";base64"):
        raise InvalidArgument("input_reference", "must be a file upload or a data URL (data:image/png;base64,...)")
    try:
        return base64.b64decode(payload, validate=True)
    except ValueError:
        raise InvalidArgument("input_reference", "the data URL's payload is not valid base64") from None


async def video_request_from(request: Request) -> VideoRequest:
    """The body as JSON or as a multipart form (the OpenAI SDK's videos.create sends a form, and the image in it
    as a file); both end as one VideoRequest, checked by the same model."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        form = await request.form()
        values: dict = {}
        for key, value in form.multi_items():
            value = await value.read() if isinstance(value, UploadFile) else value
            outer, bracket, inner = key.partition("[")
            if bracket and inner.endswith("]"):      # how the SDK writes a nested object: input_reference[image_url]
                nested = values.setdefault(outer, {})
                if isinstance(nested, dict):
                    nested[inner[:-1]] = value
                    continue
            values[key] = value
    else:
        try:
            values = await request.json()
        except ValueError:
            raise InvalidArgument("body", "is not valid JSON (or a multipart form)") from None
        except RecursionError:
            raise InvalidArgument("body", NESTED_TOO_DEEPLY) from None
        if not isinstance(values, dict):
            raise InvalidArgument("body", "must be a JSON object")
    try:
        return VideoRequest.model_validate(values)
    except ValidationError as error:
        raise RequestValidationError(error.errors()) from None


def frames_for(seconds: float | str | None, fps: int, frame_multiple: int = 4) -> int:
    """Duration -> a frame count of the form frame_multiple * k + 1 (what the model's VAE takes)."""
    try:
        value = float(seconds)
    except (TypeError, ValueError):
        raise InvalidArgument("seconds", f"{seconds!r} is not a number") from None
    if not 0 < value <= 120:
        raise InvalidArgument("seconds", f"{value} is outside (0, 120]")
    return max(1, round(value * fps / frame_multiple)) * frame_multiple + 1


def check_query(request: Request, allowed: set[str]) -> None:
    """A query parameter the route does not take is refused by name, as a body field would be."""
    unknown = sorted(set(request.query_params) - allowed)
    if unknown:
        raise InvalidArgument(unknown[0], "unknown query parameter; this server does not support it")


def header_request_id(request: Request) -> str:
    """The client's X-Request-Id, checked before it reaches a log line or a stage's metadata; without one, the id
    the access layer made for this request and echoes (services/gateway/access.py)."""
    value = request.headers.get(REQUEST_ID_HEADER, "")
    return check_request_id(value, REQUEST_ID_HEADER) if value else getattr(request.state, "request_id", "")


def inline_schema(model: type[BaseModel]) -> dict:
    """The model's JSON schema with its `$defs` written in place: a schema given by hand in `openapi_extra` sits
    outside the document's components, where a `#/$defs/...` reference would point at nothing."""
    schema = model.model_json_schema()
    definitions = schema.pop("$defs", {})

    def resolve(node):
        if isinstance(node, dict):
            if "$ref" in node:
                return resolve(definitions[node["$ref"].rsplit("/", 1)[-1]])
            return {key: resolve(value) for key, value in node.items()}
        if isinstance(node, list):
            return [resolve(item) for item in node]
        return node

    return resolve(schema)


def video_object(job: Job, retention_age_s: float | None = None) -> dict:
    """OpenAI's Video object, every field of it (null where it does not apply), and diffmesh's own three after."""
    r = job.request
    completed = job.completed_at if job.status.finished and job.completed_at else None
    error = job.error
    return {
        "id": job.id,
        "object": "video",
        "model": r.model,            # the model's id, also when the request named it by an alias
        "status": job.status.value if job.status != JobStatus.CANCELLED else "failed",
        "progress": int(job.progress),
        "created_at": int(job.created_at),
        "completed_at": int(completed) if completed else None,
        # Retention deletes a finished job this long after it ended (--retention-age), sooner if over
        # --retention-bytes.
        "expires_at": int(completed + retention_age_s) if completed and retention_age_s else None,
        "prompt": r.prompt or None,
        "remixed_from_video_id": None,
        "size": f"{r.width}x{r.height}",
        "seconds": f"{(r.num_frames - 1) / r.fps:g}",
        "error": {"code": error.grpc_code.name.lower(), "message": error.message,
                  "param": getattr(error, "field", None)} if error else None,
        "num_frames": r.num_frames,
        "seed": r.seed,
        "queue_position": job.queue_position,     # while queued: 1 = the next to run
    }


# Probes and scrapers carry no key, and the API's schema is public.
OPEN_PATHS = frozenset({"/health", "/metrics", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})


class ApiKeyGuard:
    """Checks the API key and its rate limit before routing: a refused request reaches no handler, so no job and no
    stage call starts. The key's id goes to `request.state.owner`. Plain ASGI, as access.AccessLog says why."""

    def __init__(self, app, service: GatewayService) -> None:
        self.app, self.service = app, service

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        authorization = next((value.decode("latin-1") for key, value in scope.get("headers", ())
                              if key == b"authorization"), None)
        try:
            owner = self.service.admit(authorization)
        except MeshError as error:
            await mesh_error_response(error)(scope, receive, send)
            return
        scope.setdefault("state", {})["owner"] = owner
        await self.app(scope, receive, send)


def owner_of(request: Request) -> str:
    return getattr(request.state, "owner", "")


def create_app(service: GatewayService) -> FastAPI:
    app = FastAPI(title="diffmesh gateway", version="0.1.0")
    metrics = GatewayMetrics(service.jobs)
    service.jobs.observer = metrics         # jobs by status and outcome, time queued, generation latency

    app.add_middleware(ApiKeyGuard, service=service)
    app.add_middleware(BodyLimit, max_bytes=service.config.max_body_bytes)     # 413 before anything reads a body
    tracing.instrument_fastapi(app)         # a client's traceparent continues its trace (only with OTLP set)
    access.install(app, metrics)            # outermost: request id, access line and count for 401s and 500s too

    @app.exception_handler(MeshError)
    async def on_mesh_error(request: Request, error: MeshError) -> JSONResponse:
        return mesh_error_response(error)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {}
        loc = first.get("loc", ())
        where = loc[0] if loc and loc[0] in ("body", "query", "path", "header") else "body"
        field = ".".join(str(part) for part in loc[1 if loc and loc[0] == where else 0:]) or where
        if first.get("type") == "extra_forbidden":
            return error_response(400, f"{field}: unknown parameter; this server does not support it", field,
                                  "unknown_parameter")
        return error_response(400, f"{field}: {first.get('msg', 'invalid request')}", field)

    @app.exception_handler(HTTPException)
    async def on_http_error(request: Request, error: HTTPException) -> JSONResponse:
        """Starlette's own errors (unknown route 404, 405, a body over the limit 413, a body FastAPI cannot parse
        400) in OpenAI's shape too."""
        message = error.detail if isinstance(error.detail, str) else "invalid request"
        if isinstance(error.__cause__, RecursionError):
            message = f"body: {NESTED_TOO_DEEPLY}"
        code = None
        if error.status_code == 404 and message == "Not Found":      # no route: OpenAI's words for it
            message, code = f"Invalid URL ({request.method} {request.url.path})", "unknown_url"
        elif error.status_code == 405:
            allowed = (error.headers or {}).get("allow", "")
            message = f"{request.method} is not allowed on {request.url.path}" + (f"; use {allowed}" if allowed else "")
            code = "method_not_allowed"
        field = "body" if error.status_code in (400, 413) else None
        response = error_response(error.status_code, message, field, code)
        response.headers.update(error.headers or {})
        return response

    @app.exception_handler(ClientDisconnect)
    async def on_client_gone(request: Request, error: ClientDisconnect) -> JSONResponse:
        # Read by nobody: the client hung up mid-body, or stalled past --idle-timeout and was cut off.
        return error_response(400, "body: the client stopped sending it", "body")

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, error: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s", request.url.path)
        return error_response(500, "internal error")

    @app.post("/v1/images/generations")
    async def create_images(body: ImageGenerationRequest, request: Request) -> dict:
        check_openai_choices(body)
        width, height = parse_size(body.size, "size") if body.size not in (None, "auto") else (None, None)
        output_format = body.output_format or "png"
        generation = await service.new_request(
            prompt=body.prompt, model=body.model or "", n=body.n, width=width, height=height, num_frames=1,
            negative_prompt=body.negative_prompt or "", num_inference_steps=body.num_inference_steps,
            guidance_scale=body.guidance_scale, true_cfg_scale=body.true_cfg_scale, seed=body.seed, format="png",
            request_id=header_request_id(request), owner=owner_of(request),
            cache=body.cache.step_cache() if body.cache else None,
        )
        if body.stream or body.preview_every:       # server-sent events with partial images (rest_stream.py)
            return await rest_stream.stream_images(service, body, generation, request)
        with request_context(generation.request_id):
            job = await service.submit(generation, prefix="img")
            images = await collect_unless_disconnected(job, request)
            encoded = await asyncio.gather(*(reencode(job, image, output_format, body.output_compression)
                                             for image in images))
        if body.response_format == "url":
            data = [{"url": str(request.url_for("get_image", job_id=job.id, index=image.index))} for image in images]
        else:
            data = [{"b64_json": base64.b64encode(image).decode("ascii")} for image in encoded]
        return {"created": int(job.created_at), "data": data, "output_format": output_format,
                "size": f"{generation.width}x{generation.height}", "background": "opaque", "seed": generation.seed}

    async def reencode(job: Job, image: MediaEvent, output_format: str, compression: int | None) -> bytes:
        """The decoder's PNG in the format asked, stored in its place (so a url serves what b64_json would)."""
        if output_format == "png":
            return image.data
        data, mime_type = await asyncio.to_thread(media_assets.encode_image, image.data, output_format, compression)
        await service.jobs.replace_output(job.id, image.index, mime_type, data)
        return data

    async def collect_unless_disconnected(job: Job, request: Request) -> list[MediaEvent]:
        """Run a job for a waiting HTTP client; if the client hangs up, cancel the job rather than finish it
        for nobody (the server does not cancel a plain request's handler on disconnect)."""

        async def collect() -> list[MediaEvent]:
            return [event async for event in service.events(job) if isinstance(event, MediaEvent)]

        collector = asyncio.create_task(collect())
        while not collector.done():
            await asyncio.wait({collector}, timeout=DISCONNECT_POLL_S)
            if not collector.done() and await request.is_disconnected():
                logger.info("client disconnected: cancelling job %s", job.id)
                service.jobs.abandon(job.id)
        return collector.result()

    @app.api_route("/v1/images/{job_id}/{index}", methods=["GET", "HEAD"], name="get_image")
    async def get_image(job_id: str, index: int, request: Request) -> Response:
        return output_response(await service.job_of(job_id, owner_of(request)), index)

    def output_response(job: Job, index: int) -> Response:
        """An output streamed from the output store (sendfile for a local file, with HEAD and Range), never read
        whole into memory."""
        output = job.output(index)
        if output is None:
            return error_response(404, f"output {index} of {job.id} not found", "index")
        store = service.jobs.outputs
        path = store.path(job.id, index, output.mime_type)
        if path is not None:
            return RangedFileResponse(path, media_type=output.mime_type)
        chunks = store.read(job.id, index, output.mime_type)
        try:
            first = next(chunks)
        except (FileNotFoundError, StopIteration):
            return error_response(404, f"output {index} of {job.id} is no longer stored", "index")
        return StreamingResponse(itertools.chain([first], chunks), media_type=output.mime_type)

    async def derived_response(job: Job, variant: str) -> Response:
        """A finished video's thumbnail or spritesheet: made from its MP4 on first request, then kept beside it."""
        make, mime_type = {"thumbnail": (media_assets.thumbnail, "image/webp"),
                           "spritesheet": (media_assets.spritesheet, "image/jpeg")}[variant]
        store = service.jobs.outputs
        path = store.path(job.id, 0, mime_type, variant)
        if path is None:
            video = store.path(job.id, 0, "video/mp4")
            if video is None:
                return error_response(404, f"the video of {job.id} is no longer stored", "id")
            data = await asyncio.to_thread(make, video)
            await asyncio.to_thread(store.write, job.id, 0, mime_type, data, variant)
            try:
                await service.jobs.get(job.id)
            except MeshError:    # deleted while this was made: leave no file behind that nothing would remove
                await asyncio.to_thread(store.delete, job.id)
                raise
            path = store.path(job.id, 0, mime_type, variant)
        return RangedFileResponse(path, media_type=mime_type)

    # The handler reads the body itself (JSON or a form); the schema says what either holds, for clients and fuzzers.
    @app.post("/v1/videos", openapi_extra={"requestBody": {"required": True, "content": {
        "application/json": {"schema": inline_schema(VideoRequest)},
        "multipart/form-data": {"schema": inline_schema(VideoRequest)}}}})
    async def create_video(request: Request) -> dict:
        body = await video_request_from(request)
        image = image_bytes(body.input_reference)
        width, height = parse_size(body.size, "size") if body.size not in (None, "auto") else (None, None)
        model = service.model_id(body.model or "")
        limits = await service.limits(model)
        if not limits.makes_video:
            raise InvalidArgument("model", f"{model} makes images ({limits.task}); use /v1/images/generations")
        fps = limits.default_fps if body.fps is None else body.fps
        check_fps(fps)      # before it scales `seconds` (a huge fps would overflow the float arithmetic)
        if body.num_frames is not None:
            num_frames = body.num_frames
        elif body.seconds is not None:
            num_frames = frames_for(body.seconds, fps, limits.frame_multiple)
        else:    # OpenAI's default length, or the longest the model makes if that is shorter
            num_frames = min(frames_for(DEFAULT_VIDEO_SECONDS, fps, limits.frame_multiple), limits.max_frames)
        generation = await service.new_request(
            prompt=body.prompt, model=model, width=width, height=height, num_frames=num_frames,
            negative_prompt=body.negative_prompt or "", num_inference_steps=body.num_inference_steps,
            guidance_scale=body.guidance_scale, guidance_scale_2=body.guidance_scale_2, seed=body.seed,
            format="mp4", fps=fps, request_id=header_request_id(request),
            image=image, owner=owner_of(request), preview_every=body.preview_every,
            cache=body.cache.step_cache() if body.cache else None,
        )
        with request_context(generation.request_id):
            job = await service.submit(generation, prefix="video", stream=False)
            logger.info("video job %s queued", job.id)
        return video_object(job, service.config.retention_age_s)

    @app.get("/v1/videos")
    async def list_videos(request: Request, after: str | None = None,
                          limit: int = Query(DEFAULT_PAGE, ge=1, le=MAX_PAGE),
                          order: Literal["asc", "desc"] = "desc") -> dict:
        """The caller's own videos (every video when no API keys are set), newest first by default."""
        check_query(request, {"after", "limit", "order"})
        try:
            jobs, has_more = await service.jobs.page(owner_of(request), "video_", after=after, limit=limit,
                                                     descending=order == "desc")
        except NotFound:
            raise InvalidArgument("after", f"{after!r} is not one of your videos") from None
        data = [video_object(job, service.config.retention_age_s) for job in jobs]
        return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None, "has_more": has_more}

    @app.get("/v1/videos/{job_id}")
    async def get_video(job_id: str, request: Request) -> JSONResponse:
        job = await service.job_of(job_id, owner_of(request))
        headers = {} if job.status.finished else {"openai-poll-after-ms": str(POLL_AFTER_MS)}
        return JSONResponse(video_object(job, service.config.retention_age_s), headers=headers)

    @app.api_route("/v1/videos/{job_id}/content", methods=["GET", "HEAD"])
    async def get_video_content(job_id: str, request: Request, variant: str = "video") -> Response:
        check_query(request, {"variant"})
        if variant not in VIDEO_VARIANTS:
            raise InvalidArgument("variant", f"{variant!r} is not one of {', '.join(VIDEO_VARIANTS)}")
        job = await service.job_of(job_id, owner_of(request))
        if job.status != JobStatus.COMPLETED:
            preview = service.latest_preview(job.id) if variant == "thumbnail" else None
            if preview is not None:       # while it runs, the thumbnail is its latest live preview
                data, mime_type = preview
                return Response(data, media_type=mime_type, headers={"cache-control": "no-store"})
            return error_response(409, f"video {job_id} is {job.status.value}, not completed", "id",
                                  "video_not_ready")
        if variant == "video":
            return output_response(job, 0)
        return await derived_response(job, variant)

    @app.delete("/v1/videos/{job_id}")
    async def delete_video(job_id: str, request: Request) -> dict:
        """OpenAI's delete: the job and its files are gone (one still queued or running is cancelled first)."""
        await service.delete_job(job_id, owner_of(request))
        return {"id": job_id, "object": "video.deleted", "deleted": True}

    @app.post("/v1/videos/{job_id}/cancel")
    async def cancel_video(job_id: str, request: Request) -> dict:
        """diffmesh's own: stop a job but keep it (it reads failed, error code cancelled); DELETE removes it."""
        return video_object(await service.cancel_job(job_id, owner_of(request)), service.config.retention_age_s)

    async def model_object(name: str) -> dict:
        """A served name as an OpenAI model (an alias is a model of its own, as vLLM lists them; `root` is the
        model's id, which responses and jobs carry)."""
        model_id = service.model_id(name)
        limits = await service.pipeline.limits(model_id)
        return {"id": name, "object": "model", "created": 0, "owned_by": "diffmesh", "root": model_id,
                "task": limits.task, "limits": dataclasses.asdict(limits)}

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [await model_object(name) for name in service.served_names]}

    @app.get("/v1/models/{model}")
    async def retrieve_model(model: str) -> dict:
        return await model_object(model)     # NotFound (404) for a name not served

    @app.get("/health")
    async def health() -> JSONResponse:
        retry = {"Retry-After": str(UNAVAILABLE_RETRY_AFTER_S)}
        if service.draining:    # SIGTERM: load balancers should send nothing new while accepted jobs finish
            return JSONResponse({"status": "draining", **error_body(503, "the gateway is shutting down", None,
                                                                    "draining")}, status_code=503, headers=retry)
        stages = await service.pipeline.health()
        if all(stages.values()):
            return JSONResponse({"status": "ok", "stages": stages})
        down = [stage for stage, ok in stages.items() if not ok]
        return JSONResponse({"status": "unavailable", "stages": stages,
                             **error_body(503, f"stage(s) not serving: {', '.join(down)}", down[0],
                                          "stage_unavailable")}, status_code=503, headers=retry)

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    return app
