"""The `diffmesh` command: serve one stage, bring the whole mesh up locally, generate, write the tiny model."""

from __future__ import annotations

import argparse
import os
import pathlib
import signal
import sys
import tempfile
import time
import urllib.request
from typing import TYPE_CHECKING

from diffmesh.placement import ENV as PLACEMENT_ENV
from diffmesh.placement import Placement, device_list, place_stages

if TYPE_CHECKING:
    from services.common.forked import ForkedProcess

STAGE_MODULES = {
    "encoder": "services.encoder.server",
    "denoiser": "services.denoiser.server",
    "decoder": "services.decoder.server",
    "gateway": "services.gateway.server",
}
READY_PREFIX = "diffmesh is up:"


def cmd_serve(args: argparse.Namespace) -> int:
    import importlib

    importlib.import_module(STAGE_MODULES[args.stage]).main(args.stage_args)
    return 0


def cmd_tiny_model(args: argparse.Namespace) -> int:
    from services.common.tiny import write_tiny

    started = time.monotonic()
    path = write_tiny(args.dir, family=args.family, seed=args.seed)
    print(f"wrote tiny {args.family} model to {path} in {time.monotonic() - started:.1f}s")
    return 0


def cmd_dev_ca(args: argparse.Namespace) -> int:
    from services.common.devca import make_dev_ca

    files = make_dev_ca(args.dir, args.name)
    print(f"wrote a development CA to {args.dir}: CA {files.ca}; server {files.server_cert} + {files.server_key} "
          f"(every stage and the gateway: --tls-cert/--tls-key/--tls-ca); client {files.client_cert} + "
          f"{files.client_key}")
    return 0


