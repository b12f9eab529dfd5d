"""Tests for services.common.server.AdmissionGate: bounded concurrency plus a bounded queue, refusing the rest."""

from __future__ import annotations

import asyncio

import pytest

from services.common.errors import ResourceExhausted
from services.common.server import AdmissionGate

# Generous bound for "at once": a refused entrant must never wait for a slot.
IMMEDIATE_S = 1.0


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def _hold(gate: AdmissionGate, entered: asyncio.Event, release: asyncio.Event) -> None:
    async with gate:
        entered.set()
        await release.wait()


def test_third_entrant_is_refused_immediately_and_admitted_after_release():
    async def scenario() -> None:
        gate = AdmissionGate("denoiser", concurrency=1, max_queue=1)
        holder_in, holder_go = asyncio.Event(), asyncio.Event()
        waiter_in, waiter_go = asyncio.Event(), asyncio.Event()
        holder = asyncio.create_task(_hold(gate, holder_in, holder_go))
        await asyncio.wait_for(holder_in.wait(), IMMEDIATE_S)
        waiter = asyncio.create_task(_hold(gate, waiter_in, waiter_go))
        await _settle()
        assert not waiter_in.is_set()  # queued behind the holder
        assert gate.in_flight == 2

        with pytest.raises(ResourceExhausted) as info:
            await asyncio.wait_for(gate.__aenter__(), IMMEDIATE_S)
        assert "denoiser" in info.value.message
        assert gate.in_flight == 2  # the refusal took no slot

        holder_go.set()
        await asyncio.wait_for(holder, IMMEDIATE_S)
        await asyncio.wait_for(waiter_in.wait(), IMMEDIATE_S)  # the queued one runs next
        assert gate.in_flight == 1

        # There is room in the queue again: a new entrant waits instead of being refused.
        third_in, third_go = asyncio.Event(), asyncio.Event()
        third = asyncio.create_task(_hold(gate, third_in, third_go))
        await _settle()
        assert not third.done() and gate.in_flight == 2
        waiter_go.set()
        await asyncio.wait_for(third_in.wait(), IMMEDIATE_S)
        third_go.set()
        await asyncio.wait_for(asyncio.gather(waiter, third), IMMEDIATE_S)
        assert gate.in_flight == 0

    asyncio.run(scenario())


def test_entry_works_again_once_everyone_has_left():
    async def scenario() -> None:
        gate = AdmissionGate("encoder", concurrency=1, max_queue=1)
        for _ in range(3):
            async with gate:
                assert gate.in_flight == 1
            assert gate.in_flight == 0

    asyncio.run(scenario())


def test_cancelled_waiter_frees_its_queue_slot():
    async def scenario() -> None:
        gate = AdmissionGate("decoder", concurrency=1, max_queue=1)
        holder_in, holder_go = asyncio.Event(), asyncio.Event()
        holder = asyncio.create_task(_hold(gate, holder_in, holder_go))
        await asyncio.wait_for(holder_in.wait(), IMMEDIATE_S)
        waiter = asyncio.create_task(_hold(gate, asyncio.Event(), asyncio.Event()))
        await _settle()
        assert gate.in_flight == 2

        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert gate.in_flight == 1

        # The freed slot admits a new waiter rather than refusing it.
        replacement_in, replacement_go = asyncio.Event(), asyncio.Event()
        replacement = asyncio.create_task(_hold(gate, replacement_in, replacement_go))
        await _settle()
        assert not replacement.done()  # queued, not refused
        holder_go.set()
        await asyncio.wait_for(replacement_in.wait(), IMMEDIATE_S)
        replacement_go.set()
        await asyncio.wait_for(asyncio.gather(holder, replacement), IMMEDIATE_S)
        assert gate.in_flight == 0

    asyncio.run(scenario())


def test_error_inside_the_gate_releases_the_slot():
    async def scenario() -> None:
        gate = AdmissionGate("denoiser", concurrency=1, max_queue=0)
        with pytest.raises(ValueError):
            async with gate:
                raise ValueError("boom")
        assert gate.in_flight == 0
        async with gate:  # would raise ResourceExhausted if the slot had leaked
            pass

    asyncio.run(scenario())


def test_gateway_slots_never_overfill_the_smallest_stage():
    from services.gateway.admission import stage_slots

    # One running + one waiting per replica, never more than the stage admits, and unknown counts as one.
    assert stage_slots([(1, 16)]) == 2
    assert stage_slots([(1, 0)]) == 1
    assert stage_slots([(4, 1)]) == 5
    assert stage_slots([(1, 16), (1, 16), None]) == 5
    assert stage_slots([]) == 1
