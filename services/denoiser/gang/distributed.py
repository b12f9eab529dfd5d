"""The gang's process groups: one device group per parallel axis, and a CPU group for control messages.

Rank discovery is torch.distributed's usual environment (`MASTER_ADDR`, `MASTER_PORT`, `RANK`, `WORLD_SIZE`,
`LOCAL_RANK`), whether `diffmesh serve denoiser --devices N` set it for its children or torchrun / a
Kubernetes controller did, so a gang can span machines. The tensor backend comes from the platform layer
(xccl, nccl or gloo); control traffic (requests, cancellation, shutdown) always goes over gloo on the CPU.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket

import torch
import torch.distributed as dist

from services.common.logs import request_context
from services.common.platform import Platform
from services.denoiser.axes import AxisGroup
from services.denoiser.gang.layout import Coordinates, GangLayout

logger = logging.getLogger(__name__)

# Workers wait for the next request for as long as the gang is idle, and every rank waits at start-up until all
# have loaded the model; a short timeout would kill an idle or slow-loading gang. A dead peer still surfaces at
# once, as a closed connection.
CONTROL_TIMEOUT = datetime.timedelta(days=365)
# Inside a request the ranks meet every few milliseconds, so a rank that has not arrived after this long is hung
# or gone; the collective then fails (gloo) or the backend's watchdog ends the process (NCCL, XCCL), instead of
# the request hanging. `--gang-timeout` overrides it.
DEFAULT_COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=2)
GANG_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")


def env_rank() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) from torch.distributed's environment, or None outside a gang."""
    if "WORLD_SIZE" not in os.environ:
        return None
    missing = [name for name in GANG_ENV if not os.environ.get(name)]
    if missing:
        raise RuntimeError(f"WORLD_SIZE is set but {', '.join(missing)} is not: cannot join the gang")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    return rank, world, local_rank


