"""Wan image-to-video (`WanImageToVideoPipeline`): Wan2.1 I2V (CLIP vision image embeddings fed to the image
cross-attention), Wan2.2 I2V A14B (two experts, no image encoder) and Wan2.2 TI2V-5B's image path
(`expand_timesteps`: the first latent frame is the image's, with timestep 0), in a directory of that pipeline
or in TI2V-5B's own `WanPipeline` directory, where the image is optional (`WanTI2VDenoising`).

The conditioning image reaches three stages: the encoder runs CLIP vision on it ("image_embeds", where the
model has an image encoder), the decoder, which holds the VAE, encodes it as the first frame of the video
("condition_latents"), and the denoiser builds the pipeline's mask from the sizes and concatenates (or, with
expand_timesteps, blends) the condition with the latents at every step. Every part mirrors
`WanImageToVideoPipeline.__call__` and `prepare_latents`, so the mesh returns diffusers' latents and frames.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch
from diffusers.pipelines.wan.pipeline_wan_i2v import retrieve_latents
from PIL import Image

from services.common.errors import InvalidArgument
from services.common.models import ModelDir
from services.families.base import (
    Decoding,
    DenoiseRun,
    Denoising,
    ImageEncoding,
    Limits,
    Sampling,
    TextEncoding,
    TransformerLoader,
    check_embeddings,
)
from services.families.wan import (
    TEXT_NAMES,
    WanDecoding,
    WanDenoising,
    WanFamily,
    WanRun,
    WanTextEncoding,
)

CONDITION = "condition_latents"
IMAGE_EMBEDS = "image_embeds"


class WanImageEncoding(ImageEncoding):
    """CLIP vision's penultimate hidden states, as `WanImageToVideoPipeline.encode_image` takes them."""

    names = (IMAGE_EMBEDS,)

    def __init__(self, model: ModelDir, dtype: torch.dtype, device: torch.device) -> None:
        self.device = device
        self.image_processor = model.load("image_processor")
        self.image_encoder = model.load("image_encoder", dtype=dtype, device=device)

    def encode(self, image: Image.Image) -> dict[str, torch.Tensor]:
        pixels = self.image_processor(images=image, return_tensors="pt").to(self.device)
        hidden = self.image_encoder(**pixels, output_hidden_states=True).hidden_states[-2]
        return {IMAGE_EMBEDS: hidden.float().cpu()}


class WanI2VRun(WanRun):
    def __init__(self, denoising: WanI2VDenoising, params: Sampling, tensors: Mapping[str, torch.Tensor],
                 device: torch.device) -> None:
        super().__init__(denoising, params, tensors, device)
        n = params.num_outputs
        condition = tensors[CONDITION].to(device, torch.float32).repeat(n, 1, 1, 1, 1)
        _, _, frames, height, width = self.latents.shape
        if denoising.expand_timesteps:
            # TI2V: the first latent frame is the image's; its tokens get timestep 0.
            self.first_frame_mask = torch.ones(1, 1, frames, height, width, dtype=torch.float32, device=device)
            self.first_frame_mask[:, :, 0] = 0
            # Each token's share of t (0 for the image's frame), as the pipeline's mask[0][0][:, ::2, ::2].
            self.token_mask = self.first_frame_mask[0][0][:, ::2, ::2].flatten()
            self.condition = condition
        else:
            self.condition = torch.concat([denoising.frame_mask(params, n, height, width).to(device), condition], 1)
        embeds = tensors.get(IMAGE_EMBEDS)
        self.image_embeds = None if embeds is None else embeds.to(device, denoising.dtype).repeat(n, 1, 1)

    def model_inputs(self, latents: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor]:
        d = self.denoising
        if d.expand_timesteps:
            hidden = ((1 - self.first_frame_mask) * self.condition + self.first_frame_mask * latents).to(d.dtype)
            timestep = (self.token_mask * t).unsqueeze(0).expand(latents.shape[0], -1)
        else:
            hidden = torch.cat([latents, self.condition], dim=1).to(d.dtype)
            timestep = t.expand(latents.shape[0])
        inputs = {"hidden_states": hidden, "timestep": timestep}
        if self.image_embeds is not None:
            inputs["encoder_hidden_states_image"] = self.image_embeds
        return inputs

    def layout(self, latents: torch.Tensor) -> torch.Tensor:
        if self.denoising.expand_timesteps:
            latents = (1 - self.first_frame_mask) * self.condition + self.first_frame_mask * latents
        return super().layout(latents)


