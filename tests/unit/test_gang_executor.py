"""The gang's executor with its gang and engine stubbed: the leader's check -> hand over -> run, the followers'
loop, and that a broken gang is reported to the caller (the worker decides about exit), never acted on here."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from services.common.errors import Cancelled
from services.denoiser.engine import DenoiseParams
from services.denoiser.gang.executor import STOP, DenoiseMessage, GangBroken, GangExecutor


def params(request_id: str = "r") -> DenoiseParams:
    return DenoiseParams(request_id=request_id, width=64, height=32, num_frames=5, num_inference_steps=2,
                         guidance_scale=1.0, seed=3)


class StubGang:
    rank = 0

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

    def any_rank(self, flag: bool) -> bool:
        return flag


class StubEngine:
    model_name = "tiny"
    limits = None
    conditioning_names = ("prompt_embeds",)

    def __init__(self, fails: bool = False) -> None:
        self.fails = fails
        self.checked: list[str] = []
        self.ran: list[str] = []
        self.previews: list[object] = []        # the on_preview each run got

    def check(self, params: DenoiseParams) -> None:
        self.checked.append(params.request_id)

    def check_conditioning(self, params: DenoiseParams, tensors) -> None:
        pass

    def denoise(self, params, tensors, on_step=None, cancelled=lambda: False, on_preview=None) -> torch.Tensor:
        self.previews.append(on_preview)
        if cancelled():
            raise Cancelled("cancelled at step 0 of 2")
        if self.fails:
            raise RuntimeError("a collective failed")
        self.ran.append(params.request_id)
        return torch.zeros(1)


def leader(gang: StubGang, engine: StubEngine) -> tuple[GangExecutor, list[int]]:
    broken: list[int] = []
    return GangExecutor(engine, gang, on_broken=lambda: broken.append(1)), broken


def test_the_leader_checks_hands_the_request_over_then_runs_its_share():
    gang, engine = StubGang(), StubEngine()
    executor, broken = leader(gang, engine)
    executor.denoise(params("a"), {"prompt_embeds": torch.ones(1, 2, 3)})
    assert engine.checked[0] == "a" and engine.ran == ["a"]
    [message] = gang.sent
    assert isinstance(message, DenoiseMessage) and message.params.request_id == "a"
    assert message.tensors["prompt_embeds"].device.type == "cpu"
    assert broken == []


def test_a_rank_gone_before_the_hand_over_fails_the_request_and_tells_the_caller():
    engine = StubEngine()
    executor, broken = leader(StubGang(hand_over_fails=True), engine)
    with pytest.raises(GangBroken, match="gone"):
        executor.denoise(params(), {})
    assert broken == [1] and engine.ran == []


def test_a_failure_mid_request_breaks_the_gang_but_a_cancellation_does_not():
    executor, broken = leader(StubGang(), StubEngine(fails=True))
    with pytest.raises(GangBroken) as raised:
        executor.denoise(params(), {})
    assert raised.value.grpc_code.name == "UNAVAILABLE" and broken == [1]

    executor, broken = leader(StubGang(), StubEngine())
    with pytest.raises(Cancelled):
        executor.denoise(params(), {}, cancelled=lambda: True)
    assert broken == []


def test_a_follower_runs_each_request_until_stop():
    messages = [DenoiseMessage(params("a"), {}), DenoiseMessage(params("b"), {}), STOP]
    engine = StubEngine()
    GangExecutor(engine, StubGang(messages)).follow()
    assert engine.ran == ["a", "b"]


def test_a_follower_that_fails_mid_request_leaves_with_gang_broken():
    with pytest.raises(GangBroken):
        GangExecutor(StubEngine(fails=True), StubGang([DenoiseMessage(params(), {}), STOP])).follow()


def test_only_the_leader_previews_and_a_follower_runs_the_same_request_without():
    """Previews are local work on the leader's whole latents: the followers run the same request (preview_every
    included, so every rank checks the same params) with no preview callback, and stay in step."""
    previewing = dataclasses.replace(params("a"), preview_every=1)
    engine = StubEngine()
    executor, _ = leader(StubGang(), engine)
    on_preview = lambda done, total, image: None  # noqa: E731
    executor.denoise(previewing, {}, on_preview=on_preview)
    assert engine.previews == [on_preview]

    follower = StubEngine()
    GangExecutor(follower, StubGang([DenoiseMessage(previewing, {}), STOP])).follow()
    assert follower.ran == ["a"] and follower.previews == [None]
