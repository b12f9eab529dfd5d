"""The gang's executor: every rank runs the same DenoiserEngine loop in lockstep. Rank 0 (the leader) takes each
request from the gRPC servicer, checks it, hands it to the other ranks over the CPU control group and runs its
share; every other rank follows, running what the leader hands it until it says stop.

Per step, the ranks first agree whether the request was cancelled (an all-reduce of the leader's flag), so a
cancellation stops all of them at the same step and the gang is ready for the next request. A rank that fails or
is gone breaks the gang: the request fails with GangBroken (UNAVAILABLE) and the executor says so through
`on_broken`; what the process does about it is the worker's decision (worker.py), not the executor's.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping

import torch

from services.common.errors import Cancelled, Unavailable
from services.denoiser.engine import DenoiseParams, DenoiserEngine, PreviewCallback, StepCallback
from services.denoiser.gang.distributed import STOP, Gang, LeaderAndFollowers  # noqa: F401  (STOP: re-exported)
from services.families.base import Limits

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DenoiseMessage:
    """What the leader broadcasts for each request (tensors on the CPU, pickled over the gloo group)."""

    params: DenoiseParams
    tensors: dict[str, torch.Tensor]


class GangBroken(Unavailable):
    """A rank failed or is gone; the gang's ranks are no longer in step and the process must exit. The client
    sees UNAVAILABLE naming the stage: a retry succeeds once the gang has restarted."""

    def __init__(self, reason: str) -> None:
        super().__init__("denoiser", f"{reason}; the gang is restarting")


class GangExecutor(LeaderAndFollowers):
    """Serves like an engine on the leader (what the servicer calls); `follow()` on every other rank.

    `on_broken` is called on the leader, from the request's thread, just before GangBroken is raised: the error
    itself goes to the servicer, which answers the client, so this is how the worker hears of it."""

    def __init__(self, engine: DenoiserEngine, gang: Gang, on_broken: Callable[[], None] = lambda: None) -> None:
        self.engine = engine
        self.gang = gang
        self.on_broken = on_broken

    # What the servicer reads and checks: the leader's engine's own -------------------------------------------

    @property
    def model_name(self) -> str:
        return self.engine.model_name

    @property
    def limits(self) -> Limits:
        return self.engine.limits

    @property
    def conditioning_names(self) -> tuple[str, ...]:
        return self.engine.conditioning_names

    def check(self, params: DenoiseParams) -> None:
        self.engine.check(params)

    def check_conditioning(self, params: DenoiseParams, tensors: Mapping[str, torch.Tensor]) -> None:
        self.engine.check_conditioning(params, tensors)

    # The leader: check -> hand over -> run ------------------------------------------------------------------

    def denoise(self, params: DenoiseParams, tensors: Mapping[str, torch.Tensor],
                on_step: StepCallback | None = None, cancelled: Callable[[], bool] = lambda: False,
                on_preview: PreviewCallback | None = None) -> torch.Tensor:
        """Checked here first, so that a bad request fails on the leader alone and the gang stays in step. Only the
        leader previews: every rank holds the whole latents after each step (the sequence-parallel transformer
        gathers its output, and every rank runs the scheduler), and a preview is local work with no collective, so
        the followers skip it without falling out of step."""
        self.check(params)
        self.check_conditioning(params, tensors)
        message = DenoiseMessage(params, {name: tensor.cpu() for name, tensor in tensors.items()})
        try:
            self._hand_over(message)
            return self._run(params, message.tensors, on_step, lambda: self.gang.any_rank(cancelled()), on_preview)
        except GangBroken:
            self.on_broken()
            raise

    def broken(self, reason: str) -> GangBroken:
        return GangBroken(reason)

    # Every other rank: follow (LeaderAndFollowers.follow) -----------------------------------------------------

    def _follow(self, message: DenoiseMessage) -> None:
        try:
            self._run(message.params, message.tensors, None, lambda: self.gang.any_rank(False))
        except Cancelled:
            pass

    def _run(self, params: DenoiseParams, tensors: Mapping[str, torch.Tensor], on_step: StepCallback | None,
             cancelled: Callable[[], bool], on_preview: PreviewCallback | None = None) -> torch.Tensor:
        try:
            return self.engine.denoise(params, tensors, on_step, cancelled, on_preview)
        except Cancelled:
            raise
        except BaseException:
            # A rank that failed mid-loop leaves the others inside a collective: the gang cannot go on.
            logger.exception("gang rank %d failed during a request; the gang must restart", self.gang.rank)
            raise GangBroken(f"the gang failed during the request (seen by rank {self.gang.rank})") from None
