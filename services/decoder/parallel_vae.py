"""Several devices decode one video together, each its own rows of every frame: exact, not tiled.

The latents (and so every feature map after them) are split along H into one slab per rank, of uneven heights
where they do not divide. Every layer of the VAE then either works row by row (activations, channel norms such as
Wan's RMS norm, nearest upsampling, which doubles a slab's rows and keeps the slabs aligned, pixel (un)shuffles
within aligned rows) or is wrapped here so that it computes on its slab exactly the rows it computes on the
whole frame -- patch parallelism, the concept of xDiT's DistVAE:

- a convolution first takes its halo: the rows above and below its slab that its kernel reads (its H padding at
  unit stride), from the neighbouring ranks, with zero rows only at the frame's top and bottom, where its own
  padding would be. A strided convolution (an encoder's downsampler) needs each slab to start on its stride,
  which slabs cut in whole latent rows do;
- constant padding (Wan's downsamplers pad before they convolve) pads only the frame's top and bottom;
- GroupNorm, whose statistics span the whole frame, sums over every rank: the mean first, then the variance about
  it (two all-reduces of n x groups numbers, as exact as one device's two-pass);
- a frame attention (the VAE's mid-block) gathers the whole frame, attends over it and keeps its own rows.

Wan's causal convolution caches the last frames of its input between temporal chunks; the cache holds this
rank's slab only, and the halo is taken after the cached frames are put before the chunk, so the neighbours'
cached rows arrive together with their current ones.

Halos travel by all-gather rather than send/recv: one collective per convolution that every backend (gloo, nccl,
xccl) has, and only a row or two per rank.

The wrappers are installed once on the loaded VAE (`RowParallelVae`) and act only inside `decoding()` (the VAE
gets this rank's slab of the latents) or `encoding()` (the VAE gets the whole image; its encoder cuts the slab
and gathers the latents); outside them the VAE runs as diffusers wrote it. Which of the VAE's own classes are
causal convolutions or frame attentions is its family's to say (`RowSplitPlan`, services/families/base.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
from collections.abc import Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from services.families.base import RowSplitPlan

logger = logging.getLogger(__name__)

H = -2          # rows: the second-to-last dimension of every feature map here (N, C, [T,] H, W)

# Torch layers that read across rows in ways a halo of constant rows cannot reproduce: a VAE holding one cannot
# be split by this mechanism, and says so at start-up rather than decoding wrong frames.
UNSUPPORTED = (nn.ReflectionPad2d, nn.ReflectionPad3d, nn.ReplicationPad2d, nn.ReplicationPad3d,
               nn.CircularPad2d, nn.CircularPad3d, nn.InstanceNorm2d, nn.InstanceNorm3d,
               nn.AvgPool2d, nn.AvgPool3d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
LOCAL_UPSAMPLING = ("nearest", "nearest-exact")


@dataclasses.dataclass(frozen=True)
class RowSplit:
    """The ranks decoding one video together: `group` (None: the default group), and where this rank sits."""

    group: dist.ProcessGroup | None
    rank: int
    size: int

    @classmethod
    def of(cls, group: dist.ProcessGroup | None = None) -> RowSplit:
        return cls(group=group, rank=dist.get_rank(group), size=dist.get_world_size(group))

    @property
    def first(self) -> bool:
        return self.rank == 0

    @property
    def last(self) -> bool:
        return self.rank == self.size - 1

    def leader(self) -> int:
        """The global rank of the group's first member (what torch's gather takes as its destination)."""
        return dist.get_process_group_ranks(self.group)[0] if self.group is not None else 0


def row_sizes(rows: int, parts: int) -> list[int]:
    """`rows` in `parts` slabs as even as they go, the first ones a row taller where they do not divide."""
    if parts < 1 or rows < parts:
        raise ValueError(f"{rows} rows cannot give each of {parts} ranks one")
    base, extra = divmod(rows, parts)
    return [base + (index < extra) for index in range(parts)]


def slab(x: torch.Tensor, sizes: list[int], rank: int, dim: int = H) -> torch.Tensor:
    """Rank `rank`'s rows of `x`, split as `sizes`."""
    return x.narrow(dim, sum(sizes[:rank]), sizes[rank])


def _rows_of_every_rank(rows: int, split: RowSplit, device: torch.device) -> list[int]:
    mine = torch.tensor([rows], dtype=torch.int64, device=device)
    every = [torch.empty_like(mine) for _ in range(split.size)]
    dist.all_gather(every, mine, group=split.group)
    return [int(value.item()) for value in every]


