"""Gateway configuration: command-line flags, then environment variables, then a TOML file, then defaults
(merged by pydantic-settings: services/common/settings.py).

One model: `--model-name` with `--encoder/--denoiser/--decoder` (or their env and TOML keys). Several: one
`--route "NAME encoder=HOST:PORT[,...] denoiser=... decoder=..."` per model, or TOML `[[models]]` tables with
`name`, `encoder`, `denoiser`, `decoder`; the first model is the default for requests that name none.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os

from services.common import logs, settings
from services.common.errors import InvalidArgument, MeshError
from services.common.limits import MAX_STEPS
from services.common.models import MODEL_ENV, default_model_name
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
    aliases: tuple[str, ...] = ()      # other names requests may give for this model (--served-model-name)


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
    """The gateway's flags; each also a key of the --config TOML file (and some an environment variable)."""
    base = GatewayConfig()
    settings.add_config_argument(parser, env="DIFFMESH_GATEWAY_CONFIG")
    parser.add_argument("--host", default=base.host, help="address to bind")
    parser.add_argument("--grpc-port", type=int, default=base.grpc_port, help="gRPC port (0 picks one)")
    parser.add_argument("--http-port", type=int, default=base.http_port, help="REST port (0 picks one)")
    for stage in STAGES:
        parser.add_argument(f"--{stage}", type=_addresses, default=DEFAULT_STAGE_ADDRESSES[stage],
                            metavar="HOST:PORT[,HOST:PORT...]", help=f"{stage} replicas")
    parser.add_argument("--model", default=None,
                        help="model directory the stages serve; only its name is used here (default: the tiny "
                        "model's)")
    parser.add_argument("--model-name", default=None, help="model id to serve (default: --model's directory name)")
    parser.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                        help="names the model is served under: the first is its id in responses, the others are "
                        "aliases requests may use (as vLLM's flag; default: --model-name)")
    parser.add_argument("--route", action="append", default=None, metavar='"NAME encoder=A denoiser=B decoder=C"',
                        help="one served model and its stages' replicas (HOST:PORT, comma-separated; aliases=X,Y "
                        "optional); repeat for several models, the first is the default; replaces --model-name and "
                        "the stage flags (default: none: one model, from those)")
    parser.add_argument("--default-size", default=None, metavar="WxH",
                        help="size when a request gives none (default: each model's own)")
    parser.add_argument("--default-steps", type=int, default=None,
                        help="denoising steps when a request gives none (default: each model's own)")
    parser.add_argument("--request-timeout", type=float, default=base.request_timeout_s,
                        help="seconds before a request is failed")
    parser.add_argument("--stage-stall-timeout", type=float, default=base.stage_stall_timeout_s,
                        help="seconds a stage may send nothing before it counts as hung")
    parser.add_argument("--stage-wait", type=float, default=base.stage_wait_s,
                        help="seconds an accepted job waits for a stage that has no replica serving (restarting) "
                        "before it fails")
    parser.add_argument("--max-output-pixels", type=int, default=base.max_output_pixels,
                        help="width x height x frames x n one request may ask for (default "
                        f"{base.max_output_pixels}: 1280x720x161)")
    parser.add_argument("--max-steps", type=int, default=base.max_steps,
                        help="denoising steps one request may ask for")
    parser.add_argument("--max-body-bytes", type=int, default=base.max_body_bytes,
                        help=f"HTTP request body bytes; beyond, 413 (default {base.max_body_bytes}: 32 MiB)")
    parser.add_argument("--idle-timeout", type=float, default=base.idle_timeout_s,
                        help="seconds an HTTP or gRPC connection may stay open with no request before it is closed")
    parser.add_argument("--header-timeout", type=float, default=base.header_timeout_s,
                        help="seconds a client has to send a request's HTTP headers, or to finish a gRPC connection's "
                        "handshake, before the connection is closed")
    parser.add_argument("--max-queued-jobs", type=int, default=base.max_queued_jobs,
                        help="accepted jobs waiting for the stages; beyond that, 429 with Retry-After")
    parser.add_argument("--data-dir", default=None,
                        help="jobs' SQLite database and outputs (default $DIFFMESH_HOME/data, DIFFMESH_HOME "
                        "defaulting to ~/.cache/diffmesh)")
    parser.add_argument("--database-url", default=None,
                        help="a shared database for the jobs instead of SQLite, e.g. postgresql://USER:PASS@HOST/DB; "
                        "outputs stay under --data-dir (default: SQLite under --data-dir)")
    parser.add_argument("--instance-id", default=None,
                        help="this gateway's name on a shared database; a gateway restarted under the same name "
                        "resumes its jobs at once instead of after their lease (default: a new one per process)")
    parser.add_argument("--retention-age", default="24h", metavar="DURATION",
                        help="finished jobs and outputs are deleted this long after they end: seconds or 30m, 24h, "
                        "7d; 0: never")
    parser.add_argument("--retention-bytes", default="10G", metavar="SIZE",
                        help="outputs kept at most, oldest finished jobs deleted first: bytes or 500M, 10G; "
                        "0: no limit")
    parser.add_argument("--grace", type=float, default=base.grace_seconds, help="seconds to drain on SIGTERM")
    parser.add_argument("--port-file", default=None,
                        help="write 'GRPC_PORT HTTP_PORT' here once serving (default: none)")
    parser.add_argument("--api-key", action="append", default=None, metavar="KEY",
                        help="an API key clients must send (REST 'Authorization: Bearer KEY', gRPC 'authorization' "
                        "metadata); repeat for several; 'sha256:HEX' gives a key by its SHA-256 only; the "
                        "environment variable (comma-separated) keeps keys out of the process list (default: none: "
                        "no key needed)")
    parser.add_argument("--rate-limit", type=float, default=None, metavar="N",
                        help="requests per minute per API key (a token bucket, bursts up to N; default: none)")
    logs.add_log_arguments(parser)
    add_tls_arguments(parser)
    settings.bind_env(parser, host="DIFFMESH_HOST", log_format=logs.LOG_FORMAT_ENV, model=MODEL_ENV,
                      model_name="DIFFMESH_MODEL_NAME", data_dir="DIFFMESH_DATA_DIR",
                      database_url="DIFFMESH_DATABASE_URL", instance_id="DIFFMESH_INSTANCE_ID",
                      api_key="DIFFMESH_API_KEYS", rate_limit="DIFFMESH_RATE_LIMIT",
                      **{stage: f"DIFFMESH_{stage.upper()}_ADDR" for stage in STAGES})
    # In the file only: [[models]] tables (one per model, as --route), and `api_keys` (its older name of api_key).
    settings.file_only(parser, models=(list[dict], []), api_keys=(list[str] | str, []))
    # Sealed here: load_config takes a namespace parsed by any parser made with these flags (a flag not given is None).
    return settings.seal(parser)


