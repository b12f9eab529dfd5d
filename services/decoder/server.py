"""Decoder stage gRPC server: latents in; PNG/MP4 files (and raw frames when asked) out.

On one device the servicer drives a `DecoderEngine`. With `--devices N` (or torch.distributed's env) the process is
one rank of a decoder gang (services/decoder/gang.py): rank 0 serves gRPC with the same servicer over the gang's
executor, and every rank decodes its rows of each frame.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys

import grpc
import torch

from diffmesh.v1 import decoder_pb2, decoder_pb2_grpc
from services.common import logs, settings
from services.common.errors import InvalidArgument
from services.common.models import check_model
from services.common.platform import select_platform
from services.common.server import AdmissionGate, rpc_method, run_until_stopped
from services.common.stage import StageSpec, serve_stage, stage_parser
from services.common.tensors import iter_chunks, iter_media_chunks, receive_params_and_tensors
from services.decoder import media
from services.decoder.compile import add_vae_compile_arguments, check_vae_compile, vae_compile_from_args
from services.decoder.encoders import FileEncoders
from services.decoder.engine import ConditionParams, Decoded, DecodeParams, DecoderEngine
from services.decoder.tiling import add_tiling_arguments, tiling_from_args
from services.denoiser.gang.distributed import DEFAULT_COLLECTIVE_TIMEOUT, env_rank
from services.denoiser.gang.launcher import launch_gang

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
        self.gate = AdmissionGate("decoder", concurrency=1, max_queue=max_queue)    # the VAE: one call at a time
        self.encoders = FileEncoders()

    @rpc_method
    async def Decode(self, request_iterator, context: grpc.aio.ServicerContext):
        message, tensors = await receive_params_and_tensors(request_iterator, ("latents",))
        check_model(message.model, self.engine.model_name)
        params = params_from_proto(message)
        if "latents" not in tensors:
            raise InvalidArgument("latents", "missing from the stream")
        self.engine.check(params, tensors["latents"])
        # The gate is held for the VAE's part only. The files are written on an encoder thread as the VAE hands over
        # its frames, and after it while the next request decodes. The place among the encoders is taken inside the
        # gate and before the decode, and kept until the files are done: while the encoders are full the VAE waits,
        # so decoded pixels never pile up (services/decoder/encoders.py).
        async with contextlib.AsyncExitStack() as held:
            async with self.gate:
                place = await held.enter_async_context(self.encoders.place())
                files = self.engine.file_writer(params, tensors["latents"])
                written = place.start(files.write)
                # When the client goes away (cancel, deadline) grpc.aio may cancel this handler or only end the RPC;
                # either way its done-callback fires, and the decode stops at its next chunk (a Wan video's next
                # latent frame).
                context.add_done_callback(lambda _: files.abort())
                work = asyncio.ensure_future(asyncio.to_thread(self.engine.decode_pixels, params,
                                                               tensors["latents"], files))
                # Read below, unless this handler is cancelled first (asyncio would log it as never retrieved).
                work.add_done_callback(lambda task: task.cancelled() or task.exception())
                try:
                    await asyncio.wait({work})
                    frames = work.result()
                except BaseException:
                    files.abort()       # the decode failed or this call was cancelled: no files
                    written.cancel()    # nobody waits for them (the thread stops at the abort)
                    if not work.done():
                        # Hold the gate until the VAE thread has stopped: two decodes never share the VAE.
                        await asyncio.wait({work})
                    raise
            decoded = Decoded(media=await written, frames=frames)
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


def positive_seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number of seconds")
    return value


def add_decoder_arguments(parser: argparse.ArgumentParser) -> None:
    add_tiling_arguments(parser)
    add_vae_compile_arguments(parser)
    gang = parser.add_argument_group("gang", "several devices decoding each video together, by rows of its frames")
    gang.add_argument("--devices", type=int, default=None,
                      help="processes/devices decoding each video together, exactly as one device does (default 1, "
                      "or $WORLD_SIZE when launched by torchrun); the decode is not tiled then")
    gang.add_argument("--gang-timeout", type=positive_seconds, default=DEFAULT_COLLECTIVE_TIMEOUT.total_seconds(),
                      metavar="SECONDS", help="how long a rank waits in a collective for the others before the "
                      "gang counts as broken (answers UNAVAILABLE and exits) (default %(default)s)")


SPEC = StageSpec(
    name="decoder",
    service_name="diffmesh.v1.Decoder",
    default_port=DEFAULT_PORT,
    engine_class=DecoderEngine,
    servicer_class=DecoderServicer,
    add_to_server=decoder_pb2_grpc.add_DecoderServicer_to_server,
    add_arguments=add_decoder_arguments,
    engine_options=lambda args: {**tiling_from_args(args), "compile_vae": vae_compile_from_args(args)},
)


def gang_size(args: argparse.Namespace, joined: tuple[int, int, int] | None) -> int:
    """How many ranks decode together; ValueError for flags that cannot work, before any process starts."""
    devices = args.devices if args.devices is not None else (joined[1] if joined else 1)
    if devices < 1:
        raise ValueError(f"--devices must be at least 1, got {devices}")
    if joined is not None and devices != joined[1]:
        raise ValueError(f"--devices {devices} but WORLD_SIZE is {joined[1]}")
    check_vae_compile(args, devices)
    if joined is None and devices > 1:
        platform = select_platform(args.device)
        if platform.kind != "cpu" and platform.device_count() < devices:
            raise ValueError(f"{devices} {platform.kind} devices requested, {platform.device_count()} visible")
    return devices


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = settings.parse_args(stage_parser(SPEC), argv)
    try:
        joined = env_rank()
        devices = gang_size(args, joined)
    except (RuntimeError, ValueError) as error:
        logs.configure("decoder")
        logger.error("cannot start: %s", error)
        raise SystemExit(1) from None
    if joined is not None:
        # Only a gang's rank loads the gang's roles (and, through them, the denoiser gang's worker).
        from services.decoder.gang import serve_decoder_rank

        run_until_stopped(serve_decoder_rank(SPEC, args, *joined))
    elif devices > 1:
        raise SystemExit(launch_gang("services.decoder.server", argv, devices, args.grace))
    else:
        run_until_stopped(serve_stage(SPEC, args))


if __name__ == "__main__":
    main()