def rendezvous_store(rank: int, world_size: int,
                     timeout: datetime.timedelta) -> tuple[dist.TCPStore | None, socket.socket | None]:
    """The rendezvous store at MASTER_ADDR:MASTER_PORT, as init_process_group's env:// makes it, except that rank 0
    listens on MASTER_ADDR's own address instead of on every interface. None under torchrun, whose agent hosts the
    store.

    torch.distributed's store (and gloo's and NCCL's sockets after it) has neither TLS nor authentication: whoever
    reaches the port can join or disturb the gang. So it binds the one address the ranks use: loopback for
    `--devices N` on one host, the pod's address in Kubernetes, where deploy/k8s/components/denoiser-gang adds a
    NetworkPolicy that admits only the gang's own pods. If the address is not one of this host's (a VIP, a name
    that does not resolve yet), rank 0 falls back to every interface, as torch does, and says so. Returns the store
    and rank 0's listening socket, which must stay open as long as the store."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True):
        return None, None
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    if rank != 0:
        return dist.TCPStore(host, port, world_size, is_master=False, timeout=timeout), None
    listener = None
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        listener = socket.socket(family, kind, proto)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(address)
        listener.listen(world_size * 4)
    except OSError as error:
        if listener is not None:
            listener.close()
        logger.warning("rendezvous: cannot listen on %s:%d only (%s); listening on every interface", host, port, error)
        return dist.TCPStore(host, port, world_size, is_master=True, timeout=timeout), None
    store = dist.TCPStore(host, port, world_size, is_master=True, timeout=timeout, master_listen_fd=listener.fileno())
    return store, listener


STOP = "stop"       # the leader's last control message: the other ranks exit


class LeaderAndFollowers:
    """The control protocol every gang's executor shares (the denoiser's, the decoder's): the leader hands each
    request to the other ranks over the control group and releases them when it stops; the others follow until
    released. A subclass says how a follower runs one request (`_follow`) and what its broken gang is (`broken`)."""

    gang: Ranks

    def broken(self, reason: str) -> Exception:
        raise NotImplementedError

    def _follow(self, message) -> None:
        raise NotImplementedError

    def _hand_over(self, message) -> None:
        try:
            self.gang.broadcast_message(message)
        except Exception as error:
            # A rank that died or hung while the gang was idle is noticed here, when the request cannot reach it.
            logger.error("cannot hand the request to the gang: %s", error)
            raise self.broken("a rank of the gang is gone") from None

    def release(self) -> None:
        """Tell the other ranks to exit (the leader is shutting down)."""
        self.gang.broadcast_message(STOP)

    def follow(self) -> None:
        """Run the leader's requests until it says stop; a broken gang (or the leader's loss) ends it with an
        error."""
        while True:
            message = self.gang.broadcast_message()
            if message == STOP:
                logger.info("gang rank %d stopping", self.gang.rank)
                return
            with request_context(message.params.request_id):
                self._follow(message)


class Ranks:
    """The processes of one gang, whatever they split: this rank's device, the default process group (the
    platform's backend, for tensors) and two CPU (gloo) groups for control. The denoiser's Gang adds its layout's
    axes; the decoder's gang (services/decoder/gang.py) splits frames by rows over the default group."""

    def __init__(self, platform: Platform, rank: int, local_rank: int, world_size: int,
                 timeout: datetime.timedelta = DEFAULT_COLLECTIVE_TIMEOUT) -> None:
        self.platform = platform
        self.rank = rank
        self.world_size = world_size
        self.timeout = timeout
        if platform.kind != "cpu":
            platform.set_device(local_rank % platform.device_count())
        self.device = platform.device(local_rank % platform.device_count() if platform.kind != "cpu" else None)
        platform.apply_collective_env()
        if not dist.is_initialized():
            options = {"device_id": self.device} if platform.kind != "cpu" else {}
            # The listening socket stays open with the gang: rank 0's store serves on its descriptor.
            self._store, self._listener = rendezvous_store(rank, world_size, timeout)
            if self._store is not None:
                options["store"] = self._store
            dist.init_process_group(backend=platform.dist_backend, rank=rank, world_size=world_size,
                                    timeout=timeout, **options)
        if dist.get_world_size() != world_size:
            raise RuntimeError(f"WORLD_SIZE {dist.get_world_size()} != {self.describe()}")
        self.control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
        # Requests and per-step agreement travel on a CPU group of their own. Timeouts are each process's own:
        # workers wait on it for as long as the gang is idle; the leader waits only `timeout`, so a worker that
        # hangs (not one that dies: that closes its connections) cannot hold a request or the leader forever.
        self.requests = dist.new_group(backend="gloo", timeout=timeout if rank == 0 else CONTROL_TIMEOUT)

    def describe(self) -> str:
        return f"{self.world_size} ranks"

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    # Control traffic, on the CPU group --------------------------------------------------------------------

    def broadcast_message(self, message: object = None) -> object:
        """Rank 0 sends `message` to every rank; every rank returns it."""
        box = [message]
        dist.broadcast_object_list(box, src=0, group=self.requests)
        return box[0]

    def broadcast_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rank 0's `tensor` into every rank's (same shape and dtype, on this rank's device), over the default
        (device) group: tensors too big to pickle over the control group."""
        dist.broadcast(tensor, src=0)
        return tensor

    def any_rank(self, flag: bool) -> bool:
        """True on every rank when `flag` is true on any: how the leader's cancellation reaches all."""
        value = torch.tensor([1 if flag else 0], dtype=torch.int32)
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self.requests)
        return bool(value.item())

    def barrier(self) -> None:
        dist.barrier(group=self.control)

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


class Gang(Ranks):
    def __init__(self, layout: GangLayout, platform: Platform, rank: int, local_rank: int,
                 timeout: datetime.timedelta = DEFAULT_COLLECTIVE_TIMEOUT) -> None:
        self.layout = layout
        self.at: Coordinates = layout.coordinates(rank)
        super().__init__(platform, rank, local_rank, layout.world_size, timeout)
        self.axes = {axis: self._axis_group(axis) for axis in ("cfg", "ring", "ulysses", "tp", "sequence")}
        logger.info("gang rank %d of %d (%s) on %s: %s", rank, layout.world_size, layout.describe(), self.device,
                    self.at)

    def describe(self) -> str:
        return f"layout {self.layout.describe()}"

    def _axis_group(self, axis: str) -> AxisGroup:
        mine = None
        # new_group must be called by every rank for every group, in the same order.
        for ranks in self.layout.groups(axis):
            group = dist.new_group(ranks, timeout=self.timeout) if len(ranks) > 1 else None
            if self.rank in ranks:
                mine = AxisGroup(group=group, ranks=ranks, index=ranks.index(self.rank))
        assert mine is not None
        return mine

    def axis(self, name: str) -> AxisGroup:
        return self.axes[name]
