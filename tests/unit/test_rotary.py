"""The rotary embedding and the one-device self-attention processor against diffusers' WanAttnProcessor.

On the CPU the reference path runs; on CUDA the fused Triton kernel must run (the test fails if it silently
fell back) and equal diffusers bit for bit, which holds only if it keeps diffusers' float32 operation
order and rounding (no fused multiply-add)."""

from __future__ import annotations

import pytest
import torch

from services.common.platform import is_available
from services.denoiser.rotary import TRITON_DEVICES, apply_rotary, apply_rotary_reference, fused_rotary_applies
from services.families.wan_attention import SequenceParallelAttention

ACCELERATOR = next((kind for kind in ("xpu", "cuda") if is_available(kind)), None)
DEVICES = ["cpu"] + ([pytest.param(ACCELERATOR, marks=pytest.mark.gpu)] if ACCELERATOR else [])


def _diffusers_attention(heads: int, head_dim: int, dtype: torch.dtype, device: str):
    from diffusers.models.transformers.transformer_wan import WanAttention, WanAttnProcessor

    torch.manual_seed(3)
    attention = WanAttention(dim=heads * head_dim, heads=heads, dim_head=head_dim, processor=WanAttnProcessor())
    return attention.to(device, dtype).eval()


def _angles(tokens: int, head_dim: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 frequencies, as from_pretrained keeps Wan's rope (the case the fused kernel takes)."""
    angles = torch.randn(1, tokens, 1, head_dim, generator=torch.Generator().manual_seed(7)) * 50
    return angles.cos().to(device), angles.sin().to(device)


def _diffusers_rotary(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """Verbatim from diffusers' WanAttnProcessor (0.42), where it is a local function."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(1, 75, 12, 128), (2, 33, 3, 64)])     # rows not a multiple of the block
def test_rotary_equals_diffusers_bit_for_bit(device, dtype, shape):
    batch, tokens, heads, head_dim = shape
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 3).to(device, dtype)
    freqs = _angles(tokens, head_dim, device)
    assert fused_rotary_applies(x, *freqs) == (device in TRITON_DEVICES)
    expected = _diffusers_rotary(x, *freqs)
    assert torch.equal(apply_rotary(x, *freqs), expected)
    assert torch.equal(apply_rotary_reference(x, *freqs), expected)


@pytest.mark.parametrize("device", DEVICES)
def test_rotary_takes_a_strided_input(device):
    """The gang hands over views (the exchange's receive buffer); they are read in their own layout."""
    x = torch.randn(1, 12, 40, 64, generator=torch.Generator().manual_seed(2)).to(device, torch.bfloat16)
    view = x.transpose(1, 2)                                 # [1, 40, 12, 64], not contiguous
    freqs = _angles(40, 64, device)
    assert torch.equal(apply_rotary(view, *freqs), _diffusers_rotary(view, *freqs))


def test_half_precision_frequencies_take_the_reference_path():
    """With bf16 frequencies diffusers rounds every product to bf16, which the kernel does not do."""
    x = torch.randn(1, 8, 2, 16).to(torch.bfloat16)
    freqs = tuple(f.to(torch.bfloat16) for f in _angles(8, 16, "cpu"))
    assert not fused_rotary_applies(x, *freqs)
    assert torch.equal(apply_rotary(x, *freqs), _diffusers_rotary(x, *freqs))


@pytest.mark.parametrize("device", DEVICES)
def test_one_device_processor_equals_diffusers_processor(device):
    """What the one-device denoiser installs on every block: the same numbers as diffusers' processor."""
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    heads, head_dim, tokens = 4, 64, 50
    hidden = torch.randn(2, tokens, heads * head_dim, generator=torch.Generator().manual_seed(4)).to(device, dtype)
    rotary = _angles(tokens, head_dim, device)
    reference = _diffusers_attention(heads, head_dim, dtype, device)
    ours = _diffusers_attention(heads, head_dim, dtype, device)
    ours.set_processor(SequenceParallelAttention())
    with torch.inference_mode():
        expected = reference(hidden, rotary_emb=rotary)
        actual = ours(hidden, rotary_emb=rotary)
    assert torch.equal(actual, expected)
