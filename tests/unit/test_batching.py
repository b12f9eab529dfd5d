"""Request batching in the denoiser (services/denoiser/batching.py), in process on CPU with the tiny Wan and FLUX
models: batched requests each equal their solo runs bit for bit (own seeds, prompts, guidance scales, output
counts, progress and previews), in one transformer call per branch per step; a request of another size runs in a
batch of its own; a member cancelled mid-run leaves and the others stay equal to solo; --max-batch 1 is today's
path untouched."""

from __future__ import annotations

import asyncio

import pytest
import torch

from services.common.errors import Cancelled
from services.common.models import resolve_model_dir
from services.common.platform import PLATFORMS
from services.common.tiny.flux import write_tiny_flux
from services.common.tiny_model import write_tiny_model
from services.denoiser.batching import BatchOptions, BatchQueue, Member, denoise_together
from services.denoiser.engine import DenoiserEngine
from services.denoiser.server import DenoiserServicer
from services.families.base import Sampling


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory):
    return resolve_model_dir(write_tiny_model(tmp_path_factory.mktemp("batching") / "wan"))


@pytest.fixture(scope="module")
def wan(wan_dir) -> DenoiserEngine:
    return DenoiserEngine(wan_dir, PLATFORMS["cpu"], batching=BatchOptions(max_batch=4))


@pytest.fixture(scope="module")
def flux(tmp_path_factory) -> DenoiserEngine:
    model = resolve_model_dir(write_tiny_flux(tmp_path_factory.mktemp("batching") / "flux"))
    return DenoiserEngine(model, PLATFORMS["cpu"], batching=BatchOptions(max_batch=4))


def conditioning(engine: DenoiserEngine, params: Sampling, seed: int) -> dict[str, torch.Tensor]:
    """A prompt's tensors of the encoder's shapes, random per `seed` (a different prompt each)."""
    generator = torch.Generator().manual_seed(seed)
    shapes = engine.denoising.warmup_conditioning(params, 16)
    return {name: torch.randn(tensor.shape, generator=generator) for name, tensor in shapes.items()}


class Calls:
    """Counts the transformer's calls (a forward hook: it changes nothing)."""

    def __init__(self, engine: DenoiserEngine) -> None:
        self.count = 0
        self.handle = engine.denoising.transformers[0].register_forward_hook(lambda *_: self.bump())

    def bump(self) -> None:
        self.count += 1

    def __enter__(self) -> Calls:
        return self

    def __exit__(self, *_) -> None:
        self.handle.remove()


def member(engine: DenoiserEngine, params: Sampling, seed: int) -> Member:
    m = Member(params, conditioning(engine, params, seed))
    m.steps, m.previews = [], []
    m.on_step = lambda done, total: m.steps.append(done)
    m.on_preview = lambda done, total, image: m.previews.append((done, image))
    return m


def solo(engine: DenoiserEngine, m: Member) -> tuple[torch.Tensor, list, list]:
    steps, previews = [], []
    result = engine.denoise(m.params, m.tensors, lambda done, total: steps.append(done),
                            on_preview=lambda done, total, image: previews.append((done, image)))
    return result, steps, previews


def assert_equal_to_solo(engine: DenoiserEngine, members: list[Member]) -> None:
    for m in members:
        result, steps, previews = solo(engine, m)
        assert m.error is None and torch.equal(m.result, result), m.params.request_id
        assert m.steps == steps
        assert [d for d, _ in m.previews] == [d for d, _ in previews]
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(m.previews, previews, strict=True))


def test_batched_wan_requests_each_equal_their_solo_runs_bit_for_bit_in_one_call_per_branch(wan, wan_dir):
    # Own seeds, prompts, guidance scales and output counts (1 + 2 + 1 = 4 outputs); two branches (CFG) each.
    members = [member(wan, Sampling("a", 48, 32, 5, 3, 5.0, 1, preview_every=1), 11),
               member(wan, Sampling("b", 48, 32, 5, 3, 3.0, 2, num_outputs=2), 12),
               member(wan, Sampling("c", 48, 32, 5, 3, 7.5, 3, preview_every=2), 13)]
    with Calls(wan) as calls:
        denoise_together(wan, members)
    assert calls.count == 3 * 2                     # 3 steps x (cond, uncond): one call for all three
    assert members[0].result.shape[0] == 1 and members[1].result.shape[0] == 2
    assert_equal_to_solo(wan, members)
    # And solo on the batching engine is today's engine exactly (the per-member modules act only in a batch).
    today = DenoiserEngine(wan_dir, PLATFORMS["cpu"])
    assert torch.equal(today.denoise(members[1].params, members[1].tensors), members[1].result)


