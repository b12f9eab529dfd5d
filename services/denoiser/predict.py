"""Noise predictors: where a step's guidance branches run. The denoising loop hands each step's `StepCall` to one
(`NoisePredictor`); this one runs the branches on this device in turn, in the pipelines' order (cond, then uncond),
so the numbers equal diffusers'. The gang has its own (services/denoiser/gang/predict.py: CFG-parallel, outputs
split across ranks)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from services.denoiser.cache import branch
from services.families.base import StepCall

NoisePredictor = Callable[[StepCall], torch.Tensor]


def guided(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance as every served pipeline writes it."""
    return uncond + scale * (cond - uncond)


def predict_on_one_device(call: StepCall) -> torch.Tensor:
    # Each branch in its own cache context (a no-op unless the request caches steps: services/denoiser/cache.py)
    with branch(call.model, "cond"):
        noise = call.model(**call.cond, return_dict=False)[0]
    if call.uncond is None:
        return noise
    with branch(call.model, "uncond"):
        noise_uncond = call.model(**call.uncond, return_dict=False)[0]
    return guided(noise, noise_uncond, call.scale)
