"""What a model family declares, and the contract stage engines hold it to.

A family is one module in this package. It says which diffusers pipeline classes it serves, what a request may
ask of its models (`Limits`, read from the configs without loading weights), and, for each stage, the part
that is specific to it:

- `TextEncoding`: prompt -> named conditioning tensors (e.g. "prompt_embeds", "pooled_prompt_embeds"); and, for
  models conditioned on an image, `ImageEncoding`: image -> e.g. "image_embeds" (both in the encoder stage).
- `Denoising`: checks, then one `DenoiseRun` per request: timesteps, the first latents, and for each step a
  `StepCall` (which transformer, the kwargs of each guidance branch, the guidance scale).
- `Decoding`: latents as they travel -> frames [n, F, H, W, 3] in 0..1 on the device; and, for image-to-video,
  the conditioning image through the VAE's encoder ("condition_latents"), since this stage holds the VAE.

Stage engines keep the mechanics (load, loop, cancel, timing, transport) and never look at a family's
numbers. The wire stays generic: conditioning is a set of named tensors, latents are one tensor.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from services.common.errors import InvalidArgument
from services.common.models import ModelDir
from services.families.limits import TASKS, Limits  # noqa: F401  (re-exported: the contract names both)
from services.families.preview import LatentRGB, project

if TYPE_CHECKING:
    from services.denoiser.cache import StepCache


@dataclasses.dataclass(frozen=True)
class Sampling:
    """The request's parameters a denoiser needs, as every stage sees them (defaults already applied)."""

    request_id: str
    width: int
    height: int
    num_frames: int
    num_inference_steps: int
    guidance_scale: float
    seed: int
    num_outputs: int = 1
    true_cfg_scale: float = 1.0
    guidance_scale_2: float | None = None    # a second expert's scale (Wan2.2 A14B); None: guidance_scale
    preview_every: int = 0                   # a preview every this many steps (before the last); 0: none
    cache: StepCache | None = None           # step caching for this request (services/denoiser/cache.py); None: off


@dataclasses.dataclass(frozen=True)
class StepCall:
    """One step's noise prediction, as data: a noise predictor decides where the branches run (one device in
    turn, or CFG-parallel ranks at once) and combines them as `uncond + scale * (cond - uncond)`."""

    model: Callable[..., Any]            # called as model(**kwargs, return_dict=False)[0]
    cond: dict[str, Any]
    uncond: dict[str, Any] | None        # None: no guidance branch
    scale: float
    batched: frozenset[str]              # kwargs whose first dimension is the batch (the outputs)

    @property
    def batch_size(self) -> int:
        """How many outputs this step predicts (the first dimension of the batched kwargs)."""
        return next(value.shape[0] for name, value in self.cond.items()
                    if name in self.batched and isinstance(value, torch.Tensor))


class DenoiseRun(abc.ABC):
    """One request's denoising: built by `Denoising.start`, driven by the engine's loop."""

    scheduler: Any
    timesteps: torch.Tensor
    latents: torch.Tensor                # the first latents, float32 on the device

    @abc.abstractmethod
    def step_call(self, latents: torch.Tensor, t: torch.Tensor, index: int) -> StepCall: ...

    def after_step(self, latents: torch.Tensor, index: int) -> torch.Tensor:
        """Whatever the pipeline does to the latents after the scheduler's step (e.g. re-impose a condition)."""
        return latents

    def layout(self, latents: torch.Tensor) -> torch.Tensor:
        """The loop's latents in the decoder's layout, on the device (e.g. FLUX's unpacked): for `result` and for
        previews."""
        return latents

    def result(self, latents: torch.Tensor) -> torch.Tensor:
        """The latents as they travel to the decoder: float32 on the CPU."""
        return self.layout(latents).float().cpu()

    def preview_latents(self, latents: torch.Tensor, noise_pred: torch.Tensor, index: int) -> torch.Tensor:
        """What a live preview of step `index` projects: the clean-latents estimate in the decoder's layout (a family
        may compute only the part a preview shows)."""
        return self.layout(self.denoised(latents, noise_pred, index))

    def denoised(self, latents: torch.Tensor, noise_pred: torch.Tensor, index: int) -> torch.Tensor:
        """Step `index`'s estimate of the clean latents, what a preview shows (the noisy latents themselves would
        show mostly noise until the last steps). Flow matching, which every family here runs (UniPC with
        flow_prediction for Wan, FlowMatchEuler for FLUX): x0 = x_t - sigma_t * v, as UniPC's own
        convert_model_output. A scheduler predicting anything else previews the current latents as they are."""
        sigmas = getattr(self.scheduler, "sigmas", None)
        if sigmas is None or getattr(self.scheduler.config, "prediction_type", "flow_prediction") != "flow_prediction":
            return latents
        sigma = sigmas[index]
        if sigma.device.type == "cpu":   # a Python float rides along with the kernel: no host-to-device copy to wait on
            sigma = float(sigma)
        return latents - sigma * noise_pred.float()


