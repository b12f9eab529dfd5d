"""Compiled blocks: `--compile` compiles the transformer's repeated blocks (regional compilation, diffusers'
`compile_repeated_blocks`), one graph per block class shared by every layer, so compiling costs seconds, not the
whole model's minutes, for the same speed.

Each size a request brings compiles once (static shapes: the fastest kernels); `--warmup-sizes` compiles the
listed sizes at start-up, before the denoiser reports SERVING, so no request waits for them. A size not warmed up
still works: its first request compiles it (said in the log), later ones reuse it.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os

import torch

logger = logging.getLogger(__name__)

COMPILE_BACKEND_ENV = "DIFFMESH_COMPILE_BACKEND"    # inductor by default; "eager" traces only (tests, debugging)
# Shapes compiled per block before dynamo gives up and runs a block eagerly; PyTorch's default is 8.
RECOMPILE_LIMIT = 64

Size = tuple[int, int, int]     # width, height, frames


@dataclasses.dataclass(frozen=True)
class CompileOptions:
    mode: str | None = None                     # torch.compile's mode: None (default), "max-autotune", ...
    backend: str = "inductor"
    warmup_sizes: tuple[Size, ...] = ()


def compile_blocks(transformer: torch.nn.Module, options: CompileOptions) -> torch.nn.Module:
    """Compile the repeated blocks of a loaded transformer in place (a gang's wrapper holds it as `.model`)."""
    model = transformer if hasattr(transformer, "compile_repeated_blocks") else getattr(transformer, "model", None)
    if model is None or not getattr(model, "_repeated_blocks", None):
        raise ValueError(f"{type(transformer).__name__} declares no repeated blocks to compile (--compile)")
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    model.compile_repeated_blocks(mode=options.mode, backend=options.backend, dynamic=False)
    logger.info("compiling %s's %s blocks (%s, mode %s)", type(model).__name__, ", ".join(model._repeated_blocks),
                options.backend, options.mode or "default")
    return transformer


def parse_sizes(text: str) -> tuple[Size, ...]:
    """'832x480x81,1024x1024' -> ((832, 480, 81), (1024, 1024, 1)); frames default to 1."""
    sizes = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        numbers = item.lower().split("x")
        if len(numbers) not in (2, 3) or not all(n.isdecimal() and int(n) > 0 for n in numbers):
            raise argparse.ArgumentTypeError(f"{item!r} is not WIDTHxHEIGHT[xFRAMES]")
        width, height, *frames = (int(n) for n in numbers)
        sizes.append((width, height, frames[0] if frames else 1))
    return tuple(sizes)


def add_compile_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    group = parser.add_argument_group("compiled blocks")
    group.add_argument("--compile", nargs="?", const="default", default=None, metavar="MODE",
                       help="compile the transformer's repeated blocks (optional torch.compile mode, e.g. "
                       "max-autotune; default: off)")
    group.add_argument("--warmup-sizes", type=parse_sizes, default=(), metavar="WxH[xF],...",
                       help="sizes compiled at start-up, before serving (with --compile; default: none)")
    return parser


def compile_from_args(args: argparse.Namespace) -> CompileOptions | None:
    if args.compile is None:
        if args.warmup_sizes:
            raise ValueError("--warmup-sizes needs --compile")
        return None
    return CompileOptions(mode=None if args.compile == "default" else args.compile,
                          backend=os.environ.get(COMPILE_BACKEND_ENV, "inductor"), warmup_sizes=args.warmup_sizes)
