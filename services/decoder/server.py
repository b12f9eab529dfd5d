"""Decoder stage gRPC server: latents in; PNG/MP4 files (and raw frames when asked) out."""

from __future__ import annotations

import asyncio
import logging

import grpc
import torch

from diffmesh.v1 import decoder_pb2, decoder_pb2_grpc
from services.common.errors import InvalidArgument
from services.common.models import check_model
from services.common.server import AdmissionGate, rpc_method
from services.common.stage import StageSpec, stage_main
from services.common.tensors import iter_chunks, iter_media_chunks, receive_params_and_tensors
from services.decoder import media
from services.decoder.engine import ConditionParams, DecodeParams, DecoderEngine
from services.decoder.tiling import add_tiling_arguments, tiling_from_args

logger = logging.getLogger(__name__)

DEFAULT_PORT = 50063
FORMAT_NAMES = {
    decoder_pb2.MEDIA_FORMAT_AUTO: "auto",
    decoder_pb2.MEDIA_FORMAT_PNG: "png",
    decoder_pb2.MEDIA_FORMAT_MP4: "mp4",
    decoder_pb2.MEDIA_FORMAT_NONE: "none",
}


def params_from_proto(message: decoder_pb2.DecodeParams) -> DecodeParams:
    if message.format not in FORMAT_NAMES:
        raise InvalidArgument("format", f"unknown media format {message.format}")
    return DecodeParams(
        request_id=message.request_id,
        format=FORMAT_NAMES[message.format],
        fps=message.fps if message.HasField("fps") else media.DEFAULT_FPS,
        return_frames=message.return_frames,
    )


class DecoderServicer(decoder_pb2_grpc.DecoderServicer):
    def __init__(self, engine: DecoderEngine, max_queue: int = 16) -> None:
        self.engine = engine
        self.gate = AdmissionGate("decoder", concurrency=1, max_queue=max_queue)

    @rpc_method
    async def Decode(self, request_iterator, context: grpc.aio.ServicerContext):
        message, tensors = await receive_params_and_tensors(request_iterator, ("latents",))
        check_model(message.model, self.engine.model_name)
        params = params_from_proto(message)
        if "latents" not in tensors:
            raise InvalidArgument("latents", "missing from the stream")
        self.engine.check(params, tensors["latents"])
        async with self.gate:
            decoded = await asyncio.to_thread(self.engine.decode, params, tensors["latents"])
        for index, item in enumerate(decoded.media):
            for chunk in iter_media_chunks(index, item.mime_type, item.data):
                yield decoder_pb2.DecodeResponse(media=chunk)
        if decoded.frames is not None:
            for chunk in iter_chunks("frames", torch.from_numpy(decoded.frames)):
                yield decoder_pb2.DecodeResponse(tensor=chunk)

    @rpc_method
    async def EncodeImage(self, request: decoder_pb2.EncodeImageRequest, context: grpc.aio.ServicerContext):
        check_model(request.model, self.engine.model_name)
        params = ConditionParams(request_id=request.request_id, image=request.image, width=request.width,
                                 height=request.height, num_frames=request.num_frames)
        self.engine.check_condition(params)
        # The same gate as Decode: one VAE, one call at a time.
        async with self.gate:
            tensors = await asyncio.to_thread(self.engine.encode_condition, params)
        for name, tensor in tensors.items():
            for chunk in iter_chunks(name, tensor):
                yield chunk


SPEC = StageSpec(
    name="decoder",
    service_name="diffmesh.v1.Decoder",
    default_port=DEFAULT_PORT,
    engine_class=DecoderEngine,
    servicer_class=DecoderServicer,
    add_to_server=decoder_pb2_grpc.add_DecoderServicer_to_server,
    add_arguments=add_tiling_arguments,
    engine_options=tiling_from_args,
)


def main(argv: list[str] | None = None) -> None:
    stage_main(SPEC, argv)


if __name__ == "__main__":
    main()
