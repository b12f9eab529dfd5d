"""FLUX.1 text-to-image: [dev] (the guidance scale is embedded, `guidance_embeds=True`) and [schnell] (no
guidance embedding), both `FluxPipeline`.

Each part mirrors `FluxPipeline.__call__` exactly: the prompt through the pipeline's own `encode_prompt` (CLIP
pooled + T5 tokens), latents drawn from the seed and packed 2x2, the size-dependent shift `mu`, the guidance
embedding, true CFG with a negative prompt, and the decode after the loop. So for the same directory, seed and
sizes the mesh returns the latents and images diffusers returns. Latents travel to the decoder unpacked,
[n, C, H/vae_scale_factor, W/vae_scale_factor], the VAE's own layout.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from diffusers import FluxPipeline
from diffusers.image_processor import VaeImageProcessor
from diffusers.models.attention_processor import Attention
from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps
from diffusers.utils.torch_utils import randn_tensor

from services.common.errors import InvalidArgument
from services.common.limits import MAX_SIDE, check_guidance, check_side
from services.common.models import ModelDir
from services.families.base import (
    Decoding,
    DenoiseRun,
    Denoising,
    Family,
    Limits,
    ParallelPlan,
    RowSplitPlan,
    Sampling,
    StepCall,
    TextEncoding,
    TransformerLoader,
    check_embeddings,
)
from services.families.preview import LatentRGB

DEFAULT_MAX_SEQUENCE_LENGTH = 512   # FluxPipeline.__call__'s default, and the most its check_inputs allows
DEFAULT_SAMPLE_SIZE = 128           # FluxPipeline.default_sample_size: 1024 px at 8x
NAMES = ("prompt_embeds", "pooled_prompt_embeds", "negative_prompt_embeds", "negative_pooled_prompt_embeds")

# Live previews of FLUX.1's 16 unpacked latent channels (services/families/preview.py): ComfyUI's
# `latent_rgb_factors` and `latent_rgb_factors_bias` for its `Flux` latent format, in comfyanonymous/ComfyUI,
# comfy/latent_formats.py. They apply to the latents as the transformer sees them (ComfyUI's process_in space, which
# is diffusers' too: the decode divides by scaling_factor and adds shift_factor after the loop).
FLUX1_LATENT_RGB = LatentRGB(
    factors=(
        (-0.0346, 0.0244, 0.0681), (0.0034, 0.0210, 0.0687), (0.0275, -0.0668, -0.0433), (-0.0174, 0.0160, 0.0617),
        (0.0859, 0.0721, 0.0329), (0.0004, 0.0383, 0.0115), (0.0405, 0.0861, 0.0915), (-0.0236, -0.0185, -0.0259),
        (-0.0245, 0.0250, 0.1180), (0.1008, 0.0755, -0.0421), (-0.0515, 0.0201, 0.0011), (0.0428, -0.0012, -0.0036),
        (0.0817, 0.0765, 0.0749), (-0.1264, -0.0522, -0.1103), (-0.0280, -0.0881, -0.0499), (-0.1262, -0.0982, -0.0778),
    ),
    bias=(-0.0329, -0.0718, -0.0851),
    source="ComfyUI comfy/latent_formats.py, Flux.latent_rgb_factors",
)


def vae_scale_factor(vae_config: Mapping) -> int:
    """FluxPipeline's: 2 ** (levels - 1), 8 for FLUX.1's VAE. Sizes are multiples of twice this (the 2x2 packing)."""
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


class FluxTextEncoding(TextEncoding):
    """`FluxPipeline.encode_prompt` itself, on a pipeline that holds only the text components: the CLIP pooled
    embedding [1, D_clip] and the T5 token embeddings [1, max_sequence_length, D_t5] (no mask, padding kept)."""

    names = NAMES

    def __init__(self, model: ModelDir, dtype: torch.dtype, device: torch.device) -> None:
        self.device = device
        self.pipe = FluxPipeline(
            scheduler=None, vae=None, transformer=None,
            tokenizer=model.load("tokenizer"), text_encoder=model.load("text_encoder", dtype=dtype, device=device),
            tokenizer_2=model.load("tokenizer_2"),
            text_encoder_2=model.load("text_encoder_2", dtype=dtype, device=device),
        )

    def encode(self, prompt: str, negative_prompt: str | None, max_sequence_length: int) -> dict[str, torch.Tensor]:
        if max_sequence_length > DEFAULT_MAX_SEQUENCE_LENGTH:   # FluxPipeline.check_inputs refuses it too
            raise InvalidArgument("max_sequence_length",
                                  f"{max_sequence_length} is over FLUX's limit of {DEFAULT_MAX_SEQUENCE_LENGTH}")
        tensors = dict(zip(NAMES[:2], self._embed(prompt, max_sequence_length), strict=True))
        if negative_prompt is not None:
            tensors.update(zip(NAMES[2:], self._embed(negative_prompt, max_sequence_length), strict=True))
        return tensors

    def _embed(self, text: str, max_sequence_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, pooled, _text_ids = self.pipe.encode_prompt(
            prompt=text, device=self.device, num_images_per_prompt=1, max_sequence_length=max_sequence_length)
        return embeds.float().cpu(), pooled.float().cpu()


class FluxRun(DenoiseRun):
    def __init__(self, denoising: FluxDenoising, params: Sampling, tensors: Mapping[str, torch.Tensor],
                 device: torch.device) -> None:
        self.denoising = denoising
        self.params = params
        dtype, n = denoising.dtype, params.num_outputs
        # Embeddings: one copy per output, on the device, in the transformer's dtype
        self.prompt_embeds = tensors["prompt_embeds"].to(device, dtype).repeat(n, 1, 1)
        self.pooled_prompt_embeds = tensors["pooled_prompt_embeds"].to(device, dtype).repeat(n, 1)
        self.text_ids = torch.zeros(self.prompt_embeds.shape[1], 3, device=device, dtype=dtype)
        # True CFG: the pipeline's `true_cfg_scale > 1 and has_neg_prompt` (the encoder sends the negative
        # tensors only for a non-empty negative prompt)
        self.true_cfg = params.true_cfg_scale > 1.0 and "negative_prompt_embeds" in tensors
        if self.true_cfg:
            self.negative_prompt_embeds = tensors["negative_prompt_embeds"].to(device, dtype).repeat(n, 1, 1)
            self.negative_pooled_prompt_embeds = tensors["negative_pooled_prompt_embeds"].to(device, dtype).repeat(n, 1)
            self.negative_text_ids = torch.zeros(self.negative_prompt_embeds.shape[1], 3, device=device, dtype=dtype)
        # Latents: drawn on the CPU from the seed (so a seed means the same image on every device), in float32
        # and rounded to the weights' dtype, which is exactly the pipeline's draw in that dtype; then packed 2x2
        channels, height, width = denoising.latent_shape(params)
        generator = torch.Generator("cpu").manual_seed(params.seed)
        noise = randn_tensor((n, channels, height, width), generator=generator, dtype=torch.float32).to(dtype).float()
        self.latents = FluxPipeline._pack_latents(noise, n, channels, height, width).to(device)
        self.image_ids = FluxPipeline._prepare_latent_image_ids(n, height // 2, width // 2, device, dtype)
        # Timesteps: a fresh scheduler per request (schedulers keep per-run state), sigmas and mu as the pipeline
        template = denoising.scheduler_template
        self.scheduler = type(template).from_config(template.config)
        steps = params.num_inference_steps
        sigmas = np.linspace(1.0, 1 / steps, steps)
        if getattr(self.scheduler.config, "use_flow_sigmas", False):
            sigmas = None
        config = self.scheduler.config
        mu = calculate_shift(self.latents.shape[1], config.get("base_image_seq_len", 256),
                             config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                             config.get("max_shift", 1.15))
        self.timesteps, _ = retrieve_timesteps(self.scheduler, steps, device, sigmas=sigmas, mu=mu)
        self.scheduler.set_begin_index(0)
        # FLUX.1 [dev] embeds the guidance scale; [schnell] has no such input
        self.guidance = None
        if denoising.guidance_embeds:
            self.guidance = torch.full([1], params.guidance_scale, device=device, dtype=torch.float32).expand(n)
        # The kwargs whose dim 0 is the batch: all but the ids, which are positions [tokens, 3] the batch shares
        self.batched = frozenset({"hidden_states", "timestep", "pooled_projections", "encoder_hidden_states",
                                  *(("guidance",) if self.guidance is not None else ())})

    def step_call(self, latents: torch.Tensor, t: torch.Tensor, index: int) -> StepCall:
        dtype = self.denoising.dtype
        hidden = latents.to(dtype)
        timestep = t.expand(hidden.shape[0]).to(dtype)
        cond = dict(hidden_states=hidden, timestep=timestep / 1000, pooled_projections=self.pooled_prompt_embeds,
                    encoder_hidden_states=self.prompt_embeds, txt_ids=self.text_ids, img_ids=self.image_ids)
        if self.guidance is not None:
            cond["guidance"] = self.guidance
        uncond = None
        if self.true_cfg:
            uncond = {**cond, "pooled_projections": self.negative_pooled_prompt_embeds,
                      "encoder_hidden_states": self.negative_prompt_embeds, "txt_ids": self.negative_text_ids}
        return StepCall(self.denoising.transformer, cond, uncond, self.params.true_cfg_scale, self.batched)

    def layout(self, latents: torch.Tensor) -> torch.Tensor:
        """Unpacked to the VAE's layout [n, C, H/f, W/f], as the pipeline does before decoding."""
        p = self.params
        return FluxPipeline._unpack_latents(latents, p.height, p.width, self.denoising.vae_scale_factor)


