"""The denoiser engine on one rank of a gang: the family-free loop (services/denoiser/engine.py) with each
transformer loaded for the gang (TP ranks read only their shard; with `--shard-weights` each rank keeps only its
shard of every block, sharded_weights.py; every rank wraps it to split the sequence) and the gang's noise
predictor. Every rank builds one; the executor (executor.py) keeps them in step.
"""

from __future__ import annotations

import torch

from services.common.models import ModelDir
from services.common.platform import Platform
from services.denoiser.cache import Agreement
from services.denoiser.compile import CompileOptions
from services.denoiser.engine import DenoiserEngine
from services.denoiser.gang.attention import LSE_KERNELS
from services.denoiser.gang.distributed import Gang
from services.denoiser.gang.layout import GangLayout, LayoutError
from services.denoiser.gang.predict import GangNoisePredictor
from services.denoiser.gang.sharded_weights import log_resident_weights, shard_blocks
from services.families import family_for
from services.families.base import ParallelPlan


def gang_engine(model: ModelDir, platform: Platform, dtype: torch.dtype | None, gang: Gang,
                compile: CompileOptions | None = None, shard_weights: bool = False) -> DenoiserEngine:
    """This rank's engine. Fails with LayoutError, before loading anything, for a model the layout cannot split.
    `shard_weights`: each block's parameters sharded across the gang (flags.py has checked the layout allows it)."""
    plan = check_gang_model(model, gang.layout)
    tp = gang.axis("tp")
    lse_kernel = LSE_KERNELS[platform.lse_attention]

    def load(model: ModelDir, component: str, dtype: torch.dtype):
        if tp.size > 1:
            whole = plan.tensor_parallel(model.component_class(component), model.path / component, tp, dtype,
                                         gang.device)
        elif shard_weights:
            # Loaded on the host: the device never holds more than one block whole (shard_blocks).
            whole = model.load(component, dtype=dtype, device="cpu")
            log_resident_weights(gang, component, shard_blocks(whole, gang))
        else:
            whole = model.load(component, dtype=dtype, device=gang.device)
        return plan.sequence_parallel(whole, gang, lse_kernel)

    engine = DenoiserEngine(model, platform, dtype, device=gang.device, load=load,
                            predict_noise=GangNoisePredictor(gang.axis("cfg")), compile=compile)
    # first_block's skip decisions, made from each rank's shard, are agreed across the gang (services/denoiser/cache.py)
    engine.cache_agreement = Agreement(sequence=gang.axis("sequence"))
    return engine


def check_gang_model(model: ModelDir, layout: GangLayout) -> ParallelPlan:
    """The model's family must declare how the gang splits it, and its numbers must divide as the layout says."""
    family = family_for(model)
    plan = family.parallel_plan(model)
    if plan is None:
        raise LayoutError(f"{model.name}: the denoiser gang does not split this {family.name} model yet; "
                          "serve it on one device (--devices 1)")
    if layout.tp > 1 and plan.tensor_parallel is None:
        raise LayoutError(f"{model.name}: the {family.name} family has no tensor-parallel plan; use --tp 1")
    try:
        layout.check_model(plan.heads, dict(plan.tp_widths))
    except LayoutError as error:
        raise LayoutError(f"{model.name}: {error}") from None
    return plan
