"""Which attention kernel runs, chosen once per process by the platform layer and overridable.

Choices:
- `auto`: the platform's choice (`Platform.auto_attention`): on Hopper and Blackwell GPUs `flash-attn-4` where it is
  installed (below), else PyTorch's own SDPA dispatch (`Platform.attention`; on an H200 cuDNN's kernel, the fastest
  exact one PyTorch ships at every shape bench/attention.py measures).
- `native`: PyTorch's SDPA with its own priority order; `cudnn`, `flash`, `efficient`, `math`, `overrideable`:
  that SDPA kernel first, PyTorch's order after it (a kernel that cannot take a call, e.g. for its dtype or mask,
  falls through instead of failing).
- Kernels from other packages, only when installed (never required), run through diffusers' attention dispatcher:
  `flash-attn` (FlashAttention 2), `flash-attn-3` (FlashAttention 3, Hopper), `xformers`, and the lossy `sage`
  (SageAttention: int8/fp8 quantised), which runs only when asked for by name and logs its error at start-up.
- `flash-attn-4` (FlashAttention 4, the `flash-attn-4` package; Hopper and Blackwell) replaces PyTorch's own flash
  SDPA kernel through PyTorch's flash-attention registry (`torch.nn.attention.activate_flash_attention_impl`), so
  every SDPA call takes it, compiled graphs and diffusers' processors included, with nothing to install per model
  (PyTorch's own glue, pointed at `fa4_glue` so any flash-attn-4 release fits it). diffmesh's own attention calls take
  it from 16,384 keys on and cuDNN's kernel below, where FA4 is slower on an H200.

A named SDPA kernel is called as its own op where it takes the call (DIRECT_KERNELS), so a compiled graph runs the
kernel it was chosen for, whatever was traced or cached before.

Selection: `--attention-backend` flag, else `DIFFMESH_ATTENTION_BACKEND`, else `auto`. Stage code calls `attention()`
where it would call `F.scaled_dot_product_attention`, runs its forward passes inside `scope()` (so diffusers' own
processors, which call SDPA themselves, take the same kernel), and hands each loaded model to `install()`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import logging
import os
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from services.common import fa4_glue
from services.common.platform import Platform

logger = logging.getLogger(__name__)

ATTENTION_ENV = "DIFFMESH_ATTENTION_BACKEND"

SDPA_KERNELS: dict[str, SDPBackend] = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
    "overrideable": SDPBackend.OVERRIDEABLE,
}
# PyTorch's own order, which follows the preferred kernel (torch/nn/attention: the default priority list).
_FALLBACK_ORDER = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH,
                   SDPBackend.CUDNN_ATTENTION, SDPBackend.OVERRIDEABLE)


def _cudnn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, False)[0]


def _flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v)[0]


def _efficient(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, False)[0]


def _flash_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)[0]


def _math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten._scaled_dot_product_attention_math(q, k, v)[0]


# The kernel a named SDPA choice stands for, called as its own op wherever it can take the call. A compiled graph
# keeps the kernel F.scaled_dot_product_attention picked while it was traced: no guard re-checks the SDPA settings,
# and the compiled artifacts PyTorch caches (in the process and on disk) are not keyed on them either. Measured on
# an H200 with --compile: `cudnn` ran PyTorch's flash kernel after an earlier run had traced under flash, and
# `flash-attn-4` ran cuDNN's when warmed up at start-up. Naming the op puts the choice in the graph itself.
# Keyed by (device type, SDPA_KERNELS name): plain strings, which compiled graphs' guards can name.
DIRECT_KERNELS: dict[tuple[str, str], Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    ("cuda", "cudnn"): _cudnn,
    ("cuda", "flash"): _flash,
    ("cuda", "efficient"): _efficient,
    ("cuda", "math"): _math,
    ("cpu", "flash"): _flash_cpu,
    ("cpu", "math"): _math,
}


def _direct_takes(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None) -> bool:
    """Whether every direct kernel of the query's device takes this call: no mask, [B, heads, tokens, dim], one
    dtype, and on CUDA half precision with a head size the fused kernels all take (else SDPA's own dispatch)."""
    if attn_mask is not None or query.dim() != 4 or not query.dtype == key.dtype == value.dtype:
        return False
    if query.device.type == "cuda":
        head_dim = query.shape[-1]
        return query.dtype in (torch.float16, torch.bfloat16) and head_dim % 8 == 0 and head_dim <= 128
    return query.device.type == "cpu"


@dataclasses.dataclass(frozen=True)
class ExternalKernel:
    package: str          # the module that must be importable
    backend: str          # its name in diffusers' AttentionBackendName
    lossy: bool = False


EXTERNAL_KERNELS: dict[str, ExternalKernel] = {
    # FlashAttention 2's compiled extension: `flash_attn` alone may be FlashAttention 4's namespace package.
    "flash-attn": ExternalKernel("flash_attn_2_cuda", "flash"),
    "flash-attn-3": ExternalKernel("flash_attn_interface", "_flash_3"),
    "xformers": ExternalKernel("xformers", "xformers"),
    "sage": ExternalKernel("sageattention", "sage", lossy=True),
}


@dataclasses.dataclass(frozen=True)
class FlashImpl:
    """An implementation of PyTorch's flash SDPA kernel from another package."""
    module: str                                  # must be importable
    impl: str                                    # the name PyTorch's registry knows it by
    offer: Callable[[], object] | None = None    # puts `impl` in the registry, when PyTorch does not itself
    short_kernel: str | None = None              # SDPA kernel for sequences shorter than `long_from` key tokens
    long_from: int = 0


FLASH_IMPLS: dict[str, FlashImpl] = {
    # FA4 is the fastest exact kernel on an H200 only for long sequences (bench/results/attention-cuda-2026-12-02.json:
    # Wan's 32,760-token self-attention 9.5 ms vs cuDNN's 11.5; FLUX.1's 4,608 tokens 0.52 vs 0.46 ms, Wan's 512-token
    # cross-attention 0.34 vs 0.21 ms): cuDNN below 16,384 keys.
    "flash-attn-4": FlashImpl(fa4_glue.FA4_MODULE, fa4_glue.REGISTRY_NAME, fa4_glue.offer, short_kernel="cudnn",
                              long_from=16384),
}
CHOICES = ("auto", "native", *SDPA_KERNELS, *EXTERNAL_KERNELS, *FLASH_IMPLS)


def _installed(module: str) -> bool:
    """Whether `module` can be imported; a parent package that fails to import counts as not installed."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _use_flash_impl(impl: str | None) -> None:
    """Make `impl` PyTorch's flash SDPA kernel (None: PyTorch's own). Process-wide, as PyTorch's registry is; a
    no-op when it already is, so entering a scope per step costs nothing."""
    registry = torch.nn.attention
    if not hasattr(registry, "current_flash_attention_impl") or registry.current_flash_attention_impl() == impl:
        return
    if impl is None:
        registry.restore_flash_attention_impl()
    else:
        registry.activate_flash_attention_impl(impl)
        logger.info("PyTorch's flash attention kernel is now %s", impl)


@dataclasses.dataclass(frozen=True)
class AttentionChoice:
    name: str
    sdpa_order: tuple[SDPBackend, ...] | None = None     # None: PyTorch's own order
    external: ExternalKernel | None = None
    flash_impl: str | None = None       # PyTorch's flash SDPA kernel replaced by this registered one
    kernel: str | None = None           # the SDPA_KERNELS name called directly where it can be (DIRECT_KERNELS)
    # Below `long_from` key tokens, `short_kernel` instead (a kernel fastest only on long sequences, e.g. FA4)
    short_kernel: str | None = None
    long_from: int = 0

    @property
    def lossy(self) -> bool:
        return self.external is not None and self.external.lossy

    def scope(self) -> contextlib.AbstractContextManager:
        """Every SDPA call inside takes this choice's kernel first (diffusers' processors included)."""
        _use_flash_impl(self.flash_impl)
        if self.sdpa_order is None:
            return contextlib.nullcontext()
        return sdpa_kernel(list(self.sdpa_order), set_priority=True)

    def install(self, model: torch.nn.Module) -> torch.nn.Module:
        """Point a diffusers model's own attention processors at an external kernel (SDPA choices need nothing:
        `scope` reaches them)."""
        if self.external is not None and hasattr(model, "set_attention_backend"):
            model.set_attention_backend(self.external.backend)
        return model

    def __call__(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attention of [B, heads, tokens, dim] tensors, as F.scaled_dot_product_attention takes them."""
        if self.external is None:
            kernel = self.short_kernel if self.short_kernel and key.shape[-2] < self.long_from else self.kernel
            direct = DIRECT_KERNELS.get((query.device.type, kernel)) if kernel else None
            if direct is not None and _direct_takes(query, key, value, attn_mask):
                return direct(query, key, value)
            return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask)
        from diffusers.models.attention_dispatch import AttentionBackendName, dispatch_attention_fn

        out = dispatch_attention_fn(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask,
                                    backend=AttentionBackendName(self.external.backend))
        return out.transpose(1, 2)


