"""The denoising loop: seed + embeddings -> final latents, with classifier-free guidance.

Mirrors `WanPipeline.__call__` steps 4-6 (timesteps, latent preparation, denoising loop), so for the same
weights, seed and sizes it returns the latents diffusers returns. No I/O here: the server feeds it tensors
and receives a callback per step. The gang (services/denoiser/gang/) overrides `load_transformer` and
`predict_noise` and runs this same loop on every rank.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import torch
from diffusers.utils.torch_utils import randn_tensor

from services.common.errors import Cancelled, InvalidArgument
from services.common.limits import check_frames, check_guidance, check_outputs, check_side, check_steps
from services.common.models import ModelDir
from services.common.platform import Platform
from services.denoiser.attention import install_self_attention

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DenoiseParams:
    request_id: str
    width: int
    height: int
    num_frames: int
    num_inference_steps: int
    guidance_scale: float
    seed: int
    num_outputs: int = 1

    @property
    def guided(self) -> bool:
        """Classifier-free guidance is on when the scale exceeds 1, as in WanPipeline."""
        return self.guidance_scale > 1.0


StepCallback = Callable[[int, int], None]      # (steps done, total steps)


class DenoiserEngine:
    def __init__(self, model: ModelDir, platform: Platform, dtype: torch.dtype | None = None,
                 device: torch.device | None = None) -> None:
        self.model_name = model.name
        self.platform = platform
        self.device = device or platform.device()
        self.transformer = self.load_transformer(model, dtype or platform.default_dtype())
        self.scheduler_template = model.load("scheduler")
        vae_config = model.config("vae")
        self.vae_scale_temporal = int(vae_config.get("scale_factor_temporal", 4))
        self.vae_scale_spatial = int(vae_config.get("scale_factor_spatial", 8))
        config = self.transformer.config
        self.latent_channels = int(config.in_channels)
        self.text_dim = int(config.text_dim)
        self.size_multiple = self.vae_scale_spatial * int(config.patch_size[1])
        # The transformer's rotary embedding has positions for this many patches along each axis.
        self.max_patches = int(config.rope_max_seq_len)
        self.patch_size = tuple(int(p) for p in config.patch_size)
        logger.info("denoiser loaded %s on %s (%s)", model.path, self.device, self.transformer.dtype)

    def load_transformer(self, model: ModelDir, dtype: torch.dtype):
        """The whole transformer on this device, its self-attention run by the gang's processor (with nothing to
        exchange: the same kernels, so one device and a gang compute the same numbers); the gang loads its
        sharded form instead."""
        transformer = model.load("transformer", dtype=dtype, device=self.device)
        install_self_attention(transformer)
        return transformer

    # 1. Check inputs
    def check(self, params: DenoiseParams) -> None:
        check_side("width", params.width, self.size_multiple)
        check_side("height", params.height, self.size_multiple)
        check_frames(params.num_frames, self.vae_scale_temporal)
        check_steps(params.num_inference_steps)
        check_guidance(params.guidance_scale)
        check_outputs(params.num_outputs)
        _, _, frames, height, width = self.latent_shape(params)
        for field, latent, patch, scale in (("num_frames", frames, self.patch_size[0], self.vae_scale_temporal),
                                            ("height", height, self.patch_size[1], self.vae_scale_spatial),
                                            ("width", width, self.patch_size[2], self.vae_scale_spatial)):
            if latent // patch > self.max_patches:
                limit = self.max_patches * patch * scale
                raise InvalidArgument(field, f"{getattr(params, field)} exceeds this model's limit of about {limit}")

    def check_embeddings(self, params: DenoiseParams, prompt: torch.Tensor, negative: torch.Tensor | None) -> None:
        for name, embeds in (("prompt_embeds", prompt), ("negative_prompt_embeds", negative)):
            if embeds is None:
                if name == "negative_prompt_embeds" and params.guided:
                    raise InvalidArgument(name, "required when guidance_scale > 1")
                continue
            if embeds.dim() != 3 or embeds.shape[0] != 1 or embeds.shape[2] != self.text_dim:
                raise InvalidArgument(name, f"shape {list(embeds.shape)} is not [1, L, {self.text_dim}]")
            if not embeds.is_floating_point():
                raise InvalidArgument(name, f"dtype {embeds.dtype} is not a floating point type")

    def latent_shape(self, params: DenoiseParams) -> tuple[int, ...]:
        return (
            params.num_outputs,
            self.latent_channels,
            (params.num_frames - 1) // self.vae_scale_temporal + 1,
            params.height // self.vae_scale_spatial,
            params.width // self.vae_scale_spatial,
        )

    @torch.inference_mode()
    def denoise(
        self,
        params: DenoiseParams,
        prompt_embeds: torch.Tensor,
        negative_prompt_embeds: torch.Tensor | None,
        on_step: StepCallback | None = None,
        cancelled: Callable[[], bool] = lambda: False,
    ) -> torch.Tensor:
        """Run the whole loop; returns float32 latents on the CPU. Raises Cancelled between steps if asked."""
        self.check(params)
        self.check_embeddings(params, prompt_embeds, negative_prompt_embeds)
        dtype = self.transformer.dtype
        # 2. Embeddings: one copy per output, on the device, in the transformer's dtype
        prompt_embeds = prompt_embeds.to(self.device, dtype).repeat(params.num_outputs, 1, 1)
        if params.guided:
            negative_prompt_embeds = negative_prompt_embeds.to(self.device, dtype).repeat(params.num_outputs, 1, 1)

        # 3. Timesteps: a fresh scheduler per request, since schedulers keep per-run state
        scheduler = type(self.scheduler_template).from_config(self.scheduler_template.config)
        scheduler.set_timesteps(params.num_inference_steps, device=self.device)
        timesteps = scheduler.timesteps
        scheduler.set_begin_index(0)

        # 4. Latents: drawn on the CPU from the seed, so a seed means the same video on every device
        generator = torch.Generator("cpu").manual_seed(params.seed)
        latents = randn_tensor(self.latent_shape(params), generator=generator, dtype=torch.float32).to(self.device)

        # 5. Denoising loop
        total = len(timesteps)
        for i, t in enumerate(timesteps):
            if cancelled():
                raise Cancelled(f"cancelled at step {i} of {total}")
            noise_pred = self.predict_noise(latents.to(dtype), t.expand(latents.shape[0]), prompt_embeds,
                                            negative_prompt_embeds if params.guided else None, params.guidance_scale)
            latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
            if on_step is not None:
                on_step(i + 1, total)
        return latents.float().cpu()

    def predict_noise(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        prompt_embeds: torch.Tensor,
        negative_prompt_embeds: torch.Tensor | None,
        guidance_scale: float,
    ) -> torch.Tensor:
        """One guided noise prediction. Cond and uncond run as two passes, in WanPipeline's order, so the
        numbers match it exactly; the gang's CFG-parallel mode puts them on different ranks instead."""
        noise_pred = self.transformer(
            hidden_states=latents, timestep=timestep, encoder_hidden_states=prompt_embeds, return_dict=False
        )[0]
        if negative_prompt_embeds is None:
            return noise_pred
        noise_uncond = self.transformer(
            hidden_states=latents, timestep=timestep, encoder_hidden_states=negative_prompt_embeds, return_dict=False
        )[0]
        return noise_uncond + guidance_scale * (noise_pred - noise_uncond)