def _padded(x: torch.Tensor, rows: int, dim: int) -> torch.Tensor:
    missing = rows - x.shape[dim]
    if not missing:
        return x.contiguous()
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x, x.new_zeros(shape)], dim)


def all_gather_rows(x: torch.Tensor, split: RowSplit, dim: int = H) -> tuple[torch.Tensor, list[int]]:
    """Every rank's slab put back together, on every rank, and each rank's row count. Slabs of uneven heights are
    padded to the tallest for the collective (every backend's all-gather wants equal shapes) and trimmed after."""
    dim = dim % x.dim()
    if split.size == 1:
        return x, [x.shape[dim]]
    sizes = _rows_of_every_rank(x.shape[dim], split, x.device)
    tallest = max(sizes)
    parts = [torch.empty_like(_padded(x, tallest, dim)) for _ in range(split.size)]
    dist.all_gather(parts, _padded(x, tallest, dim), group=split.group)
    return torch.cat([part.narrow(dim, 0, rows) for part, rows in zip(parts, sizes)], dim), sizes


def gather_rows(x: torch.Tensor, split: RowSplit, dim: int = H) -> torch.Tensor | None:
    """The slabs put back together on the group's first rank (None on the others), which alone needs the whole
    video: the others hold only their share of it at any time."""
    dim = dim % x.dim()
    if split.size == 1:
        return x
    sizes = _rows_of_every_rank(x.shape[dim], split, x.device)
    mine = _padded(x, max(sizes), dim)
    parts = [torch.empty_like(mine) for _ in range(split.size)] if split.first else None
    dist.gather(mine, parts, dst=split.leader(), group=split.group)
    if not split.first:
        return None
    return torch.cat([part.narrow(dim, 0, rows) for part, rows in zip(parts, sizes)], dim)


def with_halo(x: torch.Tensor, top: int, bottom: int, edge_bottom: int, split: RowSplit) -> torch.Tensor:
    """This rank's rows with `top` rows of the rank above before them and `bottom` rows of the rank below after
    them (a negative `bottom` drops as many of its own last rows); at the frame's edges zero rows instead: `top`
    on the first rank, `edge_bottom` on the last (where the layer's own bottom padding would be)."""
    dim = x.dim() + H
    rows = x.shape[dim]
    down, up = top, max(bottom, 0)          # rows each rank gives the rank below / above it
    received = None
    if down + up:
        if rows < max(down, up):
            # Every rank's slab is at least one latent row (row_sizes), enough for the 3x3 kernels of the VAEs
            # here; a wider kernel on a thinner slab would need rows from beyond the neighbours.
            raise RuntimeError(f"a slab of {rows} rows is thinner than the {max(down, up)}-row halo its neighbours "
                               "need; decode with fewer devices")
        send = torch.cat([x.narrow(dim, rows - down, down), x.narrow(dim, 0, up)], dim).contiguous()
        received = [torch.empty_like(send) for _ in range(split.size)]
        dist.all_gather(received, send, group=split.group)

    def zeros(count: int) -> torch.Tensor:
        shape = list(x.shape)
        shape[dim] = count
        return x.new_zeros(shape)

    parts = []
    if top:
        parts.append(zeros(top) if split.first else received[split.rank - 1].narrow(dim, 0, down))
    if split.last:
        parts.append(x)
        if edge_bottom:
            parts.append(zeros(edge_bottom))
    else:
        parts.append(x if bottom >= 0 else x.narrow(dim, 0, rows + bottom))
        if bottom > 0:
            parts.append(received[split.rank + 1].narrow(dim, down, up))
    return torch.cat(parts, dim) if len(parts) > 1 else parts[0]


