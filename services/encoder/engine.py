"""Text encoding: prompt -> the model family's conditioning tensors.

The family (services/families/) does the encoding exactly as its diffusers pipeline does; this engine checks
the request, decides with the family whether a negative branch is needed, and loads once.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from services.common import metrics
from services.common.errors import InvalidArgument
from services.common.images import decode_image
from services.common.models import ModelDir
from services.common.platform import Platform
from services.families import family_for

logger = logging.getLogger(__name__)

MAX_SEQUENCE_LENGTH = 4096


@dataclasses.dataclass(frozen=True)
class EncodeParams:
    request_id: str
    prompt: str
    negative_prompt: str = ""
    guidance_scale: float = 5.0
    true_cfg_scale: float = 1.0
    max_sequence_length: int | None = None     # None: the family's default
    image: bytes = b""                         # an encoded conditioning image (image-to-video), or none


class EncoderEngine:
    def __init__(self, model: ModelDir, platform: Platform, dtype: torch.dtype | None = None) -> None:
        self.model_name = model.name
        self.device = platform.device()
        self.family = family_for(model)
        self.limits = self.family.limits(model)
        weights_dtype = dtype or platform.default_dtype()
        self.encoding = self.family.text_encoding(model, weights_dtype, self.device)
        self.image_encoding = self.family.image_encoding(model, weights_dtype, self.device)
        logger.info("encoder loaded %s (%s family) on %s", model.path, self.family.name, self.device)

    def check(self, params: EncodeParams) -> None:
        if not params.prompt.strip():
            raise InvalidArgument("prompt", "must not be empty")
        length = self.sequence_length(params)
        if not 1 <= length <= MAX_SEQUENCE_LENGTH:
            raise InvalidArgument("max_sequence_length", f"{length} is outside 1..{MAX_SEQUENCE_LENGTH}")
        if params.image and not self.limits.takes_image:
            raise InvalidArgument("image", f"{self.model_name} ({self.limits.task}) takes no conditioning image")
        if self.limits.needs_image and not params.image:
            raise InvalidArgument("image", f"{self.model_name} ({self.limits.task}) needs a conditioning image")

    def sequence_length(self, params: EncodeParams) -> int:
        if params.max_sequence_length is None:
            return self.limits.max_sequence_length
        return params.max_sequence_length

    def negative_needed(self, params: EncodeParams) -> bool:
        return self.family.negative_needed(self.limits, params.guidance_scale, params.true_cfg_scale,
                                           params.negative_prompt)

    @torch.inference_mode()
    def encode(self, params: EncodeParams) -> dict[str, torch.Tensor]:
        """Named float32 tensors on the CPU, in the order they are sent."""
        self.check(params)
        negative = params.negative_prompt if self.negative_needed(params) else None
        with metrics.phase("encode", self.model_name):
            tensors = self.encoding.encode(params.prompt, negative, self.sequence_length(params))
            if params.image and self.image_encoding is not None:
                tensors.update(self.image_encoding.encode(decode_image(params.image)))
        return tensors
