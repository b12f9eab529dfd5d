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
from services.common.limits import MAX_STEPS
from services.common.models import default_model_name
from services.common.tls import TlsFiles, add_tls_arguments, tls_from_args
from services.gateway.http_limits import DEFAULT_HEADER_TIMEOUT_S, DEFAULT_IDLE_TIMEOUT_S, DEFAULT_MAX_BODY_BYTES
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
    stage_wait_s: float = 60.0                  # an accepted job waits this long for a stage with no replica serving
    max_output_pixels: int = DEFAULT_MAX_OUTPUT_PIXELS
    max_steps: int = MAX_STEPS
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S
    header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S
    grace_seconds: float = 30.0
    data_dir: str = ""                         # SQLite file and outputs ("": default_data_dir())
    database_url: str = dataclasses.field(default="", repr=False)   # "" : SQLite under data_dir
    instance_id: str = ""                      # this gateway's name on a shared database ("": one per process)
    max_queued_jobs: int = 256
    retention_age_s: float = 24 * 3600.0       # 0: no age limit
    retention_bytes: int = 10 << 30            # 0: no size limit
    tls: TlsFiles | None = None
    api_keys: tuple[str, ...] = dataclasses.field(default=(), repr=False)   # keys or sha256:HEX digests
    rate_limit_per_minute: float | None = None

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
    parser.add_argument("--stage-wait", type=float, default=None,
                        help="seconds an accepted job waits for a stage that has no replica serving (restarting) "
                        "before it fails (default 60)")
    parser.add_argument("--max-output-pixels", type=int, default=None,
                        help="width x height x frames x n one request may ask for (default 1280x720x161)")
    parser.add_argument("--max-steps", type=int, default=None,
                        help=f"denoising steps one request may ask for (default {MAX_STEPS})")
    parser.add_argument("--max-body-bytes", type=int, default=None,
                        help=f"HTTP request body bytes; beyond, 413 (default {DEFAULT_MAX_BODY_BYTES}: 32 MiB)")
    parser.add_argument("--idle-timeout", type=float, default=None,
                        help=f"seconds an HTTP or gRPC connection may stay open with no request before it is closed "
                        f"(default {DEFAULT_IDLE_TIMEOUT_S:g})")
    parser.add_argument("--header-timeout", type=float, default=None,
                        help="seconds a client has to send a request's HTTP headers, or to finish a gRPC connection's "
                        f"handshake, before the connection is closed (default {DEFAULT_HEADER_TIMEOUT_S:g})")
    parser.add_argument("--max-queued-jobs", type=int, default=None,
                        help="accepted jobs waiting for the stages (default 256); beyond that, 429 with Retry-After")
    parser.add_argument("--data-dir", default=None,
                        help="jobs' SQLite database and outputs (env DIFFMESH_DATA_DIR; default $DIFFMESH_HOME/data, "
                        "DIFFMESH_HOME defaulting to ~/.cache/diffmesh)")
    parser.add_argument("--database-url", default=None,
                        help="a shared database for the jobs instead of SQLite, e.g. postgresql://USER:PASS@HOST/DB "
                        "(env DIFFMESH_DATABASE_URL); outputs stay under --data-dir")
    parser.add_argument("--instance-id", default=None,
                        help="this gateway's name on a shared database; a gateway restarted under the same name "
                        "resumes its jobs at once instead of after their lease (env DIFFMESH_INSTANCE_ID)")
    parser.add_argument("--retention-age", default=None, metavar="DURATION",
                        help="finished jobs and outputs are deleted this long after they end: seconds or 30m, 24h, "
                        "7d (default 24h; 0: never)")
    parser.add_argument("--retention-bytes", default=None, metavar="SIZE",
                        help="outputs kept at most, oldest finished jobs deleted first: bytes or 500M, 10G "
                        "(default 10G; 0: no limit)")
    parser.add_argument("--grace", type=float, default=None, help="seconds to drain on SIGTERM")
    parser.add_argument("--port-file", default=None, help="write 'GRPC_PORT HTTP_PORT' here once serving")
    parser.add_argument("--api-key", action="append", default=None, metavar="KEY",
                        help="an API key clients must send (REST 'Authorization: Bearer KEY', gRPC 'authorization' "
                        "metadata); repeat for several; 'sha256:HEX' gives a key by its SHA-256 only (env "
                        "DIFFMESH_API_KEYS, comma-separated; keeps keys out of the process list)")
    parser.add_argument("--rate-limit", type=float, default=None, metavar="N",
                        help="requests per minute per API key (a token bucket, bursts up to N; env "
                        "DIFFMESH_RATE_LIMIT; default: none)")
    return add_tls_arguments(parser)


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
        stage_wait_s=float(pick(args.stage_wait, None, "stage_wait", base.stage_wait_s)),
        max_output_pixels=int(pick(args.max_output_pixels, None, "max_output_pixels", base.max_output_pixels)),
        max_steps=_at_least_one("max_steps", pick(args.max_steps, None, "max_steps", base.max_steps)),
        max_body_bytes=_at_least_one("max_body_bytes",
                                     pick(args.max_body_bytes, None, "max_body_bytes", base.max_body_bytes)),
        idle_timeout_s=_positive("idle_timeout", pick(args.idle_timeout, None, "idle_timeout", base.idle_timeout_s)),
        header_timeout_s=_positive("header_timeout",
                                   pick(args.header_timeout, None, "header_timeout", base.header_timeout_s)),
        max_queued_jobs=_at_least_one("max_queued_jobs",
                                      pick(args.max_queued_jobs, None, "max_queued_jobs", base.max_queued_jobs)),
        data_dir=str(pick(args.data_dir, "DIFFMESH_DATA_DIR", "data_dir", "") or default_data_dir()),
        database_url=str(pick(args.database_url, "DIFFMESH_DATABASE_URL", "database_url", "")),
        instance_id=str(pick(args.instance_id, "DIFFMESH_INSTANCE_ID", "instance_id", "")),
        retention_age_s=parse_duration(pick(args.retention_age, None, "retention_age", base.retention_age_s)),
        retention_bytes=parse_bytes(pick(args.retention_bytes, None, "retention_bytes", base.retention_bytes)),
        grace_seconds=float(pick(args.grace, None, "grace", base.grace_seconds)),
        models=models,
        tls=tls_from_args(args, server=False),
        api_keys=tuple(_addresses(pick(getattr(args, "api_key", None), "DIFFMESH_API_KEYS", "api_keys", ()))),
        rate_limit_per_minute=_positive_or_none(pick(getattr(args, "rate_limit", None), "DIFFMESH_RATE_LIMIT",
                                                     "rate_limit", None)),
    )


