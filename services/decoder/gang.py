"""`diffmesh serve decoder --devices N`: N processes, one per device, decode each video together by rows.

The same roles as the denoiser gang's, and its pieces: services/denoiser/gang/launcher.py starts the ranks,
distributed.Ranks sets up their process groups (the platform's backend for tensors, gloo for control), and the
worker's `lead` / `follow` run the leader's gRPC server and the followers' loop. What is the decoder's own:

- the executor: the leader checks a request, broadcasts its parameters over the control group and its latents over
  the device group; every rank decodes its slab of rows (services/decoder/parallel_vae.py); the slabs are gathered
  on the leader, which alone encodes the PNG / MP4, on its file encoders' threads while the gang decodes the next
  request. An I2V conditioning image goes to every rank whole; the VAE's encoder splits its rows inside and every
  rank ends with the whole latents, the leader replying;
- the rank's life: device -> process groups -> load the VAE -> READY -> serve (the leader) or follow.

Latents fewer rows high than the gang has ranks (tiny images) are decoded by the leader alone. A rank that fails
mid-request leaves the others inside a collective: the request fails UNAVAILABLE and the gang exits to be
restarted whole, as the denoiser's does.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import logging
import os
from collections.abc import Callable

import numpy as np
import torch

from services.common import logs, metrics
from services.common.errors import Unavailable
from services.common.images import decode_image
from services.common.server import StartupError
from services.common.stage import StageSpec, setup_stage
from services.decoder.engine import ConditionParams, Decoded, DecodeParams, DecoderEngine
from services.decoder.parallel_vae import RowParallelVae, RowSplit, gather_rows, row_sizes, slab
from services.decoder.tiling import tiling_from_args
from services.decoder.writer import FileWriter
from services.denoiser.gang.distributed import STOP, LeaderAndFollowers, Ranks  # noqa: F401  (STOP: re-exported)
from services.denoiser.gang.worker import follow, lead, leave_stopping_to_the_leader

logger = logging.getLogger(__name__)

@dataclasses.dataclass(frozen=True)
class DecodeMessage:
    """What the leader broadcasts over the control group before a decode; the latents follow on the device group."""

    params: DecodeParams
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclasses.dataclass(frozen=True)
class EncodeMessage:
    """A conditioning image to encode (its bytes travel in the message: they are small)."""

    params: ConditionParams


class GangBroken(Unavailable):
    """A rank failed or is gone; the client sees UNAVAILABLE naming the decoder, and a retry succeeds once the gang
    has restarted."""

    def __init__(self, reason: str) -> None:
        super().__init__("decoder", f"{reason}; the gang is restarting")


def check_row_split(engine: DecoderEngine) -> None:
    if engine.decoding.row_split is None:
        raise ValueError(f"{engine.model_name}: the {engine.family.name} family does not split its VAE over "
                         "devices; serve the decoder with --devices 1")


class DecoderGangExecutor(LeaderAndFollowers):
    """Serves like a DecoderEngine on the leader (what the servicer calls); `follow()` on every other rank."""

    def __init__(self, engine: DecoderEngine, gang: Ranks, on_broken: Callable[[], None] = lambda: None) -> None:
        check_row_split(engine)
        self.engine = engine
        self.gang = gang
        self.on_broken = on_broken
        self.split = RowSplit(group=None, rank=gang.rank, size=gang.world_size)
        self.parallel = RowParallelVae(engine.decoding.vae, engine.decoding.row_split)

    # What the servicer reads and checks: the leader's engine's own -------------------------------------------

    @property
    def model_name(self) -> str:
        return self.engine.model_name

    def check(self, params: DecodeParams, latents: torch.Tensor) -> None:
        self.engine.check(params, latents)

    def check_condition(self, params: ConditionParams) -> None:
        self.engine.check_condition(params)

    # The leader: check -> hand over -> run ------------------------------------------------------------------

    def file_writer(self, params: DecodeParams, latents: torch.Tensor) -> FileWriter:
        return self.engine.file_writer(params, latents)

    def decode(self, params: DecodeParams, latents: torch.Tensor) -> Decoded:
        self.engine.check(params, latents)
        files = self.file_writer(params, latents)
        frames = self.decode_pixels(params, latents, files)
        return Decoded(media=files.write(), frames=frames)

    def decode_pixels(self, params: DecodeParams, latents: torch.Tensor, files: FileWriter) -> np.ndarray | None:
        """Checked here first, so that a bad request fails on the leader alone and the gang stays in step. The
        gang's part ends with the whole frames on the leader's host, handed to `files`: the servicer gives the gang
        the next request while the leader's file encoders write this one's (off the gang: no rank takes part, and
        a failure there leaves the gang in step)."""
        self.engine.check(params, latents)

        def whole() -> list[torch.Tensor]:
            return [self._lead(DecodeMessage(params, tuple(latents.shape), latents.dtype),
                               lambda: self._decode(latents.to(self.gang.device).contiguous()))]

        return self.engine.deliver(params, files, whole)

    def encode_condition(self, params: ConditionParams) -> dict[str, torch.Tensor]:
        self.engine.check_condition(params)
        decode_image(params.image)          # a file that is no image fails here, not on every rank
        return self._lead(EncodeMessage(params), lambda: self._encode(params))

    def _lead(self, message: DecodeMessage | EncodeMessage, work: Callable[[], object]):
        try:
            self._hand_over(message)
            return self._run(work)
        except GangBroken:
            self.on_broken()
            raise

    def broken(self, reason: str) -> GangBroken:
        return GangBroken(reason)

    # Every other rank: follow (LeaderAndFollowers.follow) -----------------------------------------------------

    def _follow(self, message: DecodeMessage | EncodeMessage) -> None:
        if isinstance(message, DecodeMessage):
            self._run(lambda: self._decode(torch.empty(message.shape, dtype=message.dtype, device=self.gang.device)))
        else:
            self._run(lambda: self._encode(message.params))

    # Every rank, in step ------------------------------------------------------------------------------------

    def _run(self, work: Callable[[], object]):
        try:
            with torch.inference_mode():
                return work()
        except BaseException:
            # A rank that failed mid-request leaves the others inside a collective: the gang cannot go on.
            logger.exception("decoder gang rank %d failed during a request; the gang must restart", self.gang.rank)
            raise GangBroken(f"the gang failed during the request (seen by rank {self.gang.rank})") from None

    def _decode(self, latents: torch.Tensor) -> torch.Tensor | None:
        """The leader's latents reach every rank (device group); each decodes its rows; the leader gets the whole
        frames [n, F, H, W, 3], the others None."""
        self.gang.broadcast_tensor(latents)
        rows = latents.shape[-2]
        if rows < self.split.size:
            return self.engine.decode_frames(latents) if self.gang.is_leader else None
        mine = slab(latents, row_sizes(rows, self.split.size), self.split.rank)
        with metrics.phase("decode", self.model_name), self.parallel.decoding(self.split):
            frames = self.engine.decoding.decode(mine)                              # [n, F, h, W, 3]
            return gather_rows(frames, self.split, dim=2)

    def _encode(self, params: ConditionParams) -> dict[str, torch.Tensor]:
        with self.parallel.encoding(self.split):
            return self.engine.encode_condition(params)


async def serve_decoder_rank(spec: StageSpec, args: argparse.Namespace, rank: int, world_size: int,
                             local_rank: int) -> None:
    """Run this rank until the gang stops; `spec` is the stage the leader serves over gRPC."""
    platform, model, dtype = setup_stage(spec.name, args)
    logs.configure(spec.name, rank)
    leave_stopping_to_the_leader(rank)
    try:
        gang = await asyncio.to_thread(Ranks, platform, rank, local_rank, world_size,
                                       datetime.timedelta(seconds=args.gang_timeout))
        platform.share_host(int(os.environ.get("LOCAL_WORLD_SIZE", world_size)))
        engine = await asyncio.to_thread(DecoderEngine, model, platform, dtype, device=gang.device,
                                         **tiling_from_args(args))
        check_row_split(engine)
    except (RuntimeError, OSError, ValueError) as error:
        raise StartupError(str(error)) from error
    await asyncio.to_thread(gang.barrier)      # READY: every rank loaded before the leader reports SERVING
    if rank == 0:
        await lead(spec, args, engine, gang, executor_class=DecoderGangExecutor)
    else:
        await follow(args, DecoderGangExecutor(engine, gang), local_rank)
