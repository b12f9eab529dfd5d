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

Equal to solo bit for bit on CPU (measured by tests/unit/test_batching.py): CPU kernels pick their blocking,
algorithm and thread split by the shape they are given, so a sample's bits depend on how many samples share the
call. A Linear over [batch, tokens, features] is one GEMM over batch x tokens rows, and MKL/oneDNN block by that
row count: [3, 11, 32] gives other bits than three [1, 11, 32] calls on an AVX-512 CPU (at 16 tokens they agree);
a convolution picks its algorithm by batch, and SDPA, the norms, activations (vector body against scalar tail)
and the timestep embedding's sin/cos split their work by size. Which shapes differ depends on the CPU and the
library build, so no shape is taken as safe: within a batched call every module that computes runs once per
member (`make_batch_invariant`), and all that runs over the whole batch is element-wise +, - and * (rounded per
element, the same in any layout), reshapes and concatenations: on CPU a batch runs its members' kernels in turn.
On a GPU the modules run batched (that is where batching pays) and GEMM kernels are picked by shape too, so there
a batched output is within rounding of solo, not bit-equal (bench/batching.py reports the difference it
measures).

With `--compile` (compile.py) the blocks are compiled for static shapes, so a batch of n outputs compiles them once
for n (the engine logs it as for an un-warmed size; `--warmup-sizes` compiles n = 1..--max-batch). On CPU the
per-member modules run inside the compiled blocks too: dynamo guards on the members' output counts, so there each
member layout (1+2, 2+1, ...) is a graph of its own.
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

_MEMBERS = "_diffmesh_batch_members"     # a batch-invariant transformer's _Members


class _Members:
    """The outputs each member brings to the transformer call running now, in batch order; None outside a batched
    call. An attribute of the transformer, not a ContextVar: dynamo cannot trace `ContextVar.get`, so with
    `--compile` each per-member module broke its block's graph (measured on the tiny Wan: 48 graph breaks, 45
    graphs for one batch), while an attribute it reads into the graph and guards on. One batch runs at a time on an
    engine (the BatchQueue's one worker), so one value per transformer is enough."""

    sizes: tuple[int, ...] | None = None


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
    """Within a batched call, run every module that computes (`_PER_MEMBER`: Linear of any rank, convolutions,
    norms, activations, timestep embeddings, attention with its projections, matmuls and SDPA) once per member, so
    that every member's kernels see the shapes of its solo call and give its bits (see the module docstring for
    why no shape is safe). Outside a batched call the modules run as they were."""
    members = _Members()
    setattr(transformer, _MEMBERS, members)
    for module in transformer.modules():
        if isinstance(module, _PER_MEMBER):
            module.forward = _per_member(module.forward, members)
    return transformer


def _per_member_classes() -> tuple[type, ...]:
    from diffusers.models import activations, attention, attention_processor, embeddings, normalization

    def defined_in(module) -> tuple[type, ...]:
        return tuple(c for c in vars(module).values() if isinstance(c, type) and issubclass(c, torch.nn.Module)
                     and c.__module__ == module.__name__)

    # Every kind that runs kernels over the rows it is given. Not position embedders: their output has no batch.
    return (torch.nn.Linear, torch.nn.modules.conv._ConvNd, torch.nn.LayerNorm, torch.nn.GroupNorm,
            torch.nn.RMSNorm, normalization.RMSNorm, embeddings.Timesteps, attention.AttentionModuleMixin,
            attention_processor.Attention, *defined_in(torch.nn.modules.activation), *defined_in(activations))


_PER_MEMBER = _per_member_classes()


def _per_member(forward: Callable[..., Any], members: _Members) -> Callable[..., Any]:
    """`forward` once per member on its slice of each batched tensor argument: one whose dim 0 is the batch's
    outputs, or k times them (Wan2.2 TI2V flattens its per-token timesteps to batch x tokens, batch-major, so a
    member's rows are k x its outputs). Slicing dim 0 is exact for every `_PER_MEMBER` kind (each treats dim 0 as
    independent samples or rows); other arguments (rotary tables: tuples) go to each member whole. A slice keeps
    the solo tensor's strides, and its 64-byte alignment (which MKL's GEMM can round by) wherever a member's rows
    fill whole cache lines, as the families' feature widths (multiples of 16) do. The outputs, a tensor or a tuple of
    them, are concatenated in batch order."""
    def run(*args: Any, **kwargs: Any) -> Any:
        sizes = members.sizes
        values = [*args, *kwargs.values()]
        rows = [0] * len(values) if sizes is None else [
            v.shape[0] // sum(sizes) if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] % sum(sizes) == 0
            else 0 for v in values]
        if not any(rows):        # outside a batched call, or nothing batched in this one
            return forward(*args, **kwargs)
        columns = [v.split([k * size for size in sizes]) if k else [v] * len(sizes) for v, k in zip(values, rows)]
        members.sizes = None     # inside, a member's modules run as in its solo call (none splits again)
        try:
            outs = [forward(*one[:len(args)], **dict(zip(kwargs, one[len(args):]))) for one in zip(*columns)]
        finally:
            members.sizes = sizes
        if isinstance(outs[0], tuple):
            return tuple(torch.cat(column) for column in zip(*outs))
        return torch.cat(outs)
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
    members: _Members | None = getattr(calls[0].model, _MEMBERS, None)     # None: not batch-invariant (a GPU)
    if members is not None:
        members.sizes = sizes
    try:
        out = calls[0].model(**_joined([getattr(call, branch) for call in calls], calls[0].batched),
                             return_dict=False)[0]
    finally:
        if members is not None:
            members.sizes = None
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
        # Compiled blocks compile for the batch's outputs (static shapes), again after a member leaves.
        first = active[0].params
        engine.note_compile((first.width, first.height, first.num_frames, sum(m.params.num_outputs for m in active)),
                            first.request_id, "this batch")
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
