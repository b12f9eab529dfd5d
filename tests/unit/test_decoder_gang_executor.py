"""The decoder gang's executor with a one-rank gang stubbed (its control and tensor broadcasts) and a VAE-less
decoding: a bad request fails on the leader before any rank hears of it, a failure mid-request breaks the gang
(UNAVAILABLE naming the decoder, reported to the worker), and followers run every request until told to stop.
The split itself is tests/unit/test_parallel_vae.py's; the real gang, tests/integration/test_decoder_gang.py's."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from services.common.errors import InvalidArgument
from services.common.images import encode_png
from services.decoder.engine import ConditionParams, DecodeParams, DecoderEngine
from services.decoder.gang import STOP, DecodeMessage, DecoderGangExecutor, EncodeMessage, GangBroken
from services.families.base import RowSplitPlan


class StubGang:
    rank, world_size, is_leader, device = 0, 1, True, torch.device("cpu")

    def __init__(self, incoming=(), hand_over_fails: bool = False) -> None:
        self.incoming = list(incoming)
        self.sent: list[object] = []
        self.hand_over_fails = hand_over_fails

    def broadcast_message(self, message: object = None) -> object:
        if message is None:                     # a follower: receive the leader's next message
            return self.incoming.pop(0)
        if self.hand_over_fails:
            raise RuntimeError("Connection closed by peer")
        self.sent.append(message)
        return message

    def broadcast_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor


class StubDecoding:
    row_split = RowSplitPlan()
    spatial_scale = 8

    def __init__(self, fails: bool) -> None:
        self.vae = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1))
        self.fails = fails
        self.decoded: list[tuple[int, ...]] = []

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if self.fails:
            raise RuntimeError("a collective failed")
        self.decoded.append(tuple(latents.shape))
        return torch.zeros(latents.shape[0], 1, latents.shape[-2] * 8, latents.shape[-1] * 8, 3)


class StubEngine:
    model_name = "tiny"

    def __init__(self, fails: bool = False, takes_image: bool = True) -> None:
        self.decoding = StubDecoding(fails)
        self.takes_image = takes_image
        self.encoded: list[str] = []

    def check(self, params: DecodeParams, latents: torch.Tensor) -> None:
        if latents.dim() != 4:
            raise InvalidArgument("latents", "not [n, C, H, W]")

    def check_condition(self, params: ConditionParams) -> None:
        if not self.takes_image:
            raise InvalidArgument("image", "tiny takes no conditioning image")

    def encode_condition(self, params: ConditionParams) -> dict[str, torch.Tensor]:
        self.encoded.append(params.request_id)
        return {"condition_latents": torch.zeros(1)}

    # The real engine's: the gang hands its whole frames to the request's files as one engine does.
    file_writer = DecoderEngine.file_writer
    deliver = DecoderEngine.deliver


def leader(gang: StubGang, engine: StubEngine) -> tuple[DecoderGangExecutor, list[int]]:
    broken: list[int] = []
    return DecoderGangExecutor(engine, gang, on_broken=lambda: broken.append(1)), broken


def picture() -> bytes:
    from PIL import Image

    return encode_png(Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)))


def test_the_leader_checks_hands_over_then_decodes_its_rows_and_finishes():
    gang, engine = StubGang(), StubEngine()
    executor, broken = leader(gang, engine)
    decoded = executor.decode(DecodeParams("a", return_frames=True), torch.ones(1, 16, 9, 6))
    assert decoded.frames.shape == (1, 1, 72, 48, 3)
    [message] = gang.sent
    assert isinstance(message, DecodeMessage) and message.params.request_id == "a"
    assert message.shape == (1, 16, 9, 6) and message.dtype == torch.float32
    assert engine.decoding.decoded == [(1, 16, 9, 6)] and broken == []


def test_bad_requests_fail_on_the_leader_before_any_rank_hears_of_them():
    gang, engine = StubGang(), StubEngine(takes_image=False)
    executor, broken = leader(gang, engine)
    with pytest.raises(InvalidArgument, match="latents"):
        executor.decode(DecodeParams("a"), torch.ones(16, 9, 6))
    with pytest.raises(InvalidArgument, match="takes no conditioning image"):
        executor.encode_condition(ConditionParams("b", picture(), 48, 72, 9))
    executor, broken = leader(gang, StubEngine())
    with pytest.raises(InvalidArgument) as raised:
        executor.encode_condition(ConditionParams("c", b"no image at all", 48, 72, 9))
    assert raised.value.field == "image"
    assert gang.sent == [] and broken == []


def test_a_rank_gone_or_failing_breaks_the_gang_naming_the_decoder_and_tells_the_worker():
    executor, broken = leader(StubGang(hand_over_fails=True), StubEngine())
    with pytest.raises(GangBroken, match="gone") as raised:
        executor.decode(DecodeParams("a"), torch.ones(1, 16, 9, 6))
    assert raised.value.grpc_code.name == "UNAVAILABLE" and "decoder" in str(raised.value) and broken == [1]

    executor, broken = leader(StubGang(), StubEngine(fails=True))
    with pytest.raises(GangBroken, match="failed during the request"):
        executor.decode(DecodeParams("b"), torch.ones(1, 16, 9, 6))
    assert broken == [1]


def test_a_follower_runs_each_request_until_stop():
    messages = [DecodeMessage(DecodeParams("a"), (1, 16, 9, 6), torch.float32),
                EncodeMessage(ConditionParams("b", picture(), 48, 72, 9)), STOP]
    engine = StubEngine()
    DecoderGangExecutor(engine, StubGang(messages)).follow()
    assert engine.decoding.decoded == [(1, 16, 9, 6)] and engine.encoded == ["b"]
