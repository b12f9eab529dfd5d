"""Gateway configuration: command-line flags, then environment variables, then a TOML file, then defaults.

One model: `--model-name` with `--encoder/--denoiser/--decoder` (or their env and TOML keys). Several: one
`--route "NAME encoder=HOST:PORT[,...] denoiser=... decoder=..."` per model, or TOML `[[models]]` tables with
`name`, `encoder`, `denoiser`, `decoder`; the first model is the default for requests that name none.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tomllib

from services.common.errors import InvalidArgument
from services.common.models import default_model_name
from services.gateway.pipeline import DEFAULT_MAX_OUTPUT_PIXELS, Defaults

STAGES = ("encoder", "denoiser", "decoder")
DEFAULT_STAGE_ADDRESSES = {"encoder": "127.0.0.1:50061", "denoiser": "127.0.0.1:50062", "decoder": "127.0.0.1:50063"}


@dataclasses.dataclass(frozen=True)
class ModelStages:
    """Where one served model's stages are: each a list of replicas."""

    name: str
    encoder: tuple[str, ...] = (DEFAULT_STAGE_ADDRESSES["encoder"],)
    denoiser: tuple[str, ...] = (DEFAULT_STAGE_ADDRESSES["denoiser"],)
    decoder: tuple[str, ...] = (DEFAULT_STAGE_ADDRESSES["decoder"],)


@dataclasses.dataclass(frozen=True)
class GatewayConfig:
    host: str = "127.0.0.1"
    grpc_port: int = 50051
    http_port: int = 8000
    models: tuple[ModelStages, ...] = ()
    defaults: Defaults = Defaults()
    request_timeout_s: float = 1800.0
    stage_stall_timeout_s: float = 300.0
    max_output_pixels: int = DEFAULT_MAX_OUTPUT_PIXELS
    max_active_jobs: int = 64
    grace_seconds: float = 30.0

    @property
    def model_name(self) -> str:
        """The default model: the first one configured."""
        return self.models[0].name if self.models else ""


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--config", default=os.environ.get("DIFFMESH_GATEWAY_CONFIG"), help="TOML config file")
    parser.add_argument("--host", default=None, help="address to bind (env DIFFMESH_HOST; default 127.0.0.1)")
    parser.add_argument("--grpc-port", type=int, default=None, help="gRPC port (default 50051; 0 picks one)")
    parser.add_argument("--http-port", type=int, default=None, help="REST port (default 8000; 0 picks one)")
    for stage in STAGES:
        parser.add_argument(f"--{stage}", default=None, metavar="HOST:PORT[,HOST:PORT...]",
                            help=f"{stage} replicas (env DIFFMESH_{stage.upper()}_ADDR)")
    parser.add_argument("--model", default=None, help="model directory the stages serve; only its name is used here")
    parser.add_argument("--model-name", default=None, help="model id to serve (env DIFFMESH_MODEL_NAME)")
    parser.add_argument("--route", action="append", default=None, metavar='"NAME encoder=A denoiser=B decoder=C"',
                        help="one served model and its stages' replicas (HOST:PORT, comma-separated); repeat for "
                        "several models, the first is the default; replaces --model-name and the stage flags")
    parser.add_argument("--default-size", default=None, metavar="WxH", help="size when a request gives none")
    parser.add_argument("--default-steps", type=int, default=None, help="denoising steps when a request gives none")
    parser.add_argument("--request-timeout", type=float, default=None, help="seconds before a request is failed")
    parser.add_argument("--stage-stall-timeout", type=float, default=None,
                        help="seconds a stage may send nothing before it counts as hung (default 300)")
    parser.add_argument("--max-output-pixels", type=int, default=None,
                        help="width x height x frames x n one request may ask for (default 1280x720x161)")
    parser.add_argument("--max-active-jobs", type=int, default=None, help="jobs running or queued at once")
    parser.add_argument("--grace", type=float, default=None, help="seconds to drain on SIGTERM")
    parser.add_argument("--port-file", default=None, help="write 'GRPC_PORT HTTP_PORT' here once serving")
    return parser


