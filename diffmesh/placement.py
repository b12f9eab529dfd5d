"""Which devices each stage of `diffmesh up` sees: `--encoder-devices`, `--denoiser-devices`, `--decoder-devices`.

An index is a position among the devices `up` itself sees, as in torchrun and vLLM: with CUDA_VISIBLE_DEVICES=2,3
set for `up`, `--decoder-devices 1` is GPU 3; with it unset, GPU 1. The platform layer turns a stage's list into its
affinity variable (CUDA_VISIBLE_DEVICES, ZE_AFFINITY_MASK) in that stage's environment only, so the stage numbers
its devices from 0 in the order given and a gang's ranks take them by LOCAL_RANK; no stage code knows it was
placed. A list of N devices is a gang of N ranks (the denoiser's and the decoder's `--devices N`); the encoder runs
on one. CPU has no devices to choose: the flags are refused there rather than ignored, since a layout asked for
and not made would be measured as if it had been.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:       # the platform layer imports torch: only when a device list is given (`--help` stays fast)
    from services.common.platform import Platform

STAGES = ("encoder", "denoiser", "decoder")
# Stages served by one process per device with `--devices N` (their gangs); the others use one device.
GANG_STAGES = ("denoiser", "decoder")
ENV = {stage: f"DIFFMESH_{stage.upper()}_DEVICES" for stage in STAGES}


def device_list(text: str) -> tuple[int, ...]:
    """argparse type: "0,1" -> (0, 1): distinct indices, 0 or more, in the order the stage numbers them."""
    items = [item.strip() for item in str(text).split(",")]
    for item in items:
        if not item.lstrip("-").isdecimal():        # "x", "", "0,,1", "1.5"
            raise argparse.ArgumentTypeError(f"{text!r} is not a list of device indices, e.g. 0 or 0,1")
        if item.startswith("-"):
            raise argparse.ArgumentTypeError(f"{text!r}: device indices start at 0")
    indices = tuple(int(item) for item in items)
    repeated = next((index for position, index in enumerate(indices) if index in indices[:position]), None)
    if repeated is not None:
        raise argparse.ArgumentTypeError(f"{text!r} lists device {repeated} twice")
    return indices


@dataclasses.dataclass(frozen=True)
class Placement:
    """What `up` adds to one stage's processes: environment (the affinity variable) and flags (its gang's size)."""

    env: Mapping[str, str] = dataclasses.field(default_factory=dict)
    argv: tuple[str, ...] = ()


def chosen_devices(args: argparse.Namespace) -> dict[str, tuple[int, ...]]:
    """Each stage's device list that was given. A TOML array (`decoder_devices = [1, 2]`) arrives as a list, which
    the settings layer passes through unparsed: it is checked here as the same text on the command line would be."""
    chosen = {}
    for stage in STAGES:
        value = getattr(args, f"{stage}_devices", None)
        if isinstance(value, list):
            text = ",".join(str(item) for item in value)
            try:
                value = device_list(text)
            except argparse.ArgumentTypeError as error:
                raise ValueError(f"--{stage}-devices: {error}") from None
        if value is not None:
            chosen[stage] = value
    return chosen


def place_stages(args: argparse.Namespace, platform: Platform | None = None,
                 environ: Mapping[str, str] | None = None) -> dict[str, Placement]:
    """Each stage's placement from `up`'s flags, against the devices `environ` (default: ours) shows on `platform`
    (default: the one `--device` selects). ValueError, one line naming the flag, for a list that cannot be met."""
    chosen = chosen_devices(args)
    placements = {stage: Placement() for stage in STAGES}
    if not chosen:
        return placements
    environ = os.environ if environ is None else environ
    if platform is None:
        from services.common.platform import select_platform

        try:
            platform = select_platform(args.device)
        except (RuntimeError, ValueError) as error:
            raise ValueError(str(error)) from None
    for stage, indices in chosen.items():
        flag = f"--{stage}-devices {','.join(str(index) for index in indices)}"
        if stage not in GANG_STAGES and len(indices) > 1:
            raise ValueError(f"{flag}: the {stage} runs on one device; give one")
        try:
            env = platform.affinity_env(indices, environ)
        except ValueError as error:
            raise ValueError(f"{flag}: {error}") from None
        argv: tuple[str, ...] = ()
        if stage == "denoiser" and args.devices is not None:
            # --devices given too: it must agree (fewer ranks would leave listed devices idle, more would put two
            # ranks on one device).
            if args.devices != len(indices):
                raise ValueError(f"--devices {args.devices} but {flag} lists {len(indices)}: the gang runs one rank "
                                 "per device; drop --devices or give the same count")
        elif stage in GANG_STAGES and len(indices) > 1:
            argv = ("--devices", str(len(indices)))
        placements[stage] = Placement(env, argv)
    return placements
