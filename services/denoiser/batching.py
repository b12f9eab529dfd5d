"""Request batching in the denoiser: requests that can share one transformer call per step run as one batch.

`--max-batch N` (default 1: every request runs alone, today's path, untouched) lets up to N outputs share each
step's transformer call; `--batch-wait-ms W` is how long a request waits at most for partners when the device is
free (0: it runs with whoever is already waiting). Requests join when their batch key matches: size, frames,
steps, the guidance branches they run and their conditioning tensors' shapes (the model and dtype are the
denoiser's own). Each step, every member's `StepCall` is checked again before its kwargs are concatenated (same
transformer, same branches, same shapes of every batched kwarg, equal shared kwargs); one that does not fit runs
its own call that step, so a join never changes what a member gets.

Each member keeps everything that makes its output its own: its first latents drawn from its own seed, its own
scheduler (stepped on its slice of the prediction), its own guidance scale, its own progress events and previews.
A cancelled member leaves at the next step; the others go on.

Equal to solo bit for bit (on CPU, measured by tests/unit/test_batching.py): most of the transformer's kernels give
each sample the same bits whatever the batch (a GEMM over B x tokens rows reduces each row as for one sample;
SDPA and the norms work per sample), but two kinds do not: a Linear over [batch, features] (the timestep,
guidance and pooled-text embeddings, the blocks' modulation) becomes a matrix-vector product for one sample and
a blocked GEMM for several, and a convolution (Wan's patch embedding) picks its algorithm by batch. Those modules
run per member inside a batched call (`make_batch_invariant`): a handful of tiny calls per step. On a GPU, GEMM
kernels are picked by shape too, so there a batched output is within rounding of solo, not bit-equal
(bench/batching.py reports the difference it measures).
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import dataclasses
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch

from services.common import logs, metrics
from services.common.errors import Cancelled
from services.denoiser.predict import guided
from services.families.base import Sampling, StepCall

logger = logging.getLogger(__name__)

# The outputs each member brings to the transformer call running now, in batch order; None outside a batched call.
_MEMBER_SIZES: contextvars.ContextVar[tuple[int, ...] | None] = contextvars.ContextVar("member_sizes", default=None)


@dataclasses.dataclass(frozen=True)
class BatchOptions:
    max_batch: int = 1            # outputs per transformer call; 1: no batching
    wait_ms: float = 0.0          # how long a request waits at most for partners

    @property
    def enabled(self) -> bool:
        return self.max_batch > 1


def add_batching_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    group = parser.add_argument_group("request batching")
    group.add_argument("--max-batch", type=int, default=1, metavar="N",
                       help="up to N outputs (requests of the same size, frames, steps and guidance branches) share "
                            "each step's transformer call; 1 (default): every request runs alone. One device only")
    group.add_argument("--batch-wait-ms", type=float, default=0.0, metavar="MS",
                       help="with --max-batch > 1, how long a request waits at most for partners before it runs "
                            "(default 0: it runs with the requests already waiting)")
    return parser


def batching_from_args(args: argparse.Namespace) -> BatchOptions:
    max_batch, wait_ms = getattr(args, "max_batch", 1), getattr(args, "batch_wait_ms", 0.0)
    if max_batch < 1:
        raise ValueError(f"--max-batch {max_batch}: must be at least 1")
    if wait_ms < 0:
        raise ValueError(f"--batch-wait-ms {wait_ms}: must not be negative")
    return BatchOptions(max_batch, wait_ms)


def batch_key(params: Sampling, tensors: Mapping[str, torch.Tensor]) -> tuple:
    """What must match for two requests to share a transformer call: size, frames, steps (hence timesteps), the
    guidance branches (a negative branch or not) and the conditioning's shapes (e.g. prompt lengths). Scales, seeds
    and output counts may differ: they stay per member."""
    if getattr(params, "cache", None) is not None:
        return (object(),)    # step caching decides per request which steps run the transformer: it runs alone
    shapes = tuple(sorted((name, tuple(tensor.shape), str(tensor.dtype)) for name, tensor in tensors.items()))
    return (params.width, params.height, params.num_frames, params.num_inference_steps,
            params.guidance_scale > 1.0, params.true_cfg_scale > 1.0, params.guidance_scale_2 is None, shapes)


# 1. Batch-invariant modules

def make_batch_invariant(transformer: torch.nn.Module) -> torch.nn.Module:
    """Within a batched call, run each Linear over [batch, features] and each convolution once per member, so that
    every member gets the bits its solo call gives (see the module docstring for why those two). Outside a batched
    call the modules run as they were."""
    for module in transformer.modules():
        if isinstance(module, torch.nn.Linear):
            module.forward = _per_member(module.forward, rows_only=True)
        elif isinstance(module, (torch.nn.modules.conv._ConvNd, *_ACTIVATIONS)):
            module.forward = _per_member(module.forward, rows_only=False)
    return transformer


def _activation_classes() -> tuple[type, ...]:
    from diffusers.models import activations

    torch_ones = tuple(c for c in vars(torch.nn.modules.activation).values()
                       if isinstance(c, type) and issubclass(c, torch.nn.Module) and c is not torch.nn.Module)
    return torch_ones + (activations.GELU, activations.GEGLU, activations.ApproximateGELU)


_ACTIVATIONS = _activation_classes()


def _per_member(forward: Callable[..., torch.Tensor], rows_only: bool) -> Callable[..., torch.Tensor]:
    def run(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        sizes = _MEMBER_SIZES.get()
        if sizes is None or x.shape[0] != sum(sizes) or (rows_only and x.dim() != 2):
            return forward(x, *args, **kwargs)
        return torch.cat([forward(part, *args, **kwargs) for part in x.split(sizes)])
    return run


# 2. One step's prediction for several members

def _fits(a: StepCall, b: StepCall) -> bool:
    """Whether b's kwargs can be concatenated to a's for one call."""
    if a.model is not b.model or (a.uncond is None) != (b.uncond is None) or a.batched != b.batched:
        return False
    branches = [(a.cond, b.cond)] + ([(a.uncond, b.uncond)] if a.uncond is not None else [])
    for x, y in branches:
        if x.keys() != y.keys():
            return False
        for name, value in x.items():
            other = y[name]
            if name in a.batched and isinstance(value, torch.Tensor):
                if value.shape[1:] != other.shape[1:] or value.dtype != other.dtype:
                    return False
            elif isinstance(value, torch.Tensor):
                if not (value is other or (value.shape == other.shape and torch.equal(value, other))):
                    return False
            elif value != other:
                return False
    return True


def _joined(kwargs: list[dict[str, Any]], batched: frozenset[str]) -> dict[str, Any]:
    return {name: torch.cat([k[name] for k in kwargs]) if name in batched and isinstance(value, torch.Tensor)
            else value for name, value in kwargs[0].items()}


def _call(calls: list[StepCall], branch: str) -> list[torch.Tensor]:
    sizes = tuple(call.batch_size for call in calls)
    token = _MEMBER_SIZES.set(sizes)
    try:
        out = calls[0].model(**_joined([getattr(call, branch) for call in calls], calls[0].batched),
                             return_dict=False)[0]
    finally:
        _MEMBER_SIZES.reset(token)
    return list(out.split(sizes))


def predict_together(calls: list[StepCall], predict_one: Callable[[StepCall], torch.Tensor]) -> list[torch.Tensor]:
    """Each call's noise prediction, as `predict_one` would give it alone: calls that fit share one transformer
    call per branch (cond, then uncond, as the pipelines), each combined with its own guidance scale."""
    groups: list[list[int]] = []
    for index, call in enumerate(calls):
        group = next((g for g in groups if _fits(calls[g[0]], call)), None)
        if group is None:
            groups.append([index])
        else:
            group.append(index)
    predictions: list[torch.Tensor | None] = [None] * len(calls)
    for group in groups:
        members = [calls[i] for i in group]
        if len(members) == 1:
            predictions[group[0]] = predict_one(members[0])
            continue
        cond = _call(members, "cond")
        uncond = _call(members, "uncond") if members[0].uncond is not None else None
        for j, i in enumerate(group):
            predictions[i] = cond[j] if uncond is None else guided(cond[j], uncond[j], members[j].scale)
    return predictions   # type: ignore[return-value]


# 3. The loop over several requests

@dataclasses.dataclass(eq=False)
class Member:
    """One request in a batch, with what it hands in and, once done, what it gets: `result` or `error`."""

    params: Sampling
    tensors: Mapping[str, torch.Tensor]
    on_step: Callable[[int, int], None] | None = None
    cancelled: Callable[[], bool] = lambda: False
    on_preview: Callable[[int, int, torch.Tensor], None] | None = None
    result: torch.Tensor | None = None
    error: BaseException | None = None
    run: Any = None
    latents: torch.Tensor | None = None


@torch.inference_mode()
def denoise_together(engine, members: list[Member]) -> None:
    """The engine's loop (engine.denoise) for several requests at once, step by step in lockstep; sets each
    member's `result` or `error` (a member's bad input or cancellation is its own)."""
    active: list[Member] = []
    for member in members:
        try:
            engine.check(member.params)
            engine.check_conditioning(member.params, member.tensors)
            member.run = engine.denoising.start(member.params, member.tensors, engine.device)
            member.latents = member.run.latents
            active.append(member)
        except Exception as error:   # noqa: BLE001  (the member's own error, sent to it alone)
            member.error = error
    if not active:
        return
    total = len(active[0].run.timesteps)
    steps = metrics.StepTimer(engine.model_name)
    for i in range(total):
        for member in active:
            if member.cancelled():
                logger.info("request %s cancelled at step %d of %d; the batch goes on", member.params.request_id, i,
                            total)
                member.error = Cancelled(f"cancelled at step {i} of {total}")
        active = [member for member in active if member.error is None]
        if not active:
            return
        calls = [m.run.step_call(m.latents, m.run.timesteps[i], i) for m in active]
        with engine.attention.scope():
            predictions = predict_together(calls, engine.predict_noise)
        previews: list[torch.Tensor | None] = []
        for member, noise_pred in zip(active, predictions, strict=True):
            every = member.params.preview_every if member.on_preview is not None else 0
            previews.append(engine.preview(member.run, member.latents, noise_pred, i)
                            if every and (i + 1) % every == 0 and i + 1 < total else None)
            t = member.run.timesteps[i]
            latents = member.run.scheduler.step(noise_pred, t, member.latents, return_dict=False)[0]
            member.latents = member.run.after_step(latents, i)
        steps.lap()
        for member, preview in zip(active, previews, strict=True):
            if member.on_step is not None:
                member.on_step(i + 1, total)
            if preview is not None:
                member.on_preview(i + 1, total, preview.cpu())
    for member in active:
        member.result = member.run.result(member.latents)
    steps.done()


def run_batch(engine, members: list[Member]) -> None:
    """A batch of one runs the engine's own loop (today's path, step caching included); more run together."""
    if len(members) > 1:
        denoise_together(engine, members)
        return
    member = members[0]
    try:
        member.result = engine.denoise(member.params, member.tensors, member.on_step, member.cancelled,
                                       member.on_preview)
    except Exception as error:   # noqa: BLE001  (the member's own, re-raised in its handler)
        member.error = error


# 4. Forming batches from the requests that wait

@dataclasses.dataclass(eq=False)
class _Waiting:
    member: Member
    key: tuple
    arrived: float
    future: asyncio.Future


class BatchQueue:
    """Requests wait here for the device; each time it is free, the oldest one runs with the waiting requests of its
    batch key (up to `max_batch` outputs), after waiting at most `wait_ms` from its arrival for more to come."""

    def __init__(self, engine, options: BatchOptions) -> None:
        self.engine = engine
        self.options = options
        self._pending: list[_Waiting] = []
        self._arrived = asyncio.Event()
        self._worker: asyncio.Task | None = None
        self.batches: list[tuple[str, ...]] = []     # each batch's request ids, most recent last (a short history)

    async def denoise(self, params: Sampling, tensors: Mapping[str, torch.Tensor],
                      on_step: Callable[[int, int], None] | None, cancelled: Callable[[], bool],
                      on_preview: Callable[[int, int, torch.Tensor], None] | None = None) -> torch.Tensor:
        member = Member(params, tensors, on_step, cancelled, on_preview)
        waiting = _Waiting(member, batch_key(params, tensors), time.monotonic(),
                           asyncio.get_running_loop().create_future())
        self._pending.append(waiting)
        self._arrived.set()
        if self._worker is None or self._worker.done():
            # In a context of its own: it serves every request, not the one whose call started it (logs' request id).
            self._worker = asyncio.get_running_loop().create_task(self._serve(), context=contextvars.Context())
        await waiting.future
        if member.error is not None:
            raise member.error
        return member.result

    def _partners(self, first: _Waiting) -> list[_Waiting]:
        batch, outputs = [first], first.member.params.num_outputs
        for other in self._pending:
            if other is first or other.key != first.key:
                continue
            if outputs + other.member.params.num_outputs > self.options.max_batch:
                continue
            batch.append(other)
            outputs += other.member.params.num_outputs
        return batch

    async def _serve(self) -> None:
        while self._pending:
            first = self._pending[0]
            deadline = first.arrived + self.options.wait_ms / 1000
            while True:
                batch = self._partners(first)
                outputs = sum(w.member.params.num_outputs for w in batch)
                left = deadline - time.monotonic()
                if outputs >= self.options.max_batch or left <= 0:
                    break
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), left)
                except TimeoutError:
                    pass
            for waiting in batch:
                self._pending.remove(waiting)
            ids = tuple(w.member.params.request_id for w in batch)
            self.batches = [*self.batches[-31:], ids]
            members = [w.member for w in batch]
            try:
                with logs.request_context(ids[0]):
                    if len(batch) > 1:
                        logger.info("denoising a batch of %d requests (%d outputs): %s", len(batch), outputs,
                                    " ".join(ids))
                    await asyncio.to_thread(run_batch, self.engine, members)
            except Exception as error:   # noqa: BLE001  (the batch's failure is each member's)
                for member in members:
                    if member.result is None and member.error is None:
                        member.error = error
            for waiting in batch:
                if not waiting.future.done():
                    waiting.future.set_result(None)
