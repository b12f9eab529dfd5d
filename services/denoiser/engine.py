"""The denoising loop: seed + conditioning tensors -> final latents.

Family-free: the model's family (services/families/) builds each request's run (timesteps, first latents,
each step's noise-prediction call); this loop drives it, checks for cancellation between steps and reports
each step. No I/O here: the server feeds it tensors and receives a callback per step.

Two things are handed in rather than decided here, so that a gang (services/denoiser/gang/) runs this same loop
on every rank: how a transformer is loaded (whole on this device by default; sharded and sequence-parallel in a
gang) and the noise predictor that runs each step's branches (predict.py; the gang's splits them across ranks).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import torch

from services.common.attention import current_attention
from services.common.errors import Cancelled
from services.common.limits import check_guidance, check_outputs, check_steps
from services.common.models import ModelDir
from services.common.platform import Platform
from services.denoiser.predict import NoisePredictor, predict_on_one_device
from services.families import family_for
from services.families.base import Sampling

logger = logging.getLogger(__name__)

# The request parameters the denoiser takes: the family-neutral set every stage shares.
DenoiseParams = Sampling
StepCallback = Callable[[int, int], None]      # (steps done, total steps)
TransformerLoad = Callable[[ModelDir, str, torch.dtype], torch.nn.Module]   # (model, component, dtype) -> module


class DenoiserEngine:
    def __init__(self, model: ModelDir, platform: Platform, dtype: torch.dtype | None = None,
                 device: torch.device | None = None, *, load: TransformerLoad | None = None,
                 predict_noise: NoisePredictor = predict_on_one_device) -> None:
        self.model_name = model.name
        self.platform = platform
        self.device = device or platform.device()
        self.family = family_for(model)
        self.limits = self.family.limits(model)
        self.predict_noise = predict_noise
        load = load or self.load_whole
        weights_dtype = dtype or platform.default_dtype()
        self.attention = current_attention()
        self.denoising = self.family.denoising(
            model, lambda component: self.attention.install(load(model, component, weights_dtype)), self.device)
        logger.info("denoiser loaded %s (%s family) on %s (%s)", model.path, self.family.name, self.device,
                    self.denoising.dtype)

    def load_whole(self, model: ModelDir, component: str, dtype: torch.dtype) -> torch.nn.Module:
        """A whole transformer on this device; where the gang's self-attention processor serves its family, it
        runs here too (with nothing to exchange: the same kernels, so one device and a gang compute the same
        numbers)."""
        transformer = model.load(component, dtype=dtype, device=self.device)
        self.family.install_kernels(transformer)
        return transformer

    @property
    def conditioning_names(self) -> tuple[str, ...]:
        return self.denoising.conditioning_names

    # 1. Check inputs
    def check(self, params: DenoiseParams) -> None:
        check_steps(params.num_inference_steps)
        check_guidance(params.guidance_scale)
        check_outputs(params.num_outputs)
        self.denoising.check(params)

    def check_conditioning(self, params: DenoiseParams, tensors: Mapping[str, torch.Tensor]) -> None:
        self.denoising.check_conditioning(params, tensors)

    @torch.inference_mode()
    def denoise(
        self,
        params: DenoiseParams,
        tensors: Mapping[str, torch.Tensor],
        on_step: StepCallback | None = None,
        cancelled: Callable[[], bool] = lambda: False,
    ) -> torch.Tensor:
        """Run the whole loop; returns float32 latents on the CPU. Raises Cancelled between steps if asked."""
        self.check(params)
        self.check_conditioning(params, tensors)
        # 2. The family's run: scheduler and timesteps, first latents (drawn on the CPU from the seed)
        run = self.denoising.start(params, tensors, self.device)
        latents = run.latents
        # 3. Denoising loop
        total = len(run.timesteps)
        for i, t in enumerate(run.timesteps):
            if cancelled():
                raise Cancelled(f"cancelled at step {i} of {total}")
            with self.attention.scope():
                noise_pred = self.predict_noise(run.step_call(latents, t, i))
            latents = run.scheduler.step(noise_pred, t, latents, return_dict=False)[0]
            latents = run.after_step(latents, i)
            if on_step is not None:
                on_step(i + 1, total)
        return run.result(latents)
