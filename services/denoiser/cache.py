"""Step caching per request (off by default): diffusers' cache hooks on the request's transformers, for one run.

A request's `cache` names a method diffusers implements: `first_block` (First Block Cache: skip the remaining blocks
when the first block's residual changed less than `threshold`, relative), `taylorseer` (TaylorSeer: full forwards
every `interval` steps after `warmup_steps`, Taylor-extrapolated attention outputs between) and `magcache`
(MagCache: skip while the accumulated magnitude-ratio error stays under `threshold`; it needs the checkpoint's
calibrated ratios, which diffusers ships for FLUX only, so another family must pass `mag_ratios`). TeaCache is not in
diffusers (nor in another library this project takes), so it is refused naming `cache.method`.

`StepCacheRun` enables the method on the transformers for one denoising run and disables it afterwards: the hooks
are gone, nothing of the run's cache state stays allocated, and the next uncached request runs the model's own
forward, bit for bit as before. The noise predictors (predict.py, gang/predict.py) enter `branch(model,
"cond"|"uncond")` around each call, as diffusers' pipelines enter `cache_context`, so each CFG branch keeps its own
cache state.

In a gang every rank must take the same skip decision: taylorseer and magcache decide from the step index and fixed
ratios, the same on every rank; first_block decides from the first block's residual, of which a sequence-parallel
rank sees only its shard. `Agreement` makes that decision collective: the two sums the metric is made of are
all-reduced over the sequence group, and the resulting compute/skip flag is all-reduced with MAX over the whole gang
(a rank skips only if every rank would). That also makes a CFG-parallel gang's cond and uncond ranks skip the same
steps (both compute if either branch's metric says so). On one device each branch decides alone, as in diffusers'
pipelines.

With `--compile` (compile.py compiles each block's forward) the hooks on the blocks (first_block, magcache) wrap the
compiled forward and run eagerly around it: the cached run uses the uncached run's graphs and compiles nothing. The
TaylorSeer hooks sit on attention modules inside the blocks, so dynamo would trace them into the block's graph:
their decision is a graph break and their state update reads the step counter, a recompile per computed step
(measured on the tiny Wan: 13 graphs for 8 steps, 25 for 20, up to the recompile limit, past which the block runs
eagerly). So on a compiled transformer the hooked attention modules run eagerly (`torch.compiler.disable`): the
block's graph breaks around them, into a fixed number of pieces whatever the steps (3 per size for Wan, 4 for FLUX's
two block classes), and the blocks run their variant meanwhile (compile.graphs_apart), whose graphs never serve an
uncached call.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist

from services.common.errors import InvalidArgument
from services.denoiser.axes import AxisGroup
from services.denoiser.compile import blocks_compiled, graphs_apart

logger = logging.getLogger(__name__)

METHODS = ("first_block", "taylorseer", "magcache")
NOT_AVAILABLE = {"teacache": "teacache is not available: diffusers has no TeaCache hooks; first_block (First Block "
                             "Cache, TeaCache's successor in diffusers) caches the same way"}
DEFAULT_THRESHOLD = {"first_block": 0.05, "magcache": 0.06}     # diffusers' defaults
DEFAULT_INTERVAL, DEFAULT_WARMUP_STEPS = 5, 3                   # taylorseer: diffusers' defaults
FAMILY_MAG_RATIOS = {"flux": "FLUX_MAG_RATIOS"}                 # diffusers.hooks.mag_cache's calibrated ratios
# The modules TaylorSeer extrapolates: diffusers' default patterns (fullmatch "^blocks.*attn") miss Wan's attn1/attn2
TAYLORSEER_MODULES = {"wan": [r"^blocks\.\d+\.attn[12]$"]}
_SESSION = "_diffmesh_step_cache"                               # the run, on each transformer it caches


@dataclasses.dataclass(frozen=True)
class StepCache:
    """A request's `cache` option. Unset numbers take the method's diffusers default."""

    method: str
    threshold: float | None = None          # first_block, magcache
    interval: int | None = None             # taylorseer: steps between full forwards
    warmup_steps: int | None = None         # taylorseer: full forwards before caching starts
    mag_ratios: tuple[float, ...] = ()      # magcache: the checkpoint's calibrated ratios (FLUX: diffusers')

    def describe(self) -> str:
        if self.method == "taylorseer":
            return (f"taylorseer interval={self.interval or DEFAULT_INTERVAL} "
                    f"warmup_steps={self.warmup_steps if self.warmup_steps is not None else DEFAULT_WARMUP_STEPS}")
        return f"{self.method} threshold={self.threshold_or_default()}"

    def threshold_or_default(self) -> float:
        return DEFAULT_THRESHOLD[self.method] if self.threshold is None else self.threshold


def check_cache(cache: StepCache | None, family: str | None = None) -> None:
    """Fields first (the gateway calls this without a family), then what the family can take."""
    if cache is None:
        return
    if cache.method in NOT_AVAILABLE:
        raise InvalidArgument("cache.method", NOT_AVAILABLE[cache.method])
    if cache.method not in METHODS:
        raise InvalidArgument("cache.method", f"{cache.method!r} is not one of {', '.join(METHODS)}")
    if cache.threshold is not None:
        if cache.method == "taylorseer":
            raise InvalidArgument("cache.threshold", "taylorseer takes no threshold (it caches by interval)")
        if not (math.isfinite(cache.threshold) and 0 < cache.threshold <= 10):
            raise InvalidArgument("cache.threshold", f"{cache.threshold} is outside (0, 10]")
    if cache.method != "taylorseer" and (cache.interval is not None or cache.warmup_steps is not None):
        field = "cache.interval" if cache.interval is not None else "cache.warmup_steps"
        raise InvalidArgument(field, f"applies to taylorseer only, not {cache.method}")
    if cache.interval is not None and not 1 <= cache.interval <= 100:
        raise InvalidArgument("cache.interval", f"{cache.interval} is outside 1..100")
    if cache.warmup_steps is not None and not 0 <= cache.warmup_steps <= 200:
        raise InvalidArgument("cache.warmup_steps", f"{cache.warmup_steps} is outside 0..200")
    if cache.mag_ratios:
        if cache.method != "magcache":
            raise InvalidArgument("cache.mag_ratios", f"applies to magcache only, not {cache.method}")
        if not all(math.isfinite(r) and r > 0 for r in cache.mag_ratios):
            raise InvalidArgument("cache.mag_ratios", "every ratio must be finite and > 0")
    if family is not None and cache.method == "magcache" and not cache.mag_ratios and family not in FAMILY_MAG_RATIOS:
        raise InvalidArgument("cache.method", f"magcache needs this {family} model's calibrated magnitude ratios "
                                              "(cache.mag_ratios); diffusers ships them for FLUX only")


def cache_from_proto(message) -> StepCache:
    """A CacheConfig message (denoiser.proto) as the request's StepCache; unset numbers stay unset."""
    return StepCache(
        method=message.method,
        threshold=message.threshold if message.HasField("threshold") else None,
        interval=message.interval if message.HasField("interval") else None,
        warmup_steps=message.warmup_steps if message.HasField("warmup_steps") else None,
        mag_ratios=tuple(message.mag_ratios),
    )


