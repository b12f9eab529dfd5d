"""Which transport carries Ulysses' exchanges: the platform's choice, `DIFFMESH_ULYSSES_EXCHANGE` to override.

  collective   all-to-alls on the gang's backend (xccl, nccl, gloo): any device, ranks on any hosts
  copy-engine  the GPUs' copy engines through symmetric memory (services/denoiser/gang/copy_engine.py): CUDA, every
               Ulysses rank on one host; faster because no SM is spent on the transfers

Where copy engines are asked for but cannot run (another host in the group, no cuda-bindings), the gang says why
once and uses the collective. Both give the same numbers.
"""

from __future__ import annotations

import logging
import os

from services.denoiser.gang.attention import CollectiveExchange
from services.denoiser.gang.distributed import Gang

logger = logging.getLogger(__name__)

EXCHANGE_ENV = "DIFFMESH_ULYSSES_EXCHANGE"
EXCHANGES = ("collective", "copy-engine")


def requested_exchange(default: str) -> str:
    choice = os.environ.get(EXCHANGE_ENV, "").strip().lower() or default
    if choice not in EXCHANGES:
        raise ValueError(f"{EXCHANGE_ENV}={choice!r}: expected one of {', '.join(EXCHANGES)}")
    return choice


def ulysses_exchange(gang: Gang):
    """The exchange for this rank's Ulysses axis, or None without one. Every gang rank calls this (the
    copy-engine check is collective)."""
    ulysses = gang.axis("ulysses")
    if ulysses.size == 1:
        return None
    if requested_exchange(gang.platform.ulysses_exchange) == "copy-engine":
        from services.denoiser.gang.copy_engine import CopyEngineExchange, unavailable_reason

        reason = unavailable_reason(ulysses, gang.control)
        if reason is None:
            return CopyEngineExchange(ulysses)
        if gang.is_leader:
            logger.warning("Ulysses exchange: copy engines unavailable (%s); using %s all-to-all instead", reason,
                           gang.platform.dist_backend)
    return CollectiveExchange(ulysses)