class Mesh:
    """The four services as child processes; any one dying stops them all."""

    def __init__(self) -> None:
        self.children: dict[str, ForkedProcess] = {}

    def spawn(self, name: str, argv: list[str], stage: str | None = None, env: dict[str, str] | None = None) -> None:
        """Start `stage` (default: `name`) as the child called `name`, with `env` added to ours, forked from a
        forkserver that has imported every stage once (services/common/forked.py). The child ends when we do,
        however we end (services/common/lifeline.py)."""
        from services.common.forked import ForkedProcess
        from services.families import FAMILY_MODULES

        # Own session, so a Ctrl-C in the terminal reaches only us and we stop children in order.
        self.children[name] = ForkedProcess(STAGE_MODULES[stage or name], argv, {**os.environ, **(env or {})},
                                            preload=[*STAGE_MODULES.values(), *FAMILY_MODULES], name=name,
                                            new_session=True)

    def wait_for_file(self, name: str, path: pathlib.Path, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if path.exists():
                return path.read_text().strip()
            self.check_alive()
            time.sleep(0.1)
        raise RuntimeError(f"{name} did not start within {timeout:.0f}s")

    def check_alive(self) -> None:
        for name, child in self.children.items():
            if child.poll() is not None:
                raise RuntimeError(f"{name} exited with code {child.returncode}")

    def stop(self, grace: float = 30.0) -> None:
        # Gateway first, so no new work reaches the stages while they drain; then the stages together.
        self._terminate([self.children[name] for name in ("gateway",) if name in self.children], grace)
        self._terminate([child for name, child in self.children.items() if name != "gateway"], grace)

    @staticmethod
    def _terminate(children: list[ForkedProcess], grace: float) -> None:
        from services.common.processes import wait_then_kill

        running = [child for child in children if child.poll() is None]
        for child in running:
            child.send_signal(signal.SIGTERM)
        wait_then_kill(running, grace)


def gang_flags(args: argparse.Namespace) -> list[str]:
    """`diffmesh up`'s gang flags, passed on to the denoiser (which validates the layout)."""
    flags = []
    for name in ("devices", "ulysses", "ring", "tp"):
        value = getattr(args, name)
        if value is not None:
            flags += [f"--{name}", str(value)]
    if args.cfg_parallel:
        flags.append("--cfg-parallel")
    if args.shard_weights:
        flags.append("--shard-weights")
    if args.gang_timeout is not None:
        flags += ["--gang-timeout", str(args.gang_timeout)]
    return flags


STAGES = ("encoder", "denoiser", "decoder")


def denoiser_speed_flags(args: argparse.Namespace) -> list[str]:
    """`diffmesh up`'s attention and compile flags, passed on to the denoiser (which validates them)."""
    flags = ["--attention-backend", args.attention_backend] if args.attention_backend else []
    if args.compile is not None:
        flags.append(f"--compile={args.compile}")
    if args.warmup_sizes:
        flags += ["--warmup-sizes", args.warmup_sizes]
    if getattr(args, "compile_tuning", False):
        flags.append("--compile-tuning")
    if getattr(args, "max_batch", None) is not None:
        flags += ["--max-batch", str(args.max_batch)]
    if getattr(args, "batch_wait_ms", None) is not None:
        flags += ["--batch-wait-ms", str(args.batch_wait_ms)]
    if getattr(args, "dit_offload", False):
        flags.append("--dit-offload")
    if getattr(args, "quantize", None):
        flags += ["--quantize", args.quantize]
    return flags


def decoder_speed_flags(args: argparse.Namespace) -> list[str]:
    """`diffmesh up --compile-vae`: the decoder compiles its VAE decoder and warms up `--warmup-sizes` too."""
    if not getattr(args, "compile_vae", False):
        return []
    return ["--compile-vae", *(["--vae-warmup-sizes", args.warmup_sizes] if args.warmup_sizes else [])]


def stage_command(args: argparse.Namespace, stage: str, common: list[str], port_file: pathlib.Path,
                  placement: Placement) -> tuple[list[str], dict[str, str]]:
    """One stage's flags under `up`, and what `up` adds to its environment (its devices)."""
    extra = {"denoiser": [*gang_flags(args), *denoiser_speed_flags(args)],
             "decoder": decoder_speed_flags(args)}.get(stage, [])
    port = str(getattr(args, f"{stage}_port") or 0)
    return [*common, *extra, *placement.argv, "--port", port, "--port-file", str(port_file)], dict(placement.env)


def cmd_up(args: argparse.Namespace) -> int:
    from services.common.models import resolve_model_dir
    from services.gateway.config import default_data_dir

    pinned = [f"--{stage}-port" for stage in STAGES if getattr(args, f"{stage}_port")]
    if pinned and len(args.model or ()) > 1:
        raise UsageError(f"{', '.join(pinned)} pin one process's port, and each --model has its own stage processes: "
                         "give them with one --model only")
    # Before anything is written or started: a device list that cannot be met is a usage error.
    try:
        placements = place_stages(args)
    except ValueError as error:
        raise UsageError(str(error)) from None
    # Written here, before any stage starts, so the stages never race to create the same directory.
    try:
        models = [resolve_model_dir(path) for path in (args.model or [None])]
    except (OSError, ValueError) as error:
        print(f"diffmesh up failed: {error}", file=sys.stderr)
        return 1
    names = [model.name for model in models]
    if len(set(names)) != len(names):
        raise UsageError(f"two --model directories share a name: {names}")
    mesh = Mesh()
    stop_requested = False

    def request_stop(signum, frame) -> None:
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    with tempfile.TemporaryDirectory(prefix="diffmesh-up-") as tmp:
        ports = pathlib.Path(tmp)
        tls_flags: list[str] = []
        if args.tls:
            from services.common.devca import make_dev_ca

            # Every process serves and presents the one server certificate; stages take only clients it signed.
            dev_ca = make_dev_ca(args.tls_dir or ports / "tls", [args.host])
            tls_flags = ["--tls-cert", str(dev_ca.server_cert), "--tls-key", str(dev_ca.server_key),
                         "--tls-ca", str(dev_ca.ca)]
        try:
            # Each model has its own stage processes: its pools scale, fail and restart on their own.
            for index, model in enumerate(models):
                common = ["--model", str(model.path), "--model-name", model.name, "--host", args.host, *tls_flags]
                if args.device:
                    common += ["--device", args.device]
                if args.dtype:
                    common += ["--dtype", args.dtype]
                if args.log_format:
                    common += ["--log-format", args.log_format]
                for stage in STAGES:
                    argv, env = stage_command(args, stage, common, ports / f"{index}-{stage}", placements[stage])
                    mesh.spawn(f"{model.name}/{stage}", argv, stage, env=env)
            # Each stage's port file: "GRPC_PORT METRICS_PORT".
            stage_ports = [
                {stage: mesh.wait_for_file(f"{model.name}/{stage}", ports / f"{index}-{stage}",
                                           args.start_timeout).split()
                 for stage in STAGES}
                for index, model in enumerate(models)
            ]
            addresses = [{stage: f"{args.host}:{found[0]}" for stage, found in model_ports.items()}
                         for model_ports in stage_ports]
            gateway_argv = [
                "--host", args.host, "--grpc-port", str(args.grpc_port), "--http-port", str(args.http_port),
                "--port-file", str(ports / "gateway"),
                *[f"--route={model.name} " + " ".join(f"{stage}={address}" for stage, address in stages.items())
                  for model, stages in zip(models, addresses, strict=True)],
            ]
            if args.default_size:
                gateway_argv += ["--default-size", "{}x{}".format(*args.default_size)]
            if args.default_steps:
                gateway_argv += ["--default-steps", str(args.default_steps)]
            gateway_argv += ["--data-dir", str(args.data_dir or default_data_dir())]
            if args.rate_limit:
                gateway_argv += ["--rate-limit", str(args.rate_limit)]
            if args.log_format:
                gateway_argv += ["--log-format", args.log_format]
            # Keys travel in the child's environment, not its argv, which every user of the host can list.
            mesh.spawn("gateway", [*gateway_argv, *tls_flags],
                       env={"DIFFMESH_API_KEYS": ",".join(args.api_key)} if args.api_key else None)
            grpc_port, http_port = mesh.wait_for_file("gateway", ports / "gateway", args.start_timeout).split()
            scheme = "https" if args.tls else "http"
            wait_healthy(f"{scheme}://{args.host}:{http_port}/health", mesh, args.start_timeout,
                         dev_ca.ca if args.tls else None)
            if args.tls:
                print(f"diffmesh tls: ca={dev_ca.ca} client-cert={dev_ca.client_cert} client-key={dev_ca.client_key}"
                      f" (mutual TLS between the gateway and the stages; clients of the gateway need only the CA)",
                      flush=True)
            for model, stages in zip(models, addresses, strict=True):
                listed = " ".join(f"{stage}={address}" for stage, address in stages.items())
                print(f"diffmesh serves: model={model.name} {listed}", flush=True)
            first = " ".join(f"{stage}={address}" for stage, address in addresses[0].items())
            print(f"{READY_PREFIX} gateway grpc={args.host}:{grpc_port} http={scheme}://{args.host}:{http_port} "
                  f"model={models[0].name} {first}", flush=True)
            # Prometheus endpoints: each stage's own (--metrics-port), the default model's first; the gateway's on
            # its REST port.
            for model, model_ports in zip(models, stage_ports, strict=True):
                scraped = " ".join(f"{stage}=http://{args.host}:{found[1]}/metrics"
                                   for stage, found in model_ports.items() if len(found) > 1)
                print(f"diffmesh metrics: {scraped} model={model.name} "
                      f"gateway={scheme}://{args.host}:{http_port}/metrics", flush=True)
            while not stop_requested:
                mesh.check_alive()
                time.sleep(0.2)
            print("stopping diffmesh...", flush=True)
            return 0
        except RuntimeError as error:
            print(f"diffmesh up failed: {error}", file=sys.stderr, flush=True)
            return 1
        finally:
            mesh.stop()


def wait_healthy(url: str, mesh: Mesh, timeout: float, ca: pathlib.Path | None = None) -> None:
    import ssl

    context = ssl.create_default_context(cafile=str(ca)) if ca else None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        mesh.check_alive()
        try:
            with urllib.request.urlopen(url, timeout=5, context=context) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"gateway never reported healthy at {url}")