class TextEncoding(abc.ABC):
    """The encoder stage's part: prompt -> named tensors, float32 on the CPU."""

    names: tuple[str, ...]               # every tensor name it may send

    @abc.abstractmethod
    def encode(self, prompt: str, negative_prompt: str | None, max_sequence_length: int) -> dict[str, torch.Tensor]:
        """`negative_prompt` None: no guidance branch, send only the positive tensors."""


def check_embeddings(name: str, embeds: torch.Tensor, width: int, rank: int = 3) -> None:
    """One prompt's embeddings: [1, L, width] (rank 3) or [1, width] (rank 2, pooled), floating point."""
    shape = [1, "L", width] if rank == 3 else [1, width]
    if embeds.dim() != rank or embeds.shape[0] != 1 or embeds.shape[-1] != width:
        raise InvalidArgument(name, f"shape {list(embeds.shape)} is not {shape}")
    if not embeds.is_floating_point():
        raise InvalidArgument(name, f"dtype {embeds.dtype} is not a floating point type")


class ImageEncoding(abc.ABC):
    """The encoder stage's part for a conditioning image: image -> named tensors, float32 on the CPU."""

    names: tuple[str, ...]

    @abc.abstractmethod
    def encode(self, image: Image.Image) -> dict[str, torch.Tensor]: ...


class Denoising(abc.ABC):
    """The denoiser stage's part: the transformer(s) and scheduler, and how a request is denoised."""

    conditioning_names: tuple[str, ...]  # the tensor names it accepts from the encoder

    @property
    @abc.abstractmethod
    def transformers(self) -> list[torch.nn.Module]: ...

    @property
    def dtype(self) -> torch.dtype:
        return self.transformers[0].dtype

    @abc.abstractmethod
    def check(self, params: Sampling) -> None:
        """Raise InvalidArgument naming the field for a request this model cannot take."""

    @abc.abstractmethod
    def check_conditioning(self, params: Sampling, tensors: Mapping[str, torch.Tensor]) -> None:
        """Raise InvalidArgument naming the tensor when one is missing, misshapen or of the wrong kind."""

    @abc.abstractmethod
    def start(self, params: Sampling, tensors: Mapping[str, torch.Tensor], device: torch.device) -> DenoiseRun: ...

    def warmup_conditioning(self, params: Sampling, sequence_length: int) -> dict[str, torch.Tensor] | None:
        """Zero conditioning of the shapes the encoder sends for `params` (prompt padded to `sequence_length`), to
        compile a size before any request brings it; None where the family cannot make it up (an image's)."""
        return None


@dataclasses.dataclass(frozen=True)
class RowSplitPlan:
    """How several decoder devices split one VAE's frames by rows (services/decoder/parallel_vae.py), as data in the
    spirit of diffusers' `_cp_plan`. Torch's own layers are the mechanism's to know (convolutions take halo rows,
    GroupNorm sums over every rank, constant padding pads only the frame's edges); a family names only its VAE's
    own classes that mix rows."""

    # Conv3d subclasses that pad themselves (`_padding` in F.pad order) and take forward(x, cache_x), the cached
    # frames going before x in time: Wan's causal convolution.
    causal_convs: tuple[type, ...] = ()
    # Modules that mix every position of a frame (a VAE's mid-block attention): each runs on the gathered frame.
    frame_attentions: tuple[type, ...] = ()
    # The VAE's attribute holding its encoder, when every layer in it is one of the above, a torch layer the
    # mechanism knows, or works row by row; None: the encoder runs whole on each device.
    encoder: str | None = None


