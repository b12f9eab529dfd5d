"""The denoiser engine on one rank of a gang: the family-free loop (services/denoiser/engine.py) with each
transformer loaded for the gang (TP ranks read only their shard; every rank wraps it to split the sequence) and
the gang's noise predictor. Every rank builds one; the executor (executor.py) keeps them in step.
"""

from __future__ import annotations

import torch

from services.common.models import ModelDir
from services.common.platform import Platform
from services.denoiser.engine import DenoiserEngine
from services.denoiser.gang.attention import LSE_KERNELS
from services.denoiser.gang.distributed import Gang
from services.denoiser.gang.layout import GangLayout, LayoutError
from services.denoiser.gang.predict import GangNoisePredictor
from services.denoiser.gang.tensor_parallel import load_sharded_transformer
from services.denoiser.gang.transformer import ParallelTransformer
from services.families import family_for


def gang_engine(model: ModelDir, platform: Platform, dtype: torch.dtype | None, gang: Gang) -> DenoiserEngine:
    """This rank's engine. Fails with LayoutError, before loading anything, for a model the layout cannot split."""
    check_gang_model(model, gang.layout)
    tp = gang.axis("tp")
    lse_kernel = LSE_KERNELS[platform.lse_attention]

    def load(model: ModelDir, component: str, dtype: torch.dtype) -> ParallelTransformer:
        if tp.size > 1:
            whole = load_sharded_transformer(model.component_class(component), model.path / component, tp, dtype,
                                             gang.device)
        else:
            whole = model.load(component, dtype=dtype, device=gang.device)
        return ParallelTransformer(whole, gang, lse_kernel)

    return DenoiserEngine(model, platform, dtype, device=gang.device, load=load,
                          predict_noise=GangNoisePredictor(gang.axis("cfg")))


def check_gang_model(model: ModelDir, layout: GangLayout) -> None:
    """The model's family must be one the gang splits, and its heads and FFN must divide as the layout says."""
    family = family_for(model)
    if not family.supports_gang:
        raise LayoutError(f"{model.name}: the denoiser gang does not split {family.name} models yet; "
                          "serve this model on one device (--devices 1)")
    config = model.config("transformer")
    layout.check_model(int(config["num_attention_heads"]), int(config["ffn_dim"]))
