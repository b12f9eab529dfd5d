"""What both front doors (gRPC and REST) share: request defaults, job creation, running a generation."""

from __future__ import annotations

import secrets
import uuid
from collections.abc import AsyncIterator

from services.common.errors import Unavailable
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
        # Set on SIGTERM: no new job is accepted (503 naming the gateway) while accepted ones finish.
        self.draining = False

    @property
    def models(self) -> list[str]:
        return self.pipeline.model_names

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
    ) -> GenerationRequest:
        """The one frozen request: what the caller left out (None) takes the gateway's default, then the model's
        (from its limits), here and only here; what it gave is kept as given, so an explicit 0 fails validation
        naming its field instead of silently becoming a default. Draws a seed if none. An unknown model is
        NotFound; a model whose stages are down, Unavailable."""
        name = model or self.config.model_name
        limits = await self.pipeline.limits(name)
        d = self.config.defaults
        return GenerationRequest(
            request_id=request_id or uuid.uuid4().hex[:16],
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
            seed=secrets.randbits(63) if seed is None else int(seed),
            n=first_given(n, 1),
            format=format or "auto",
            fps=first_given(fps, limits.default_fps),
            return_latents=return_latents,
            return_frames=return_frames,
            timeout_s=self.config.request_timeout_s,
            image=image,
        )

    async def submit(self, request: GenerationRequest, prefix: str = "gen") -> Job:
        """Validate and register a job; raises InvalidArgument / NotFound / ResourceExhausted before any work."""
        if self.draining:
            raise Unavailable("gateway", "shutting down; retry on another gateway replica or after the restart")
        await self.pipeline.validate(request)
        return self.jobs.create(request, new_job_id(prefix))

    def events(self, job: Job) -> AsyncIterator[Event]:
        return self.jobs.track(job, self.pipeline.generate(job.request))

    def start_background(self, job: Job) -> None:
        self.jobs.start_background(job, self.pipeline.generate(job.request))
