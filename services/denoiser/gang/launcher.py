"""`diffmesh serve denoiser --devices N` on one host: start one process per device and watch them.

Each child gets torch.distributed's usual environment (rank, world size, local rank, a free master port on
loopback), exactly what torchrun or a Kubernetes controller would give it, so the same child code serves a
gang spanning hosts. If any rank dies, the gang cannot go on in step: the launcher stops the rest and
exits non-zero, so a supervisor (docker, Kubernetes, `diffmesh up`) restarts it whole.

The ranks fork from the launcher itself, which has imported the stage's module and the model families once
(services/common/forked.py, `from_here`); each ends with the launcher.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time

from services.common.forked import ForkedProcess
from services.common.lifeline import end_with_parent
from services.common.processes import wait_then_kill
from services.families import FAMILY_MODULES

logger = logging.getLogger(__name__)

POLL_SECONDS = 0.2


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def launch_gang(module: str, argv: list[str], devices: int, grace_seconds: float) -> int:
    """Run `module.main(argv)` as ranks 0..devices-1, each its own process; return the exit code for the launcher.
    The launcher ends with its own parent (`diffmesh up`), and the ranks with the launcher, however it ends: the
    leader drains on the SIGTERM it then gets and releases the others."""
    end_with_parent()
    # Loopback only: the rendezvous store and gloo's sockets have no TLS or authentication (torch offers none), so
    # ranks on one host keep them off the network (gloo would otherwise bind the host name's address).
    master = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(devices),
              "LOCAL_WORLD_SIZE": str(devices)}
    if "GLOO_SOCKET_IFNAME" not in os.environ and "lo" in {name for _, name in socket.if_nameindex()}:
        master["GLOO_SOCKET_IFNAME"] = "lo"
    children = [ForkedProcess(module, argv, {**os.environ, **master, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                              FAMILY_MODULES, name=f"gang-rank-{rank}", from_here=True) for rank in range(devices)]
    logger.info("started a gang of %d processes (pids %s)", devices, [child.pid for child in children])

    stopping = False

    def forward_stop(signum, frame) -> None:
        # Only the leader drains (it finishes or cancels the request in flight, then releases the others).
        nonlocal stopping
        stopping = True
        if children[0].poll() is None:
            children[0].send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward_stop)
    signal.signal(signal.SIGINT, forward_stop)

    exit_code = 0
    while True:
        codes = [child.poll() for child in children]
        if all(code is not None for code in codes):
            break
        failed = [(rank, code) for rank, code in enumerate(codes) if code not in (None, 0)]
        leader_done = codes[0] is not None
        if failed or (leader_done and not stopping):
            if failed:
                rank, code = failed[0]
                logger.error("gang rank %d exited with code %d; stopping the gang", rank, code)
            else:
                logger.error("gang leader exited; stopping the gang")
            exit_code = 1
            wait_then_kill(children, grace_seconds=5.0)
            break
        if leader_done:
            # The leader released the others; give them a moment to leave their process groups.
            wait_then_kill(children, grace_seconds=10.0)
            break
        time.sleep(POLL_SECONDS)
    codes = [child.wait() for child in children]
    if any(code != 0 for code in codes):
        exit_code = 1
    return exit_code