def cache_to_proto(cache: StepCache | None):
    """The StepCache as a CacheConfig message for the denoiser; None (caching off) stays unset."""
    if cache is None:
        return None
    from diffmesh.v1 import denoiser_pb2

    return denoiser_pb2.CacheConfig(method=cache.method, threshold=cache.threshold, interval=cache.interval,
                                    warmup_steps=cache.warmup_steps, mag_ratios=list(cache.mag_ratios))


@dataclasses.dataclass
class Agreement:
    """Who must agree on a first_block decision: the ranks holding other shards of the same branch (`sequence`:
    their metric sums add up), and the whole gang (`everyone`, None: the default group), which skips only if all
    would."""

    sequence: AxisGroup
    everyone: dist.ProcessGroup | None = None


def _diffusers_config(cache: StepCache, family: str, steps: int):
    from diffusers.hooks import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig

    if cache.method == "first_block":
        return FirstBlockCacheConfig(threshold=cache.threshold_or_default())
    if cache.method == "taylorseer":
        # float32 Taylor factors: bf16 ones (diffusers' default) would add their own rounding to the cached steps
        return TaylorSeerCacheConfig(
            cache_interval=cache.interval or DEFAULT_INTERVAL,
            disable_cache_before_step=DEFAULT_WARMUP_STEPS if cache.warmup_steps is None else cache.warmup_steps,
            taylor_factors_dtype=torch.float32, cache_identifiers=TAYLORSEER_MODULES.get(family))
    from diffusers.hooks import mag_cache

    ratios = list(cache.mag_ratios) if cache.mag_ratios else getattr(mag_cache, FAMILY_MAG_RATIOS[family])
    return MagCacheConfig(threshold=cache.threshold_or_default(), num_inference_steps=steps,
                          mag_ratios=torch.as_tensor(ratios, dtype=torch.float32))