def test_batched_flux_requests_each_equal_their_solo_runs_bit_for_bit(flux):
    members = [member(flux, Sampling(rid, 64, 32, 1, 3, scale, seed, preview_every=1), 20 + seed)
               for rid, scale, seed in (("a", 3.5, 1), ("b", 2.0, 2), ("c", 5.0, 3))]
    with Calls(flux) as calls:
        denoise_together(flux, members)
    assert calls.count == 3
    assert_equal_to_solo(flux, members)


def test_a_member_cancelled_mid_run_leaves_and_the_others_stay_equal_to_solo(wan):
    members = [member(wan, Sampling(rid, 48, 32, 5, 4, 5.0, seed), 30 + seed)
               for rid, seed in (("a", 1), ("b", 2), ("c", 3))]
    members[1].cancelled = lambda: len(members[1].steps) >= 2
    with Calls(wan) as calls:
        denoise_together(wan, members)
    assert isinstance(members[1].error, Cancelled) and members[1].result is None and members[1].steps == [1, 2]
    assert calls.count == 4 * 2                    # still one call per branch per step, with two members after
    assert_equal_to_solo(wan, [members[0], members[2]])


def test_the_queue_batches_waiting_requests_of_one_key_and_runs_another_size_apart(wan):
    queue = BatchQueue(wan, BatchOptions(max_batch=4, wait_ms=200))
    members = [member(wan, Sampling("a", 48, 32, 5, 2, 5.0, 1), 41),
               member(wan, Sampling("big", 64, 32, 5, 2, 5.0, 2), 42),      # another size: not in a's batch
               member(wan, Sampling("c", 48, 32, 5, 2, 4.0, 3), 43)]

    async def submit(m: Member) -> None:
        m.result = await queue.denoise(m.params, m.tensors, m.on_step, lambda: False, None)

    async def all_at_once() -> None:
        await asyncio.gather(*(submit(m) for m in members))

    asyncio.run(all_at_once())
    assert queue.batches == [("a", "c"), ("big",)]
    for m in members:
        assert torch.equal(m.result, wan.denoise(m.params, m.tensors))


def test_a_cancelled_member_gets_cancelled_from_the_queue_and_bad_input_fails_only_its_request(wan):
    queue = BatchQueue(wan, BatchOptions(max_batch=4, wait_ms=100))
    good = member(wan, Sampling("good", 48, 32, 5, 2, 5.0, 1), 51)
    bad = member(wan, Sampling("bad", 48, 32, 5, 2, 5.0, 2), 52)
    bad.tensors = {**bad.tensors, "prompt_embeds": bad.tensors["prompt_embeds"][..., :3]}   # wrong width
    gone = member(wan, Sampling("gone", 48, 32, 5, 2, 5.0, 3), 53)

    async def run() -> list:
        return await asyncio.gather(*(queue.denoise(m.params, m.tensors, None, lambda m=m: m is gone)
                                      for m in (good, bad, gone)), return_exceptions=True)

    results = asyncio.run(run())
    assert torch.equal(results[0], wan.denoise(good.params, good.tensors))
    assert results[1].__class__.__name__ == "InvalidArgument" and "prompt_embeds" in str(results[1])
    assert isinstance(results[2], Cancelled)


def test_max_batch_one_is_todays_path(wan_dir):
    engine = DenoiserEngine(wan_dir, PLATFORMS["cpu"], batching=BatchOptions(max_batch=1))
    assert engine.batching is None
    assert all("forward" not in vars(m) for m in engine.denoising.transformers[0].modules())
    servicer = DenoiserServicer(engine)
    assert servicer.batches is None and servicer.gate.concurrency == 1


def test_the_denoisers_capacity_grows_with_max_batch(wan):
    servicer = DenoiserServicer(wan, max_queue=8)
    assert servicer.batches is not None and (servicer.gate.concurrency, servicer.gate.max_queue) == (4, 8)


def test_the_gateway_keeps_a_batching_denoiser_fed_and_never_overfills_a_stage():
    from services.gateway.admission import job_slots

    one = [(1, 16)]
    assert job_slots([one, one, one]) == 2                    # every stage at concurrency 1: as before
    assert job_slots([one, [(8, 16)], one]) == 16             # --max-batch 8: enough jobs for a batch of 8
    assert job_slots([[(1, 2)], [(8, 16)], one]) == 3         # never more than the smallest stage admits
    assert job_slots([one, [None], one]) == 1                 # a stage that cannot say counts as one


def test_up_passes_max_batch_and_batch_wait_to_the_denoiser_alone():
    from diffmesh import cli

    args = cli.build_parser().parse_args(["up", "--model", "m", "--max-batch", "4", "--batch-wait-ms", "20"])
    assert cli.denoiser_speed_flags(args)[-4:] == ["--max-batch", "4", "--batch-wait-ms", "20.0"]
    plain = cli.build_parser().parse_args(["up", "--model", "m"])
    assert "--max-batch" not in cli.denoiser_speed_flags(plain)
