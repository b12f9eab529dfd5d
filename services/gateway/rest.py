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
import time
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from services.common.errors import InvalidArgument, MeshError
from services.common.limits import check_fps, check_request_id
from services.common.logs import request_context
from services.gateway.config import parse_size
from services.gateway.http_limits import BodyLimit
from services.gateway.jobs import Job, JobStatus
from services.gateway.pipeline import MediaEvent
from services.gateway.service import GatewayService

logger = logging.getLogger(__name__)

DISCONNECT_POLL_S = 0.5
REQUEST_ID_HEADER = "x-request-id"
NESTED_TOO_DEEPLY = "JSON nested too deeply"
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 409: "invalid_request_error", 413: "invalid_request_error",
               429: "rate_limit_error", 503: "service_unavailable", 504: "timeout"}


class ImageGenerationRequest(BaseModel):
    # Unknown fields that OpenAI clients send (quality, style, user) are accepted and ignored.
    model_config = ConfigDict(extra="ignore")

    prompt: str
    model: str | None = None
    n: int | None = None
    size: str | None = Field(default=None, description="WIDTHxHEIGHT, multiples of the model's size_multiple")
    response_format: Literal["b64_json", "url"] = "b64_json"
    negative_prompt: str | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    true_cfg_scale: float | None = None
    seed: int | None = None


class VideoRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    prompt: str
    model: str | None = None
    size: str | None = None
    seconds: float | str | None = Field(default=None, description="duration; frames = seconds x fps, as 4k+1")
    num_frames: int | None = Field(default=None, description="frames, 4k+1; wins over seconds")
    fps: int | None = None
    negative_prompt: str | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    guidance_scale_2: float | None = None
    seed: int | None = None
    # The conditioning image (image-to-video): in JSON a data URL (data:image/png;base64,...); in a multipart form
    # (what the OpenAI SDK sends) a file, read into bytes before this model is built.
    input_reference: str | bytes | None = Field(default=None, repr=False)


def error_response(status: int, message: str, param: str | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"), "param": param,
                      "code": None}}
    return JSONResponse(body, status_code=status)


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
    if error.http_status == 401:
        response.headers["WWW-Authenticate"] = "Bearer"    # RFC 6750: what the client should send
    return response


def image_bytes(reference: str | bytes | None) -> bytes:
    """input_reference -> the encoded image: file bytes as uploaded, or a data URL's payload."""
    if reference is None or isinstance(reference, bytes):
        return reference or b""
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
            values[key] = await value.read() if isinstance(value, UploadFile) else value
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


def header_request_id(request: Request) -> str:
    """The client's X-Request-Id, checked before it reaches a log line or a stage's metadata ("" if none)."""
    value = request.headers.get(REQUEST_ID_HEADER, "")
    return check_request_id(value, REQUEST_ID_HEADER) if value else ""


def video_object(job: Job) -> dict:
    r = job.request
    return {
        "id": job.id,
        "object": "video",
        "model": r.model,
        "status": job.status.value if job.status != JobStatus.CANCELLED else "failed",
        "progress": int(job.progress),
        "created_at": int(job.created_at),
        "completed_at": int(job.completed_at) if job.completed_at else None,
        "size": f"{r.width}x{r.height}",
        "seconds": f"{(r.num_frames - 1) / r.fps:g}",
        "num_frames": r.num_frames,
        "seed": r.seed,
        "queue_position": job.queue_position,     # while queued: 1 = the next to run
        "error": {"code": job.error.grpc_code.name.lower(), "message": job.error.message} if job.error else None,
    }


# Probes and scrapers carry no key, and the API's schema is public.
OPEN_PATHS = frozenset({"/health", "/metrics", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})


class ApiKeyGuard:
    """Checks the API key and its rate limit before routing: a refused request reaches no handler, so no job and no
    stage call starts. The key's id goes to `request.state.owner`. Plain ASGI, as RequestCounter says why."""

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


