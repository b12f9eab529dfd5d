"""The token sequence as a gang splits it, for any family's sequence-parallel forward: which slice of the (padded)
sequence this rank holds, which tokens its self-attention sees them on, and gathering every rank's slice back.

Each sequence rank (ring x ulysses) holds `per_rank` consecutive tokens; the sequence is zero-padded at its end to
`degree * per_rank`, and the padding is trimmed from keys in attention (services/families/wan_attention.py) and from
the output after the gather, so it never changes a real token.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
import torch.nn.functional as F

from services.denoiser.axes import AxisGroup


def local_slice(x: torch.Tensor, dim: int, start: int, length: int) -> torch.Tensor:
    """x[start:start+length] along `dim`, zero-padded past the end (the sequence's padding)."""
    available = max(0, min(length, x.shape[dim] - start))
    piece = x.narrow(dim, min(start, x.shape[dim]), available)
    if available == length:
        return piece
    pad = [0, 0] * (x.dim() - dim - 1) + [0, length - available]
    return F.pad(piece, pad)


def gather_sequence(x: torch.Tensor, sequence: AxisGroup) -> torch.Tensor:
    """Concatenate every sequence rank's [B, s, C] slice, in rank order, into [B, degree*s, C]."""
    if sequence.size == 1:
        return x
    pieces = [torch.empty_like(x) for _ in range(sequence.size)]
    dist.all_gather(pieces, x.contiguous(), group=sequence.group)
    return torch.cat(pieces, dim=1)


@dataclasses.dataclass(frozen=True)
class SequenceSplit:
    """One rank's share of a sequence of `tokens`: its own slice, and where its self-attention's tokens lie."""

    tokens: int
    start: int                   # this rank's first token
    per_rank: int                # tokens per rank (the last ranks' slices end in padding)
    valid_keys: list[int]        # real keys in each ring block (the processors trim the rest)
    rotary_start: int            # the tokens self-attention applies per-token terms (rotary) to
    rotary_length: int

    @classmethod
    def of(cls, tokens: int, sequence: AxisGroup, ulysses: AxisGroup, ring: AxisGroup) -> SequenceSplit:
        per_rank = -(-tokens // sequence.size)
        start = sequence.index * per_rank
        block = per_rank * ulysses.size
        valid_keys = [max(0, min(block, tokens - r * block)) for r in range(ring.size)]
        # Ulysses applies rotary after its exchange, to the ring block's tokens; otherwise to this rank's own.
        if ulysses.size > 1:
            rotary_start, rotary_length = ring.index * block, block
        else:
            rotary_start, rotary_length = start, per_rank
        return cls(tokens, start, per_rank, valid_keys, rotary_start, rotary_length)

    def own(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's slice of a per-token tensor (tokens along `dim`)."""
        return local_slice(x, dim, self.start, self.per_rank)

    def rotary(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """The slice of a per-token tensor that this rank's self-attention applies (rotary frequencies)."""
        return local_slice(x, dim, self.rotary_start, self.rotary_length)

    def gather(self, x: torch.Tensor, sequence: AxisGroup) -> torch.Tensor:
        """Every rank's [B, per_rank, C] back in order, padding dropped: [B, tokens, C]."""
        return gather_sequence(x, sequence)[:, : self.tokens]
