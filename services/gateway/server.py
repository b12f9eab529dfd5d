"""Gateway: the gRPC Gateway service and the OpenAI-style REST shim, in one process and one event loop."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import pathlib
import time

import grpc
import sqlalchemy
import uvicorn

from diffmesh.v1 import (
    decoder_pb2_grpc,
    denoiser_pb2_grpc,
    encoder_pb2_grpc,
    gateway_pb2,
    gateway_pb2_grpc,
    tensor_pb2,
)
from services.common import logs, metrics, tracing
from services.common.errors import InvalidArgument
from services.common.logs import request_context
from services.common.server import (
    StartupError,
    is_loopback,
    request_id_from,
    rpc_method,
    run_server,
    run_until_stopped,
)
from services.common.stage import write_port_file
from services.common.tensors import iter_media_chunks
from services.common.tls import uvicorn_options
from services.denoiser.cache import cache_from_proto
from services.families.wire import limits_to_proto
from services.gateway import rest
from services.gateway.config import GatewayConfig, parse_config
from services.gateway.health import mirror_stage_health
from services.gateway.http_limits import bounded_h11
from services.gateway.jobs import Job, JobStatus, JobStore
from services.gateway.outputs import LocalOutputStore
from services.gateway.pipeline import (
    FORMAT_ENUM,
    Event,
    MediaEvent,
    MeshPipeline,
    ModelRoute,
    PreviewEvent,
    ProgressEvent,
    TensorEvent,
)
from services.gateway.service import GatewayService
from services.gateway.stages import StagePool
from services.gateway.store import JobDatabase, lock_file, redacted, sqlite_path

logger = logging.getLogger(__name__)

AUTHORIZATION_KEY = "authorization"     # gRPC metadata keys are lower case: "authorization: Bearer KEY"

FORMAT_NAMES = {value: name for name, value in FORMAT_ENUM.items()}
JOB_STATUS = {
    JobStatus.QUEUED: gateway_pb2.JOB_STATUS_QUEUED,
    JobStatus.IN_PROGRESS: gateway_pb2.JOB_STATUS_IN_PROGRESS,
    JobStatus.COMPLETED: gateway_pb2.JOB_STATUS_COMPLETED,
    JobStatus.FAILED: gateway_pb2.JOB_STATUS_FAILED,
    JobStatus.CANCELLED: gateway_pb2.JOB_STATUS_CANCELLED,
}


def job_to_proto(job: Job) -> gateway_pb2.Job:
    r = job.request
    return gateway_pb2.Job(
        id=job.id, model=r.model, status=JOB_STATUS[job.status], progress=job.progress,
        error=job.error.message if job.error else "", created_at=int(job.created_at),
        completed_at=int(job.completed_at or 0), width=r.width, height=r.height, num_frames=r.num_frames,
        queue_position=job.queue_position or 0,
    )


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(self, service: GatewayService) -> None:
        self.service = service

    def admit(self, context: grpc.aio.ServicerContext) -> str:
        """The caller's owner id from its `authorization` metadata; the first thing every method does, so a request
        without a valid key does no work at all (UNAUTHENTICATED)."""
        authorization = next((str(value) for key, value in context.invocation_metadata() or ()
                              if key == AUTHORIZATION_KEY), None)
        return self.service.admit(authorization)

    @rpc_method
    async def Generate(self, request: gateway_pb2.GenerateRequest, context: grpc.aio.ServicerContext):
        owner = self.admit(context)
        if request.format not in FORMAT_NAMES:
            raise InvalidArgument("format", f"unknown media format {request.format}")
        def given(field: str):
            """The field's value when the client set it, else None (the default applies, once, below)."""
            return getattr(request, field) if request.HasField(field) else None

        generation = await self.service.new_request(
            prompt=request.prompt, model=request.model, negative_prompt=request.negative_prompt,
            width=given("width"), height=given("height"), num_frames=given("num_frames"),
            num_inference_steps=given("num_inference_steps"), guidance_scale=given("guidance_scale"),
            true_cfg_scale=given("true_cfg_scale"), guidance_scale_2=given("guidance_scale_2"), seed=given("seed"),
            n=given("n"), format=FORMAT_NAMES[request.format], fps=given("fps"), return_latents=request.return_latents,
            return_frames=request.return_frames, request_id=request.request_id or request_id_from(context),
            image=request.image, owner=owner, preview_every=given("preview_every"),
            cache=cache_from_proto(request.cache) if request.HasField("cache") else None,
        )
        client_deadline = context.time_remaining()
        if client_deadline is not None and client_deadline < (generation.timeout_s or float("inf")):
            # The client's own deadline, passed down so no stage works on after the client has given up.
            generation = dataclasses.replace(generation, timeout_s=client_deadline)
        with request_context(generation.request_id):
            job = await self.service.submit(generation)
            # The client going away (cancel, deadline) does not cancel this handler in grpc.aio; the RPC's
            # done-callback fires, and cancelling the job stops the stage call in flight.
            context.add_done_callback(lambda _: self.service.jobs.abandon(job.id))
            started = time.monotonic()
            logger.info("job %s accepted: %dx%d, %d frames, %d steps", job.id, generation.width,
                        generation.height, generation.num_frames, generation.num_inference_steps)
            yield gateway_pb2.GenerateEvent(accepted=gateway_pb2.JobAccepted(job_id=job.id, seed=generation.seed))
            async for event in self.service.events(job):
                for message in event_to_proto(event):
                    yield message
            elapsed = time.monotonic() - started
            logger.info("job %s completed in %.2fs", job.id, elapsed)
            yield gateway_pb2.GenerateEvent(
                completed=gateway_pb2.JobCompleted(job_id=job.id, elapsed_seconds=elapsed)
            )

    @rpc_method
    async def GetJob(self, request: gateway_pb2.GetJobRequest, context: grpc.aio.ServicerContext):
        return job_to_proto(await self.service.job_of(request.job_id, self.admit(context)))

    @rpc_method
    async def CancelJob(self, request: gateway_pb2.CancelJobRequest, context: grpc.aio.ServicerContext):
        return job_to_proto(await self.service.cancel_job(request.job_id, self.admit(context)))

    @rpc_method
    async def ListModels(self, request: gateway_pb2.ListModelsRequest, context: grpc.aio.ServicerContext):
        self.admit(context)
        models = []
        for name in self.service.served_names:       # aliases too, each a model of its own (as REST /v1/models)
            limits = await self.service.limits(name)
            models.append(gateway_pb2.ModelInfo(id=name, task=limits.task, limits=limits_to_proto(limits)))
        return gateway_pb2.ListModelsResponse(models=models)


