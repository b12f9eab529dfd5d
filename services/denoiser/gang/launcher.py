"""`diffmesh serve denoiser --devices N` on one host: start one process per device and watch them.

Each child gets torch.distributed's usual environment (rank, world size, local rank, a free master port on
loopback), exactly what torchrun or a Kubernetes controller would give it, so the same child code serves a
gang spanning hosts. If any rank dies, the gang cannot go on in step: the launcher stops the rest and
exits non-zero, so a supervisor (docker, Kubernetes, `diffmesh up`) restarts it whole.

The ranks fork from a multiprocessing forkserver that has imported the stage's module once: a fresh interpreter per
rank would import torch, diffusers and the families again (about 5 s of CPU each; on a 2-core host a 4-rank gang
spent most of its 20 s start there). The forkserver is a clean process started for this (no CUDA, no threads), as
PyTorch advises for accelerator children; each rank ends with the launcher (lifeline), and the forkserver with them.
It imports the model families too, which each rank would otherwise import on loading its model.
"""

from __future__ import annotations

import importlib
import logging
import multiprocessing
import os
import signal
import socket
import subprocess
import time

from services.common.lifeline import end_with_parent, end_with_process
from services.common.processes import wait_then_kill
from services.families import FAMILY_MODULES

logger = logging.getLogger(__name__)

POLL_SECONDS = 0.2


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def run_rank(module: str, argv: list[str], env: dict[str, str], launcher: int) -> None:
    """A rank, in the forkserver's child: this rank's environment, then the stage's `main(argv)`, as `python -m
    module argv` would run it; it ends with the launcher (not its parent here: the forkserver)."""
    os.environ.clear()
    os.environ.update(env)
    end_with_process(launcher)
    importlib.import_module(module).main(argv)


class RankProcess:
    """A started multiprocessing.Process with the subprocess.Popen calls the launcher and wait_then_kill make."""

    def __init__(self, process: multiprocessing.Process) -> None:
        self.process = process
        process.start()
        self.pid = process.pid

    def poll(self) -> int | None:
        return self.process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self.process.join(timeout)
        if self.process.exitcode is None:
            raise subprocess.TimeoutExpired(f"gang rank {self.pid}", timeout)
        return self.process.exitcode

    def send_signal(self, signum: int) -> None:
        if self.process.exitcode is None:
            os.kill(self.pid, signum)

    def kill(self) -> None:
        self.process.kill()


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
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([module, *FAMILY_MODULES])
    children = []
    for rank in range(devices):
        env = {**os.environ, **master, "RANK": str(rank), "LOCAL_RANK": str(rank)}
        children.append(RankProcess(context.Process(target=run_rank, args=(module, argv, env, os.getpid()),
                                                    name=f"gang-rank-{rank}")))
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