def _symmetric_h_padding(conv: nn.Conv2d | nn.Conv3d) -> tuple[int, ...]:
    """The convolution's padding per spatial dimension as numbers ('same' and 'valid' resolved)."""
    if conv.padding == "valid":
        return (0,) * len(conv.kernel_size)
    if conv.padding == "same":
        reach = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
        if any(r % 2 for r in reach):
            raise ValueError(f"{conv}: 'same' padding with an even kernel pads unevenly; cannot split its rows")
        return tuple(r // 2 for r in reach)
    return tuple(conv.padding)


class RowParallelVae:
    """A loaded diffusers VAE whose layers can split each frame's rows over a group of ranks (see the module's
    docstring). Install once per process; every rank of a group installs it on the same VAE."""

    def __init__(self, vae: nn.Module, plan: RowSplitPlan) -> None:
        self.vae = vae
        self.plan = plan
        self._active: RowSplit | None = None       # layers split their rows while set
        self._encoding: RowSplit | None = None     # the encoder cuts its slab and gathers while set
        self._wrap(vae)
        self.encoder_reduction = 0
        if plan.encoder is not None:
            encoder = getattr(vae, plan.encoder)
            # The encoder's downsamplers run one after the other (in every diffusers VAE), so their strides
            # multiply to how many input rows make one latent row: slabs cut in such units stay on every stride.
            self.encoder_reduction = 1
            for module in encoder.modules():
                if isinstance(module, (nn.Conv2d, nn.Conv3d)):
                    self.encoder_reduction *= module.stride[H]
            encoder.forward = functools.partial(self._encoder_forward, encoder.forward)

    # What the decoder runs inside ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def decoding(self, split: RowSplit) -> Iterator[None]:
        """The VAE gets this rank's slab of the latents and returns its slab of the frames. Diffusers' tiling is
        off inside: it would cut tiles out of a slab, and the split is what bounds each device's memory."""
        tiling = getattr(self.vae, "use_tiling", False)
        self.vae.use_tiling = False
        self._active = split if split.size > 1 else None
        try:
            yield
        finally:
            self._active = None
            self.vae.use_tiling = tiling

    @contextlib.contextmanager
    def encoding(self, split: RowSplit) -> Iterator[None]:
        """The VAE gets the whole image on every rank; its encoder encodes this rank's rows and every rank gets the
        whole latents. Without an encoder in the plan, every rank encodes the whole image itself."""
        self._encoding = split if split.size > 1 and self.encoder_reduction else None
        try:
            yield
        finally:
            self._encoding = None

    # Installation -----------------------------------------------------------------------------------------

    def _wrap(self, module: nn.Module) -> None:
        plan = self.plan
        if isinstance(module, plan.frame_attentions):
            # Its insides see the whole frame: nothing below it is wrapped.
            module.forward = functools.partial(self._attention_forward, module.forward)
            return
        if isinstance(module, UNSUPPORTED):
            raise ValueError(f"{type(module).__name__} mixes rows in a way the row split cannot reproduce; "
                             "decode this VAE on one device")
        if isinstance(module, nn.Upsample) and module.mode not in LOCAL_UPSAMPLING:
            raise ValueError(f"{module.mode} upsampling reads neighbouring rows; decode this VAE on one device")
        if isinstance(module, plan.causal_convs):
            self._wrap_causal_conv(module)
        elif isinstance(module, (nn.Conv2d, nn.Conv3d)):
            self._wrap_conv(module)
        elif isinstance(module, nn.GroupNorm):
            module.forward = functools.partial(self._group_norm_forward, module, module.forward)
        elif isinstance(module, (nn.ConstantPad2d, nn.ConstantPad3d)):
            module.forward = functools.partial(self._pad_forward, module, module.forward)
        for child in module.children():
            self._wrap(child)

    def _wrap_conv(self, conv: nn.Conv2d | nn.Conv3d) -> None:
        if conv.padding_mode != "zeros":
            raise ValueError(f"{conv}: {conv.padding_mode} padding reads across the frame; cannot split its rows")
        padding = list(_symmetric_h_padding(conv))
        pad_h = padding[H]
        padding[H] = 0                               # the rows' padding comes with the halo
        convolve = F.conv3d if isinstance(conv, nn.Conv3d) else F.conv2d
        halo = self._halo(conv, pad_h)

        def forward(original, x: torch.Tensor) -> torch.Tensor:
            split = self._active
            if split is None:
                return original(x)
            return convolve(halo(x, split), conv.weight, conv.bias, conv.stride, tuple(padding), conv.dilation,
                            conv.groups)

        conv.forward = functools.partial(forward, conv.forward)

    def _wrap_causal_conv(self, conv: nn.Conv3d) -> None:
        left, right, top, bottom, front, back = conv._padding
        if (left, top) != (right, bottom) or tuple(_symmetric_h_padding(conv)) != (0, 0, 0):
            raise ValueError(f"{conv}: a causal convolution must pad W and H evenly and nothing else itself")
        halo = self._halo(conv, top)

        def forward(original, x: torch.Tensor, cache_x: torch.Tensor | None = None) -> torch.Tensor:
            split = self._active
            if split is None:
                return original(x, cache_x)
            # As WanCausalConv3d.forward: the cached frames of the last chunk go first, and pad what they do not
            # fill of the causal (front) padding. Both are this rank's rows; the halo then brings the neighbours'.
            time_front = front
            if cache_x is not None and front > 0:
                x = torch.cat([cache_x.to(x.device), x], dim=2)
                time_front -= cache_x.shape[2]
            if time_front or back:
                x = F.pad(x, (0, 0, 0, 0, time_front, back))
            return F.conv3d(halo(x, split), conv.weight, conv.bias, conv.stride, (0, 0, left), conv.dilation,
                            conv.groups)

        conv.forward = functools.partial(forward, conv.forward)

    @staticmethod
    def _halo(conv: nn.Conv2d | nn.Conv3d, pad_h: int):
        """(x, split) -> x with the rows `conv` reads beyond this rank's slab. Output row o of a kernel k, stride s,
        dilation d over rows padded by p reads input rows o*s - p .. o*s - p + d*(k-1); a slab starting on the
        stride (at row a) makes output rows a/s.. and so needs p rows above it and d*(k-1) - p - (s-1) below."""
        stride = conv.stride[H]
        below = conv.dilation[H] * (conv.kernel_size[H] - 1) - pad_h - (stride - 1)

        def halo(x: torch.Tensor, split: RowSplit) -> torch.Tensor:
            if not split.last and x.shape[H] % stride:
                raise RuntimeError(f"a slab of {x.shape[H]} rows does not start the next on the stride {stride}")
            return with_halo(x, pad_h, below, pad_h, split)

        return halo

    # Forwards ---------------------------------------------------------------------------------------------

    def _group_norm_forward(self, norm: nn.GroupNorm, original, x: torch.Tensor) -> torch.Tensor:
        split = self._active
        if split is None:
            return original(x)
        n, channels = x.shape[:2]
        # Sums and counts over every rank's rows, in float32 at least, as torch's own GroupNorm accumulates.
        accumulate = torch.promote_types(x.dtype, torch.float32)
        flat = x.reshape(n, norm.num_groups, -1).to(accumulate)
        stats = torch.stack([flat.sum(-1), flat.new_full(flat.shape[:2], flat.shape[-1])])
        dist.all_reduce(stats, group=split.group)
        count = stats[1].unsqueeze(-1)
        centred = flat - stats[0].unsqueeze(-1) / count
        variance = centred.square().sum(-1, keepdim=True)
        dist.all_reduce(variance, group=split.group)
        out = (centred * torch.rsqrt(variance / count + norm.eps)).reshape(x.shape)
        if norm.affine:
            shape = (1, channels) + (1,) * (x.dim() - 2)
            out = out * norm.weight.to(accumulate).view(shape) + norm.bias.to(accumulate).view(shape)
        return out.to(x.dtype)

    def _pad_forward(self, pad: nn.ConstantPad2d | nn.ConstantPad3d, original, x: torch.Tensor) -> torch.Tensor:
        split = self._active
        if split is None:
            return original(x)
        padding = list(pad.padding)                  # (left, right, top, bottom[, front, back])
        if not split.first:
            padding[2] = 0
        if not split.last:
            padding[3] = 0
        return F.pad(x, padding, value=pad.value)

    def _attention_forward(self, original, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        split = self._active
        if split is None:
            return original(x, *args, **kwargs)
        whole, sizes = all_gather_rows(x, split)
        # Every rank attends over the whole frame (the mid-block runs at latent resolution, where that is cheap)
        # and keeps its own rows.
        return slab(original(whole, *args, **kwargs), sizes, split.rank).contiguous()

    def _encoder_forward(self, original, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        split = self._encoding
        if split is None:
            return original(x, *args, **kwargs)
        units, rest = divmod(x.shape[H], self.encoder_reduction)
        if rest or units < split.size:
            return original(x, *args, **kwargs)     # too small to split: every rank encodes it whole, alike
        sizes = [rows * self.encoder_reduction for rows in row_sizes(units, split.size)]
        self._active = split
        try:
            mine = original(slab(x, sizes, split.rank), *args, **kwargs)
        finally:
            self._active = None
        return all_gather_rows(mine, split)[0]
