"""Sequence-parallel self-attention for the gang: Ulysses (all-to-all over heads) and Ring (K/V passed
around the ring, blocks merged by log-sum-exp), alone or combined.

Each rank holds a contiguous slice of the (padded) token sequence. Ulysses trades that for the whole of
its ring block on a subset of heads; Ring then walks the other blocks of the sequence. Padding sits at
the end of the sequence, so it is removed by trimming keys, never with a mask.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from services.denoiser.gang.distributed import AxisGroup
from services.denoiser.rotary import apply_rotary

# Attention kernels that also return the log-sum-exp of each query's scores, which Ring needs to merge
# blocks. Each is a PyTorch SDPA backend; the platform layer names the one its device has.


def _lse_flash_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)[:2]
    return out, lse


def _lse_cuda(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    head_dim = q.shape[-1]
    if q.dtype in (torch.float16, torch.bfloat16) and head_dim <= 256 and head_dim % 8 == 0:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v)[:2]
        return out, lse
    # Flash has no float32 and wants head sizes in multiples of 8; memory-efficient attention covers float32
    # (its LSE is padded to a multiple of 32 queries); anything neither takes falls back to the math kernel.
    if head_dim % 8 == 0:
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True)[:2]
        return out, lse[..., : q.shape[-2]]
    return _lse_math(q, k, v)


def _lse_fused_overrideable(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = torch.ops.aten._scaled_dot_product_fused_attention_overrideable(q, k, v)[:2]
    return out, lse


def _lse_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference kernel for devices with none of the above: materialises the score matrix."""
    scores = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    lse = torch.logsumexp(scores, dim=-1)
    return (torch.softmax(scores, dim=-1) @ v.float()).to(q.dtype), lse


LSE_KERNELS = {
    "flash_cpu": _lse_flash_cpu,
    "cuda": _lse_cuda,
    "fused_overrideable": _lse_fused_overrideable,
    "math": _lse_math,
}


# Ulysses: sequence-sharded <-> head-sharded ---------------------------------------------------------------
#
# Everything stays token-major ([B, tokens, heads, d], the layout the projections produce and SDPA reads
# through a transposed view), so with one sample per request the exchanged tensors need no copy after they
# arrive: each source rank's block of tokens lands after the previous one. Each tensor travels in its own
# all-to-all for the same reason (one shared buffer would interleave them).


