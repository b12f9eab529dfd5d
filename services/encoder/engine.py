"""Text encoding: prompt -> UMT5 embeddings, with WanPipeline's exact semantics.

Same cleaning (diffusers' own `prompt_clean`), tokenisation (pad to max_sequence_length, truncate), and
trim-to-real-length then zero-pad-back as `WanPipeline._get_t5_prompt_embeds`, so the denoiser sees the very
tensors diffusers would build.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from diffusers.pipelines.wan.pipeline_wan import prompt_clean

from services.common.errors import InvalidArgument
from services.common.models import ModelDir
from services.common.platform import Platform

logger = logging.getLogger(__name__)

DEFAULT_MAX_SEQUENCE_LENGTH = 512  # WanPipeline.__call__'s default


@dataclasses.dataclass(frozen=True)
class EncodeParams:
    request_id: str
    prompt: str
    negative_prompt: str = ""
    with_negative: bool = True
    max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH


@dataclasses.dataclass(frozen=True)
class Embeddings:
    prompt_embeds: torch.Tensor                      # float32 [1, L, D] on CPU
    negative_prompt_embeds: torch.Tensor | None


class EncoderEngine:
    def __init__(self, model: ModelDir, platform: Platform, dtype: torch.dtype | None = None) -> None:
        self.model_name = model.name
        self.device = platform.device()
        self.tokenizer = model.load("tokenizer")
        self.text_encoder = model.load("text_encoder", dtype=dtype or platform.default_dtype(), device=self.device)
        logger.info("encoder loaded %s on %s", model.path, self.device)

    def check(self, params: EncodeParams) -> None:
        if not params.prompt.strip():
            raise InvalidArgument("prompt", "must not be empty")
        if not 1 <= params.max_sequence_length <= 4096:
            raise InvalidArgument("max_sequence_length", f"{params.max_sequence_length} is outside 1..4096")

    @torch.inference_mode()
    def encode(self, params: EncodeParams) -> Embeddings:
        # 1. Check inputs
        self.check(params)
        # 2. Encode the prompt, and the negative prompt when guidance needs it
        prompt_embeds = self._embed(params.prompt, params.max_sequence_length)
        negative = self._embed(params.negative_prompt, params.max_sequence_length) if params.with_negative else None
        return Embeddings(prompt_embeds, negative)

    def _embed(self, text: str, max_sequence_length: int) -> torch.Tensor:
        tokens = self.tokenizer(
            [prompt_clean(text)],
            padding="max_length",
            max_length=max_sequence_length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        ids, mask = tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device)
        seq_len = int(mask.gt(0).sum())
        hidden = self.text_encoder(ids, mask).last_hidden_state.float()
        # Keep the real tokens, zero the padding positions: what WanPipeline feeds its transformer.
        embeds = torch.zeros_like(hidden)
        embeds[:, :seq_len] = hidden[:, :seq_len]
        return embeds.cpu()
