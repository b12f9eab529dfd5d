"""Gang layouts: resolving flags into cfg x ring x ulysses x tp, start-up checks, and rank placement."""

from __future__ import annotations

import itertools

import pytest

from services.denoiser.gang.layout import Coordinates, GangLayout, LayoutError


def test_devices_alone_go_to_ulysses_and_cfg_parallel_takes_two():
    assert GangLayout.resolve(4) == GangLayout(ulysses=4)
    assert GangLayout.resolve(4, cfg_parallel=True) == GangLayout(cfg=2, ulysses=2)
    assert GangLayout.resolve(2, cfg_parallel=True) == GangLayout(cfg=2)
    assert GangLayout.resolve(4, ring=2, ulysses=2) == GangLayout(ring=2, ulysses=2)
    assert GangLayout.resolve(8, cfg_parallel=True, tp=2, ulysses=2) == GangLayout(cfg=2, ulysses=2, tp=2)


@pytest.mark.parametrize("devices,kwargs,message", [
    (4, dict(ulysses=2), "must equal --devices"),
    (3, dict(cfg_parallel=True), "even number"),
    (2, dict(tp=0), "at least 1"),
    (0, {}, "at least 1"),
])
def test_impossible_flag_combinations_are_refused_with_the_reason(devices, kwargs, message):
    with pytest.raises(LayoutError, match=message):
        GangLayout.resolve(devices, **kwargs)


def test_model_check_names_the_heads_and_the_degrees():
    GangLayout(ulysses=4).check_model(num_heads=12, tp_widths={"ffn_dim": 8960})     # Wan2.1-1.3B: 12 heads
    GangLayout(ulysses=2, tp=2).check_model(num_heads=12, tp_widths={"ffn_dim": 8960})
    with pytest.raises(LayoutError) as raised:
        GangLayout(ulysses=8).check_model(num_heads=12, tp_widths={"ffn_dim": 8960})
    assert "12 attention heads" in str(raised.value) and "ulysses 8" in str(raised.value)
    with pytest.raises(LayoutError, match="ffn_dim 30 is not divisible by tp 4"):
        GangLayout(tp=4).check_model(num_heads=12, tp_widths={"ffn_dim": 30})


@pytest.mark.parametrize("layout", [GangLayout(ulysses=4), GangLayout(cfg=2, ring=2, ulysses=2),
                                    GangLayout(cfg=2, ulysses=2, tp=2), GangLayout(ring=3, tp=2)])
def test_every_rank_has_unique_coordinates_and_groups_partition_the_gang(layout):
    seen = {layout.coordinates(rank) for rank in range(layout.world_size)}
    assert len(seen) == layout.world_size
    for rank in range(layout.world_size):
        assert layout.rank_of(layout.coordinates(rank)) == rank
    for axis in ("cfg", "ring", "ulysses", "tp", "sequence"):
        groups = layout.groups(axis)
        assert sorted(itertools.chain(*groups)) == list(range(layout.world_size))
        expected = layout.sequence_degree if axis == "sequence" else getattr(layout, axis)
        assert all(len(group) == expected for group in groups)


def test_tensor_parallel_ranks_are_neighbours_then_ulysses():
    layout = GangLayout(cfg=2, ulysses=2, tp=2)
    assert layout.coordinates(1) == Coordinates(cfg=0, ring=0, ulysses=0, tp=1)
    assert layout.coordinates(2) == Coordinates(cfg=0, ring=0, ulysses=1, tp=0)
    assert layout.coordinates(4).cfg == 1
    assert layout.groups("tp")[0] == [0, 1]
    assert layout.groups("ulysses")[0] == [0, 2]
    # The sequence group orders ranks ring-major, matching how the sequence is cut into slices.
    assert GangLayout(ring=2, ulysses=2).groups("sequence") == [[0, 1, 2, 3]]