@functools.cache
def gateway_parser() -> argparse.ArgumentParser:
    return add_arguments(settings.Parser(prog="diffmesh serve gateway"))


def parse_config(argv: list[str] | None = None) -> tuple[GatewayConfig, argparse.Namespace]:
    """`diffmesh serve gateway ARGV`: the config, and the resolved flags; a bad value exits 2 in one line."""
    parser = gateway_parser()
    args = settings.parse_args(parser, argv)
    try:
        return load_config(args), args
    except InvalidArgument as error:       # a field of the config: named as its flag
        parser.error(f"--{error.field.replace('_', '-')}: {error.reason}")
    except (ValueError, OSError, MeshError) as error:
        parser.error(str(error))
    raise AssertionError("unreachable: parser.error exits")


def _addresses(value: str | list | tuple) -> tuple[str, ...]:
    items = value.split(",") if isinstance(value, str) else value
    return tuple(item.strip() for item in items if item.strip())


def parse_route(text: str) -> ModelStages:
    """`NAME encoder=A[,A2] denoiser=B decoder=C [aliases=X,Y]` -> ModelStages (every stage named, nothing else)."""
    name, *pairs = text.split()
    stages: dict[str, tuple[str, ...]] = {}
    aliases: tuple[str, ...] = ()
    for pair in pairs:
        stage, sep, addresses = pair.partition("=")
        if stage == "aliases" and sep:
            aliases = _addresses(addresses)
            continue
        if not sep or stage not in STAGES or stage in stages or not _addresses(addresses):
            raise ValueError(f"--route {text!r}: {pair!r} is not STAGE=HOST:PORT[,HOST:PORT] with STAGE one of "
                             f"{STAGES}, each once")
        stages[stage] = _addresses(addresses)
    if set(stages) != set(STAGES):
        raise ValueError(f"--route {text!r} must name every stage: {', '.join(STAGES)}")
    return ModelStages(name=name, aliases=aliases, **stages)