class RequestCounter:
    """Counts requests by route and status. Plain ASGI on purpose: Starlette's BaseHTTPMiddleware hides the
    client's disconnect from handlers, and the image endpoint relies on seeing it to cancel abandoned jobs."""

    def __init__(self, app, counter: Counter) -> None:
        self.app, self.counter = app, counter

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = {"code": 500}

        async def send_and_note_status(message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note_status)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.counter.labels(route, str(status["code"])).inc()


def create_app(service: GatewayService) -> FastAPI:
    app = FastAPI(title="diffmesh gateway", version="0.1.0")
    registry = CollectorRegistry()
    http_requests = Counter("diffmesh_http_requests_total", "HTTP requests", ["route", "status"], registry=registry)
    generation_seconds = Histogram("diffmesh_generation_seconds", "Time to finish a generation", ["kind"],
                                   registry=registry, buckets=(0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800))
    active_jobs = Gauge("diffmesh_active_jobs", "Jobs running or queued", registry=registry)
    active_jobs.set_function(lambda: service.jobs.active)

    app.add_middleware(ApiKeyGuard, service=service)
    app.add_middleware(BodyLimit, max_bytes=service.config.max_body_bytes)     # 413 before anything reads a body
    app.add_middleware(RequestCounter, counter=http_requests)    # added last, so outermost: counts 401s too

    @app.exception_handler(MeshError)
    async def on_mesh_error(request: Request, error: MeshError) -> JSONResponse:
        return mesh_error_response(error)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {}
        field = ".".join(str(part) for part in first.get("loc", ()) if part != "body") or "body"
        return error_response(400, f"{field}: {first.get('msg', 'invalid request')}", field)

    @app.exception_handler(HTTPException)
    async def on_http_error(request: Request, error: HTTPException) -> JSONResponse:
        """Starlette's own errors (unknown route 404, 405, a body over the limit 413, a body FastAPI cannot parse
        400) in OpenAI's shape too."""
        message = error.detail if isinstance(error.detail, str) else "invalid request"
        if isinstance(error.__cause__, RecursionError):
            message = f"body: {NESTED_TOO_DEEPLY}"
        field = "body" if error.status_code in (400, 413) else None
        response = error_response(error.status_code, message, field)
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
        width, height = parse_size(body.size, "size") if body.size is not None else (None, None)
        generation = await service.new_request(
            prompt=body.prompt, model=body.model or "", n=body.n, width=width, height=height, num_frames=1,
            negative_prompt=body.negative_prompt or "", num_inference_steps=body.num_inference_steps,
            guidance_scale=body.guidance_scale, true_cfg_scale=body.true_cfg_scale, seed=body.seed, format="png",
            request_id=header_request_id(request), owner=owner_of(request),
        )
        with request_context(generation.request_id):
            job = await service.submit(generation, prefix="img")
            started = time.monotonic()
            images = await collect_unless_disconnected(job, request)
            generation_seconds.labels("image").observe(time.monotonic() - started)
        if body.response_format == "url":
            data = [{"url": str(request.url_for("get_image", job_id=job.id, index=image.index))} for image in images]
        else:
            data = [{"b64_json": base64.b64encode(image.data).decode("ascii")} for image in images]
        return {"created": int(job.created_at), "data": data, "seed": generation.seed}

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

    @app.get("/v1/images/{job_id}/{index}", name="get_image")
    async def get_image(job_id: str, index: int, request: Request) -> Response:
        return output_response(await service.job_of(job_id, owner_of(request)), index)

    def output_response(job: Job, index: int) -> Response:
        """An output streamed from the output store (sendfile for a local file), never read whole into memory."""
        output = job.output(index)
        if output is None:
            return error_response(404, f"output {index} of {job.id} not found", "index")
        store = service.jobs.outputs
        path = store.path(job.id, index, output.mime_type)
        if path is not None:
            return FileResponse(path, media_type=output.mime_type)
        chunks = store.read(job.id, index, output.mime_type)
        try:
            first = next(chunks)
        except (FileNotFoundError, StopIteration):
            return error_response(404, f"output {index} of {job.id} is no longer stored", "index")
        return StreamingResponse(itertools.chain([first], chunks), media_type=output.mime_type)

    # The handler reads the body itself (JSON or a form); the schema says what either holds, for clients and fuzzers.
    @app.post("/v1/videos", openapi_extra={"requestBody": {"required": True, "content": {
        "application/json": {"schema": VideoRequest.model_json_schema()},
        "multipart/form-data": {"schema": VideoRequest.model_json_schema()}}}})
    async def create_video(request: Request) -> dict:
        body = await video_request_from(request)
        width, height = parse_size(body.size, "size") if body.size is not None else (None, None)
        limits = await service.pipeline.limits(body.model or service.config.model_name)
        if not limits.makes_video:
            raise InvalidArgument("model", f"{body.model or service.config.model_name} makes images "
                                  f"({limits.task}); use /v1/images/generations")
        fps = limits.default_fps if body.fps is None else body.fps
        check_fps(fps)      # before it scales `seconds` (a huge fps would overflow the float arithmetic)
        if body.num_frames is not None:
            num_frames = body.num_frames
        elif body.seconds is not None:
            num_frames = frames_for(body.seconds, fps, limits.frame_multiple)
        else:
            num_frames = limits.default_frames   # the model's native clip length
        generation = await service.new_request(
            prompt=body.prompt, model=body.model or "", width=width, height=height, num_frames=num_frames,
            negative_prompt=body.negative_prompt or "", num_inference_steps=body.num_inference_steps,
            guidance_scale=body.guidance_scale, guidance_scale_2=body.guidance_scale_2, seed=body.seed,
            format="mp4", fps=fps, request_id=header_request_id(request),
            image=image_bytes(body.input_reference), owner=owner_of(request),
        )
        with request_context(generation.request_id):
            job = await service.submit(generation, prefix="video", stream=False)
            logger.info("video job %s queued", job.id)
        return video_object(job)

    @app.get("/v1/videos/{job_id}")
    async def get_video(job_id: str, request: Request) -> dict:
        return video_object(await service.job_of(job_id, owner_of(request)))

    @app.get("/v1/videos/{job_id}/content")
    async def get_video_content(job_id: str, request: Request) -> Response:
        job = await service.job_of(job_id, owner_of(request))
        if job.status != JobStatus.COMPLETED:
            return error_response(409, f"video {job_id} is {job.status.value}, not completed", "id")
        return output_response(job, 0)

    @app.delete("/v1/videos/{job_id}")
    async def cancel_video(job_id: str, request: Request) -> dict:
        return video_object(await service.cancel_job(job_id, owner_of(request)))

    async def model_object(name: str) -> dict:
        limits = await service.pipeline.limits(name)
        return {"id": name, "object": "model", "created": 0, "owned_by": "diffmesh", "task": limits.task,
                "limits": dataclasses.asdict(limits)}

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [await model_object(name) for name in service.models]}

    @app.get("/v1/models/{model}")
    async def retrieve_model(model: str) -> dict:
        service.pipeline.route(model)     # NotFound (404) for a model not served
        return await model_object(model)

    @app.get("/health")
    async def health() -> JSONResponse:
        if service.draining:    # SIGTERM: load balancers should send nothing new while accepted jobs finish
            return JSONResponse({"status": "draining", "error": {"message": "the gateway is shutting down"}},
                                status_code=503)
        stages = await service.pipeline.health()
        if all(stages.values()):
            return JSONResponse({"status": "ok", "stages": stages})
        down = [stage for stage, ok in stages.items() if not ok]
        return JSONResponse({"status": "unavailable", "stages": stages,
                             "error": {"message": f"stage(s) not serving: {', '.join(down)}"}}, status_code=503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app
