"""The denoising loop: seed + conditioning tensors -> final latents.

Family-free: the model's family (services/families/) builds each request's run (timesteps, first latents,
each step's noise-prediction call); this loop drives it, checks for cancellation between steps and reports
each step. No I/O here: the server feeds it tensors and receives a callback per step, and with `preview_every`
a live preview (the family's latent -> RGB projection) every k steps.

Two things are handed in rather than decided here, so that a gang (services/denoiser/gang/) runs this same loop
on every rank: how a transformer is loaded (whole on this device by default; sharded and sequence-parallel in a
gang) and the noise predictor that runs each step's branches (predict.py; the gang's splits them across ranks).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping

import torch

from services.common import metrics
from services.common.attention import current_attention
from services.common.errors import Cancelled, InvalidArgument
from services.common.limits import (
    check_guidance,
    check_outputs,
    check_preview_every,
    check_request_id,
    check_seed,
    check_steps,
)
from services.common.models import ModelDir
from services.common.platform import Platform
from services.denoiser.batching import BatchOptions, Member, denoise_together, make_batch_invariant
from services.denoiser.cache import Agreement, CacheCounts, StepCacheRun, check_cache
from services.denoiser.compile import CompileOptions, compile_blocks
from services.denoiser.offload import OffloadOptions, check_offload, load_device, offload_blocks
from services.denoiser.predict import NoisePredictor, predict_on_one_device
from services.denoiser.quantize import QuantizeOptions, check_quantize, quantize_blocks
from services.families import family_for
from services.families.base import DenoiseRun, Sampling

logger = logging.getLogger(__name__)

# The request parameters the denoiser takes: the family-neutral set every stage shares.
DenoiseParams = Sampling
StepCallback = Callable[[int, int], None]      # (steps done, total steps)
PreviewCallback = Callable[[int, int, torch.Tensor], None]   # (steps done, total steps, uint8 [n, h, w, 3] CPU)
TransformerLoad = Callable[[ModelDir, str, torch.dtype], torch.nn.Module]   # (model, component, dtype) -> module


class DenoiserEngine:
    def __init__(self, model: ModelDir, platform: Platform, dtype: torch.dtype | None = None,
                 device: torch.device | None = None, *, load: TransformerLoad | None = None,
                 predict_noise: NoisePredictor = predict_on_one_device, compile: CompileOptions | None = None,
                 batching: BatchOptions | None = None, offload: OffloadOptions | None = None,
                 quantize: QuantizeOptions | None = None) -> None:
        self.model_name = model.name
        self.platform = platform
        self.device = device or platform.device()
        self.family = family_for(model)
        self.limits = self.family.limits(model)
        self.predict_noise = predict_noise
        load = load or self.load_whole
        weights_dtype = dtype or platform.default_dtype()
        self.attention = current_attention()
        self.compile = compile
        # Sizes (width, height, frames, outputs) whose blocks are compiled, when compiling.
        self.compiled_sizes: set[tuple[int, int, int, int]] = set()
        # A gang's ranks agree on step-cache decisions (gang/engine.py sets it); None: one device decides alone.
        self.cache_agreement: Agreement | None = None
        self.last_cache: CacheCounts | None = None       # the last cached request's skip counts (no tensors)

        # Request batching (batching.py): the server's BatchQueue drives it; None or max_batch 1: each request alone.
        # With --compile, a batch of n outputs compiles the blocks for n (note_compile says so).
        self.batching = batching if batching is not None and batching.enabled else None

        # --dit-offload (offload.py): the blocks live in pinned host memory and stream to the device per forward.
        check_offload(offload, compile=compile)
        self.offload = offload
        # --quantize fp8 (quantize.py): lossy, on request; the block linears as float8 matmuls.
        check_quantize(quantize, offload=offload)

        def load_component(component: str) -> torch.nn.Module:
            transformer = self.attention.install(load(model, component, weights_dtype))
            if quantize is not None:
                transformer = quantize_blocks(transformer, platform, self.device, quantize,
                                              compiled=compile is not None)
            if self.batching and self.device.type == "cpu":
                # Bit-equal to solo on CPU (batching.py); a GPU's kernels are picked by shape anyway: within rounding.
                transformer = make_batch_invariant(transformer)
            if offload is not None:
                transformer = offload_blocks(transformer, self.device, offload)
            return compile_blocks(transformer, compile) if compile else transformer

        self.denoising = self.family.denoising(model, load_component, self.device)
        logger.info("denoiser loaded %s (%s family) on %s (%s)", model.path, self.family.name, self.device,
                    self.denoising.dtype)
        if compile and compile.warmup_sizes:
            self.warm_up(compile.warmup_sizes)

    def warm_up(self, sizes) -> None:
        """Compile each (width, height, frames) now, with a two-step denoise on zero conditioning; with --max-batch
        N, for each batch of n = 1..N outputs (each n compiles: static shapes). A size this model cannot take fails
        start-up naming it."""
        most = self.batching.max_batch if self.batching else 1
        if most > 1:
            logger.info("--warmup-sizes with --max-batch %d: each size warms up for batches of n=1..%d outputs, one "
                        "compile each", most, most)
        for width, height, frames in sizes:
            params = Sampling("warmup", width, height, frames, 2, self.limits.default_guidance_scale, 0)
            try:
                self.check(params)
                tensors = self.denoising.warmup_conditioning(params, self.limits.max_sequence_length)
            except InvalidArgument as error:
                raise ValueError(f"--warmup-sizes {width}x{height}x{frames}: {error.message}") from None
            if tensors is None:
                logger.warning("warm-up is not available for %s (its conditioning comes from an image): the first "
                               "request of each size compiles it", self.model_name)
                return
            started = time.monotonic()
            for n in range(1, most + 1):
                if n == 1:
                    self.denoise(params, tensors)
                    continue
                batch = [Member(params, tensors) for _ in range(n)]
                denoise_together(self, batch)
                if batch[0].error is not None:
                    raise batch[0].error
            logger.info("compiled %dx%dx%d%s in %.1fs", width, height, frames,
                        f" for n=1..{most}" if most > 1 else "", time.monotonic() - started)

    def note_compile(self, size: tuple[int, int, int, int], request_id: str, waiting: str = "this request") -> None:
        """With --compile: a size (width, height, frames, outputs per transformer call) first seen compiles the
        blocks now (static shapes), which the log says unless warm-up is compiling it."""
        if self.compile and size not in self.compiled_sizes:
            self.compiled_sizes.add(size)
            if request_id != "warmup":
                logger.info("compiling the blocks for %dx%dx%d, n=%d (not in --warmup-sizes): %s waits for it, "
                            "later ones of this size do not", *size, waiting)

    def load_whole(self, model: ModelDir, component: str, dtype: torch.dtype) -> torch.nn.Module:
        """A whole transformer on this device; where the gang's self-attention processor serves its family, it
        runs here too (with nothing to exchange: the same kernels, so one device and a gang compute the same
        numbers)."""
        # Offloaded, it loads to the host: the device need not hold the whole model, not even while loading.
        transformer = model.load(component, dtype=dtype, device=load_device(self.device, self.offload))
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
        check_seed(params.seed)
        check_preview_every(params.preview_every, params.num_inference_steps)
        check_cache(params.cache, self.family.name)     # with --compile too: the hooks wrap the compiled blocks
        if params.request_id:   # a gang's ranks log under it
            check_request_id(params.request_id, "request_id")
        self.denoising.check(params)

    def check_conditioning(self, params: DenoiseParams, tensors: Mapping[str, torch.Tensor]) -> None:
        self.denoising.check_conditioning(params, tensors)

    def denoise(self, params: DenoiseParams, tensors: Mapping[str, torch.Tensor], on_step: StepCallback | None = None,
                cancelled: Callable[[], bool] = lambda: False, on_preview: PreviewCallback | None = None
                ) -> torch.Tensor:
        """The loop below, with the request's step caching (if any) on the transformers for this run only."""
        if params.cache is None:
            return self._denoise(params, tensors, on_step, cancelled, on_preview)
        self.check(params)
        run = StepCacheRun(params.cache, self.denoising.transformers, self.family.name, params.num_inference_steps,
                           self.cache_agreement)
        with run:
            result = self._denoise(params, tensors, on_step, cancelled, on_preview)
        self.last_cache = run.counts()
        logger.info("%s", self.last_cache.summary())
        return result

    @torch.inference_mode()
    def _denoise(
        self,
        params: DenoiseParams,
        tensors: Mapping[str, torch.Tensor],
        on_step: StepCallback | None = None,
        cancelled: Callable[[], bool] = lambda: False,
        on_preview: PreviewCallback | None = None,
    ) -> torch.Tensor:
        """Run the whole loop; returns float32 latents on the CPU. Raises Cancelled between steps if asked. With
        `on_preview` and params.preview_every = k, it gets a preview after steps k, 2k, ... before the last (whose
        latents the caller gets at once); a preview only reads the loop's tensors, so the result is the same
        with or without."""
        self.check(params)
        self.check_conditioning(params, tensors)
        self.note_compile((params.width, params.height, params.num_frames, params.num_outputs), params.request_id)
        # 2. The family's run: scheduler and timesteps, first latents (drawn on the CPU from the seed)
        run = self.denoising.start(params, tensors, self.device)
        latents = run.latents
        # 3. Denoising loop
        total = len(run.timesteps)
        every = params.preview_every if on_preview is not None else 0
        # On an accelerator a lap ends when the host has queued the step; the host runs at most a step or so ahead
        # (the launch queue is bounded), so laps average to the steps' times, and the loop's time (after the
        # latents reach the CPU) is exact.
        steps = metrics.StepTimer(self.model_name)
        for i, t in enumerate(run.timesteps):
            if cancelled():
                # INFO, not an error: the client chose it (and the gRPC layer reports CANCELLED to nobody).
                logger.info("cancelled at step %d of %d", i, total)
                raise Cancelled(f"cancelled at step {i} of {total}")
            with self.attention.scope():
                noise_pred = self.predict_noise(run.step_call(latents, t, i))
            preview = None
            if every and (i + 1) % every == 0 and i + 1 < total:
                # Queued before the scheduler's step: the estimate needs this step's input latents and prediction.
                preview = self.preview(run, latents, noise_pred, i)
            latents = run.scheduler.step(noise_pred, t, latents, return_dict=False)[0]
            latents = run.after_step(latents, i)
            steps.lap()
            if on_step is not None:
                on_step(i + 1, total)
            if preview is not None:
                # To the CPU only once the step is queued too: the copy waits for the device once every k steps,
                # with the next step's work the only thing not yet queued (bench/previews.py counts this wait).
                on_preview(i + 1, total, preview.cpu())
        result = run.result(latents)
        steps.done()
        return result

    def preview(self, run: DenoiseRun, latents: torch.Tensor, noise_pred: torch.Tensor, index: int) -> torch.Tensor:
        """The family's preview of step `index`'s clean-latents estimate, uint8 [n, h, w, 3] on the device."""
        return self.family.preview(run.preview_latents(latents, noise_pred, index))
