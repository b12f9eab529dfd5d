"""What both front doors (gRPC and REST) share: request defaults, job creation, running a generation."""

from __future__ import annotations

import secrets
import uuid
from collections.abc import AsyncIterator

from services.gateway.config import GatewayConfig
from services.gateway.jobs import Job, JobStore, new_job_id
from services.gateway.pipeline import Event, GenerationRequest, MeshPipeline


class GatewayService:
    def __init__(self, config: GatewayConfig, pipeline: MeshPipeline, jobs: JobStore) -> None:
        self.config = config
        self.pipeline = pipeline
        self.jobs = jobs

    @property
    def models(self) -> list[str]:
        return self.pipeline.model_names

    async def new_request(
        self,
        *,
        prompt: str,
        model: str = "",
        negative_prompt: str = "",
        width: int = 0,
        height: int = 0,
        num_frames: int = 0,
        num_inference_steps: int = 0,
        guidance_scale: float | None = None,
        true_cfg_scale: float | None = None,
        guidance_scale_2: float | None = None,
        seed: int | None = None,
        n: int = 0,
        format: str = "auto",
        fps: int = 0,
        return_latents: bool = False,
        return_frames: bool = False,
        request_id: str = "",
        image: bytes = b"",
    ) -> GenerationRequest:
        """Fill what the caller left out (0 / None / '') with the gateway's defaults, then the model's (from its
        limits); draw a seed if none. An unknown model is NotFound; a model whose stages are down, Unavailable."""
        name = model or self.config.model_name
        limits = await self.pipeline.limits(name)
        d = self.config.defaults
        return GenerationRequest(
            request_id=request_id or uuid.uuid4().hex[:16],
            model=name,
            prompt=prompt,
            negative_prompt=negative_prompt or "",
            width=width or d.width or limits.default_width,
            height=height or d.height or limits.default_height,
            num_frames=num_frames or 1,
            num_inference_steps=num_inference_steps or d.num_inference_steps or limits.default_steps,
            guidance_scale=limits.default_guidance_scale if guidance_scale is None else float(guidance_scale),
            true_cfg_scale=1.0 if true_cfg_scale is None else float(true_cfg_scale),
            guidance_scale_2=None if guidance_scale_2 is None else float(guidance_scale_2),
            seed=secrets.randbits(63) if seed is None else int(seed),
            n=n or 1,
            format=format or "auto",
            fps=fps or limits.default_fps,
            return_latents=return_latents,
            return_frames=return_frames,
            timeout_s=self.config.request_timeout_s,
            image=image,
        )

    async def submit(self, request: GenerationRequest, prefix: str = "gen") -> Job:
        """Validate and register a job; raises InvalidArgument / NotFound / ResourceExhausted before any work."""
        await self.pipeline.validate(request)
        return self.jobs.create(request, new_job_id(prefix))
    def events(self, job: Job) -> AsyncIterator[Event]:
        return self.jobs.track(job, self.pipeline.generate(job.request))

    def start_background(self, job: Job) -> None:
        self.jobs.start_background(job, self.pipeline.generate(job.request))