def resolve_attention(platform: Platform, requested: str | None = None) -> AttentionChoice:
    """The choice for this process: flag, then $DIFFMESH_ATTENTION_BACKEND, then the platform's default. An unknown
    name, or an external kernel whose package is not installed, is a ValueError saying so."""
    name = (requested or os.environ.get(ATTENTION_ENV) or "auto").strip().lower()
    if name == "auto":
        return _auto(platform)
    if name not in CHOICES:
        raise ValueError(f"unknown attention backend {name!r}: expected one of {', '.join(CHOICES)}")
    if name == "native":
        return AttentionChoice(name)
    if name in SDPA_KERNELS:
        return AttentionChoice(name, _first(SDPA_KERNELS[name]), kernel=name)
    if name in FLASH_IMPLS:
        flash = FLASH_IMPLS[name]
        if not _installed(flash.module):
            raise ValueError(f"attention backend {name!r} needs the {flash.module!r} module, which is not installed")
        if flash.offer is not None:
            flash.offer()
        registry = torch.nn.attention
        if flash.impl not in getattr(registry, "list_flash_attention_impls", list)():
            raise ValueError(f"attention backend {name!r} needs a PyTorch whose flash-attention registry can take "
                             f"{flash.impl!r} (this is {torch.__version__})")
        return AttentionChoice(name, _first(SDPBackend.FLASH_ATTENTION), flash_impl=flash.impl, kernel="flash",
                               short_kernel=flash.short_kernel, long_from=flash.long_from)
    kernel = EXTERNAL_KERNELS[name]
    if not _installed(kernel.package):
        raise ValueError(f"attention backend {name!r} needs the {kernel.package!r} package, which is not installed")
    return AttentionChoice(name, external=kernel)


