"""`diffmesh up` hands its gang flags to the denoiser unchanged, and only those given."""

from __future__ import annotations

import argparse

from diffmesh import cli
from services.denoiser.gang.flags import add_gang_arguments, resolve_layout
from services.denoiser.gang.layout import GangLayout


def gang_flags_of(argv: list[str]) -> list[str]:
    return cli.gang_flags(cli.build_parser().parse_args(["up", *argv]))


def test_up_passes_the_gang_flags_it_was_given_to_the_denoiser():
    flags = gang_flags_of(["--devices", "4", "--cfg-parallel", "--ulysses", "2", "--gang-timeout", "30"])
    assert flags == ["--devices", "4", "--ulysses", "2", "--cfg-parallel", "--gang-timeout", "30.0"]
    # The denoiser's own parser reads them back: the same layout, the same timeout.
    denoiser = add_gang_arguments(argparse.ArgumentParser()).parse_args(flags)
    assert denoiser.gang_timeout == 30.0
    assert resolve_layout(denoiser, None) == GangLayout(cfg=2, ring=1, ulysses=2, tp=1)


def test_up_without_gang_flags_passes_none():
    assert gang_flags_of([]) == []
