"""Start-up every stage server shares: flags, platform, model directory, logging, engine, gRPC server."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from collections.abc import Callable

import torch

from services.common import logs, metrics, settings, tracing
from services.common.admission import admission_service
from services.common.attention import ATTENTION_ENV, probe_error, set_attention
from services.common.models import MODEL_ENV, ModelDir, resolve_model_dir
from services.common.platform import DEVICE_ENV, Platform, set_platform
from services.common.server import StartupError, run_server, run_until_stopped
from services.common.tls import TlsFiles, add_tls_arguments, tls_from_args

logger = logging.getLogger(__name__)

DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_stage_arguments(parser: argparse.ArgumentParser, default_port: int) -> argparse.ArgumentParser:
    settings.add_config_argument(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind")
    parser.add_argument("--port", type=int, default=default_port, help="gRPC port (0 picks a free one)")
    parser.add_argument("--model", default=None, help="diffusers model directory (default: the tiny Wan2.1 model)")
    parser.add_argument("--model-name", default=None, help="id clients use for this model (default: directory name)")
    parser.add_argument("--device", default="auto", help="auto, xpu, cuda or cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="auto",
                        help="weights dtype (auto: float32 on cpu, bfloat16 on accelerators)")
    parser.add_argument("--attention-backend", default="auto", metavar="NAME",
                        help="attention kernel of the transformer: auto (the platform's), native, cudnn, flash, "
                        "efficient, math, overrideable, or if installed flash-attn, flash-attn-3, flash-attn-4, "
                        "xformers, sage (lossy)")
    parser.add_argument("--max-queue", type=int, default=16, help="requests waiting beyond the one running")
    parser.add_argument("--grace", type=float, default=30.0, help="seconds to drain on SIGTERM")
    parser.add_argument("--port-file", default=None,
                        help="write 'GRPC_PORT METRICS_PORT' here once serving (for tests and `diffmesh up`; "
                        "default: none)")
    parser.add_argument("--metrics-port", type=int, default=0,
                        help="HTTP port of GET /metrics (Prometheus), on --host; 0 picks a free one, logged and "
                        "written to --port-file")
    logs.add_log_arguments(parser)
    add_tls_arguments(parser)
    return settings.bind_env(parser, host="DIFFMESH_HOST", model=MODEL_ENV, device=DEVICE_ENV,
                             attention_backend=ATTENTION_ENV, metrics_port="DIFFMESH_METRICS_PORT",
                             log_format=logs.LOG_FORMAT_ENV)


def stage_tls(args: argparse.Namespace) -> TlsFiles | None:
    """The stage's TLS files (None: plaintext); a bad combination or an unreadable file fails start-up."""
    try:
        return tls_from_args(args, server=True)
    except ValueError as error:
        raise StartupError(str(error)) from None


def setup_stage(service: str, args: argparse.Namespace) -> tuple[Platform, ModelDir, torch.dtype | None]:
    logs.configure(service, fmt=getattr(args, "log_format", None))
    tracing.setup_tracing(service)      # before any gRPC server exists: the instrumentation wraps its constructor
    metrics.set_build_info(service)
    stage_tls(args)      # before the model loads: a bad TLS flag fails in a second, not after minutes
    try:
        platform = set_platform(args.device)
        metrics.watch_device(platform, service)
        attention = set_attention(platform, args.attention_backend)
        model = resolve_model_dir(args.model, args.model_name)
    except (ValueError, RuntimeError, OSError) as error:
        raise StartupError(str(error)) from error
    dtype = DTYPES[args.dtype]
    if attention.lossy:
        error = probe_error(attention, platform.device(), dtype or platform.default_dtype())
        logger.warning("attention backend %s is lossy: max abs error %.3g against exact attention on a random "
                       "probe (1x4x1024x128)", attention.name, error)
    return platform, model, dtype


def serve_metrics(args: argparse.Namespace) -> int:
    """Start GET /metrics on --host:--metrics-port (StartupError if it cannot bind); the bound port."""
    try:
        return metrics.start_metrics_server(args.host, args.metrics_port)
    except (OSError, OverflowError) as error:
        raise StartupError(f"could not bind metrics to {args.host}:{args.metrics_port}: {error}") from None


def port_file_writer(args: argparse.Namespace, metrics_port: int) -> Callable[[int], None] | None:
    """run_server's on_started for --port-file: 'GRPC_PORT METRICS_PORT', once health says SERVING."""
    path = args.port_file
    return (lambda port: write_port_file(path, f"{port} {metrics_port}")) if path else None


def write_port_file(path: str, text: str) -> None:
    """Record bound ports atomically, so a parent waiting for the file never reads half of it."""
    with open(f"{path}.tmp", "w") as f:
        f.write(text)
    os.replace(f"{path}.tmp", path)


@dataclasses.dataclass(frozen=True)
class StageSpec:
    """What distinguishes one stage server from another."""

    name: str                                   # "encoder", also the log's service name
    service_name: str                           # full gRPC service name, for health and reflection
    default_port: int
    engine_class: type                          # (ModelDir, Platform, dtype) -> engine
    servicer_class: type                        # (engine, max_queue) -> servicer
    add_to_server: Callable                     # the generated add_XServicer_to_server
    # The stage's own flags, and the engine keyword arguments they give (e.g. the decoder's VAE tiling).
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None
    engine_options: Callable[[argparse.Namespace], dict] | None = None


async def serve_stage(spec: StageSpec, args: argparse.Namespace) -> None:
    """Load the model, then serve until SIGTERM. Health turns SERVING only once the engine is ready."""
    platform, model, dtype = setup_stage(spec.name, args)
    try:
        options = spec.engine_options(args) if spec.engine_options else {}
        engine = spec.engine_class(model, platform, dtype, **options)
    except (ValueError, OSError) as error:      # e.g. a pipeline no family serves, a component missing
        raise StartupError(str(error)) from error
    await serve_engine(spec, args, engine)


async def serve_engine(spec: StageSpec, args: argparse.Namespace, engine) -> None:
    """Serve an engine that is already loaded (a gang's leader builds its own) until SIGTERM."""
    servicer = spec.servicer_class(engine, args.max_queue)
    gate = getattr(servicer, "gate", None)
    if gate is not None:
        metrics.watch_gate(spec.name, engine.model_name, gate)
    metrics_port = serve_metrics(args)
    await run_server(
        services=[(spec.add_to_server, servicer, spec.service_name), *admission_service(servicer)],
        host=args.host, port=args.port, grace_seconds=args.grace, tls=stage_tls(args),
        on_started=port_file_writer(args, metrics_port),
    )


def stage_parser(spec: StageSpec) -> argparse.ArgumentParser:
    """`diffmesh serve STAGE`'s flags: every stage's, then the stage's own."""
    parser = add_stage_arguments(settings.Parser(prog=f"diffmesh serve {spec.name}"), spec.default_port)
    if spec.add_arguments:
        spec.add_arguments(parser)
    return parser


def stage_main(spec: StageSpec, argv: list[str] | None = None) -> None:
    run_until_stopped(serve_stage(spec, settings.parse_args(stage_parser(spec), argv)))
