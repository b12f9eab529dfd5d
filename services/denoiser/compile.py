"""Compiled blocks: `--compile` compiles the transformer's repeated blocks (regional compilation, diffusers'
`compile_repeated_blocks`), one graph per block class shared by every layer, so compiling costs seconds, not the
whole model's minutes, for the same speed.

Each size a request brings compiles once (static shapes: the fastest kernels); `--warmup-sizes` compiles the
listed sizes at start-up, before the denoiser reports SERVING, so no request waits for them. A size not warmed up
still works: its first request compiles it (said in the log), later ones reuse it.

The graph is traced from each block's `forward`, not from its `__call__` (`nn.Module.compile`, which diffusers'
`compile_repeated_blocks` uses): a request's step caching (cache.py) replaces a block's `forward` with diffusers'
hook chain (`HookRegistry.register_hook`), and through a compiled `__call__` dynamo traced that chain into graphs
of its own, breaking at every skip decision (measured on the tiny Wan: 6 more graphs for a first_block request, 4
more for each next one). Compiled this way the hooks wrap the compiled forward and run eagerly around it: a cached
request runs the very graphs an uncached one does.

TaylorSeer hooks the attention modules inside the blocks instead, and cache.py runs those eagerly, so a TaylorSeer
run's block graphs break around them. Dynamo guards a graph that breaks at a call only on what it traced before the
call: compiled from the block's own code, those pieces also matched the uncached calls after the run and served
them, in pieces, from then on (measured: the next uncached request compiled the attention as graphs of its own).
So such a run uses each block's variant (`graphs_apart`): its forward compiled from a copy of the code object,
which dynamo keys its graphs by, so the two sets never serve each other's calls.

`--compile-tuning` has inductor tune each compiled kernel's launch parameters by coordinate descent, for these
compiles only (torch.compile's options, not the process-wide config): minutes of compiling for a few per cent
(Wan2.1-1.3B 480x832x81 with `--quantize fp8` on an H200: a 444 ms forward after a 7 s compile untuned, 425 ms
after ~150 s tuned, docs/perf-log.md). It replaces a mode: torch.compile takes one or the other.

With request batching (batching.py) a batch of n outputs is another shape: its blocks compile once per (size, n),
and `--warmup-sizes` with `--max-batch N` compiles n = 1..N.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import logging
import os
import types
from collections.abc import Iterator

import torch

from services.denoiser.blocks import diffusers_model, repeated_blocks

logger = logging.getLogger(__name__)

COMPILE_BACKEND_ENV = "DIFFMESH_COMPILE_BACKEND"    # inductor by default; "eager" traces only (tests, debugging)
# Shapes compiled per block before dynamo gives up and runs a block eagerly; PyTorch's default is 8.
RECOMPILE_LIMIT = 64
# --compile-tuning: inductor's options for these compiles (what torchao's float8 recommends, scoped here).
TUNING_OPTIONS = {"coordinate_descent_tuning": True, "coordinate_descent_check_all_directions": True}

Size = tuple[int, int, int]     # width, height, frames
_COMPILED = "_diffmesh_compiled_blocks"     # the CompileOptions, on a model whose blocks compile_blocks compiled
_VARIANT = "_diffmesh_variant_forward"      # on each compiled block: its forward compiled apart (graphs_apart)


@dataclasses.dataclass(frozen=True)
class CompileOptions:
    mode: str | None = None                     # torch.compile's mode: None (default), "max-autotune", ...
    backend: str = "inductor"
    warmup_sizes: tuple[Size, ...] = ()
    tuning: bool = False                        # --compile-tuning: coordinate-descent tuning of inductor's kernels

    def torch_compile_kwargs(self) -> dict:
        """torch.compile's keywords for a block's forward (static shapes: the fastest kernels)."""
        if self.tuning and self.backend == "inductor":
            return {"options": TUNING_OPTIONS, "backend": self.backend, "dynamic": False}
        return {"mode": self.mode, "backend": self.backend, "dynamic": False}


def compile_blocks(transformer: torch.nn.Module, options: CompileOptions) -> torch.nn.Module:
    """Compile the repeated blocks of a loaded transformer in place (a gang's wrapper holds it as `.model`)."""
    model = diffusers_model(transformer)
    # diffusers' compile_repeated_blocks, its blocks found through their bases too (blocks.py): a block sharded by
    # `--shard-weights` has FSDP2's hooks, which then run eagerly around the compiled forward.
    blocks = repeated_blocks(model, "to compile (--compile)")
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    kwargs = options.torch_compile_kwargs()
    for block in blocks:
        # The forward, not the module (see the module docstring): the cache hooks then wrap the compiled code.
        own = block.forward
        block.forward = torch.compile(own, **kwargs)
        # Compiled at its first call only (the first TaylorSeer request of a size waits for it).
        function = getattr(own, "__func__", None)
        variant = own if function is None else torch.compile(types.MethodType(_code_copy(function), block), **kwargs)
        setattr(block, _VARIANT, variant)    # a forward wrapped before compiling (no plain method): eagerly
    setattr(model, _COMPILED, options)
    tuning = ("coordinate-descent tuning" if "options" in kwargs else
              "--compile-tuning ignored: inductor tunes, not " + options.backend) if options.tuning else "untuned"
    logger.info("compiling %s's %s blocks (%s, mode %s, %s)", type(model).__name__,
                ", ".join(model._repeated_blocks), options.backend, options.mode or "default", tuning)
    return transformer


def blocks_compiled(model: torch.nn.Module) -> bool:
    """Whether compile_blocks compiled this diffusers model's blocks."""
    return getattr(model, _COMPILED, None) is not None


@functools.cache     # one copy per block class: its layers share the copy's graphs, as they share the original's
def _code_copy(function: types.FunctionType) -> types.FunctionType:
    """The same function on a new code object (the same bytecode): dynamo's graphs for it are its own."""
    copy = types.FunctionType(function.__code__.replace(), function.__globals__, function.__name__,
                              function.__defaults__, function.__closure__)
    copy.__kwdefaults__ = function.__kwdefaults__
    copy.__qualname__ = function.__qualname__
    return copy


@contextlib.contextmanager
def graphs_apart(model: torch.nn.Module) -> Iterator[None]:
    """Within: each compiled block of this diffusers model runs its variant, for a run whose graphs break inside
    the blocks (see the module docstring). Nothing changes on a model compile_blocks did not compile."""
    blocks = [module for module in model.modules() if _VARIANT in vars(module)]
    usual = [vars(block)["forward"] for block in blocks]
    for block in blocks:
        block.forward = vars(block)[_VARIANT]
    try:
        yield
    finally:
        for block, forward in zip(blocks, usual, strict=True):
            block.forward = forward


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
    group.add_argument("--compile-tuning", action="store_true",
                       help="with --compile (no MODE): tune the compiled kernels by coordinate descent; compiles take "
                       "minutes instead of seconds, the forward a few per cent less (default: off)")
    return parser


def compile_from_args(args: argparse.Namespace) -> CompileOptions | None:
    tuning = getattr(args, "compile_tuning", False)
    if args.compile is None:
        for flag, given in (("--warmup-sizes", args.warmup_sizes), ("--compile-tuning", tuning)):
            if given:
                raise ValueError(f"{flag} needs --compile")
        return None
    mode = None if args.compile == "default" else args.compile
    if tuning and mode is not None:
        raise ValueError(f"--compile-tuning with --compile={mode}: torch.compile takes a mode or inductor's "
                         "options, not both; drop one")
    return CompileOptions(mode=mode, backend=os.environ.get(COMPILE_BACKEND_ENV, "inductor"),
                          warmup_sizes=args.warmup_sizes, tuning=tuning)