def cmd_generate(args: argparse.Namespace) -> int:
    import grpc
    from tqdm import tqdm

    from diffmesh.client import GatewayClient
    from diffmesh.v1 import decoder_pb2, gateway_pb2

    output = pathlib.Path(args.output)
    suffix = output.suffix.lower()
    frames = args.frames or (1 if suffix == ".png" else 17)
    request = gateway_pb2.GenerateRequest(
        prompt=args.prompt, negative_prompt=args.negative_prompt or "", model=args.model or "", num_frames=frames,
        n=args.n, format=decoder_pb2.MEDIA_FORMAT_PNG if suffix == ".png" else decoder_pb2.MEDIA_FORMAT_MP4,
    )
    if args.size:
        request.width, request.height = args.size
    if args.image:
        try:
            request.image = pathlib.Path(args.image).read_bytes()
        except OSError as error:
            print(f"diffmesh generate: --image {args.image}: {error.strerror or error}", file=sys.stderr)
            return 1
    # Only what was given is set: the gateway applies the model's defaults to the rest.
    for field, value in (("seed", args.seed), ("guidance_scale", args.guidance_scale), ("fps", args.fps),
                         ("num_inference_steps", args.steps), ("true_cfg_scale", args.true_cfg_scale)):
        if value is not None:
            setattr(request, field, value)
    client = GatewayClient(args.gateway, tls_ca=args.tls_ca, api_key=args.api_key, tls=args.tls)
    bar = tqdm(total=100, unit="%", desc="generating", bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f}% {postfix}")
    accepted: list[str] = []

    def on_progress(event) -> None:
        p = event.progress
        bar.n = 100 * p.fraction
        bar.set_postfix_str(f"{p.stage} {p.step}/{p.total_steps}")

    try:
        result = client.generate(request, on_progress=on_progress, timeout=args.timeout,
                                 on_accepted=lambda job_id, seed: accepted.append(job_id))
    except KeyboardInterrupt:
        bar.close()
        # The cancel goes over a channel of its own, and the interrupted one is left for the exit to drop: closing
        # a channel whose call a signal cut short can deadlock in gRPC Python (grpc/grpc#19973 and its kin; seen
        # here as a `generate` that never exited after Ctrl-C on a loaded machine).
        canceller = GatewayClient(args.gateway, tls_ca=args.tls_ca, api_key=args.api_key, tls=args.tls)
        try:
            code = cancel_on_interrupt(canceller, accepted[0] if accepted else None)
        finally:
            canceller.close()
        # Nor is the interpreter's exit left to wait on the cut call's threads: everything is said and flushed.
        sys.stderr.flush()
        os._exit(code)
    except grpc.RpcError as error:
        bar.close()
        client.close()
        print(f"error: {error.code().name}: {error.details()}", file=sys.stderr)
        return 1
    client.close()
    bar.n = 100
    bar.close()
    for index, (_, data) in enumerate(result.media):
        path = output if len(result.media) == 1 else output.with_name(f"{output.stem}-{index}{output.suffix}")
        path.write_bytes(data)
        print(f"wrote {path} (job {result.job_id}, seed {result.seed}, {result.elapsed_seconds:.1f}s)")
    return 0


