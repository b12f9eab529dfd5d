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


def tokens_to_heads(tensors: list[torch.Tensor], heads: int, ulysses: AxisGroup) -> torch.Tensor:
    """Each [B, s, h*d] tensor (this rank's s tokens, all h heads) -> the U ranks' tokens on this rank's h/U
    heads, returned as one [U (source rank), n, B, h/U, s, d] buffer; `block_view` reads a tensor from it.
    All n tensors travel in one all-to-all, each copied once into the send buffer."""
    batch, tokens, width = tensors[0].shape
    degree, dim = ulysses.size, width // heads
    send = tensors[0].new_empty((degree, len(tensors), batch, heads // degree, tokens, dim))
    for index, tensor in enumerate(tensors):
        send[:, index].copy_(tensor.view(batch, tokens, degree, heads // degree, dim).permute(2, 0, 3, 1, 4))
    received = torch.empty_like(send)
    dist.all_to_all_single(received, send, group=ulysses.group)
    return received


def block_view(received: torch.Tensor, index: int) -> torch.Tensor:
    """[B, h/U, U, s, d] view of tensor `index` of `tokens_to_heads`' buffer: the ring block's U*s tokens."""
    return received[:, index].permute(1, 2, 0, 3, 4)


def heads_to_tokens(x: torch.Tensor, ulysses: AxisGroup) -> torch.Tensor:
    """The inverse of `tokens_to_heads` for the attention output: [B, h/U, U*s, d] -> [B, s, h, d]."""
    batch, local_heads, block_tokens, dim = x.shape
    degree = ulysses.size
    tokens = block_tokens // degree
    send = x.reshape(batch, local_heads, degree, tokens, dim).permute(2, 0, 3, 1, 4).contiguous()
    received = torch.empty_like(send)
    dist.all_to_all_single(received, send, group=ulysses.group)
    # received: [U (source rank = head slice), B, s, h/U, d]
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


def apply_rotary(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotary embedding, the same operations as diffusers' WanAttnProcessor (so numbers match). The
    result is contiguous whatever x's strides, which lets it double as the copy out of a permuted view."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class SequenceParallelAttention:
    """Replaces WanAttnProcessor in self-attention layers. q/k/v projections, norms and rotary run on this
    rank's tokens (and, under TP, its heads); attention itself sees the whole sequence."""

    def __init__(self, ulysses: AxisGroup, ring: AxisGroup, lse_kernel) -> None:
        self.ulysses = ulysses
        self.ring = ring
        self.lse_kernel = lse_kernel
        self.valid_keys: list[int] = []          # per ring block; set by the transformer for each forward

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states=None, attention_mask=None,
                 rotary_emb=None) -> torch.Tensor:
        query = attn.norm_q(attn.to_q(hidden_states))
        key = attn.norm_k(attn.to_k(hidden_states))
        value = attn.to_v(hidden_states)
        if self.ulysses.size > 1:
            q, k, v = self._exchange_heads(attn.heads, query, key, value, rotary_emb)
        else:
            query, key, value = (x.unflatten(2, (attn.heads, -1)) for x in (query, key, value))
            if rotary_emb is not None:
                query, key = apply_rotary(query, *rotary_emb), apply_rotary(key, *rotary_emb)
            q, k, v = (x.transpose(1, 2) for x in (query, key, value))      # [B, h, s, d]
        if self.ring.size > 1:
            out = ring_attention(q, k, v, self.ring, self.valid_keys, self.lse_kernel)
        else:
            keys = self.valid_keys[0]
            out = F.scaled_dot_product_attention(q, k[:, :, :keys], v[:, :, :keys])
        if self.ulysses.size > 1:
            out = heads_to_tokens(out, self.ulysses)               # [B, s, h, d]
        else:
            out = out.transpose(1, 2)
        out = out.flatten(2, 3).type_as(query)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)

    def _exchange_heads(self, heads: int, query, key, value, rotary_emb):
        """Ulysses: this rank's tokens on all heads -> the ring block's tokens on h/U heads, [B, h/U, U*s, d].
        Rotary runs after the exchange (it is per token and head, so the numbers are the same) and writes
        q and k contiguously, so the exchange costs one copy into the send buffer and none out of it."""
        received = tokens_to_heads([query, key, value], heads, self.ulysses)
        q, k, v = (block_view(received, index) for index in range(3))       # [B, h/U, U, s, d] views
        batch, local_heads, degree, tokens, dim = q.shape
        if rotary_emb is not None:
            # The block's frequencies, [1, U*s, 1, d] -> [1, 1, U, s, d] to match.
            cos, sin = (f.permute(0, 2, 1, 3).unflatten(2, (degree, tokens)) for f in rotary_emb)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k, v = (x.reshape(batch, local_heads, degree * tokens, dim) for x in (q, k, v))
        return q, k, v
