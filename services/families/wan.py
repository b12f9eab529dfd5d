"""Wan text-to-video: Wan2.1 (`WanPipeline`), Wan2.2 A14B (two experts switching at `boundary_ratio`) and
Wan2.2 TI2V-5B (`expand_timesteps`: one timestep per token; the Wan2.2 VAE, 48 latent channels).

A TI2V-5B directory (saved as a `WanPipeline`, as it ships) also takes an optional conditioning image: with
one, the request runs the image-to-video path of services/families/wan_i2v.py, as diffusers runs that directory
loaded into `WanImageToVideoPipeline`; without one it stays text-to-video.

Each part mirrors `WanPipeline.__call__` exactly (encode_prompt, timesteps, prepare_latents, the loop, the
decode after it), so for the same directory, seed and sizes the mesh returns the latents and frames diffusers
returns.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
from diffusers.models.autoencoders.autoencoder_kl_wan import WanAttentionBlock, WanCausalConv3d, unpatchify
from diffusers.pipelines.wan.pipeline_wan import prompt_clean
from diffusers.utils.torch_utils import randn_tensor
from diffusers.video_processor import VideoProcessor

from services.common.errors import InvalidArgument
from services.common.limits import MAX_FRAMES, MAX_SIDE, check_frames, check_side
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

DEFAULT_MAX_SEQUENCE_LENGTH = 512   # WanPipeline.__call__'s default
BRANCH_KWARGS = frozenset({"hidden_states", "timestep", "encoder_hidden_states"})
TEXT_NAMES = ("prompt_embeds", "negative_prompt_embeds")

# Live previews of the Wan2.1 VAE's 16 latent channels (Wan2.1, Wan2.2 A14B; services/families/preview.py): ComfyUI's
# `latent_rgb_factors` and `latent_rgb_factors_bias` for its `Wan21` latent format, in comfyanonymous/ComfyUI,
# comfy/latent_formats.py. They apply to normalised latents ((z - mean) / std, ComfyUI's process_in), which is what
# the loop holds here too (WanDecoding undoes it before the VAE). Wan2.2 TI2V-5B's 48-channel VAE has no map here:
# its previews take preview.py's stand-in.
WAN21_LATENT_RGB = LatentRGB(
    factors=(
        (-0.1299, -0.1692, 0.2932), (0.0671, 0.0406, 0.0442), (0.3568, 0.2548, 0.1747), (0.0372, 0.2344, 0.1420),
        (0.0313, 0.0189, -0.0328), (0.0296, -0.0956, -0.0665), (-0.3477, -0.4059, -0.2925), (0.0166, 0.1902, 0.1975),
        (-0.0412, 0.0267, -0.1364), (-0.1293, 0.0740, 0.1636), (0.0680, 0.3019, 0.1128), (0.0032, 0.0581, 0.0639),
        (-0.1251, 0.0927, 0.1699), (0.0060, -0.0633, 0.0005), (0.3477, 0.2275, 0.2950), (0.1984, 0.0913, 0.1861),
    ),
    bias=(-0.1835, -0.0868, -0.3360),
    source="ComfyUI comfy/latent_formats.py, Wan21.latent_rgb_factors",
)


class WanTextEncoding(TextEncoding):
    """UMT5 embeddings as `WanPipeline._get_t5_prompt_embeds` builds them: cleaned, padded to
    max_sequence_length, truncated, real tokens kept and the padding positions zeroed."""

    names = ("prompt_embeds", "negative_prompt_embeds")

    def __init__(self, model: ModelDir, dtype: torch.dtype, device: torch.device) -> None:
        self.device = device
        self.tokenizer = model.load("tokenizer")
        self.text_encoder = model.load("text_encoder", dtype=dtype, device=device)

    def encode(self, prompt: str, negative_prompt: str | None, max_sequence_length: int) -> dict[str, torch.Tensor]:
        tensors = {"prompt_embeds": self._embed(prompt, max_sequence_length)}
        if negative_prompt is not None:
            tensors["negative_prompt_embeds"] = self._embed(negative_prompt, max_sequence_length)
        return tensors

    def _embed(self, text: str, max_sequence_length: int) -> torch.Tensor:
        tokens = self.tokenizer(
            [prompt_clean(text)], padding="max_length", max_length=max_sequence_length, truncation=True,
            add_special_tokens=True, return_attention_mask=True, return_tensors="pt",
        )
        ids, mask = tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device)
        seq_len = int(mask.gt(0).sum())
        hidden = self.text_encoder(ids, mask).last_hidden_state.float()
        embeds = torch.zeros_like(hidden)
        embeds[:, :seq_len] = hidden[:, :seq_len]
        return embeds.cpu()


class WanRun(DenoiseRun):
    def __init__(self, denoising: WanDenoising, params: Sampling, tensors: Mapping[str, torch.Tensor],
                 device: torch.device) -> None:
        self.denoising = denoising
        self.params = params
        dtype = denoising.dtype
        # Embeddings: one copy per output, on the device, in the transformers' dtype
        self.prompt_embeds = tensors["prompt_embeds"].to(device, dtype).repeat(params.num_outputs, 1, 1)
        negative = tensors.get("negative_prompt_embeds") if params.guidance_scale > 1.0 else None
        self.negative_prompt_embeds = None if negative is None else negative.to(device, dtype).repeat(
            params.num_outputs, 1, 1)
        # Timesteps: a fresh scheduler per request, since schedulers keep per-run state
        template = denoising.scheduler_template
        self.scheduler = type(template).from_config(template.config)
        self.scheduler.set_timesteps(params.num_inference_steps, device=device)
        self.timesteps = self.scheduler.timesteps
        self.scheduler.set_begin_index(0)
        # Latents: drawn on the CPU from the seed, so a seed means the same video on every device
        generator = torch.Generator("cpu").manual_seed(params.seed)
        self.latents = randn_tensor(denoising.latent_shape(params), generator=generator,
                                    dtype=torch.float32).to(device)
        ratio = denoising.boundary_ratio
        self.boundary = None if ratio is None else ratio * self.scheduler.config.num_train_timesteps

    def step_call(self, latents: torch.Tensor, t: torch.Tensor, index: int) -> StepCall:
        d, params = self.denoising, self.params
        if self.boundary is None or t >= self.boundary:
            model, scale = d.transformer, params.guidance_scale          # Wan2.1, or Wan2.2's high-noise expert
        else:
            model = d.transformer_2
            scale = params.guidance_scale if params.guidance_scale_2 is None else params.guidance_scale_2
        inputs = self.model_inputs(latents, t)
        cond = dict(inputs, encoder_hidden_states=self.prompt_embeds)
        uncond = None if self.negative_prompt_embeds is None else {
            **cond, "encoder_hidden_states": self.negative_prompt_embeds}
        return StepCall(model, cond, uncond, scale, BRANCH_KWARGS | frozenset(inputs))

    def preview_latents(self, latents: torch.Tensor, noise_pred: torch.Tensor, index: int) -> torch.Tensor:
        """Only the middle latent frame, the one a preview shows (preview.py's preview_frame): 1/T of the estimate's
        work. `layout` changes no frame but the first (TI2V's image frame, wan_i2v.py), so it is skipped for the
        middle one of several."""
        frames = latents.shape[2]
        if frames == 1:
            return super().preview_latents(latents, noise_pred, index)
        middle = slice(frames // 2, frames // 2 + 1)
        return self.denoised(latents[:, :, middle], noise_pred[:, :, middle], index)

    def model_inputs(self, latents: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor]:
        """The transformer's inputs besides the text, each with the batch first: latents and timesteps."""
        d = self.denoising
        hidden = latents.to(d.dtype)
        if d.expand_timesteps:
            # One timestep per token (TI2V): with no condition frame, every token's is t.
            tokens = hidden.shape[2] * (hidden.shape[3] // d.patch_size[1]) * (hidden.shape[4] // d.patch_size[2])
            return {"hidden_states": hidden, "timestep": t.expand(hidden.shape[0], tokens).float()}
        return {"hidden_states": hidden, "timestep": t.expand(hidden.shape[0])}


class WanDenoising(Denoising):
    conditioning_names = ("prompt_embeds", "negative_prompt_embeds")

    def __init__(self, model: ModelDir, load_transformer: TransformerLoader, device: torch.device) -> None:
        self.transformer = load_transformer("transformer")
        self.transformer_2 = load_transformer("transformer_2") if model.has("transformer_2") else None
        self.boundary_ratio = model.index.get("boundary_ratio")
        if self.boundary_ratio is not None and self.transformer_2 is None:
            raise ValueError(f"{model.path}: boundary_ratio is set but model_index.json has no transformer_2")
        self.expand_timesteps = bool(model.index.get("expand_timesteps", False))
        self.scheduler_template = model.load("scheduler")
        vae = model.config("vae")
        self.scale_temporal = int(vae.get("scale_factor_temporal", 4))
        self.scale_spatial = int(vae.get("scale_factor_spatial", 8))
        config = self.transformer.config
        self.latent_channels = int(config.in_channels)      # WanPipeline's num_channels_latents
        self.text_dim = int(config.text_dim)
        self.patch_size = tuple(int(p) for p in config.patch_size)
        self.max_patches = int(config.rope_max_seq_len)

    @property
    def transformers(self) -> list[torch.nn.Module]:
        return [m for m in (self.transformer, self.transformer_2) if m is not None]

    def latent_shape(self, params: Sampling) -> tuple[int, ...]:
        return (params.num_outputs, self.latent_channels, (params.num_frames - 1) // self.scale_temporal + 1,
                params.height // self.scale_spatial, params.width // self.scale_spatial)

    def check(self, params: Sampling) -> None:
        multiple = self.scale_spatial * self.patch_size[1]
        check_side("width", params.width, multiple)
        check_side("height", params.height, multiple)
        check_frames(params.num_frames, self.scale_temporal)
        _, _, frames, height, width = self.latent_shape(params)
        for field, latent, patch, scale in (("num_frames", frames, self.patch_size[0], self.scale_temporal),
                                            ("height", height, self.patch_size[1], self.scale_spatial),
                                            ("width", width, self.patch_size[2], self.scale_spatial)):
            if latent // patch > self.max_patches:
                limit = self.max_patches * patch * scale
                raise InvalidArgument(field, f"{getattr(params, field)} exceeds this model's limit of about {limit}")
        if params.guidance_scale_2 is not None and self.boundary_ratio is None:
            raise InvalidArgument("guidance_scale_2", "this model has one transformer; guidance_scale_2 needs two")

    def check_conditioning(self, params: Sampling, tensors: Mapping[str, torch.Tensor]) -> None:
        for name in TEXT_NAMES:
            embeds = tensors.get(name)
            if embeds is None:
                if name == "prompt_embeds" or params.guidance_scale > 1.0:
                    raise InvalidArgument(name, "required" if name == "prompt_embeds"
                                          else "required when guidance_scale > 1")
                continue
            check_embeddings(name, embeds, self.text_dim)

    def start(self, params: Sampling, tensors: Mapping[str, torch.Tensor], device: torch.device) -> DenoiseRun:
        return WanRun(self, params, tensors, device)

    def warmup_conditioning(self, params: Sampling, sequence_length: int) -> dict[str, torch.Tensor] | None:
        embeds = torch.zeros(1, sequence_length, self.text_dim)
        names = TEXT_NAMES if params.guidance_scale > 1.0 else TEXT_NAMES[:1]
        return dict.fromkeys(names, embeds)


class WanDecoding(Decoding):
    # --devices N: the causal convolutions take halo rows, the mid-block attention the whole frame; the encoder
    # (I2V's conditioning frame) splits the same way.
    row_split = RowSplitPlan(causal_convs=(WanCausalConv3d,), frame_attentions=(WanAttentionBlock,),
                             encoder="encoder")

    def __init__(self, model: ModelDir, dtype: torch.dtype, device: torch.device) -> None:
        self.device = device
        self.vae = model.load("vae", dtype=dtype, device=device)
        config = self.vae.config
        self.z_dim = int(config.z_dim)
        self.latents_mean = torch.tensor(config.latents_mean).view(1, self.z_dim, 1, 1, 1)
        self.latents_std = torch.tensor(config.latents_std).view(1, self.z_dim, 1, 1, 1)
        self.spatial_scale = int(config.scale_factor_spatial)
        self.temporal_scale = int(config.scale_factor_temporal)
        self.video_processor = VideoProcessor(vae_scale_factor=self.spatial_scale)

    def check(self, latents: torch.Tensor) -> None:
        if latents.dim() != 5 or latents.shape[1] != self.z_dim:
            raise InvalidArgument("latents", f"shape {list(latents.shape)} is not [n, {self.z_dim}, T, H, W]")

    def warmup_latents(self, width: int, height: int, num_frames: int) -> torch.Tensor:
        return torch.zeros(1, self.z_dim, (num_frames - 1) // self.temporal_scale + 1, height // self.spatial_scale,
                           width // self.spatial_scale)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        video = self.vae.decode(self._normalized(latents), return_dict=False)[0]        # [n, 3, F, H, W]
        return self._frames(video)

    def decode_chunks(self, latents: torch.Tensor) -> Iterator[torch.Tensor]:
        """AutoencoderKLWan's own decode loop (`_decode`: one latent frame at a time through its causal decoder,
        its cache carrying the frames before), each chunk post-processed as it comes: the frames are exactly
        `decode`'s, whose `torch.cat` and clamp act frame by frame. Tiled, it decodes whole (diffusers' tiles
        run the loop per tile)."""
        vae = self.vae
        z = self._normalized(latents)
        height, width = z.shape[-2:]
        scale = vae.spatial_compression_ratio
        if vae.use_tiling and (width > vae.tile_sample_min_width // scale or
                               height > vae.tile_sample_min_height // scale):
            yield self._frames(vae.decode(z, return_dict=False)[0])
            return
        vae.clear_cache()
        try:
            x = vae.post_quant_conv(z)
            for i in range(x.shape[2]):
                vae._conv_idx = [0]
                out = vae.decoder(x[:, :, i:i + 1], feat_cache=vae._feat_map, feat_idx=vae._conv_idx,
                                  first_chunk=i == 0)
                if vae.config.patch_size is not None:
                    out = unpatchify(out, patch_size=vae.config.patch_size)
                yield self._frames(torch.clamp(out, min=-1.0, max=1.0))
        finally:
            vae.clear_cache()

    def _normalized(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents as they travel -> the VAE's input, de-normalised as WanPipeline does after its loop."""
        dtype = self.vae.dtype
        latents = latents.to(self.device, dtype)
        mean = self.latents_mean.to(self.device, dtype)
        # Cast, then invert, in the VAE's dtype: WanPipeline's `1.0 / tensor(std).to(dtype)` does exactly that,
        # and in bfloat16 inverting first gives different frames.
        inv_std = 1.0 / self.latents_std.to(self.device, dtype)
        return latents / inv_std + mean

    def _frames(self, video: torch.Tensor) -> torch.Tensor:
        """The VAE's [n, 3, F, H, W] in -1..1 -> frames [n, F, H, W, 3] in 0..1, as WanPipeline's VideoProcessor
        post-processes (denormalize in the VAE's dtype, then float32)."""
        if self.video_processor.config.do_normalize:
            video = self.video_processor.denormalize(video)
        return video.permute(0, 2, 3, 4, 1).float()


class WanFamily(Family):
    name = "wan"
    pipeline_classes = ("WanPipeline",)
    latent_rgb = (WAN21_LATENT_RGB,)

    def limits(self, model: ModelDir) -> Limits:
        transformer, vae = model.config("transformer"), model.config("vae")
        spatial, temporal = int(vae.get("scale_factor_spatial", 8)), int(vae.get("scale_factor_temporal", 4))
        patch = [int(p) for p in transformer.get("patch_size", (1, 2, 2))]
        patches = int(transformer.get("rope_max_seq_len", 1024))
        multiple = spatial * patch[1]
        max_side = min(MAX_SIDE, patches * patch[1] * spatial) // multiple * multiple
        max_frames = min(MAX_FRAMES, (patches * patch[0] - 1) * temporal + 1)
        if model.index.get("expand_timesteps"):
            # Wan2.2 TI2V-5B: 720p (1280x704, multiples of 32) at 24 fps, 121 frames, as its model card runs it
            width, height, frames, fps = 1280, 704, 121, 24
        else:
            width, height, frames, fps = 832, 480, 81, 16     # Wan2.1 and Wan2.2 A14B (WanPipeline's defaults)
        return Limits(family=self.name, task="text-to-video", size_multiple=multiple, max_side=max_side,
                      frame_multiple=temporal, max_frames=max_frames, default_width=width, default_height=height,
                      default_frames=min(frames, max_frames), default_steps=50, default_guidance_scale=5.0,
                      default_fps=fps, max_sequence_length=DEFAULT_MAX_SEQUENCE_LENGTH,
                      experts=2 if model.index.get("boundary_ratio") is not None else 1,
                      accepts_image=takes_optional_image(model))

    def parallel_plan(self, model: ModelDir) -> ParallelPlan | None:
        # Every Wan variant (T2V, I2V, A14B's two experts, TI2V's per-token timesteps); imported here, since only a
        # gang's ranks (and one device, for the same kernels) need the gang's Wan forward and TP plan.
        from services.families.wan_parallel import wan_parallel_plan

        return wan_parallel_plan(model)

    def install_kernels(self, transformer: torch.nn.Module) -> None:
        from services.families.wan_attention import install_self_attention

        install_self_attention(transformer)

    def text_encoding(self, model: ModelDir, dtype: torch.dtype, device: torch.device) -> TextEncoding:
        return WanTextEncoding(model, dtype, device)

    # With an optional image (TI2V-5B), the image-to-video parts: imported here, since wan_i2v builds on this
    # module.
    def denoising(self, model: ModelDir, load_transformer: TransformerLoader, device: torch.device) -> Denoising:
        if takes_optional_image(model):
            from services.families.wan_i2v import WanTI2VDenoising

            return WanTI2VDenoising(model, load_transformer, device)
        return WanDenoising(model, load_transformer, device)

    def decoding(self, model: ModelDir, dtype: torch.dtype, device: torch.device) -> Decoding:
        if takes_optional_image(model):
            from services.families.wan_i2v import WanI2VDecoding

            return WanI2VDecoding(model, dtype, device)
        return WanDecoding(model, dtype, device)


def takes_optional_image(model: ModelDir) -> bool:
    """A WanPipeline directory with expand_timesteps (TI2V-5B): diffusers runs it as text-to-video
    (`WanPipeline`) and as image-to-video (`WanImageToVideoPipeline` loading the same directory)."""
    return model.pipeline_class_name in WanFamily.pipeline_classes and bool(model.index.get("expand_timesteps"))