def _auto(platform: Platform) -> AttentionChoice:
    """The first of the platform's `auto` choices that this process can use; the last is always PyTorch's own."""
    *optional, last = platform.auto_attention()
    for name in optional:
        try:
            return resolve_attention(platform, name)
        except ValueError as why:
            logger.debug("attention backend auto: not %s (%s)", name, why)
    return resolve_attention(platform, last)


def _first(kernel: SDPBackend) -> tuple[SDPBackend, ...]:
    """`kernel`, then PyTorch's order for the rest (a call it cannot take falls through instead of failing)."""
    return (kernel, *(other for other in _FALLBACK_ORDER if other != kernel))


def probe_error(choice: AttentionChoice, device: torch.device, dtype: torch.dtype) -> float:
    """Largest absolute difference between `choice` and PyTorch's math kernel in float32 on a random probe (a
    lossy kernel's error, reported at start-up)."""
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 1024, 128, generator=generator) for _ in range(3))
    with sdpa_kernel(SDPBackend.MATH):
        exact = F.scaled_dot_product_attention(q, k, v)
    with choice.scope():
        got = choice(*(x.to(device, dtype) for x in (q, k, v)))
    return float((got.float().cpu() - exact).abs().max())


_current: AttentionChoice | None = None


def set_attention(platform: Platform, requested: str | None = None) -> AttentionChoice:
    global _current
    _current = resolve_attention(platform, requested)
    logger.info("attention backend: %s", _current.name)
    return _current


def current_attention() -> AttentionChoice:
    """The process-wide choice (the platform's default until `set_attention`)."""
    global _current
    if _current is None:
        from services.common.platform import current_platform

        _current = resolve_attention(current_platform())
    return _current


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Scaled dot-product attention with the process's chosen kernel ([B, heads, tokens, dim] in and out)."""
    return current_attention()(query, key, value, attn_mask)


@contextlib.contextmanager
def attention_scope() -> Iterator[AttentionChoice]:
    choice = current_attention()
    with choice.scope():
        yield choice
