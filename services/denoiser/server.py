"""Denoiser stage gRPC server: params + embeddings in, a progress event per step and the latents out.

One device for now; the gang (rank 0 serves, all ranks compute) slots in behind the same servicer.
"""

from __future__ import annotations

import asyncio
import logging
import threading

import grpc

from diffmesh.v1 import denoiser_pb2, denoiser_pb2_grpc, tensor_pb2
from services.common.errors import InvalidArgument
from services.common.models import check_model
from services.common.server import AdmissionGate, rpc_method
from services.common.stage import StageSpec, stage_main
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

        # grpc.aio does not cancel this handler when the client cancels or its deadline passes; the RPC's
        # done-callback does fire, so it is what stops the loop at its next step.
        context.add_done_callback(lambda _: cancel.set())

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


SPEC = StageSpec(
    name="denoiser",
    service_name="diffmesh.v1.Denoiser",
    default_port=DEFAULT_PORT,
    engine_class=DenoiserEngine,
    servicer_class=DenoiserServicer,
    add_to_server=denoiser_pb2_grpc.add_DenoiserServicer_to_server,
)


def main(argv: list[str] | None = None) -> None:
    stage_main(SPEC, argv)


if __name__ == "__main__":
    main()
