"""Denoiser stage gRPC server: params + embeddings in, a progress event per step and the latents out.

On one device the servicer drives a `DenoiserEngine`. With `--devices N` (or torch.distributed's env) the
process is one rank of a gang: rank 0 serves gRPC with the same servicer over a `GangDenoiserEngine`,
which hands each request to the other ranks; they run `follow()` until the leader stops.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import logging
import os
import signal
import sys
import threading

import grpc

from diffmesh.v1 import denoiser_pb2, denoiser_pb2_grpc, tensor_pb2
from services.common import logs
from services.common.models import check_model, resolve_model_dir
from services.common.platform import select_platform
from services.common.server import AdmissionGate, StartupError, rpc_method, run_server, run_until_stopped
from services.common.stage import (
    StageSpec,
    add_stage_arguments,
    serve_engine,
    serve_stage,
    setup_stage,
    write_port_file,
)
from services.common.tensors import iter_chunks, receive_params_and_tensors
from services.denoiser.engine import DenoiseParams, DenoiserEngine
from services.denoiser.gang.distributed import DEFAULT_COLLECTIVE_TIMEOUT, Gang, env_rank
from services.denoiser.gang.engine import GangDenoiserEngine, check_gang_family
from services.denoiser.gang.launcher import launch_gang
from services.denoiser.gang.layout import GangLayout, LayoutError
from services.families.wire import limits_to_proto

logger = logging.getLogger(__name__)

DEFAULT_PORT = 50062


def params_from_proto(message: denoiser_pb2.DenoiseParams) -> DenoiseParams:
    return DenoiseParams(
        request_id=message.request_id,
        width=message.width,
        height=message.height,
        num_frames=message.num_frames,
        num_inference_steps=message.num_inference_steps,
        guidance_scale=message.guidance_scale,
        seed=message.seed,
        num_outputs=message.num_outputs if message.HasField("num_outputs") else 1,
        true_cfg_scale=message.true_cfg_scale if message.HasField("true_cfg_scale") else 1.0,
        guidance_scale_2=message.guidance_scale_2 if message.HasField("guidance_scale_2") else None,
    )


class DenoiserServicer(denoiser_pb2_grpc.DenoiserServicer):
    def __init__(self, engine: DenoiserEngine, max_queue: int = 16) -> None:
        self.engine = engine
        self.gate = AdmissionGate("denoiser", concurrency=1, max_queue=max_queue)

    @rpc_method
    async def Denoise(self, request_iterator, context: grpc.aio.ServicerContext):
        message, tensors = await receive_params_and_tensors(request_iterator, self.engine.conditioning_names)
        check_model(message.model, self.engine.model_name)
        params = params_from_proto(message)
        self.engine.check(params)
        self.engine.check_conditioning(params, tensors)

        loop = asyncio.get_running_loop()
        steps: asyncio.Queue[tuple[int, int]] = asyncio.Queue()
        cancel = threading.Event()

        def on_step(done: int, total: int) -> None:
            loop.call_soon_threadsafe(steps.put_nowait, (done, total))

        # grpc.aio does not cancel this handler when the client cancels or its deadline passes; the RPC's
        # done-callback does fire, so it is what stops the loop at its next step.
        context.add_done_callback(lambda _: cancel.set())

        async with self.gate:
            work = asyncio.ensure_future(
                asyncio.to_thread(self.engine.denoise, params, tensors, on_step, cancel.is_set)
            )
            try:
                while not (work.done() and steps.empty()):
                    next_step = asyncio.ensure_future(steps.get())
                    await asyncio.wait({next_step, work}, return_when=asyncio.FIRST_COMPLETED)
                    if not next_step.done():
                        next_step.cancel()
                        continue
                    done, total = next_step.result()
                    yield denoiser_pb2.DenoiseEvent(
                        progress=tensor_pb2.Progress(stage="denoise", step=done, total_steps=total)
                    )
                latents = work.result()
            finally:
                # The client may have gone (cancel, deadline): stop the loop at its next step, and hold the
                # gate until the thread has really stopped so two requests never share the model at once.
                cancel.set()
                if not work.done():
                    await asyncio.wait({work})
        for chunk in iter_chunks("latents", latents):
            yield denoiser_pb2.DenoiseEvent(tensor=chunk)

    @rpc_method
    async def Describe(self, request: denoiser_pb2.DescribeRequest, context: grpc.aio.ServicerContext):
        return denoiser_pb2.ModelDescription(id=self.engine.model_name, limits=limits_to_proto(self.engine.limits))


SPEC = StageSpec(
    name="denoiser",
    service_name="diffmesh.v1.Denoiser",
    default_port=DEFAULT_PORT,
    engine_class=DenoiserEngine,
    servicer_class=DenoiserServicer,
    add_to_server=denoiser_pb2_grpc.add_DenoiserServicer_to_server,
)


def add_gang_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    gang = parser.add_argument_group("gang", "several devices serving each request together "
                                     "(devices = cfg x ring x ulysses x tp)")
    gang.add_argument("--devices", type=int, default=None,
                      help="processes/devices in the gang (default 1, or $WORLD_SIZE when launched by torchrun)")
    gang.add_argument("--ulysses", type=int, default=None, help="Ulysses sequence-parallel degree (heads all-to-all)")
    gang.add_argument("--ring", type=int, default=None, help="ring-attention sequence-parallel degree")
    gang.add_argument("--cfg-parallel", action="store_true",
                      help="conditional and unconditional branches on different devices (degree 2)")
    gang.add_argument("--tp", type=int, default=None, help="tensor-parallel degree (heads and FFN sharded)")
    gang.add_argument("--gang-timeout", type=positive_seconds, default=DEFAULT_COLLECTIVE_TIMEOUT.total_seconds(),
                      metavar="SECONDS", help="how long a rank waits in a collective for the others before the "
                      "gang counts as broken (answers UNAVAILABLE and exits) (default %(default)s)")
    return parser


def positive_seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number of seconds")
    return value


def resolve_layout(args: argparse.Namespace, world_size: int | None) -> GangLayout:
    """The layout from the flags; `world_size` is the gang's when torch.distributed's env says we are in one."""
    devices = args.devices or world_size or 1
    if world_size is not None and devices != world_size:
        raise LayoutError(f"--devices {devices} but WORLD_SIZE is {world_size}")
    return GangLayout.resolve(devices, cfg_parallel=args.cfg_parallel, ulysses=args.ulysses, ring=args.ring, tp=args.tp)


def check_layout_for_model(layout: GangLayout, args: argparse.Namespace) -> None:
    """Before any process starts: the model must split this way, and the devices must exist."""
    model = resolve_model_dir(args.model, args.model_name)
    check_gang_family(model)
    config = model.config("transformer")
    layout.check_model(int(config["num_attention_heads"]), int(config["ffn_dim"]))
    platform = select_platform(args.device)
    if platform.kind != "cpu" and platform.device_count() < layout.world_size:
        raise LayoutError(f"{layout.world_size} {platform.kind} devices requested, {platform.device_count()} visible")


async def serve_gang_rank(args: argparse.Namespace, rank: int, world_size: int, local_rank: int) -> None:
    """One rank of a gang: load the shard of the model this rank needs, then serve (rank 0) or follow."""
    platform, model, dtype = setup_stage("denoiser", args)
    logs.configure("denoiser", rank)
    if rank != 0:
        # The leader decides when the gang stops (after draining); a Ctrl-C in the terminal reaches every
        # rank at once, and a worker leaving first would strand the leader inside a collective.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        layout = resolve_layout(args, world_size)
        gang = await asyncio.to_thread(Gang, layout, platform, rank, local_rank,
                                       datetime.timedelta(seconds=args.gang_timeout))
        platform.share_host(int(os.environ.get("LOCAL_WORLD_SIZE", world_size)))
        engine = await asyncio.to_thread(GangDenoiserEngine, model, platform, dtype, gang)
    except (LayoutError, RuntimeError, OSError) as error:
        raise StartupError(str(error)) from error
    await asyncio.to_thread(gang.barrier)      # every rank loaded before the leader reports SERVING
    if rank != 0:
        try:
            await follow_leader(args, engine, local_rank)
        except Exception as error:
            # The leader is gone or a collective failed: this rank cannot rejoin a gang in flight. Exit non-zero
            # so the launcher or the pod's supervisor restarts the gang.
            logger.error("gang rank %d leaving: the gang is broken (%s)", rank, error)
            raise SystemExit(1) from None
        gang.close()
        return
    logger.info("gang of %d ready: %s", layout.world_size, layout.describe())
    try:
        await serve_engine(SPEC, args, engine)
    finally:
        await asyncio.to_thread(engine.release)
        gang.close()


async def follow_leader(args: argparse.Namespace, engine: GangDenoiserEngine, local_rank: int) -> None:
    """A worker runs the leader's requests until it says stop. The first worker on a host of its own (local
    rank 0: one pod per rank, or one host of a multi-host gang) also serves gRPC health on --port, SERVING
    while it follows, so its pod or host can be probed; it serves no Denoise. Workers beside the leader on one
    host do not: the leader holds the port."""
    if local_rank != 0:
        await asyncio.to_thread(engine.follow)
        return
    stop = asyncio.Event()
    port_file = args.port_file
    health = asyncio.ensure_future(run_server(
        services=[], host=args.host, port=args.port, grace_seconds=0, stop_event=stop, handle_signals=False,
        on_started=(lambda port: write_port_file(port_file, str(port))) if port_file else None))
    try:
        await asyncio.to_thread(engine.follow)
    finally:
        stop.set()
        await health


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = add_gang_arguments(add_stage_arguments(argparse.ArgumentParser(prog="diffmesh serve denoiser"),
                                                    DEFAULT_PORT))
    args = parser.parse_args(argv)
    try:
        joined = env_rank()
        layout = resolve_layout(args, joined[1] if joined else None)
        if joined is None and layout.world_size > 1:
            logs.configure("denoiser")
            check_layout_for_model(layout, args)
    except (LayoutError, RuntimeError, OSError, ValueError) as error:
        logs.configure("denoiser")
        logger.error("cannot start: %s", error)
        raise SystemExit(1) from None
    if joined is not None:
        run_until_stopped(serve_gang_rank(args, *joined))
    elif layout.world_size > 1:
        raise SystemExit(launch_gang(__name__ if __name__ != "__main__" else "services.denoiser.server", argv,
                                     layout.world_size, args.grace))
    else:
        run_until_stopped(serve_stage(SPEC, args))


if __name__ == "__main__":
    main()
