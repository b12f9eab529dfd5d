"""Ring attention: this rank's queries over every ring block's keys, the next block's K/V travelling while this
one computes, the blocks merged by their log-sum-exps.

It runs only on a ring of more than one rank, but it lives beside the self-attention processor (attention.py)
rather than in gang/: that processor is the one both one device and the gang run, and the one-device path must
not import the gang.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from services.denoiser.axes import AxisGroup


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ring: AxisGroup, valid_keys: list[int],
                   kernel, local_kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Attention of this rank's queries over every ring block's keys. q, k, v: [B, h, n, d]; block r holds
    `valid_keys[r]` real keys (the rest is padding). `kernel` is one of the gang's LSE kernels
    (services/denoiser/gang/attention.py's LSE_KERNELS): attention that also returns each query's log-sum-exp.
    `local_kv`: keys and values [B, h, m, d] that every ring rank holds alike (FLUX's replicated text tokens), so
    they never travel: each rank attends them once, before its own block's keys at the first step."""
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
        block_k, block_v = kv[0, :, :, :keys], kv[1, :, :, :keys]
        if step == 0 and local_kv is not None:
            block_k, block_v = torch.cat((local_kv[0], block_k), dim=2), torch.cat((local_kv[1], block_v), dim=2)
        if block_k.shape[2] > 0:
            block_out, block_lse = kernel(q, block_k, block_v)
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