def cancel_on_interrupt(client, job_id: str | None) -> int:
    """Ctrl-C during `generate`: cancel the job on the gateway (it would otherwise run on for nobody), say so in one
    line, and exit as a shell expects of an interrupted command (128 + SIGINT)."""
    import grpc

    from diffmesh.v1 import gateway_pb2

    # A second Ctrl-C must not cut the cancellation short (nor print a traceback).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if job_id is None:
        print("\ndiffmesh generate: interrupted before the gateway accepted the request", file=sys.stderr)
        return 130
    try:
        job = client.cancel_job(job_id, timeout=10)
        state = "cancelled" if job.status == gateway_pb2.JOB_STATUS_CANCELLED else "not cancelled: it had ended"
    except grpc.RpcError as error:
        state = f"not cancelled: {error.code().name}: {error.details()}"
    print(f"\ndiffmesh generate: interrupted; job {job_id} {state}", file=sys.stderr)
    return 130


def output_file(text: str) -> str:
    """`-o`: the suffix says what to make."""
    if pathlib.Path(text).suffix.lower() not in (".png", ".mp4"):
        raise argparse.ArgumentTypeError(f"{text!r} must end in .png (an image) or .mp4 (a video)")
    return text


# The environment variables the services read for these flags (services/common/models.py, platform.py,
# attention.py, logs.py): literal here, so that `diffmesh --help` starts without importing torch.
MODEL_ENV, DEVICE_ENV, ATTENTION_ENV, LOG_FORMAT_ENV = ("DIFFMESH_MODEL", "DIFFMESH_DEVICE",
                                                        "DIFFMESH_ATTENTION_BACKEND", "DIFFMESH_LOG_FORMAT")
# The denoiser's --gang-timeout default (services/denoiser/gang/distributed.py), shown in `up --help`.
GANG_TIMEOUT_S = 120
STAGE_HELP = {
    "encoder": "text (and image) encoders: prompts to embeddings",
    "denoiser": "the transformer's denoising loop, on one device or a gang of several (--devices)",
    "decoder": "the VAE: latents to frames, then PNG / MP4",
    "gateway": "the front door: OpenAI-style REST and gRPC, jobs, routing to the stages, API keys",
}