def event_to_proto(event: Event) -> list[gateway_pb2.GenerateEvent]:
    if isinstance(event, ProgressEvent):
        progress = tensor_pb2.Progress(stage=event.stage, step=event.step, total_steps=event.total_steps,
                                       fraction=event.fraction)
        return [gateway_pb2.GenerateEvent(progress=progress)]
    if isinstance(event, PreviewEvent):
        return [gateway_pb2.GenerateEvent(preview=gateway_pb2.PreviewImage(
            index=event.index, step=event.step, total_steps=event.total_steps, width=event.width,
            height=event.height, mime_type=event.mime_type, data=event.data))]
    if isinstance(event, MediaEvent):
        chunks = iter_media_chunks(event.index, event.mime_type, event.data)
        return [gateway_pb2.GenerateEvent(media=chunk) for chunk in chunks]
    if isinstance(event, TensorEvent):
        return [gateway_pb2.GenerateEvent(tensor=chunk) for chunk in event.chunks]
    raise TypeError(f"unknown event {event!r}")


def build_service(config: GatewayConfig) -> GatewayService:
    stall = config.stage_stall_timeout_s
    # TLS to the stages once a CA to verify them is given (presenting the gateway's certificate, if any).
    tls = config.tls if config.tls is not None and config.tls.ca else None
    routes = [
        ModelRoute(
            model.name,
            StagePool("encoder", list(model.encoder), encoder_pb2_grpc.EncoderStub, stall, tls),
            StagePool("denoiser", list(model.denoiser), denoiser_pb2_grpc.DenoiserStub, stall, tls),
            StagePool("decoder", list(model.decoder), decoder_pb2_grpc.DecoderStub, stall, tls),
        )
        for model in config.models
    ]
    pipeline = MeshPipeline(routes, config.max_output_pixels, config.max_steps)
    return GatewayService(config, pipeline, build_job_store(config, pipeline))