@functools.cache     # one class for all requests, not a new type per request (dynamo guards on types, were it to trace)
def _fbc_head_hook_class():
    from diffusers.hooks.first_block_cache import FBCHeadBlockHook

    class AgreedHeadHook(FBCHeadBlockHook):
        """diffusers' head-block hook with its decision (`_should_compute_remaining_blocks`, the only part
        overridden) made collective across a gang, and each decision recorded (local and agreed) so the tests can
        check that ranks whose local metrics disagree still act alike."""

        agreement: Agreement | None = None
        # (branch, this rank's metric, computed by it alone, computed); one device records no metric (nan)
        decisions: list[tuple[str, float, bool, bool]]

        @torch.compiler.disable
        def _should_compute_remaining_blocks(self, hidden_states_residual: torch.Tensor) -> bool:
            state = self.state_manager.get_state()
            name = self.state_manager.context.name
            if state.head_block_residual is None:
                # The first step computes on every rank (there is nothing cached yet): nothing to agree on.
                self.decisions.append((name, math.inf, True, True))
                return True
            if self.agreement is None:
                # One device: diffusers' own decision, exactly.
                computed = super()._should_compute_remaining_blocks(hidden_states_residual)
                self.decisions.append((name, math.nan, computed, computed))
                return computed
            previous = state.head_block_residual
            # mean|r - r'| / mean|r'| over the whole sequence = the ratio of the sums over all shards
            sums = torch.stack([(hidden_states_residual - previous).abs().sum(), previous.abs().sum()]).float()
            local = (sums[0] / sums[1]).item()
            sequence = self.agreement.sequence
            if sequence.size > 1:
                dist.all_reduce(sums, group=sequence.group)
            flag = (sums[0] / sums[1] > self.threshold).to(torch.int32).reshape(1)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.agreement.everyone)
            computed = bool(flag.item())
            self.decisions.append((name, local, local > self.threshold, computed))
            return computed

    return AgreedHeadHook


@dataclasses.dataclass(frozen=True)
class CacheCounts:
    """What a finished run leaves (engine.last_cache): its counts and first_block's decisions, plain numbers only.
    Nothing of the run's cache state outlives it here (see StepCacheRun.__exit__)."""

    cache: StepCache
    forwards: int
    skipped: int
    # first_block: every head decision of the run, in order (branch, this rank's metric, alone, agreed)
    decisions: tuple[tuple[str, float, bool, bool], ...] = ()

    def summary(self) -> str:
        return f"step cache {self.cache.describe()}: skipped {self.skipped} of {self.forwards} transformer forwards"


