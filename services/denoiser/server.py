"""Denoiser stage gRPC server: params + embeddings in, a progress event per step (and a preview every
preview_every steps) and the latents out.

On one device the servicer drives a `DenoiserEngine`. With `--devices N` (or torch.distributed's env) the
process is one rank of a gang (services/denoiser/gang/worker.py): rank 0 serves gRPC with the same servicer
over the gang's executor, which hands each request to the other ranks.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
from collections.abc import Callable, Mapping
from typing import Protocol

import grpc
import torch

from diffmesh.v1 import denoiser_pb2, denoiser_pb2_grpc, tensor_pb2
from services.common import logs, settings
from services.common.models import check_model
from services.common.server import AdmissionGate, rpc_method, run_until_stopped
from services.common.stage import StageSpec, serve_stage, stage_parser
from services.common.tensors import iter_chunks, receive_params_and_tensors, to_proto
from services.denoiser.batching import BatchQueue, add_batching_arguments, batching_from_args
from services.denoiser.cache import cache_from_proto
from services.denoiser.compile import add_compile_arguments, compile_from_args
from services.denoiser.engine import DenoiseParams, DenoiserEngine, PreviewCallback, StepCallback
from services.denoiser.gang.distributed import env_rank
from services.denoiser.gang.flags import add_gang_arguments, check_layout_for_model, resolve_layout
from services.denoiser.gang.launcher import launch_gang
from services.denoiser.gang.layout import LayoutError
from services.denoiser.gang.worker import serve_gang_rank
from services.denoiser.offload import add_offload_arguments, check_offload, offload_from_args
from services.denoiser.quantize import add_quantize_arguments, check_quantize, quantize_from_args
from services.families.base import Limits
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
        preview_every=message.preview_every,
        cache=cache_from_proto(message.cache) if message.HasField("cache") else None,
    )


class Denoiser(Protocol):
    """What the servicer drives: a DenoiserEngine on one device, the gang's executor on a gang's leader."""

    @property
    def model_name(self) -> str: ...
    @property
    def limits(self) -> Limits: ...
    @property
    def conditioning_names(self) -> tuple[str, ...]: ...
    def check(self, params: DenoiseParams) -> None: ...
    def check_conditioning(self, params: DenoiseParams, tensors: Mapping[str, torch.Tensor]) -> None: ...
    def denoise(self, params: DenoiseParams, tensors: Mapping[str, torch.Tensor], on_step: StepCallback | None,
                cancelled: Callable[[], bool], on_preview: PreviewCallback | None = None) -> torch.Tensor: ...


class DenoiserServicer(denoiser_pb2_grpc.DenoiserServicer):
    def __init__(self, engine: Denoiser, max_queue: int = 16) -> None:
        self.engine = engine
        # With --max-batch N (batching.py) up to N requests are in the BatchQueue at once, which runs them as
        # batches; the gate's concurrency (what GetCapacity reports) is N, so the gateway sends enough to batch.
        options = getattr(engine, "batching", None)
        self.batches = BatchQueue(engine, options) if options is not None else None
        concurrency = options.max_batch if options is not None else 1
        self.gate = AdmissionGate("denoiser", concurrency=concurrency, max_queue=max_queue)

    @rpc_method
    async def Denoise(self, request_iterator, context: grpc.aio.ServicerContext):
        message, tensors = await receive_params_and_tensors(request_iterator, self.engine.conditioning_names)
        check_model(message.model, self.engine.model_name)
        params = params_from_proto(message)
        self.engine.check(params)
        self.engine.check_conditioning(params, tensors)

        loop = asyncio.get_running_loop()
        events: asyncio.Queue[denoiser_pb2.DenoiseEvent] = asyncio.Queue()
        cancel = threading.Event()

        def on_step(done: int, total: int) -> None:
            event = denoiser_pb2.DenoiseEvent(progress=tensor_pb2.Progress(stage="denoise", step=done,
                                                                           total_steps=total))
            loop.call_soon_threadsafe(events.put_nowait, event)

        def on_preview(done: int, total: int, image: torch.Tensor) -> None:
            event = denoiser_pb2.DenoiseEvent(preview=denoiser_pb2.LatentPreview(step=done, total_steps=total,
                                                                                 image=to_proto(image)))
            loop.call_soon_threadsafe(events.put_nowait, event)

        # grpc.aio does not cancel this handler when the client cancels or its deadline passes; the RPC's
        # done-callback does fire, so it is what stops the loop at its next step.
        context.add_done_callback(lambda _: cancel.set())

        async with self.gate:
            previews = on_preview if params.preview_every else None
            work = asyncio.ensure_future(
                self.batches.denoise(params, tensors, on_step, cancel.is_set, previews) if self.batches else
                asyncio.to_thread(self.engine.denoise, params, tensors, on_step, cancel.is_set, previews)
            )
            # Its error is read below, unless the client went away first: then the loop's Cancelled is nobody's
            # error (asyncio would log it as "never retrieved", with a traceback).
            work.add_done_callback(lambda task: task.cancelled() or task.exception())
            try:
                while not (work.done() and events.empty()):
                    next_event = asyncio.ensure_future(events.get())
                    await asyncio.wait({next_event, work}, return_when=asyncio.FIRST_COMPLETED)
                    if not next_event.done():
                        next_event.cancel()
                        continue
                    yield next_event.result()
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
    add_arguments=lambda parser: add_quantize_arguments(add_offload_arguments(add_batching_arguments(
        add_compile_arguments(add_gang_arguments(parser))))),
    engine_options=lambda args: {"compile": compile_from_args(args), "batching": batching_from_args(args),
                                 "offload": offload_from_args(args), "quantize": quantize_from_args(args)},
)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = settings.parse_args(stage_parser(SPEC), argv)
    try:
        joined = env_rank()
        layout = resolve_layout(args, joined[1] if joined else None)
        if batching_from_args(args).enabled and layout.world_size > 1:
            # The gang's executor hands each rank one request at a time; batching there is not built yet.
            raise ValueError(f"--max-batch {args.max_batch} needs one device: a gang (--devices "
                             f"{layout.world_size}) runs one request at a time")
        # A gang's ranks load their own shards (gang/engine.py): offload is for one device, refused here.
        check_offload(offload_from_args(args), compile=args.compile, world_size=layout.world_size)
        check_quantize(quantize_from_args(args), world_size=layout.world_size, offload=args.dit_offload)
        if joined is None and layout.world_size > 1:
            logs.configure("denoiser")
            check_layout_for_model(layout, args)
    except (LayoutError, RuntimeError, OSError, ValueError) as error:
        logs.configure("denoiser")
        logger.error("cannot start: %s", error)
        raise SystemExit(1) from None
    if joined is not None:
        run_until_stopped(serve_gang_rank(SPEC, args, *joined))
    elif layout.world_size > 1:
        raise SystemExit(launch_gang(__name__ if __name__ != "__main__" else "services.denoiser.server", argv,
                                     layout.world_size, args.grace))
    else:
        run_until_stopped(serve_stage(SPEC, args))


if __name__ == "__main__":
    main()
