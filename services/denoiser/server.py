"""Denoiser stage gRPC server: params + embeddings in, a progress event per step and the latents out.

One device for now; the gang (rank 0 serves, all ranks compute) slots in behind the same servicer.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import threading

import grpc

from diffmesh.v1 import denoiser_pb2, denoiser_pb2_grpc, tensor_pb2
from services.common.errors import InvalidArgument
from services.common.models import check_model
from services.common.server import AdmissionGate, rpc_method, run_server
from services.common.stage import add_stage_arguments, port_writer, setup_stage
from services.common.tensors import iter_chunks, receive_params_and_tensors
from services.denoiser.engine import DenoiseParams, DenoiserEngine

logger = logging.getLogger(__name__)

DEFAULT_PORT = 50062
EMBEDDING_NAMES = ("prompt_embeds", "negative_prompt_embeds")


def params_from_proto(message: denoiser_pb2.DenoiseParams) -> DenoiseParams:
    return DenoiseParams(
        request_id=message.request_id,
        width=message.width,
        height=message.height,
        num_frames=message.num_frames,
        num_inference_steps=message.num_inference_steps,
        guidance_scale=message.guidance_scale,
        seed=message.seed,
        num_outputs=message.num_outputs or 1,
    )


class DenoiserServicer(denoiser_pb2_grpc.DenoiserServicer):
    def __init__(self, engine: DenoiserEngine, max_queue: int = 16) -> None:
        self.engine = engine
        self.gate = AdmissionGate("denoiser", concurrency=1, max_queue=max_queue)

    @rpc_method
    async def Denoise(self, request_iterator, context: grpc.aio.ServicerContext):
        message, embeddings = await receive_params_and_tensors(request_iterator, EMBEDDING_NAMES)
        check_model(message.model, self.engine.model_name)
        params = params_from_proto(message)
        prompt, negative = embeddings.get("prompt_embeds"), embeddings.get("negative_prompt_embeds")
        if prompt is None:
            raise InvalidArgument("prompt_embeds", "missing from the stream")
        self.engine.check(params)
        self.engine.check_embeddings(params, prompt, negative)

        loop = asyncio.get_running_loop()
        steps: asyncio.Queue[tuple[int, int]] = asyncio.Queue()
        cancel = threading.Event()

        def on_step(done: int, total: int) -> None:
            loop.call_soon_threadsafe(steps.put_nowait, (done, total))

        async with self.gate:
            work = asyncio.ensure_future(
                asyncio.to_thread(self.engine.denoise, params, prompt, negative, on_step, cancel.is_set)
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


async def serve(args: argparse.Namespace) -> None:
    platform, model, dtype = setup_stage("denoiser", args)
    engine = DenoiserEngine(model, platform, dtype)
    servicer = DenoiserServicer(engine, args.max_queue)
    await run_server(
        services=[(denoiser_pb2_grpc.add_DenoiserServicer_to_server, servicer, "diffmesh.v1.Denoiser")],
        host=args.host, port=args.port, grace_seconds=args.grace, on_started=port_writer(args),
    )


def main(argv: list[str] | None = None) -> None:
    parser = add_stage_arguments(argparse.ArgumentParser(prog="diffmesh serve denoiser"), DEFAULT_PORT)
    asyncio.run(serve(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