class FluxDenoising(Denoising):
    conditioning_names = NAMES

    def __init__(self, model: ModelDir, load_transformer: TransformerLoader, device: torch.device) -> None:
        self.transformer = load_transformer("transformer")
        self.scheduler_template = model.load("scheduler")
        self.vae_scale_factor = vae_scale_factor(model.config("vae"))
        config = self.transformer.config
        self.latent_channels = int(config.in_channels) // 4      # FluxPipeline's num_channels_latents
        self.text_dim = int(config.joint_attention_dim)
        self.pooled_dim = int(config.pooled_projection_dim)
        self.guidance_embeds = bool(config.guidance_embeds)

    @property
    def transformers(self) -> list[torch.nn.Module]:
        return [self.transformer]

    def latent_shape(self, params: Sampling) -> tuple[int, int, int]:
        """(channels, height, width) of one output's unpacked latents, as FluxPipeline.prepare_latents."""
        multiple = self.vae_scale_factor * 2
        return self.latent_channels, 2 * (params.height // multiple), 2 * (params.width // multiple)

    def check(self, params: Sampling) -> None:
        # The pipeline resizes other sizes with a warning; a server says so instead.
        multiple = self.vae_scale_factor * 2
        max_side = MAX_SIDE // multiple * multiple
        check_side("width", params.width, multiple, max_side)
        check_side("height", params.height, multiple, max_side)
        if params.num_frames != 1:
            raise InvalidArgument("num_frames", f"{params.num_frames}, but FLUX makes images: num_frames is 1")
        check_guidance(params.true_cfg_scale, "true_cfg_scale")
        if params.guidance_scale_2 is not None:
            raise InvalidArgument("guidance_scale_2", "FLUX has one transformer; guidance_scale_2 needs two")

    def check_conditioning(self, params: Sampling, tensors: Mapping[str, torch.Tensor]) -> None:
        for name in NAMES[:2]:
            if name not in tensors:
                raise InvalidArgument(name, "required")
        negatives = [name for name in NAMES[2:] if name in tensors]
        if len(negatives) == 1:
            missing, = set(NAMES[2:]) - set(negatives)
            raise InvalidArgument(missing, f"required with {negatives[0]}")
        for prefix in ("", "negative_") if negatives else ("",):
            check_embeddings(f"{prefix}prompt_embeds", tensors[f"{prefix}prompt_embeds"], self.text_dim)
            check_embeddings(f"{prefix}pooled_prompt_embeds", tensors[f"{prefix}pooled_prompt_embeds"],
                             self.pooled_dim, rank=2)
        if negatives and params.true_cfg_scale > 1.0 and (
                tensors["negative_prompt_embeds"].shape != tensors["prompt_embeds"].shape):
            # FluxPipeline.__call__ refuses embeddings of two shapes under true CFG too.
            raise InvalidArgument("negative_prompt_embeds", f"shape {list(tensors['negative_prompt_embeds'].shape)} "
                                  f"is not prompt_embeds' {list(tensors['prompt_embeds'].shape)}")

    def start(self, params: Sampling, tensors: Mapping[str, torch.Tensor], device: torch.device) -> DenoiseRun:
        return FluxRun(self, params, tensors, device)

    def warmup_conditioning(self, params: Sampling, sequence_length: int) -> dict[str, torch.Tensor] | None:
        return {NAMES[0]: torch.zeros(1, sequence_length, self.text_dim), NAMES[1]: torch.zeros(1, self.pooled_dim)}


class FluxDecoding(Decoding):
    # --devices N: GroupNorm and the convolutions are torch's; the mid-block attention takes the whole frame. The
    # encoder stays whole: AutoencoderKL's Downsample2D pads inside its own forward, where no wrapper reaches
    # (and FLUX.1 encodes no image here).
    row_split = RowSplitPlan(frame_attentions=(Attention,))

    def __init__(self, model: ModelDir, dtype: torch.dtype, device: torch.device) -> None:
        self.device = device
        self.vae = model.load("vae", dtype=dtype, device=device)
        config = self.vae.config
        self.latent_channels = int(config.latent_channels)
        self.scaling_factor = config.scaling_factor
        self.shift_factor = config.shift_factor
        if self.shift_factor is None:
            raise ValueError(f"{model.path}: the VAE config has no shift_factor, which FluxPipeline's decode uses")
        self.spatial_scale = vae_scale_factor(config)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.spatial_scale * 2)

    def check(self, latents: torch.Tensor) -> None:
        if latents.dim() != 4 or latents.shape[1] != self.latent_channels:
            raise InvalidArgument("latents", f"shape {list(latents.shape)} is not [n, {self.latent_channels}, H, W]")

    def warmup_latents(self, width: int, height: int, num_frames: int) -> torch.Tensor:
        return torch.zeros(1, self.latent_channels, height // self.spatial_scale, width // self.spatial_scale)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        # As the pipeline after its loop: de-normalise in the VAE's dtype, decode, then the image processor's
        # post-processing (denormalize to 0..1 in that dtype; float32 last, as its numpy output).
        latents = latents.to(self.device, self.vae.dtype) / self.scaling_factor + self.shift_factor
        image = self.vae.decode(latents, return_dict=False)[0]                        # [n, 3, H, W]
        image = self.image_processor.postprocess(image, output_type="pt")
        return image.permute(0, 2, 3, 1).unsqueeze(1).float()                          # [n, 1, H, W, 3]


class FluxFamily(Family):
    name = "flux"
    pipeline_classes = ("FluxPipeline",)
    latent_rgb = (FLUX1_LATENT_RGB,)

    def limits(self, model: ModelDir) -> Limits:
        transformer = model.config("transformer")
        scale = vae_scale_factor(model.config("vae"))
        multiple = scale * 2
        side = DEFAULT_SAMPLE_SIZE * scale
        return Limits(family=self.name, task="text-to-image", size_multiple=multiple,
                      max_side=MAX_SIDE // multiple * multiple, frame_multiple=0, max_frames=1, default_width=side,
                      default_height=side, default_frames=1, default_steps=28, default_guidance_scale=3.5,
                      true_cfg=True, guidance_embedding=bool(transformer.get("guidance_embeds", False)),
                      max_sequence_length=DEFAULT_MAX_SEQUENCE_LENGTH)

    def parallel_plan(self, model: ModelDir) -> ParallelPlan | None:
        # Imported here: only a gang's ranks (and one device, for the same attention kernels) need it.
        from services.families.flux_parallel import flux_parallel_plan

        return flux_parallel_plan(model)

    def install_kernels(self, transformer: torch.nn.Module) -> None:
        from services.families.flux_attention import install_joint_attention

        install_joint_attention(transformer)

    def text_encoding(self, model: ModelDir, dtype: torch.dtype, device: torch.device) -> TextEncoding:
        return FluxTextEncoding(model, dtype, device)

    def denoising(self, model: ModelDir, load_transformer: TransformerLoader, device: torch.device) -> Denoising:
        return FluxDenoising(model, load_transformer, device)

    def decoding(self, model: ModelDir, dtype: torch.dtype, device: torch.device) -> Decoding:
        return FluxDecoding(model, dtype, device)