class StepCacheRun:
    """One request's caching on its transformers: enabled on enter, disabled (hooks removed, their state freed) on
    exit. Counts the forwards each branch skipped."""

    def __init__(self, cache: StepCache, transformers: Sequence[torch.nn.Module], family: str, steps: int,
                 agreement: Agreement | None = None) -> None:
        self.cache = cache
        self.models = [unwrap(model) for model in transformers]
        self.config = _diffusers_config(cache, family, steps)
        self.agreement = agreement
        self.forwards = 0
        self.skipped = 0
        # first_block: every head decision of the run, in order (all transformers' head hooks append here)
        self.decisions: list[tuple[str, float, bool, bool]] = []
        self._hooks: list[tuple[torch.nn.Module, object]] = []     # (module, hook) that enable_cache registered
        self._apart = contextlib.ExitStack()

    def __enter__(self) -> StepCacheRun:
        for model in self.models:
            before = {id(hook) for _, hook in _hooks(model)}
            model.enable_cache(self.config)
            self._hooks += [(module, hook) for module, hook in _hooks(model) if id(hook) not in before]
            setattr(model, _SESSION, self)
            if self.cache.method == "taylorseer" and blocks_compiled(model):
                _run_eagerly(model, "taylorseer_cache")     # see the module docstring
                self._apart.enter_context(graphs_apart(model))
            if self.cache.method == "first_block":
                hook = _head_hook(model, "fbc_leader_block_hook")
                hook.__class__ = _fbc_head_hook_class()     # same state and registration; agreed decision
                hook.agreement, hook.decisions = self.agreement, self.decisions
        return self

    def __exit__(self, *exc) -> None:
        self._apart.close()
        for model in self.models:
            if getattr(model, _SESSION, None) is self:
                delattr(model, _SESSION)
            if model.is_cache_enabled:
                model.disable_cache()
            _restore_own_forwards(model)
        # Removed, a hook is not yet freed: it and its `fn_ref` (diffusers' HookFunctionReference, holding the hook's
        # bound methods) reference each other, so only a full collection of cyclic garbage frees it, which a serving
        # process seldom runs (CPython 3.11: once the long-lived objects grew by a quarter). Its state stayed
        # allocated meanwhile: TaylorSeer's is each hooked attention's output and first difference per branch (Wan2.1
        # 1.3B at 832x480x81: 30 blocks x 2 attentions x 2 branches x 2 float32 [32760, 1536] = 45 GiB), and the
        # next request's came on top (on an H200 the second such request ran out of memory at 89.5 GiB). So the
        # state goes now, and the cycle is cut so that the hooks go too.
        for module, hook in self._hooks:
            if hook._is_stateful:
                hook.reset_state(module)
            hook.fn_ref = None
        self._hooks = []

    def counts(self) -> CacheCounts:
        return CacheCounts(self.cache, self.forwards, self.skipped, tuple(self.decisions))

    def computed(self, model: torch.nn.Module) -> bool:
        """Whether the branch just run (its cache context still set) ran all its blocks."""
        if self.cache.method == "first_block":
            return _head_hook(model, "fbc_leader_block_hook").state_manager.get_state().should_compute
        if self.cache.method == "magcache":
            return _head_hook(model, "mag_cache_leader_block_hook").state_manager.get_state().should_compute
        hook = _head_hook(model, "taylorseer_cache")
        step = hook.state_manager.get_state().current_step       # as TaylorSeerCacheHook._measure_should_compute
        return (step < hook.disable_cache_before_step
                or (step - hook.disable_cache_before_step - 1) % hook.cache_interval == 0)

    def summary(self) -> str:
        return self.counts().summary()


def unwrap(model) -> torch.nn.Module:
    """The diffusers model under a gang's sequence-parallel wrapper (which keeps it as `.model`)."""
    return model if isinstance(model, torch.nn.Module) else model.model


def _run_eagerly(model: torch.nn.Module, hook: str) -> None:
    """Each module carrying `hook` runs its hook chain, and its own forward within, outside dynamo's graphs (the
    chain's end is the module's `forward`, which the hook's removal replaces, so the wrapper goes with it)."""
    for module in model.modules():
        registry = getattr(module, "_diffusers_hook", None)
        if registry is not None and registry.get_hook(hook) is not None:
            module.forward = torch.compiler.disable(module.forward)


def _restore_own_forwards(model: torch.nn.Module) -> None:
    """Drop the `forward` attributes that removing a hook leaves on its modules (the class's own bound method,
    which `HookRegistry.remove_hook` puts back as an instance attribute): the module is then exactly as before
    the run, and a compiled block that calls it does not recompile for the changed attribute."""
    for module in model.modules():
        forward = vars(module).get("forward")
        if getattr(forward, "__self__", None) is module and getattr(forward, "__func__", None) is type(module).forward:
            del module.forward


def _hooks(model: torch.nn.Module) -> Iterator[tuple[torch.nn.Module, object]]:
    """Every diffusers hook on the model's modules, with its module."""
    for module in model.modules():
        registry = getattr(module, "_diffusers_hook", None)
        if registry is not None:
            yield from ((module, hook) for hook in registry.hooks.values())


def _head_hook(model: torch.nn.Module, name: str):
    for module in model.modules():
        registry = getattr(module, "_diffusers_hook", None)
        if registry is not None and registry.get_hook(name) is not None:
            return registry.get_hook(name)
    raise RuntimeError(f"no {name} on {type(model).__name__}")


@contextlib.contextmanager
def branch(model, name: str) -> Iterator[None]:
    """Around one CFG branch's forward: its own cache state (diffusers' `cache_context`), when caching is on."""
    target = unwrap(model)
    run: StepCacheRun | None = getattr(target, _SESSION, None)
    if run is None:
        yield
        return
    with target.cache_context(name):
        yield
        run.forwards += 1
        run.skipped += not run.computed(target)
