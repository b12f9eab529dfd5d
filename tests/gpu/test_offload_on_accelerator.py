"""`--dit-offload` on CUDA: the denoiser's outputs equal the resident engine's bit for bit (the same kernels on the same
weights), the blocks stay in pinned host memory between calls while the rest stays on the device, and the engine holds
less device memory than the resident one.

Runs only where torch sees a CUDA device (marker `gpu`); skipped elsewhere, never counted as passed.
"""

from __future__ import annotations

import gc

import pytest
import torch

from services.common.models import resolve_model_dir
from services.common.platform import PLATFORMS, is_available
from services.common.tiny.flux import write_tiny_flux
from services.denoiser.engine import DenoiserEngine
from services.denoiser.offload import OffloadOptions, block_lists, split_bytes
from services.families.base import Sampling

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not is_available("cuda"), reason="no CUDA device")]


def conditioning(engine: DenoiserEngine, params: Sampling) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    shapes = engine.denoising.warmup_conditioning(params, 16)
    return {name: torch.randn(tensor.shape, generator=generator) for name, tensor in shapes.items()}


def build(model, offload: OffloadOptions | None) -> tuple[DenoiserEngine, int]:
    """An engine on cuda and the device memory it holds once loaded (bytes allocated by its construction)."""
    gc.collect()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    engine = DenoiserEngine(model, PLATFORMS["cuda"], offload=offload)
    torch.cuda.synchronize()
    return engine, torch.cuda.memory_allocated() - before


@pytest.mark.parametrize("family", ["wan", "flux"])
def test_offloaded_denoise_on_cuda_equals_resident_and_holds_less(family, model_dir, tmp_path_factory):
    model = resolve_model_dir(model_dir if family == "wan" else write_tiny_flux(tmp_path_factory.mktemp("flux") / "m"))
    params = Sampling("r", 48, 32, 5, 4, 5.0, 1) if family == "wan" else Sampling("r", 64, 32, 1, 4, 3.5, 1)
    resident, resident_bytes = build(model, None)
    tensors = conditioning(resident, params)
    expected = resident.denoise(params, tensors)
    del resident

    offloaded, offloaded_bytes = build(model, OffloadOptions())
    # The first request traces the blocks' order; from the second forward on, the next block is prefetched.
    for _ in range(2):
        assert torch.equal(offloaded.denoise(params, tensors), expected)
    transformer = offloaded.denoising.transformer
    blocks = [block for blocks in block_lists(transformer) for block in blocks]
    block_params = [p for block in blocks for p in block.parameters()]
    assert all(p.device.type == "cpu" and p.is_pinned() for p in block_params)          # between calls: on the host
    others = [p for name, p in transformer.named_parameters() if not any(p is q for q in block_params)]
    assert others and all(p.device.type == "cuda" for p in others)                        # the rest: resident
    resident_part, streamed = split_bytes(transformer)
    print(f"{family}: resident engine {resident_bytes} B on the device, offloaded {offloaded_bytes} B "
          f"({resident_part} B resident, {streamed} B streamed)")
    assert offloaded_bytes < resident_bytes
    assert offloaded_bytes <= resident_bytes - streamed + (1 << 20)     # the blocks' bytes are what it saves