class TokensToHeads:
    """[B, s, h*d] (this rank's s tokens, all h heads) -> [B, U*s, h/U, d] (the U ranks' tokens, in rank order,
    on this rank's h/U heads), with the all-to-all left in flight: construction copies x into the send buffer
    and starts the exchange; `wait()` makes the device's stream wait for it (the host does not block) and
    returns the result. None is copied out of the receive buffer when B is 1."""

    def __init__(self, x: torch.Tensor, heads: int, ulysses: AxisGroup) -> None:
        batch, tokens, width = x.shape
        degree = ulysses.size
        send = x.view(batch, tokens, degree, width // degree).permute(2, 0, 1, 3).contiguous()
        self._received = torch.empty_like(send)                     # [U (source rank), B, s, h/U * d]
        self._work = dist.all_to_all_single(self._received, send, group=ulysses.group, async_op=True)
        self._shape = (batch, degree * tokens, heads // degree, width // heads)

    def wait(self) -> torch.Tensor:
        self._work.wait()
        return self._received.transpose(0, 1).reshape(self._shape)


def heads_to_tokens(x: torch.Tensor, ulysses: AxisGroup) -> torch.Tensor:
    """The inverse for the attention output: [B, U*s, h/U, d] -> [B, s, h, d]."""
    batch, block_tokens, local_heads, dim = x.shape
    degree = ulysses.size
    tokens = block_tokens // degree
    # [U (destination rank), B, s, h/U, d]: free when B is 1 and x is token-major in memory
    send = x.reshape(batch, degree, tokens, local_heads, dim).transpose(0, 1).contiguous()
    received = torch.empty_like(send)                           # [U (source rank = head slice), B, s, h/U, d]
    dist.all_to_all_single(received, send, group=ulysses.group)
    return received.permute(1, 2, 0, 3, 4).reshape(batch, tokens, degree * local_heads, dim)


# Ring ----------------------------------------------------------------------------------------------------


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ring: AxisGroup, valid_keys: list[int],
                   kernel) -> torch.Tensor:
    """Attention of this rank's queries over every ring block's keys. q, k, v: [B, h, n, d]; block r holds
    `valid_keys[r]` real keys (the rest is padding). The next block's K/V travel while this one computes."""
    degree, index = ring.size, ring.index
    kv = torch.stack((k, v)).contiguous()
    out = lse = None
    for step in range(degree):
        pending, incoming = [], None
        if step < degree - 1:
            incoming = torch.empty_like(kv)
            pending = dist.batch_isend_irecv([
                dist.P2POp(dist.isend, kv, ring.ranks[(index + 1) % degree], ring.group),
                dist.P2POp(dist.irecv, incoming, ring.ranks[(index - 1) % degree], ring.group),
            ])
        source = (index - step) % degree
        keys = valid_keys[source]
        if keys > 0:
            block_out, block_lse = kernel(q, kv[0, :, :, :keys], kv[1, :, :, :keys])
            out, lse = _merge(out, lse, block_out, block_lse)
        for request in pending:
            request.wait()
        if incoming is not None:
            kv = incoming
    return out.to(q.dtype)


def _merge(out, lse, block_out, block_lse):
    """Combine two partial softmax-attention results by their log-sum-exps (in float32)."""
    block_out, block_lse = block_out.float(), block_lse.float()
    if out is None:
        return block_out, block_lse
    merged_lse = torch.logaddexp(lse, block_lse)
    out = out * torch.exp(lse - merged_lse).unsqueeze(-1) + block_out * torch.exp(block_lse - merged_lse).unsqueeze(-1)
    return out, merged_lse


# The self-attention processor ----------------------------------------------------------------------------


# One device: an axis of one rank.
ALONE = AxisGroup(group=None, ranks=[0], index=0)


class SequenceParallelAttention:
    """Replaces WanAttnProcessor in self-attention layers. q/k/v projections, norms and rotary run on this
    rank's tokens (and, under TP, its heads); attention itself sees the whole sequence.

    On one device (both axes ALONE) it is diffusers' processor with the rotary embedding fused, so one device
    and the gang run the same kernels."""

    def __init__(self, ulysses: AxisGroup = ALONE, ring: AxisGroup = ALONE, lse_kernel=None) -> None:
        self.ulysses = ulysses
        self.ring = ring
        self.lse_kernel = lse_kernel
        # Real keys per ring block, set by the gang's transformer for each forward; None: every key is real.
        self.valid_keys: list[int] | None = None

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states=None, attention_mask=None,
                 rotary_emb=None) -> torch.Tensor:
        if self.ulysses.size > 1:
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
            out = F.scaled_dot_product_attention(q, k[:, :, :keys], v[:, :, :keys])
        out = out.transpose(1, 2)                                           # [B, n, h, d]
        if self.ulysses.size > 1:
            out = heads_to_tokens(out, self.ulysses)                        # [B, s, h, d]
        out = out.flatten(2, 3).type_as(query)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)

    def _exchange_projections(self, attn, hidden_states: torch.Tensor, rotary_emb):
        """q, k, v projected on this rank's tokens and exchanged for the ring block's tokens on h/U heads.

        Each exchange is in flight while the next tensor is projected: v first (it needs nothing after the
        exchange), then q, whose rotary runs while k is still travelling. Communication kernels can share the
        device with GEMMs and element-wise kernels but not with the attention kernel that follows, so this is
        where the exchange can hide. Rotary runs after the exchange (it is per token and head, so the numbers are
        the same), on the ring block's frequencies; the order of operations changes nothing in the result.
        """
        value = TokensToHeads(attn.to_v(hidden_states), attn.heads, self.ulysses)
        query = TokensToHeads(attn.norm_q(attn.to_q(hidden_states)), attn.heads, self.ulysses)
        key = TokensToHeads(attn.norm_k(attn.to_k(hidden_states)), attn.heads, self.ulysses)
        query = query.wait()
        if rotary_emb is not None:
            query = apply_rotary(query, *rotary_emb)                        # while k travels
        key = key.wait()
        if rotary_emb is not None:
            key = apply_rotary(key, *rotary_emb)
        return query, key, value.wait()


def install_self_attention(model: torch.nn.Module, ulysses: AxisGroup = ALONE, ring: AxisGroup = ALONE,
                           lse_kernel=None) -> list[SequenceParallelAttention]:
    """Give every Wan block's self-attention a SequenceParallelAttention; returns them (in block order)."""
    processors = []
    for block in model.blocks:
        processor = SequenceParallelAttention(ulysses, ring, lse_kernel)
        block.attn1.set_processor(processor)
        processors.append(processor)
    return processors
