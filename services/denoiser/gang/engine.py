"""The denoiser engine as a gang: every rank runs the same loop in lockstep; rank 0 (the leader) takes
requests from the gRPC server and hands each to the others over the CPU control group.

Per step, the ranks first agree whether the request was cancelled (an all-reduce of the leader's flag), so
a cancellation stops all of them at the same step and the gang is ready for the next request.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from collections.abc import Callable, Mapping

import torch
import torch.distributed as dist

from services.common.errors import Cancelled, Unavailable
from services.common.logs import request_context
from services.common.models import ModelDir
from services.common.platform import Platform
from services.denoiser.engine import DenoiseParams, DenoiserEngine, StepCallback
from services.denoiser.gang.attention import LSE_KERNELS
from services.denoiser.gang.distributed import Gang
from services.denoiser.gang.layout import LayoutError
from services.denoiser.gang.tensor_parallel import load_sharded_transformer
from services.denoiser.gang.transformer import ParallelTransformer
from services.denoiser.predict import guided
from services.families import family_for
from services.families.base import StepCall

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DenoiseMessage:
    """What the leader broadcasts for each request (tensors on the CPU, pickled over the gloo group)."""

    params: DenoiseParams
    tensors: dict[str, torch.Tensor]


STOP = "stop"


class GangDenoiserEngine(DenoiserEngine):
    def __init__(self, model: ModelDir, platform: Platform, dtype: torch.dtype | None, gang: Gang) -> None:
        self.gang = gang
        self.cfg = gang.axis("cfg")
        self.tp = gang.axis("tp")
        check_gang_family(model)
        config = model.config("transformer")
        gang.layout.check_model(int(config["num_attention_heads"]), int(config["ffn_dim"]))
        super().__init__(model, platform, dtype, device=gang.device)

    def load_transformer(self, model: ModelDir, component: str, dtype: torch.dtype):
        if self.tp.size > 1:
            full = load_sharded_transformer(model.component_class(component), model.path / component,
                                            self.tp, dtype, self.device)
        else:
            full = model.load(component, dtype=dtype, device=self.device)
        return ParallelTransformer(full, self.gang, LSE_KERNELS[self.platform.lse_attention])

    # The leader's side ------------------------------------------------------------------------------------

    def denoise(self, params: DenoiseParams, tensors: Mapping[str, torch.Tensor],
                on_step: StepCallback | None = None, cancelled: Callable[[], bool] = lambda: False) -> torch.Tensor:
        """Called on the leader by the server: checks, hands the request to every rank, runs its share."""
        self.check(params)
        self.check_conditioning(params, tensors)
        message = DenoiseMessage(params, {name: tensor.cpu() for name, tensor in tensors.items()})
        try:
            self._hand_over(message)
            return self._run_guarded(params, message.tensors, on_step, lambda: self.gang.any_rank(cancelled()))
        except GangBroken:
            # Let the error reach the client, then exit so the launcher (or Kubernetes) restarts the gang.
            threading.Timer(1.0, os._exit, (1,)).start()
            raise

    def _hand_over(self, message: DenoiseMessage) -> None:
        try:
            self.gang.broadcast_message(message)
        except Exception as error:
            # A rank that died or hung while the gang was idle is noticed here, when the request cannot reach it.
            logger.error("cannot hand the request to the gang: %s", error)
            raise GangBroken("a rank of the gang is gone") from None

    def release(self) -> None:
        """Tell the other ranks to exit (the leader is shutting down)."""
        self.gang.broadcast_message(STOP)

    # Every other rank ------------------------------------------------------------------------------------

    def follow(self) -> None:
        """Run the leader's requests until it says stop."""
        while True:
            message = self.gang.broadcast_message()
            if message == STOP:
                logger.info("gang rank %d stopping", self.gang.rank)
                return
            with request_context(message.params.request_id):
                try:
                    self._run_guarded(message.params, message.tensors, None, lambda: self.gang.any_rank(False))
                except Cancelled:
                    pass

    def _run_guarded(self, params, tensors, on_step, cancelled) -> torch.Tensor:
        try:
            return DenoiserEngine.denoise(self, params, tensors, on_step, cancelled)
        except Cancelled:
            raise
        except BaseException:
            # A rank that failed mid-loop leaves the others inside a collective: the gang cannot go on.
            logger.exception("gang rank %d failed during a request; the gang must restart", self.gang.rank)
            raise GangBroken(f"the gang failed during the request (seen by rank {self.gang.rank})") from None

    # The step, split across the gang ----------------------------------------------------------------------

    def predict_noise(self, call: StepCall) -> torch.Tensor:
        batch = call.cond["hidden_states"].shape[0]
        if self.cfg.size == 1 or (call.uncond is None and batch == 1):
            return super().predict_noise(call)
        if call.uncond is None:
            return self._predict_batch_split(call, batch)
        # CFG-parallel: cfg rank 0 predicts the conditional branch, rank 1 the unconditional, then both hold both.
        mine = call.model(**(call.cond if self.cfg.index == 0 else call.uncond), return_dict=False)[0].contiguous()
        branches = [torch.empty_like(mine) for _ in range(self.cfg.size)]
        dist.all_gather(branches, mine, group=self.cfg.group)
        noise_pred, noise_uncond = branches
        return guided(noise_pred, noise_uncond, call.scale)

    def _predict_batch_split(self, call: StepCall, count: int) -> torch.Tensor:
        """Unguided, several outputs: there are no branches to split, so the cfg ranks split the outputs. Each
        takes an equal share (the last sample repeated where they do not divide), then all gather them."""
        share = -(-count // self.cfg.size)
        start = self.cfg.index * share
        picked = torch.arange(start, start + share, device=self.device).clamp(max=count - 1)
        kwargs = {name: value[picked] if name in call.batched else value for name, value in call.cond.items()}
        mine = call.model(**kwargs, return_dict=False)[0].contiguous()
        shares = [torch.empty_like(mine) for _ in range(self.cfg.size)]
        dist.all_gather(shares, mine, group=self.cfg.group)
        return torch.cat(shares)[:count]


def check_gang_family(model: ModelDir) -> None:
    family = family_for(model)
    if not family.supports_gang:
        raise LayoutError(f"{model.name}: the denoiser gang does not split {family.name} models yet; "
                          "serve this model on one device (--devices 1)")


class GangBroken(Unavailable):
    """A rank failed or is gone; the gang's ranks are no longer in step and the process must exit. The client
    sees UNAVAILABLE naming the stage: a retry succeeds once the gang has restarted."""

    def __init__(self, reason: str) -> None:
        super().__init__("denoiser", f"{reason}; the gang is restarting")
