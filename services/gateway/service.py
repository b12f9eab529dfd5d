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

    def new_request(
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
        seed: int | None = None,
        n: int = 0,
        format: str = "auto",
        fps: int = 0,
        return_latents: bool = False,
        return_frames: bool = False,
        request_id: str = "",
    ) -> GenerationRequest:
        """Fill what the caller left out (0 / None / '') with the gateway's defaults; draw a seed if none."""
        d = self.config.defaults
        return GenerationRequest(
            request_id=request_id or uuid.uuid4().hex[:16],
            model=model or self.config.model_name,
            prompt=prompt,
            negative_prompt=negative_prompt or "",
            width=width or d.width,
            height=height or d.height,
            num_frames=num_frames or d.num_frames,
            num_inference_steps=num_inference_steps or d.num_inference_steps,
            guidance_scale=d.guidance_scale if guidance_scale is None else float(guidance_scale),
            seed=secrets.randbits(63) if seed is None else int(seed),
            n=n or 1,
            format=format or "auto",
            fps=fps or d.fps,
            return_latents=return_latents,
            return_frames=return_frames,
            timeout_s=self.config.request_timeout_s,
        )

    def submit(self, request: GenerationRequest, prefix: str = "gen") -> Job:
        """Validate and register a job; raises InvalidArgument / NotFound / ResourceExhausted before any work."""
        request.validate(self.models, self.pipeline.max_output_pixels)
        return self.jobs.create(request, new_job_id(prefix))

    def events(self, job: Job) -> AsyncIterator[Event]:
        return self.jobs.track(job, self.pipeline.generate(job.request))

    def start_background(self, job: Job) -> None:
        self.jobs.start_background(job, self.pipeline.generate(job.request))
