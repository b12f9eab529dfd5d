"""Wan's rotary position embedding on q and k, fused into one kernel where Triton can run it.

diffusers applies it with eight element-wise kernels per tensor, each writing a float32 intermediate as large as
q itself (its frequencies are float32, as `from_pretrained` keeps them): about 4 % of a 720p forward on one
H200. The fused kernel reads q once and writes it once and does the same float32 operations in the same order,
with no fused multiply-add, so its output is bit-identical to diffusers'. PyTorch has no such operation and
`torch.compile` would contract the products into FMAs (and compile per shape at request time), hence a small
hand-written kernel; `apply_rotary_reference` is the eager path for everything else.
"""

from __future__ import annotations

import logging

import torch

from services.common.platform import PLATFORMS

try:  # Triton ships with PyTorch's CUDA (and XPU) wheels, not its CPU ones.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installed torch
    triton = None

logger = logging.getLogger(__name__)

# Device kinds the platform layer runs diffmesh's Triton kernels on; anything else takes the reference path.
TRITON_DEVICES = frozenset(kind for kind, platform in PLATFORMS.items() if platform.triton_kernels)
_BLOCK_ROWS = 16
_fused_failed = False   # set when the kernel could not be built here: then the reference path serves


def apply_rotary_reference(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """The rotary embedding on [B, n, h, d] exactly as diffusers' WanAttnProcessor applies it; freqs [1, n, 1, d]."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


def fused_rotary_applies(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> bool:
    """Whether the fused kernel computes exactly what the reference does for these tensors."""
    head_dim = x.shape[-1]
    return (
        triton is not None
        and not _fused_failed
        and x.device.type in TRITON_DEVICES
        and x.dim() == 4
        and x.dtype in (torch.bfloat16, torch.float16, torch.float32)
        # With half-precision frequencies the reference rounds every product to half precision; only float32
        # frequencies (what from_pretrained keeps) make the kernel's float32 arithmetic identical.
        and freqs_cos.dtype == torch.float32 and freqs_sin.dtype == torch.float32
        and freqs_cos.shape == freqs_sin.shape == (1, x.shape[1], 1, head_dim)
        and head_dim >= 2 and head_dim & (head_dim - 1) == 0 and head_dim <= 256
    )


def apply_rotary(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """The rotary embedding on [B, n, h, d] (freqs [1, n, 1, d]): fused where it applies, else the reference."""
    if not fused_rotary_applies(x, freqs_cos, freqs_sin):
        return apply_rotary_reference(x, freqs_cos, freqs_sin)
    batch, tokens, heads, head_dim = x.shape
    x = x.contiguous()
    cos = freqs_cos.reshape(tokens, head_dim).contiguous()
    sin = freqs_sin.reshape(tokens, head_dim).contiguous()
    out = torch.empty_like(x)
    rows = batch * tokens * heads
    try:
        # No fused multiply-add: a*b - c*d rounds both products and then the difference, like the eager kernels.
        _rotary_kernel[(triton.cdiv(rows, _BLOCK_ROWS),)](x, cos, sin, out, rows, heads, tokens, HEAD_DIM=head_dim,
                                                          BLOCK_ROWS=_BLOCK_ROWS, enable_fp_fusion=False)
    except Exception as error:  # compiling needs a working toolchain for this device; serving must not need it
        global _fused_failed
        _fused_failed = True
        logger.warning("fused rotary kernel unavailable (%s); using the reference kernels", error)
        return apply_rotary_reference(x, freqs_cos, freqs_sin)
    return out


if triton is not None:

    @triton.jit
    def _rotary_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, rows, heads, tokens,
                       HEAD_DIM: tl.constexpr, BLOCK_ROWS: tl.constexpr):
        # One row is one (sample, token, head): HEAD_DIM values, rotated in (even, odd) pairs by its token's angles.
        row = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        column = tl.arange(0, HEAD_DIM)
        mask = (row < rows)[:, None]
        offsets = row[:, None] * HEAD_DIM + column[None, :]
        freq_offsets = ((row // heads) % tokens)[:, None] * HEAD_DIM + column[None, :]
        x = tl.load(x_ptr + offsets, mask=mask).to(tl.float32)
        cos = tl.load(cos_ptr + freq_offsets, mask=mask)
        sin = tl.load(sin_ptr + freq_offsets, mask=mask)
        x1, x2 = tl.split(tl.reshape(x, (BLOCK_ROWS, HEAD_DIM // 2, 2)))
        cos_even, _ = tl.split(tl.reshape(cos, (BLOCK_ROWS, HEAD_DIM // 2, 2)))
        _, sin_odd = tl.split(tl.reshape(sin, (BLOCK_ROWS, HEAD_DIM // 2, 2)))
        even = x1 * cos_even - x2 * sin_odd
        odd = x1 * sin_odd + x2 * cos_even
        out = tl.reshape(tl.join(even, odd), (BLOCK_ROWS, HEAD_DIM))
        tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=mask)
