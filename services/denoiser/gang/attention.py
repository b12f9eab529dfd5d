"""The gang's pieces of sequence-parallel self-attention: Ulysses' exchanges (all-to-all over heads) and the
attention kernels that also return the log-sum-exp Ring needs (Ring itself, which the one-device processor also
carries, is services/denoiser/ring.py), used by the self-attention processor in services/families/wan_attention.py.

Each rank holds a contiguous slice of the (padded) token sequence. Ulysses trades that for the whole of
its ring block on a subset of heads; Ring then walks the other blocks of the sequence. Padding sits at
the end of the sequence, so it is removed by trimming keys, never with a mask.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from services.denoiser.axes import AxisGroup

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


class CollectiveExchange:
    """Ulysses' exchanges as all-to-alls on the platform's collective backend: any device, any hosts. Same calls as
    the copy-engine exchange (services/denoiser/gang/copy_engine.py); the buffers are the all-to-alls' own, so the
    `*_read` calls have nothing to release."""

    def __init__(self, ulysses: AxisGroup) -> None:
        self.ulysses = ulysses

    def start(self) -> None:
        pass

    def send(self, x: torch.Tensor, kind: str, heads: int) -> TokensToHeads:
        return TokensToHeads(x, heads, self.ulysses)

    def inputs_read(self) -> None:
        pass

    def heads_to_tokens(self, out: torch.Tensor) -> torch.Tensor:
        return heads_to_tokens(out, self.ulysses)

    def output_read(self) -> None:
        pass