def _addresses(value: str | list | tuple) -> tuple[str, ...]:
    items = value.split(",") if isinstance(value, str) else value
    return tuple(item.strip() for item in items if item.strip())


def parse_route(text: str) -> ModelStages:
    """`NAME encoder=A[,A2] denoiser=B decoder=C` -> ModelStages (every stage named, nothing else)."""
    name, *pairs = text.split()
    stages: dict[str, tuple[str, ...]] = {}
    for pair in pairs:
        stage, sep, addresses = pair.partition("=")
        if not sep or stage not in STAGES or stage in stages or not _addresses(addresses):
            raise ValueError(f"--route {text!r}: {pair!r} is not STAGE=HOST:PORT[,HOST:PORT] with STAGE one of "
                             f"{STAGES}, each once")
        stages[stage] = _addresses(addresses)
    if set(stages) != set(STAGES):
        raise ValueError(f"--route {text!r} must name every stage: {', '.join(STAGES)}")
    return ModelStages(name=name, **stages)


def _route_from_table(table: dict) -> ModelStages:
    missing = [key for key in ("name", *STAGES) if key not in table]
    if missing:
        raise ValueError(f"[[models]] entry {table!r} lacks {missing}")
    return ModelStages(name=str(table["name"]), **{stage: _addresses(table[stage]) for stage in STAGES})


def parse_size(text: str, field: str = "size") -> tuple[int, int]:
    width, sep, height = str(text).lower().partition("x")
    if not sep or not width.strip().isdecimal() or not height.strip().isdecimal():
        raise InvalidArgument(field, f"{text!r} is not of the form WIDTHxHEIGHT, e.g. 832x480")
    return int(width), int(height)


def load_config(args: argparse.Namespace) -> GatewayConfig:
    file_values: dict = {}
    if args.config:
        with open(args.config, "rb") as f:
            file_values = tomllib.load(f)

    def pick(flag_value, env_name: str | None, key: str, default):
        if flag_value is not None:
            return flag_value
        if env_name and os.environ.get(env_name):
            return os.environ[env_name]
        return file_values.get(key, default)

    base = GatewayConfig()
    if args.route:
        models = tuple(parse_route(text) for text in args.route)
    elif file_values.get("models"):
        models = tuple(_route_from_table(table) for table in file_values["models"])
    else:
        stages = {
            stage: _addresses(pick(getattr(args, stage), f"DIFFMESH_{stage.upper()}_ADDR", stage,
                                   DEFAULT_STAGE_ADDRESSES[stage]))
            for stage in STAGES
        }
        model_name = pick(args.model_name, "DIFFMESH_MODEL_NAME", "model_name", "") or default_model_name(args.model)
        models = (ModelStages(name=model_name, **stages),)
    names = [model.name for model in models]
    if len(set(names)) != len(names):
        raise ValueError(f"a model is routed twice: {names}")
    size = pick(args.default_size, None, "default_size", None)
    width, height = parse_size(size, "default_size") if size else (None, None)
    steps = pick(args.default_steps, None, "default_steps", None)
    defaults = Defaults(width=width, height=height, num_inference_steps=int(steps) if steps else None)
    return GatewayConfig(
        host=pick(args.host, "DIFFMESH_HOST", "host", base.host),
        grpc_port=int(pick(args.grpc_port, None, "grpc_port", base.grpc_port)),
        http_port=int(pick(args.http_port, None, "http_port", base.http_port)),
        defaults=defaults,
        request_timeout_s=float(pick(args.request_timeout, None, "request_timeout", base.request_timeout_s)),
        stage_stall_timeout_s=float(pick(args.stage_stall_timeout, None, "stage_stall_timeout",
                                         base.stage_stall_timeout_s)),
        max_output_pixels=int(pick(args.max_output_pixels, None, "max_output_pixels", base.max_output_pixels)),
        max_active_jobs=int(pick(args.max_active_jobs, None, "max_active_jobs", base.max_active_jobs)),
        grace_seconds=float(pick(args.grace, None, "grace", base.grace_seconds)),
        models=models,
    )
