"""WanTransformer3DModel run by a gang: the same diffusers modules, with the token sequence split across the
sequence-parallel ranks and (under TP) the blocks' heads and FFN split across the TP group.

Only the top-level forward is rewritten (to split and gather the sequence); blocks run diffusers' own
`WanTransformerBlock.forward`, with the self-attention processor swapped for the sequence-parallel one.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from services.denoiser.attention import install_self_attention
from services.denoiser.axes import AxisGroup
from services.denoiser.gang.distributed import Gang
from services.denoiser.gang.exchange import ulysses_exchange


def local_slice(x: torch.Tensor, dim: int, start: int, length: int) -> torch.Tensor:
    """x[start:start+length] along `dim`, zero-padded past the end (the sequence's padding)."""
    available = max(0, min(length, x.shape[dim] - start))
    piece = x.narrow(dim, min(start, x.shape[dim]), available)
    if available == length:
        return piece
    pad = [0, 0] * (x.dim() - dim - 1) + [0, length - available]
    return F.pad(piece, pad)


def gather_sequence(x: torch.Tensor, sequence: AxisGroup) -> torch.Tensor:
    """Concatenate every sequence rank's [B, s, C] slice, in rank order, into [B, degree*s, C]."""
    if sequence.size == 1:
        return x
    pieces = [torch.empty_like(x) for _ in range(sequence.size)]
    dist.all_gather(pieces, x.contiguous(), group=sequence.group)
    return torch.cat(pieces, dim=1)


class ParallelTransformer:
    """Callable like the diffusers model for what the denoiser needs (hidden_states, timestep, text)."""

    def __init__(self, model: torch.nn.Module, gang: Gang, lse_kernel) -> None:
        self.model = model
        self.sequence = gang.axis("sequence")
        self.ulysses = gang.axis("ulysses")
        self.ring = gang.axis("ring")
        self.processors = install_self_attention(model, ulysses_exchange(gang), self.ring, lse_kernel)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def config(self):
        return self.model.config

    def __call__(self, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 return_dict: bool = False) -> tuple[torch.Tensor]:
        if self.sequence.size == 1:
            return self.model(hidden_states=hidden_states, timestep=timestep,
                              encoder_hidden_states=encoder_hidden_states, return_dict=False)
        return (self._forward_split(hidden_states, timestep, encoder_hidden_states),)

    def _forward_split(self, hidden_states: torch.Tensor, timestep: torch.Tensor,
                       encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        model = self.model
        batch, _, frames, height, width = hidden_states.shape
        p_t, p_h, p_w = model.config.patch_size
        grid = (frames // p_t, height // p_h, width // p_w)
        tokens = math.prod(grid)

        # 1. This rank's slice of the (padded) sequence; each ring block's count of real keys
        per_rank = -(-tokens // self.sequence.size)
        start = self.sequence.index * per_rank
        block = per_rank * self.ulysses.size
        valid_keys = [max(0, min(block, tokens - r * block)) for r in range(self.ring.size)]
        for processor in self.processors:
            processor.valid_keys = valid_keys

        # Rotary frequencies for the tokens attention sees them on: Ulysses applies them after its exchange,
        # to the ring block's tokens; otherwise to this rank's own.
        freqs_cos, freqs_sin = model.rope(hidden_states)                       # [1, S, 1, d]
        if self.ulysses.size > 1:
            rotary_start, rotary_length = self.ring.index * block, block
        else:
            rotary_start, rotary_length = start, per_rank
        rotary = tuple(local_slice(f, 1, rotary_start, rotary_length) for f in (freqs_cos, freqs_sin))
        patches = model.patch_embedding(hidden_states).flatten(2).transpose(1, 2)  # [B, S, D]
        x = local_slice(patches, 1, start, per_rank).contiguous()

        # 2. Conditions, as diffusers' forward computes them (Wan2.1: one timestep per sample)
        if timestep.ndim != 1:
            raise ValueError("the gang supports one timestep per sample (Wan2.1), not per-token timesteps")
        temb, timestep_proj, text, _ = model.condition_embedder(timestep, encoder_hidden_states, None)
        timestep_proj = timestep_proj.unflatten(1, (6, -1))

        # 3. Blocks, on this rank's tokens
        for transformer_block in model.blocks:
            x = transformer_block(x, text, timestep_proj, rotary)

        # 4. Output norm and projection, then every rank's tokens back in order, padding dropped
        shift, scale = (model.scale_shift_table.to(temb.device) + temb.unsqueeze(1)).chunk(2, dim=1)
        x = (model.norm_out(x.float()) * (1 + scale) + shift).type_as(x)
        x = model.proj_out(x)
        x = gather_sequence(x, self.sequence)[:, :tokens]

        # 5. Unpatchify, as diffusers does
        x = x.reshape(batch, *grid, p_t, p_h, p_w, -1)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.flatten(6, 7).flatten(4, 5).flatten(2, 3)
