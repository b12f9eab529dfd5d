"""Float8 linear layers, on request: `--quantize fp8` runs the transformer blocks' linear layers as float8 matmuls.

Why: a diffusion transformer at serving sizes is bound by its GEMMs and its attention. On an H200 a FLUX.1-dev step
at 1024x1024 spends 83 ms of its 128 ms in bf16 GEMMs, already near what bf16 reaches on that GPU
(docs/perf-log.md); float8 tensor cores do twice the work per cycle. The price is precision: this is lossy, so it
is off unless asked for, the log says so at start-up, and `bench/families.py --mesh-flags="--quantize fp8"` reports
the outputs' difference from diffusers' bf16 pipeline on the same seed (max abs, PSNR).

What changes: every nn.Linear inside the transformer's repeated blocks (the unit `--compile` compiles) whose sizes
float8 kernels take (multiples of 16) gets float8 (e4m3) weights with one scale per output row, and its input is
quantized the same way on the fly, one scale per token (torchao's `Float8DynamicActivationFloat8WeightConfig`,
per-row). Embeddings, the time and text projections, the norms' modulation layers and the output layer stay as
loaded: they are a small share of the work and the most sensitive to rounding. Quantizing the activations is an
extra pass over them, which `--compile` fuses into the work before it. Eager, it costs far more than the faster
matmul saves: FLUX.1-dev 512x512 on an H200 took 377 ms a step in float8 against 84 ms in bf16 (2026-12-03,
docs/perf-log.md), so without `--compile` start-up warns.

The implementation is torchao's: its float8 tensor subclass, the scaled-matmul kernels PyTorch ships (cuBLAS or
CUTLASS on CUDA, oneDNN on XPU) and its compile support. The devices it serves are the platform layer's to say
(`Platform.float8_matmul_missing`): CUDA from compute capability 8.9, MI300/MI350, Intel XPU; elsewhere start-up
fails saying why. One device only for now: a gang's ranks load their weights their own way (tensor-parallel and
`--shard-weights` ranks as DTensors), untried with float8, so a gang is refused at start-up, as is `--dit-offload`.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging

import torch

from services.common.platform import Platform
from services.denoiser.blocks import repeated_blocks

logger = logging.getLogger(__name__)

METHODS = ("fp8",)
INSTALL_HINT = "pip install 'diffmesh[fp8]' (torchao)"
# Float8 matmul kernels take operand sizes that are multiples of 16.
FLOAT8_MULTIPLE = 16
# Where diffusers defines its norms, the adaptive ones (AdaLayerNormZero, ...) among them.
ADAPTIVE_NORMS = "diffusers.models.normalization"


@dataclasses.dataclass(frozen=True)
class QuantizeOptions:
    method: str = "fp8"


def add_quantize_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    group = parser.add_argument_group("quantized transformer (lossy)")
    group.add_argument("--quantize", choices=METHODS, default=None,
                       help="fp8: the transformer blocks' linear layers as float8 matmuls, weights and activations "
                            "scaled per row (torchao); faster GEMMs, outputs no longer equal to bf16. Best with "
                            "--compile. CUDA compute capability 8.9+, MI300+ or XPU; one device (default: off)")
    return parser


def quantize_from_args(args: argparse.Namespace) -> QuantizeOptions | None:
    method = getattr(args, "quantize", None)
    return QuantizeOptions(method) if method else None


def check_quantize(options: QuantizeOptions | None, *, world_size: int = 1, offload: object = None) -> None:
    """Refuse what quantizing does not combine with, naming the flags (a ValueError: start-up fails in one line)."""
    if options is None:
        return
    if world_size > 1:
        raise ValueError(f"--quantize {options.method} needs one device for now: a gang (--devices {world_size}) "
                         "loads its weights its own way (sharded or as DTensors), untried with float8")
    if offload:
        raise ValueError(f"--quantize {options.method} with --dit-offload: not available yet (the float8 weights "
                         "would stream as tensor subclasses, untried)")


def quantizable(model: torch.nn.Module) -> list[tuple[str, torch.nn.Linear]]:
    """(name, layer) of each linear layer inside the model's repeated blocks that float8 kernels take, less the
    modulation layers of diffusers' adaptive norms (FLUX's `norm1.linear`): those map the timestep embedding to one
    row of scales per sample, so there is no GEMM to speed up, and their rounding would scale every token."""
    inside = {id(module) for block in repeated_blocks(model, "to quantize (--quantize)")
              for module in block.modules()}
    modulation = {id(child) for module in model.modules() if type(module).__module__ == ADAPTIVE_NORMS
                  for child in module.children()}
    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and id(module) in inside and id(module) not in modulation
            and module.in_features % FLOAT8_MULTIPLE == 0 and module.out_features % FLOAT8_MULTIPLE == 0]


def quantize_blocks(transformer: torch.nn.Module, platform: Platform, device: torch.device,
                    options: QuantizeOptions, *, compiled: bool) -> torch.nn.Module:
    """Quantize a loaded transformer's block linears in place (on `device`, where its weights are); `compiled`:
    whether its blocks will be compiled (eager float8 is slower than bf16, so the log says so)."""
    missing = platform.float8_matmul_missing(device.index or 0)
    if missing is not None:
        raise ValueError(f"--quantize {options.method} on {device}: {missing}")
    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_
    except ImportError:
        raise ValueError(f"--quantize {options.method} needs torchao: {INSTALL_HINT}") from None
    layers = quantizable(transformer)
    chosen = {id(layer) for _, layer in layers}
    before = sum(layer.weight.numel() * layer.weight.element_size() for _, layer in layers)
    # set_inductor_config=False: torchao would turn on inductor's coordinate-descent tuning for the whole process
    # (every later compile: Wan 480p's warm-up went from 7 s to ~150 s); `--compile-tuning` asks for it, per compile.
    quantize_(transformer, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False),
              filter_fn=lambda module, _name: id(module) in chosen)
    logger.warning("--quantize %s: %d linear layers of %s's blocks (%.2f GiB of weights) run as float8 matmuls "
                   "(lossy: outputs differ from bf16)", options.method, len(layers), type(transformer).__name__,
                   before / 2**30)
    if not compiled:
        logger.warning("--quantize %s without --compile: eager float8 runs slower than bf16 (each activation is "
                       "quantized in a pass of its own; FLUX.1-dev 512x512 on an H200: 377 ms a step against 84), "
                       "add --compile", options.method)
    return transformer
