"""The gang's noise predictor: where a step's branches run when the gang has cfg ranks.

With guidance, CFG-parallel: cfg rank 0 predicts the conditional branch, rank 1 the unconditional, then both hold
both. Unguided with several outputs there are no branches to split, so the cfg ranks split the outputs. Anything
else (no cfg axis, one unguided output) runs as on one device, each rank's transformer splitting its sequence or
heads as the gang's other axes say.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from services.denoiser.axes import AxisGroup
from services.denoiser.cache import branch
from services.denoiser.predict import guided, predict_on_one_device
from services.families.base import StepCall


class GangNoisePredictor:
    def __init__(self, cfg: AxisGroup) -> None:
        self.cfg = cfg

    def __call__(self, call: StepCall) -> torch.Tensor:
        batch = call.batch_size
        if self.cfg.size == 1 or (call.uncond is None and batch == 1):
            return predict_on_one_device(call)
        if call.uncond is None:
            return predict_outputs_split(call, self.cfg, batch)
        return predict_cfg_parallel(call, self.cfg)


def predict_cfg_parallel(call: StepCall, cfg: AxisGroup) -> torch.Tensor:
    """cfg rank 0 runs the conditional branch, rank 1 the unconditional; both gather both and combine them."""
    name = "cond" if cfg.index == 0 else "uncond"
    with branch(call.model, name):      # its own cache state; the ranks' skip decisions agree (cache.py)
        mine = call.model(**(call.cond if cfg.index == 0 else call.uncond), return_dict=False)[0].contiguous()
    branches = [torch.empty_like(mine) for _ in range(cfg.size)]
    dist.all_gather(branches, mine, group=cfg.group)
    noise_pred, noise_uncond = branches
    return guided(noise_pred, noise_uncond, call.scale)


def predict_outputs_split(call: StepCall, cfg: AxisGroup, count: int) -> torch.Tensor:
    """Unguided, `count` outputs: each cfg rank takes an equal share (the last sample repeated where they do not
    divide, so every rank's all-gather buffer has one shape), then all gather them."""
    share = -(-count // cfg.size)
    start = cfg.index * share
    device = call.cond["hidden_states"].device
    picked = torch.arange(start, start + share, device=device).clamp(max=count - 1)
    kwargs = {name: value[picked] if name in call.batched else value for name, value in call.cond.items()}
    with branch(call.model, "cond"):
        mine = call.model(**kwargs, return_dict=False)[0].contiguous()
    shares = [torch.empty_like(mine) for _ in range(cfg.size)]
    dist.all_gather(shares, mine, group=cfg.group)
    return torch.cat(shares)[:count]