class UsageError(Exception):
    """A command's flags do not go together: reported as argparse reports a bad flag (one line, exit 2)."""


def version_line() -> str:
    """`diffmesh 0.1.0 (torch 2.13.0, diffusers 0.42.0, python 3.11.7)`: what a bug report needs, one line, from
    the installed packages' metadata (importing torch would cost seconds)."""
    from importlib import metadata

    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    python = ".".join(str(part) for part in sys.version_info[:3])
    return (f"diffmesh {version('diffmesh')} (torch {version('torch')}, diffusers {version('diffusers')}, "
            f"python {python})")


def build_parser() -> argparse.ArgumentParser:
    from services.common import settings

    parser = settings.Parser(
        prog="diffmesh", description="A serving mesh for diffusion models.",
        epilog="Every command takes --config FILE.toml (keys: its flags' names) and some flags an environment "
        "variable (named in their help): flags > environment > file > defaults.")
    parser.add_argument("-V", "--version", action="version", version=version_line())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run one stage, or the gateway, as its own server",
                           description="Run one stage of the mesh, or the gateway, as its own gRPC server "
                           "(`diffmesh serve STAGE --help` lists its flags).")
    stages = serve.add_subparsers(dest="stage", required=True, metavar="STAGE", title="stages")
    for name, text in STAGE_HELP.items():
        # No prefix characters: every argument after STAGE, options included, is the stage's to parse.
        stage = stages.add_parser(name, help=text, description=text, add_help=False, prefix_chars="\0")
        stage.add_argument("stage_args", nargs="*", help=argparse.SUPPRESS)
    serve.set_defaults(func=cmd_serve, parser=serve)

    up = sub.add_parser("up", help="start encoder, denoiser, decoder and gateway locally",
                        description="Start the encoder, denoiser, decoder and gateway as separate processes on this "
                        "host; Ctrl-C or SIGTERM stops them all.")
    settings.add_config_argument(up)
    up.add_argument("--model", action="append", default=None, metavar="DIR",
                    help="diffusers model directory to serve; repeat to serve several, the first is the default "
                    "(default: the tiny Wan2.1 model)")
    up.add_argument("--device", default=None, help="auto, xpu, cuda or cpu (default: auto)")
    up.add_argument("--dtype", default=None, choices=["auto", "float32", "bfloat16", "float16"],
                    help="weights dtype (default: auto: float32 on cpu, bfloat16 on accelerators)")
    up.add_argument("--attention-backend", default=None, metavar="NAME",
                    help="the denoiser's attention kernel (auto, native, cudnn, flash, efficient, math, ...; "
                    "default: auto)")
    up.add_argument("--compile", nargs="?", const="default", default=None, metavar="MODE",
                    help="compile the denoiser's repeated transformer blocks (optional torch.compile mode; "
                    "default: off)")
    up.add_argument("--warmup-sizes", default=None, metavar="WxH[xF],...",
                    help="sizes the denoiser compiles at start-up, before serving (with --compile; default: none)")
    up.add_argument("--compile-tuning", action="store_true",
                    help="with --compile: the denoiser tunes its compiled kernels by coordinate descent (minutes of "
                    "compiling for a few per cent; default: off)")
    up.add_argument("--compile-vae", action="store_true",
                    help="the decoder compiles its VAE decoder, warming up --warmup-sizes before serving (default: "
                    "off)")
    up.add_argument("--max-batch", type=int, default=None, metavar="N",
                    help="the denoiser runs up to N outputs of requests that match (size, frames, steps, guidance "
                    "branches) as one batch (default 1: each alone; one device only)")
    up.add_argument("--batch-wait-ms", type=float, default=None, metavar="MS",
                    help="with --max-batch, how long a request waits at most for partners (default 0)")
    up.add_argument("--dit-offload", action="store_true",
                    help="the denoiser keeps its transformer's blocks in pinned host memory and streams them to the "
                    "device block by block, for models larger than the device (one device, without --compile)")
    # services.denoiser.quantize.METHODS, written out: `up` parses without importing torch (a test keeps them equal).
    up.add_argument("--quantize", choices=["fp8"], default=None,
                    help="fp8: the denoiser's transformer blocks run their linear layers as float8 matmuls "
                    "(torchao; lossy, faster; best with --compile; default: off)")
    up.add_argument("--host", default="127.0.0.1", help="address every service binds")
    up.add_argument("--grpc-port", type=int, default=50051, help="the gateway's gRPC port (0 picks a free one)")
    up.add_argument("--http-port", type=int, default=8000, help="the gateway's REST port (0 picks a free one)")
    for stage in STAGES:
        up.add_argument(f"--{stage}-port", type=int, default=0,
                        help=f"the {stage}'s gRPC port (0 picks a free one; with one --model)")
    up.add_argument("--default-size", type=settings.wxh, default=None, metavar="WxH",
                    help="size when a request gives none (default: each model's own)")
    up.add_argument("--default-steps", type=int, default=None,
                    help="steps when a request gives none (default: each model's own)")
    up.add_argument("--data-dir", default=None,
                    help="the gateway's jobs database and outputs (default $DIFFMESH_HOME/data): jobs left unfinished "
                    "resume at the next `up` on the same directory")
    up.add_argument("--start-timeout", type=float, default=600.0, help="seconds to wait for every service")
    up.add_argument("--tls", action="store_true",
                    help="mutual TLS between every process, and TLS on the gateway's gRPC and HTTPS, on a development "
                    "CA made at start (prints where its CA file and a client certificate are)")
    up.add_argument("--tls-dir", default=None, metavar="DIR",
                    help="where --tls writes the development CA (default: a temporary directory removed on exit)")
    up.add_argument("--api-key", action="append", default=None, metavar="KEY",
                    help="an API key the gateway requires (repeat for several; default: none, no key needed)")
    up.add_argument("--rate-limit", type=float, default=None, metavar="N",
                    help="requests per minute per API key (default: none)")
    up.add_argument("--log-format", choices=["text", "json"], default=None,
                    help="every service's log format (default: text)")
    gang = up.add_argument_group("denoiser gang",
                                 "the denoiser on several devices (devices = cfg x ring x ulysses x tp)")
    gang.add_argument("--devices", type=int, default=None, help="devices in the denoiser gang (default 1)")
    gang.add_argument("--ulysses", type=int, default=None,
                      help="Ulysses sequence-parallel degree (default: what --cfg-parallel leaves of the devices, "
                      "when --ring and --tp are not given either; else 1)")
    gang.add_argument("--ring", type=int, default=None, help="ring-attention sequence-parallel degree (default: 1)")
    gang.add_argument("--cfg-parallel", action="store_true", help="cond/uncond branches on different devices")
    gang.add_argument("--tp", type=int, default=None, help="tensor-parallel degree (default: 1)")
    gang.add_argument("--shard-weights", action="store_true",
                      help="shard each transformer block's weights across the gang's ranks, gathered per block, so a "
                      "model bigger than one device fits (not with --tp > 1; default: off)")
    gang.add_argument("--gang-timeout", type=float, default=None, metavar="SECONDS",
                      help="how long a rank waits for the others in a collective before the gang counts as broken "
                      f"(default: {GANG_TIMEOUT_S}, the denoiser's)")
    place = up.add_argument_group("device placement", "which devices each stage's processes see: indices among "
                                  "those `up` sees (within CUDA_VISIBLE_DEVICES / ZE_AFFINITY_MASK when set, as in "
                                  "torchrun); set as that variable in the stage's environment only; refused on cpu")
    for stage, text in (("encoder", "the encoder's one device (default: every device `up` sees; it uses the first)"),
                        ("denoiser", "the denoiser's devices, one gang rank each: 0,1 means --devices 2 (default: "
                         "every device `up` sees; its --devices ranks use the first ones)"),
                        ("decoder", "the decoder's devices, one rank each: 1,2 is a decoder gang of 2 (default: every "
                         "device `up` sees; it uses the first)")):
        place.add_argument(f"--{stage}-devices", type=device_list, default=None, metavar="I[,I...]", help=text)
    settings.bind_env(up, **{f"{stage}_devices": name for stage, name in PLACEMENT_ENV.items()})
    settings.bind_env(up, host="DIFFMESH_HOST", model=MODEL_ENV, device=DEVICE_ENV, attention_backend=ATTENTION_ENV,
                      data_dir="DIFFMESH_DATA_DIR", api_key="DIFFMESH_API_KEYS", rate_limit="DIFFMESH_RATE_LIMIT",
                      log_format=LOG_FORMAT_ENV)
    up.set_defaults(func=cmd_up, parser=up)

    gen = sub.add_parser("generate", help="generate an image (.png) or a video (.mp4) through a running gateway",
                         description="Generate through a running gateway (gRPC), showing progress; Ctrl-C cancels the "
                         "job.")
    settings.add_config_argument(gen)
    gen.add_argument("--prompt", required=True, help="what to generate")
    gen.add_argument("--negative-prompt", default="", help="what to steer away from")
    gen.add_argument("--model", default=None, help="the model's id or alias (default: the gateway's default model)")
    gen.add_argument("--size", type=settings.wxh, default=None, metavar="WxH",
                     help="width x height (default: the model's)")
    gen.add_argument("--frames", type=int, default=None, help="4k+1 (default: 1 for .png, 17 for .mp4)")
    gen.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    gen.add_argument("--guidance-scale", type=float, default=None, help="CFG scale (default: the model's)")
    gen.add_argument("--seed", type=int, default=None, help="noise seed (default: a random one, printed at the end)")
    gen.add_argument("--n", type=int, default=1, help="how many outputs")
    gen.add_argument("--fps", type=int, default=None, help="frames per second of the MP4 (default: the model's)")
    gen.add_argument("--true-cfg-scale", type=float, default=None,
                     help="true CFG with --negative-prompt (FLUX; default: off)")
    gen.add_argument("--image", default=None, metavar="FILE",
                     help="conditioning image (image-to-video models; default: none)")
    gen.add_argument("--gateway", default="127.0.0.1:50051", metavar="HOST:PORT", help="the gateway's gRPC address")
    gen.add_argument("--tls-ca", default=None, metavar="PEM",
                     help="talk TLS to the gateway, verifying it against this CA (default: none, plaintext)")
    gen.add_argument("--tls", action="store_true", help="talk TLS to the gateway, verified by the system's roots")
    gen.add_argument("--api-key", default=None, metavar="KEY",
                     help="sent as 'authorization: Bearer KEY' (default: none)")
    gen.add_argument("--timeout", type=float, default=3600.0, help="seconds before giving up")
    gen.add_argument("-o", "--output", type=output_file, required=True, metavar="FILE",
                     help="FILE.png or FILE.mp4")
    settings.bind_env(gen, gateway="DIFFMESH_GATEWAY", tls_ca="DIFFMESH_TLS_CA", api_key="DIFFMESH_API_KEY")
    gen.set_defaults(func=cmd_generate, parser=gen)

    dev_ca = sub.add_parser("dev-ca", help="write a development CA, a server and a client certificate (mutual TLS)")
    settings.add_config_argument(dev_ca)
    dev_ca.add_argument("dir", help="where to write them")
    dev_ca.add_argument("--name", action="append", default=[], metavar="NAME",
                        help="another DNS name or IP address for the server certificate (repeatable; localhost, "
                        "127.0.0.1, ::1 and this host's name are always in it)")
    dev_ca.set_defaults(func=cmd_dev_ca, parser=dev_ca)

    from services.common.tiny import WRITERS

    tiny = sub.add_parser("tiny-model", help="write a tiny random-weight model directory of a family (offline)")
    settings.add_config_argument(tiny)
    tiny.add_argument("dir", help="where to write it")
    tiny.add_argument("--family", default="wan", choices=sorted(WRITERS), help="model family")
    tiny.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    tiny.set_defaults(func=cmd_tiny_model, parser=tiny)
    for command in (up, gen, dev_ca, tiny):
        settings.seal(command)
    return parser


def main(argv: list[str] | None = None) -> int:
    from services.common import settings

    args = build_parser().parse_args(argv)
    command = args.parser
    try:
        if args.func is not cmd_serve:       # `serve` hands its arguments to the stage, which resolves its own
            args = settings.resolve(command, args)
        return args.func(args)
    except settings.SettingsError as error:
        command.error(str(error))
    except UsageError as error:
        command.error(str(error))
    except KeyboardInterrupt:
        # Ctrl-C before a command has its own handling (imports, a stage still loading its model): no traceback.
        print(f"\n{command.prog}: interrupted", file=sys.stderr)
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
