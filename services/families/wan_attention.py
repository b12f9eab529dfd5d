"""Wan's self-attention as diffmesh runs it, on one device and in every gang layout: diffusers' WanAttnProcessor
with the rotary embedding fused, and, given a gang's axes, the sequence split over Ulysses and Ring ranks. One
device and the gang run the same kernels, so their numbers agree and their speeds compare like with like.
"""

from __future__ import annotations

import torch

from services.common.attention import attention
from services.denoiser.axes import ALONE, AxisGroup
from services.denoiser.ring import ring_attention
from services.denoiser.rotary import apply_rotary


class SequenceParallelAttention:
    """Replaces WanAttnProcessor in self-attention layers. q/k/v projections, norms and rotary run on this
    rank's tokens (and, under TP, its heads); attention itself sees the whole sequence.

    `ulysses` is the Ulysses axis' exchange (gang/attention.py's CollectiveExchange or gang/copy_engine.py's
    CopyEngineExchange), None without one. On one device (no exchange, ring ALONE) it is diffusers' processor with
    the rotary embedding fused, so one device and the gang run the same kernels."""

    def __init__(self, ulysses=None, ring: AxisGroup = ALONE, lse_kernel=None) -> None:
        self.ulysses = ulysses
        self.ring = ring
        self.lse_kernel = lse_kernel
        # Real keys per ring block, set by the gang's transformer for each forward; None: every key is real.
        self.valid_keys: list[int] | None = None

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states=None, attention_mask=None,
                 rotary_emb=None) -> torch.Tensor:
        if self.ulysses is not None:
            query, key, value = self._exchange_projections(attn, hidden_states, rotary_emb)
        else:
            query = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
            key = attn.norm_k(attn.to_k(hidden_states)).unflatten(2, (attn.heads, -1))
            value = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
            if rotary_emb is not None:
                query, key = apply_rotary(query, *rotary_emb), apply_rotary(key, *rotary_emb)
        q, k, v = (x.transpose(1, 2) for x in (query, key, value))          # [B, h, n, d] views
        if self.ring.size > 1:
            out = ring_attention(q, k, v, self.ring, self.valid_keys, self.lse_kernel)
        else:
            keys = self.valid_keys[0] if self.valid_keys else None
            out = attention(q, k[:, :, :keys], v[:, :, :keys])
        out = out.transpose(1, 2)                                           # [B, n, h, d]
        if self.ulysses is not None:
            self.ulysses.inputs_read()
            out = self.ulysses.heads_to_tokens(out)                         # [B, s, h, d]
        out = attn.to_out[0](out.flatten(2, 3).type_as(query))
        if self.ulysses is not None:
            self.ulysses.output_read()
        return attn.to_out[1](out)

    def _exchange_projections(self, attn, hidden_states: torch.Tensor, rotary_emb):
        """q, k, v projected on this rank's tokens and exchanged for the ring block's tokens on h/U heads.

        Each exchange is in flight while the next tensor is projected: v first (it needs nothing after the
        exchange), then q, whose rotary runs while k is still travelling. Communication kernels can share the
        device with GEMMs and element-wise kernels but not with the attention kernel that follows, so this is
        where the exchange can hide. Rotary runs after the exchange (it is per token and head, so the numbers are
        the same), on the ring block's frequencies; the order of operations changes nothing in the result.
        """
        exchange = self.ulysses
        exchange.start()
        value = exchange.send(attn.to_v(hidden_states), "v", attn.heads)
        query = exchange.send(attn.norm_q(attn.to_q(hidden_states)), "q", attn.heads)
        key = exchange.send(attn.norm_k(attn.to_k(hidden_states)), "k", attn.heads)
        query = query.wait()
        if rotary_emb is not None:
            query = apply_rotary(query, *rotary_emb)                        # while k travels
        key = key.wait()
        if rotary_emb is not None:
            key = apply_rotary(key, *rotary_emb)
        return query, key, value.wait()


def install_self_attention(model: torch.nn.Module, ulysses=None, ring: AxisGroup = ALONE,
                           lse_kernel=None) -> list[SequenceParallelAttention]:
    """Give every Wan block's self-attention a SequenceParallelAttention; returns them (in block order)."""
    processors = []
    for block in model.blocks:
        processor = SequenceParallelAttention(ulysses, ring, lse_kernel)
        block.attn1.set_processor(processor)
        processors.append(processor)
    return processors
