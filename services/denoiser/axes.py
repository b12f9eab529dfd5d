"""A parallel axis as one rank sees it: its process group, its members and where the rank sits.

The gang builds one per axis (services/denoiser/gang/distributed.py). One device is an axis of one rank (`ALONE`),
so the self-attention processor that one device and the gang share takes the same arguments on both.
"""

from __future__ import annotations

import dataclasses

import torch.distributed as dist


@dataclasses.dataclass
class AxisGroup:
    """One parallel axis as seen from this rank: its process group, its members and where we sit."""

    group: dist.ProcessGroup | None
    ranks: list[int]
    index: int

    @property
    def size(self) -> int:
        return len(self.ranks)


# One device: an axis of one rank.
ALONE = AxisGroup(group=None, ranks=[0], index=0)
