"""What both front doors (gRPC and REST) share: request defaults, job creation, running a generation."""

from __future__ import annotations

import secrets
import uuid
from collections.abc import AsyncIterator

from services.common.errors import NotFound, Unavailable
from services.common.limits import check_request_id
from services.denoiser.cache import StepCache
from services.families.limits import Limits
from services.gateway import media_assets
from services.gateway.auth import Gatekeeper
from services.gateway.config import GatewayConfig
from services.gateway.jobs import Job, JobStore, new_job_id
from services.gateway.pipeline import Event, GenerationRequest, MeshPipeline


def first_given(*values):
    """The first value that is not None (0 counts as given)."""
    return next(value for value in values if value is not None)


class GatewayService:
    def __init__(self, config: GatewayConfig, pipeline: MeshPipeline, jobs: JobStore) -> None:
        self.config = config
        self.pipeline = pipeline
        self.jobs = jobs
        self._draining = False
        self.gatekeeper = Gatekeeper(config.api_keys, config.rate_limit_per_minute)
        # Every name a request may give -> the model's id (its first served name), for both front doors.
        self.served_names: dict[str, str] = {}
        for model in config.models:
            for name in (model.name, *model.aliases):
                self.served_names.setdefault(name, model.name)
        for name in pipeline.model_names:       # a pipeline built without the config's models (tests, tools)
            self.served_names.setdefault(name, name)

    def admit(self, authorization: str | None) -> str:
        """Who is calling (the API key's id; "" with no keys configured), before any work: Unauthenticated for a
        missing or wrong key, ResourceExhausted past the key's rate limit."""
        return self.gatekeeper.admit(authorization)

    @property
    def draining(self) -> bool:
        """Set on SIGTERM: no new job is accepted (503 naming the gateway) and no queued job starts, while the
        running ones finish (then JobStore.shutdown keeps the rest for the next start)."""
        return self._draining

    @draining.setter
    def draining(self, value: bool) -> None:
        self._draining = value
        if value:
            self.jobs.stop_dispatching()

    async def job_of(self, job_id: str, owner: str) -> Job:
        """The job if `owner` submitted it. Another key's job is NotFound exactly as a job that does not exist
        (a 403 would tell the caller it exists)."""
        job = await self.jobs.get(job_id)
        if job.request.owner != owner:
            raise NotFound(f"job {job_id!r} not found")
        return job

    async def cancel_job(self, job_id: str, owner: str) -> Job:
        await self.job_of(job_id, owner)
        return await self.jobs.cancel(job_id)

    async def delete_job(self, job_id: str, owner: str) -> None:
        """Delete `owner`'s job, its rows and its files (a job not finished is cancelled first)."""
        await self.job_of(job_id, owner)
        await self.jobs.delete(job_id)

    def latest_preview(self, job_id: str) -> tuple[bytes, str] | None:
        """A running job's latest live preview (encoded image, mime type), if it has one yet: None unless it asked
        for previews (preview_every) and runs on this gateway (JobStore.latest_preview). As WebP, the media type of
        a finished video's thumbnail (media_assets.thumbnail), so the variant's type does not change when the job
        ends; at latent resolution (1/8 of the video's sides for Wan), which is what a preview is."""
        png = self.jobs.latest_preview(job_id)
        if png is None:
            return None
        return media_assets.encode_image(png, "webp", media_assets.THUMBNAIL_QUALITY)

    @property
    def models(self) -> list[str]:
        """The served models' ids (their first names), the default first."""
        return self.pipeline.model_names

    def model_id(self, name: str) -> str:
        """The id of the model a request names: its id or one of its aliases (--served-model-name); "" is the
        default model. Everything past the front doors (jobs, stages, responses) uses the id only."""
        if not name:
            return self.config.model_name or self.pipeline.model_names[0]
        try:
            return self.served_names[name]
        except KeyError:
            raise NotFound(f"model {name[:128]!r} not found; available: {list(self.served_names)}") from None

    async def limits(self, name: str) -> Limits:
        """The limits of the model a request names (an alias or "" too)."""
        return await self.pipeline.limits(self.model_id(name))

    async def new_request(
        self,
        *,
        prompt: str,
        model: str = "",
        negative_prompt: str = "",
        width: int | None = None,
        height: int | None = None,
        num_frames: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        true_cfg_scale: float | None = None,
        guidance_scale_2: float | None = None,
        seed: int | None = None,
        n: int | None = None,
        format: str = "auto",
        fps: int | None = None,
        return_latents: bool = False,
        return_frames: bool = False,
        request_id: str = "",
        image: bytes = b"",
        owner: str = "",
        preview_every: int | None = None,
        cache: StepCache | None = None,
    ) -> GenerationRequest:
        """The one frozen request: what the caller left out (None) takes the gateway's default, then the model's
        (from its limits), here and only here; what it gave is kept as given, so an explicit 0 fails validation
        naming its field instead of silently becoming a default. Draws a seed if none. An unknown model is
        NotFound; a model whose stages are down, Unavailable."""
        name = self.model_id(model)
        limits = await self.pipeline.limits(name)
        d = self.config.defaults
        return GenerationRequest(
            request_id=check_request_id(request_id, "request_id") if request_id else uuid.uuid4().hex[:16],
            model=name,
            prompt=prompt,
            negative_prompt=negative_prompt or "",
            width=first_given(width, d.width, limits.default_width),
            height=first_given(height, d.height, limits.default_height),
            num_frames=first_given(num_frames, 1),
            num_inference_steps=first_given(num_inference_steps, d.num_inference_steps, limits.default_steps),
            guidance_scale=limits.default_guidance_scale if guidance_scale is None else float(guidance_scale),
            true_cfg_scale=1.0 if true_cfg_scale is None else float(true_cfg_scale),
            guidance_scale_2=None if guidance_scale_2 is None else float(guidance_scale_2),
            seed=secrets.randbits(32) if seed is None else int(seed),    # 0..MAX_SEED: seeds are 32-bit
            n=first_given(n, 1),
            format=format or "auto",
            fps=first_given(fps, limits.default_fps),
            return_latents=return_latents,
            return_frames=return_frames,
            timeout_s=self.config.request_timeout_s,
            image=image,
            owner=owner,
            preview_every=first_given(preview_every, 0),
            cache=cache,
        )

    async def submit(self, request: GenerationRequest, prefix: str = "gen", stream: bool = True) -> Job:
        """Validate and queue a job (the queue runs it); raises InvalidArgument / NotFound / ResourceExhausted
        before any work. `stream`: the caller reads the job's events with `events` (synchronous front doors);
        without, the job runs for nobody and its outputs are kept (REST video jobs)."""
        if self.draining:
            raise Unavailable("gateway", "shutting down; retry on another gateway replica or after the restart")
        await self.pipeline.validate(request)
        await self.pipeline.check_serving(request.model)
        return await self.jobs.submit(request, new_job_id(prefix), stream=stream)

    def events(self, job: Job) -> AsyncIterator[Event]:
        """A streamed job's events until it ends; raises what ended it, if not success. Stopping early cancels it."""
        return self.jobs.events(job.id)
