"""Encoder stage gRPC server: EncodeRequest -> prompt embeddings as tensor chunks."""

from __future__ import annotations

import asyncio
import logging

import grpc

from diffmesh.v1 import encoder_pb2, encoder_pb2_grpc
from services.common.models import check_model
from services.common.server import AdmissionGate, rpc_method
from services.common.stage import StageSpec, stage_main
from services.common.tensors import iter_chunks
from services.encoder.engine import EncodeParams, EncoderEngine

logger = logging.getLogger(__name__)

DEFAULT_PORT = 50061


class EncoderServicer(encoder_pb2_grpc.EncoderServicer):
    def __init__(self, engine: EncoderEngine, max_queue: int = 16) -> None:
        self.engine = engine
        self.gate = AdmissionGate("encoder", concurrency=1, max_queue=max_queue)

    @rpc_method
    async def Encode(self, request: encoder_pb2.EncodeRequest, context: grpc.aio.ServicerContext):
        check_model(request.model, self.engine.model_name)
        params = EncodeParams(
            request_id=request.request_id,
            prompt=request.prompt,
            negative_prompt=request.negative_prompt,
            guidance_scale=request.guidance_scale,
            true_cfg_scale=request.true_cfg_scale if request.HasField("true_cfg_scale") else 1.0,
            max_sequence_length=request.max_sequence_length if request.HasField("max_sequence_length") else None,
            image=request.image,
        )
        self.engine.check(params)
        async with self.gate:
            tensors = await asyncio.to_thread(self.engine.encode, params)
        for name, tensor in tensors.items():
            for chunk in iter_chunks(name, tensor):
                yield chunk


SPEC = StageSpec(
    name="encoder",
    service_name="diffmesh.v1.Encoder",
    default_port=DEFAULT_PORT,
    engine_class=EncoderEngine,
    servicer_class=EncoderServicer,
    add_to_server=encoder_pb2_grpc.add_EncoderServicer_to_server,
)


def main(argv: list[str] | None = None) -> None:
    stage_main(SPEC, argv)


if __name__ == "__main__":
    main()
