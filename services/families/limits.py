"""What requests to one model may ask for (`Limits`): torch-free, so the gateway, which only reads them off the
wire, does not import the families' diffusers code."""

from __future__ import annotations

import dataclasses

TASKS = ("text-to-image", "text-to-video", "image-to-video")


@dataclasses.dataclass(frozen=True)
class Limits:
    """What requests to one model may ask for, and what they get when they do not say. Served to the gateway
    by the denoiser (Describe), so the gateway does no family arithmetic."""

    family: str
    task: str                        # one of TASKS
    size_multiple: int               # width and height must be multiples of this
    max_side: int                    # and at most this (the transformer's positions)
    frame_multiple: int              # num_frames = frame_multiple * k + 1; 0: images only (num_frames = 1)
    max_frames: int
    default_width: int
    default_height: int
    default_frames: int
    default_steps: int
    default_guidance_scale: float
    default_fps: int = 16
    true_cfg: bool = False           # a negative prompt with true_cfg_scale > 1 runs a second branch
    guidance_embedding: bool = False  # guidance_scale is fed to the transformer, not used for CFG
    needs_image: bool = False        # a request must carry a conditioning image
    accepts_image: bool = False      # a request may carry one (needs_image implies it; Wan2.2 TI2V-5B: optional)
    max_sequence_length: int = 512
    experts: int = 1                 # transformers switching during the loop (Wan2.2 A14B: 2, guidance_scale_2)

    @property
    def makes_video(self) -> bool:
        return self.frame_multiple > 0

    @property
    def takes_image(self) -> bool:
        """Whether a conditioning image is welcome: refused only where the model neither needs nor accepts one."""
        return self.needs_image or self.accepts_image