def build_job_store(config: GatewayConfig, pipeline: MeshPipeline) -> JobStore:
    """Jobs in SQLite under --data-dir (this gateway alone: a lock file says so) or in --database-url's shared
    database; outputs under --data-dir either way."""
    data_dir = pathlib.Path(config.data_dir).expanduser()
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        url = config.database_url or f"sqlite:///{data_dir / 'jobs.sqlite3'}"
        exclusive = url.startswith("sqlite")
        lock = lock_file(sqlite_path(url) + ".lock") if exclusive else None
        db = JobDatabase(url)
    except (OSError, RuntimeError, sqlalchemy.exc.SQLAlchemyError) as error:
        raise StartupError(f"cannot open the job database ({redacted(config.database_url) or data_dir}): "
                           f"{str(error).splitlines()[0]}") from None
    jobs = JobStore(db, LocalOutputStore(data_dir / "outputs"), pipeline, max_queued=config.max_queued_jobs,
                    instance_id=config.instance_id or None, exclusive=exclusive,
                    retention_age_s=config.retention_age_s, retention_bytes=config.retention_bytes,
                    stage_wait_s=config.stage_wait_s)
    jobs.lock = lock     # held (open) for the life of the process; the kernel lets go when it ends, however
    return jobs


async def serve(config: GatewayConfig, port_file: str | None = None) -> None:
    service = build_service(config)
    http = uvicorn.Server(uvicorn.Config(
        rest.create_app(service), host=config.host, port=config.http_port, log_config=None,
        timeout_graceful_shutdown=int(config.grace_seconds), **uvicorn_options(config.tls),
        # Idle keep-alive connections (and bodies stalled that long) close after --idle-timeout; headers not
        # complete in --header-timeout, too.
        http=bounded_h11(config.header_timeout_s, config.idle_timeout_s), timeout_keep_alive=config.idle_timeout_s,
    ))
    # uvicorn would install its own SIGINT/SIGTERM handlers; run_server owns shutdown for both servers.
    http.install_signal_handlers = lambda: None

    async def serve_http() -> None:
        try:
            await http.serve()
        except SystemExit:  # uvicorn's way to fail start-up; it has logged the reason, we report below
            pass

    http_task = asyncio.create_task(serve_http())
    while not http.started:
        if http_task.done():  # uvicorn has logged why (e.g. address in use) and exited
            raise StartupError(f"could not start HTTP on {config.host}:{config.http_port}")
        await asyncio.sleep(0.05)
    http_port = http.servers[0].sockets[0].getsockname()[1]
    if not service.gatekeeper.keys.enabled and not is_loopback(config.host):
        logger.warning("no API keys configured and bound to %s: any client that reaches the gateway can use it, and "
                       "see and cancel every job (--api-key or DIFFMESH_API_KEYS)", config.host)
    scheme = "https" if config.tls is not None and config.tls.serves_tls else "http"
    for model in config.models:
        logger.info("REST on %s://%s:%d, model %s: encoder=%s denoiser=%s decoder=%s", scheme, config.host, http_port,
                    model.name, ",".join(model.encoder), ",".join(model.denoiser), ",".join(model.decoder))

    def started(grpc_port: int) -> None:
        if port_file:
            write_port_file(port_file, f"{grpc_port} {http_port}")

    try:
        await service.jobs.start()      # resumes every job a previous run left unfinished
        await run_server(
            services=[(gateway_pb2_grpc.add_GatewayServicer_to_server, GatewayServicer(service),
                       "diffmesh.v1.Gateway")],
            host=config.host, port=config.grpc_port, grace_seconds=config.grace_seconds, on_started=started,
            # On SIGTERM, at once: new jobs get 503 naming the gateway and REST /health says "draining".
            on_stopping=lambda: setattr(service, "draining", True), always_drain=True,
            # The front door takes no client certificates: clients authenticate with API keys.
            tls=config.tls, require_client_cert=False,
            idle_timeout_s=config.idle_timeout_s, handshake_timeout_s=config.header_timeout_s,
            # NOT_SERVING while a model's stage has no replica serving (per model too; "liveness" stays SERVING).
            watch_health=lambda servicer: mirror_stage_health(service.pipeline, servicer),
        )
    finally:
        # Running jobs get what is left of the grace period; the rest stays in the database for the next start.
        await service.jobs.shutdown(config.grace_seconds)
        http.should_exit = True
        await http_task
        await service.pipeline.close()


def main(argv: list[str] | None = None) -> None:
    config, args = parse_config(argv)      # flags > env > --config file > defaults; a bad value exits 2 in one line
    logs.configure("gateway", fmt=args.log_format)
    tracing.setup_tracing("gateway")     # before the stage pools' channels and the gRPC server are made
    metrics.set_build_info("gateway")
    run_until_stopped(serve(config, args.port_file))


if __name__ == "__main__":
    main()
