"""The gang's command-line flags, the layout they ask for, and the checks made before any rank starts."""

from __future__ import annotations

import argparse

from services.common.models import resolve_model_dir
from services.common.platform import select_platform
from services.denoiser.gang.distributed import DEFAULT_COLLECTIVE_TIMEOUT
from services.denoiser.gang.engine import check_gang_model
from services.denoiser.gang.layout import GangLayout, LayoutError


def add_gang_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    gang = parser.add_argument_group("gang", "several devices serving each request together "
                                     "(devices = cfg x ring x ulysses x tp)")
    gang.add_argument("--devices", type=int, default=None,
                      help="processes/devices in the gang (default 1, or $WORLD_SIZE when launched by torchrun)")
    gang.add_argument("--ulysses", type=int, default=None,
                      help="Ulysses sequence-parallel degree (heads all-to-all) (default: what --cfg-parallel leaves "
                      "of the devices when --ring and --tp are not given either; else 1)")
    gang.add_argument("--ring", type=int, default=None, help="ring-attention sequence-parallel degree (default: 1)")
    gang.add_argument("--cfg-parallel", action="store_true",
                      help="conditional and unconditional branches on different devices (degree 2)")
    gang.add_argument("--tp", type=int, default=None,
                      help="tensor-parallel degree (heads and FFN sharded) (default: 1)")
    gang.add_argument("--shard-weights", action="store_true",
                      help="shard each transformer block's weights across the gang's ranks, gathered just before the "
                      "block runs and freed after, so a model bigger than one device fits (same outputs; each rank "
                      "holds 1/devices of the blocks). Needs --devices 2 or more, not with --tp > 1 (default: off, "
                      "every rank holds the whole model)")
    gang.add_argument("--gang-timeout", type=positive_seconds, default=DEFAULT_COLLECTIVE_TIMEOUT.total_seconds(),
                      metavar="SECONDS", help="how long a rank waits in a collective for the others before the "
                      "gang counts as broken (answers UNAVAILABLE and exits) (default %(default)s)")
    return parser


def positive_seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number of seconds")
    return value


def resolve_layout(args: argparse.Namespace, world_size: int | None) -> GangLayout:
    """The layout from the flags; `world_size` is the gang's when torch.distributed's env says we are in one."""
    devices = args.devices or world_size or 1
    if world_size is not None and devices != world_size:
        raise LayoutError(f"--devices {devices} but WORLD_SIZE is {world_size}")
    layout = GangLayout.resolve(devices, cfg_parallel=args.cfg_parallel, ulysses=args.ulysses, ring=args.ring,
                                tp=args.tp)
    if args.shard_weights:
        check_weight_sharding(layout)
    return layout


def check_weight_sharding(layout: GangLayout) -> None:
    """`--shard-weights` splits the blocks across ranks that would each hold them whole (sharded_weights.py)."""
    if layout.world_size == 1:
        raise LayoutError("--shard-weights shards the blocks across a gang's ranks: give --devices 2 or more")
    if layout.tp > 1:
        # TP ranks hold different slices already; sharding each slice over its replicas is not built (nor tested).
        raise LayoutError(f"--shard-weights with --tp {layout.tp}: not available; tensor parallelism already "
                          "splits the weights (use --tp or --shard-weights, not both)")


def check_layout_for_model(layout: GangLayout, args: argparse.Namespace) -> None:
    """Before any process starts: the model must split this way, and the devices must exist."""
    check_gang_model(resolve_model_dir(args.model, args.model_name), layout)
    platform = select_platform(args.device)
    if platform.kind != "cpu" and platform.device_count() < layout.world_size:
        raise LayoutError(f"{layout.world_size} {platform.kind} devices requested, {platform.device_count()} visible")