class WanI2VDenoising(WanDenoising):
    conditioning_names = ("prompt_embeds", "negative_prompt_embeds", IMAGE_EMBEDS, CONDITION)

    def __init__(self, model: ModelDir, load_transformer: TransformerLoader, device: torch.device) -> None:
        super().__init__(model, load_transformer, device)
        vae = model.config("vae")
        self.latent_channels = int(vae["z_dim"])         # the pipeline's num_channels_latents: the VAE's, not 36
        self.image_dim = self.transformer.config.image_dim   # None: no image cross-attention (Wan2.2 A14B, TI2V)
        self.image_width = None if self.image_dim is None else int(self.image_dim)

    def frame_mask(self, params: Sampling, n: int, height: int, width: int) -> torch.Tensor:
        """Which frames the condition holds (the first), at the latents' temporal packing, as prepare_latents."""
        frames, temporal = params.num_frames, self.scale_temporal
        mask = torch.ones(n, 1, frames, height, width)
        mask[:, :, list(range(1, frames))] = 0
        first = torch.repeat_interleave(mask[:, :, 0:1], dim=2, repeats=temporal)
        mask = torch.concat([first, mask[:, :, 1:, :]], dim=2)
        return mask.view(n, -1, temporal, height, width).transpose(1, 2)

    def check_conditioning(self, params: Sampling, tensors: Mapping[str, torch.Tensor]) -> None:
        super().check_conditioning(params, tensors)
        condition = tensors.get(CONDITION)
        if condition is None:
            raise InvalidArgument("image", "this model needs a conditioning image (condition_latents missing)")
        _, channels, frames, height, width = self.latent_shape(params)
        expected = [1, channels, 1 if self.expand_timesteps else frames, height, width]
        if list(condition.shape) != expected or not condition.is_floating_point():
            raise InvalidArgument(CONDITION, f"shape {list(condition.shape)} is not {expected}")
        embeds = tensors.get(IMAGE_EMBEDS)
        if self.image_width is not None:
            if embeds is None:
                raise InvalidArgument("image", "this model needs a conditioning image (image_embeds missing)")
            check_embeddings(IMAGE_EMBEDS, embeds, self.image_width)
        elif embeds is not None:
            raise InvalidArgument(IMAGE_EMBEDS, "this model has no image cross-attention")

    def start(self, params: Sampling, tensors: Mapping[str, torch.Tensor], device: torch.device) -> DenoiseRun:
        return WanI2VRun(self, params, tensors, device)

    def warmup_conditioning(self, params: Sampling, sequence_length: int) -> dict[str, torch.Tensor] | None:
        return None         # the conditioning image's latents and embeddings come from a real image


class WanTI2VDenoising(WanI2VDenoising):
    """Wan2.2 TI2V-5B's `WanPipeline` directory: text-to-video as `WanPipeline` runs it; when condition_latents
    arrive (the request carried an image) image-to-video, as `WanImageToVideoPipeline` runs the same directory."""

    conditioning_names = (*TEXT_NAMES, CONDITION)

    def check_conditioning(self, params: Sampling, tensors: Mapping[str, torch.Tensor]) -> None:
        if CONDITION in tensors:
            super().check_conditioning(params, tensors)
        else:
            WanDenoising.check_conditioning(self, params, tensors)

    def warmup_conditioning(self, params: Sampling, sequence_length: int) -> dict[str, torch.Tensor] | None:
        return WanDenoising.warmup_conditioning(self, params, sequence_length)      # text-to-video, as without image

    def start(self, params: Sampling, tensors: Mapping[str, torch.Tensor], device: torch.device) -> DenoiseRun:
        if CONDITION in tensors:
            return WanI2VRun(self, params, tensors, device)
        return WanRun(self, params, tensors, device)


class WanI2VDecoding(WanDecoding):
    def __init__(self, model: ModelDir, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__(model, dtype, device)
        self.expand_timesteps = bool(model.index.get("expand_timesteps", False))

    def encode_condition(self, image: Image.Image, width: int, height: int, num_frames: int) -> dict[str, torch.Tensor]:
        pixels = self.video_processor.preprocess(image, height=height, width=width).to(self.device, torch.float32)
        pixels = pixels.unsqueeze(2)                                                   # [1, 3, 1, H, W]
        if not self.expand_timesteps:
            # The image as the first frame of a video otherwise black: the VAE is causal in time.
            pixels = torch.cat([pixels, pixels.new_zeros(1, 3, num_frames - 1, height, width)], dim=2)
        encoded = retrieve_latents(self.vae.encode(pixels.to(self.vae.dtype)), sample_mode="argmax")
        mean = self.latents_mean.to(self.device, torch.float32)
        inv_std = 1.0 / self.latents_std.to(self.device, torch.float32)
        return {CONDITION: ((encoded.to(torch.float32) - mean) * inv_std).cpu()}


class WanI2VFamily(WanFamily):
    name = "wan-i2v"
    pipeline_classes = ("WanImageToVideoPipeline",)

    def limits(self, model: ModelDir) -> Limits:
        return dataclasses.replace(super().limits(model), family=self.name, task="image-to-video", needs_image=True,
                                   accepts_image=True)

    def text_encoding(self, model: ModelDir, dtype: torch.dtype, device: torch.device) -> TextEncoding:
        return WanTextEncoding(model, dtype, device)

    def image_encoding(self, model: ModelDir, dtype: torch.dtype, device: torch.device) -> ImageEncoding | None:
        return WanImageEncoding(model, dtype, device) if model.has("image_encoder") else None

    def denoising(self, model: ModelDir, load_transformer: TransformerLoader, device: torch.device) -> Denoising:
        return WanI2VDenoising(model, load_transformer, device)

    def decoding(self, model: ModelDir, dtype: torch.dtype, device: torch.device) -> Decoding:
        return WanI2VDecoding(model, dtype, device)