class Decoding(abc.ABC):
    """Latents -> frames with the model's VAE. `vae` is the diffusers VAE (the decoder switches its tiling per
    request); `spatial_scale` is how many pixels one latent spans along a side; `row_split`, how `--devices N`
    splits the VAE (None: the decoder refuses more than one device for this family)."""

    vae: torch.nn.Module
    spatial_scale: int
    row_split: RowSplitPlan | None = None

    @abc.abstractmethod
    def check(self, latents: torch.Tensor) -> None:
        """Raise InvalidArgument("latents", ...) for latents this VAE cannot decode."""

    @abc.abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents as they travel -> frames float32 [n, F, H, W, 3] in 0..1, on the device."""

    def decode_chunks(self, latents: torch.Tensor) -> Iterator[torch.Tensor]:
        """`decode`'s frames a few at a time, in order ([n, f, H, W, 3] each; together exactly `decode`'s), so the
        first can go to the host and into the video file while the VAE decodes the rest. A VAE that decodes all
        frames at once yields them once."""
        yield self.decode(latents)

    def encode_condition(self, image: Image.Image, width: int, height: int, num_frames: int) -> dict[str, torch.Tensor]:
        """The conditioning image through the VAE's encoder, float32 on the CPU (models that take an image)."""
        raise InvalidArgument("image", "this model takes no conditioning image")

    @abc.abstractmethod
    def warmup_latents(self, width: int, height: int, num_frames: int) -> torch.Tensor:
        """Zero latents, as they travel, of one output of this size (the decoder's compile warm-up)."""


TransformerLoader = Callable[[str], torch.nn.Module]   # component name -> the loaded (maybe sharded) module


@dataclasses.dataclass(frozen=True)
class ParallelPlan:
    """How the denoiser gang splits one model's transformer, declared by its family (in the spirit of diffusers'
    `_cp_plan`), so services/denoiser/gang/ holds no family's names or forwards. The gang checks the layout
    against `heads` and `tp_widths` at start-up (naming the model's numbers), loads each transformer with
    `tensor_parallel` when tp > 1, and wraps it with `sequence_parallel`."""

    heads: int                                   # attention heads: ulysses x tp must divide them
    tp_widths: Mapping[str, int]                 # other widths TP splits, by config name (e.g. {"ffn_dim": 8960})
    # (transformer, gang, lse_kernel) -> a callable like the transformer that splits and gathers the tokens
    sequence_parallel: Callable[..., Callable[..., Any]]
    # (model_class, folder, tp axis, dtype, device) -> the transformer with its layers sharded; None: TP refused
    tensor_parallel: Callable[..., torch.nn.Module] | None = None


class Family(abc.ABC):
    name: str                            # "wan", "flux": what `diffmesh tiny-model --family` takes
    pipeline_classes: tuple[str, ...]    # model_index.json's _class_name values this family serves
    # Live previews' latent -> RGB maps, one per latent channel count the family's VAEs have (preview.py); latents
    # no map fits are previewed by a deterministic stand-in.
    latent_rgb: tuple[LatentRGB, ...] = ()

    @abc.abstractmethod
    def limits(self, model: ModelDir) -> Limits:
        """From the configs alone (the gateway's limits must not need weights)."""

    def parallel_plan(self, model: ModelDir) -> ParallelPlan | None:
        """How a gang splits this model's transformer (from its configs); None: the gang refuses it at start-up."""
        return None

    def preview(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents in the decoder's layout -> a small RGB preview, uint8 [n, h, w, 3] on their device (for video,
        the middle frame), at latent resolution. Cheap by design: it runs inside the denoising loop."""
        return project(latents, self.latent_rgb)

    def install_kernels(self, transformer: torch.nn.Module) -> None:
        """What a whole transformer on one device runs instead of diffusers' processors, so one device and a gang
        run the same kernels (equal numbers, fair timings). Nothing by default."""

    def negative_needed(self, limits: Limits, guidance_scale: float, true_cfg_scale: float,
                        negative_prompt: str) -> bool:
        """Whether a request runs a second (negative) branch, as the family's pipeline decides it."""
        if limits.true_cfg:
            return true_cfg_scale > 1.0 and bool(negative_prompt)
        if limits.guidance_embedding:
            return False
        return guidance_scale > 1.0

    @abc.abstractmethod
    def text_encoding(self, model: ModelDir, dtype: torch.dtype, device: torch.device) -> TextEncoding: ...

    def image_encoding(self, model: ModelDir, dtype: torch.dtype, device: torch.device) -> ImageEncoding | None:
        """The image encoder, for families conditioned on one through it (None: no image encoder)."""
        return None

    @abc.abstractmethod
    def denoising(self, model: ModelDir, load_transformer: TransformerLoader, device: torch.device) -> Denoising: ...

    @abc.abstractmethod
    def decoding(self, model: ModelDir, dtype: torch.dtype, device: torch.device) -> Decoding: ...
