"""How a gang of N devices is divided: N = cfg × ring × ulysses × tp, and where each rank sits in it.

Ranks are numbered with tp innermost, then ulysses, then ring, then cfg, so the groups that talk most
(tensor parallel all-reduces, then Ulysses all-to-alls) sit on neighbouring devices.
"""

from __future__ import annotations

import dataclasses


class LayoutError(ValueError):
    """A gang layout that cannot work; the message says why and what to change."""


@dataclasses.dataclass(frozen=True)
class Coordinates:
    cfg: int
    ring: int
    ulysses: int
    tp: int


@dataclasses.dataclass(frozen=True)
class GangLayout:
    cfg: int = 1
    ring: int = 1
    ulysses: int = 1
    tp: int = 1

    @classmethod
    def resolve(cls, devices: int, *, cfg_parallel: bool = False, ulysses: int | None = None,
                ring: int | None = None, tp: int | None = None) -> GangLayout:
        """Fill in the layout from command-line choices. With no sequence or tensor degree given, whatever
        `cfg_parallel` leaves of the devices goes to Ulysses (usually the fastest on one host)."""
        cfg = 2 if cfg_parallel else 1
        for name, value in (("devices", devices), ("ulysses", ulysses), ("ring", ring), ("tp", tp)):
            if value is not None and value < 1:
                raise LayoutError(f"--{name} must be at least 1, got {value}")
        if ulysses is None and ring is None and tp is None:
            if devices % cfg:
                raise LayoutError(f"--cfg-parallel needs an even number of devices, got {devices}")
            ulysses = devices // cfg
        layout = cls(cfg=cfg, ring=ring or 1, ulysses=ulysses or 1, tp=tp or 1)
        if layout.world_size != devices:
            raise LayoutError(
                f"{devices} devices do not match the layout {layout.describe()} = {layout.world_size} devices; "
                "the product cfg × ring × ulysses × tp must equal --devices"
            )
        return layout

    @property
    def world_size(self) -> int:
        return self.cfg * self.ring * self.ulysses * self.tp

    @property
    def sequence_degree(self) -> int:
        """Ranks that each hold a slice of the token sequence."""
        return self.ring * self.ulysses

    def describe(self) -> str:
        return f"cfg {self.cfg} × ring {self.ring} × ulysses {self.ulysses} × tp {self.tp}"

    def check_model(self, num_heads: int, tp_widths: dict[str, int]) -> None:
        """Fail at start-up, not mid-request, when the model cannot be split this way. `tp_widths`: the other
        widths tensor parallelism splits, by their config names (a family's ParallelPlan)."""
        if self.cfg not in (1, 2):
            raise LayoutError(f"cfg degree must be 1 or 2 (conditional and unconditional), got {self.cfg}")
        head_split = self.ulysses * self.tp
        if num_heads % head_split:
            raise LayoutError(
                f"the model has {num_heads} attention heads, not divisible by ulysses {self.ulysses} × tp {self.tp}"
                f" = {head_split}; choose degrees whose product divides {num_heads}"
            )
        for name, width in tp_widths.items():
            if width % self.tp:
                raise LayoutError(f"the model's {name} {width} is not divisible by tp {self.tp}")

    def coordinates(self, rank: int) -> Coordinates:
        if not 0 <= rank < self.world_size:
            raise LayoutError(f"rank {rank} outside a gang of {self.world_size}")
        tp, rest = rank % self.tp, rank // self.tp
        ulysses, rest = rest % self.ulysses, rest // self.ulysses
        ring, cfg = rest % self.ring, rest // self.ring
        return Coordinates(cfg=cfg, ring=ring, ulysses=ulysses, tp=tp)

    def rank_of(self, at: Coordinates) -> int:
        return ((at.cfg * self.ring + at.ring) * self.ulysses + at.ulysses) * self.tp + at.tp

    def groups(self, axis: str) -> list[list[int]]:
        """Every group along one axis ('cfg', 'ring', 'ulysses', 'tp' or 'sequence' = ring and ulysses
        together), as lists of global ranks; a group's order is its members' index along that axis."""
        axes = ("ring", "ulysses") if axis == "sequence" else (axis,)
        found: dict[tuple, list[int]] = {}
        for rank in range(self.world_size):
            at = dataclasses.asdict(self.coordinates(rank))
            key = tuple(value for name, value in at.items() if name not in axes)
            found.setdefault(key, []).append(rank)
        return list(found.values())