def _positive_or_none(value) -> float | None:
    if value is None or value == "":
        return None
    rate = float(value)
    if not rate > 0:
        raise ValueError(f"rate limit must be > 0 requests per minute, not {value}")
    return rate


def default_data_dir() -> str:
    home = os.environ.get("DIFFMESH_HOME") or os.path.join("~", ".cache", "diffmesh")
    return os.path.expanduser(os.path.join(home, "data"))


DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_duration(value: str | float | int) -> float:
    """Seconds from 3600, "90s", "30m", "24h" or "7d"."""
    text = str(value).strip().lower()
    unit = text[-1:] if text[-1:] in DURATION_UNITS else "s"
    number = text[:-1] if text[-1:] in DURATION_UNITS else text
    try:
        seconds = float(number) * DURATION_UNITS[unit]
    except ValueError:
        raise ValueError(f"retention age {value!r} is not a duration like 3600, 30m, 24h or 7d") from None
    if seconds < 0:
        raise ValueError(f"retention age {value!r} is negative")
    return seconds


def parse_bytes(value: str | int) -> int:
    """Bytes from 1048576, "500M", "10G" or "10GiB" (K, M, G, T are powers of 1024)."""
    text = str(value).strip().lower().removesuffix("ib").removesuffix("b")
    unit = text[-1:] if text[-1:] in SIZE_UNITS and text[-1:] else ""
    number = text[:-1] if unit else text
    try:
        size = int(float(number) * SIZE_UNITS[unit])
    except ValueError:
        raise ValueError(f"retention bytes {value!r} is not a size like 500M or 10G") from None
    if size < 0:
        raise ValueError(f"retention bytes {value!r} is negative")
    return size


def _positive(name: str, value) -> float:
    number = float(value)
    if not number > 0:
        raise ValueError(f"{name} must be > 0 seconds, not {value}")
    return number


def _at_least_one(name: str, value) -> int:
    number = int(value)
    if number < 1:
        raise ValueError(f"{name} must be at least 1, not {number}")
    return number