def _route_from_table(table: dict) -> ModelStages:
    missing = [key for key in ("name", *STAGES) if key not in table]
    if missing:
        raise ValueError(f"[[models]] entry {table!r} lacks {missing}")
    return ModelStages(name=str(table["name"]), aliases=_addresses(table.get("aliases", ())),
                       **{stage: _addresses(table[stage]) for stage in STAGES})


def parse_size(text: str, field: str = "size") -> tuple[int, int]:
    width, sep, height = str(text).lower().partition("x")
    if not sep or not width.strip().isdecimal() or not height.strip().isdecimal():
        raise InvalidArgument(field, f"{text!r} is not of the form WIDTHxHEIGHT, e.g. 832x480")
    return int(width), int(height)


def load_config(args: argparse.Namespace) -> GatewayConfig:
    """The config from the gateway's flags: those given (not None) win over their environment variables, which win
    over the --config file, which wins over the defaults (services/common/settings.py merges them)."""
    args = settings.resolve(gateway_parser(), args)
    if args.route:
        models = tuple(parse_route(text) for text in args.route)
    elif args.models:
        models = tuple(_route_from_table(table) for table in args.models)
    else:
        stages = {stage: _addresses(getattr(args, stage)) for stage in STAGES}
        model_name = args.model_name or default_model_name(args.model)
        served = _names(args.served_model_name or ())
        if served:
            model_name, aliases = served[0], tuple(name for name in served[1:] if name != served[0])
        else:
            aliases = ()
        models = (ModelStages(name=model_name, aliases=aliases, **stages),)
    names = [name for model in models for name in (model.name, *model.aliases)]
    if len(set(names)) != len(names):
        raise ValueError(f"a model is routed twice: {names}")
    width, height = parse_size(args.default_size, "default_size") if args.default_size else (None, None)
    defaults = Defaults(width=width, height=height, num_inference_steps=args.default_steps or None)
    return GatewayConfig(
        host=args.host,
        grpc_port=args.grpc_port,
        http_port=args.http_port,
        defaults=defaults,
        request_timeout_s=args.request_timeout,
        stage_stall_timeout_s=args.stage_stall_timeout,
        stage_wait_s=args.stage_wait,
        max_output_pixels=args.max_output_pixels,
        max_steps=_at_least_one("max_steps", args.max_steps),
        max_body_bytes=_at_least_one("max_body_bytes", args.max_body_bytes),
        idle_timeout_s=_positive("idle_timeout", args.idle_timeout),
        header_timeout_s=_positive("header_timeout", args.header_timeout),
        max_queued_jobs=_at_least_one("max_queued_jobs", args.max_queued_jobs),
        data_dir=args.data_dir or default_data_dir(),
        database_url=args.database_url or "",
        instance_id=args.instance_id or "",
        retention_age_s=parse_duration(args.retention_age),
        retention_bytes=parse_bytes(args.retention_bytes),
        grace_seconds=args.grace,
        models=models,
        tls=tls_from_args(args, server=False),
        api_keys=_names(args.api_key or args.api_keys),
        rate_limit_per_minute=_positive_or_none(args.rate_limit),
    )


def _names(values: str | list | tuple) -> tuple[str, ...]:
    """Names or keys from a list whose items may each be comma-separated (TOML "a,b" as well as ["a", "b"])."""
    items = [values] if isinstance(values, str) else values
    return tuple(name for item in items for name in _addresses(item))


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
