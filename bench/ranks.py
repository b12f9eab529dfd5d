"""The benchmarks' one rank launcher: `world` processes on this host with torch.distributed's environment, as
`diffmesh serve denoiser --devices N` starts its gang (services/denoiser/gang/launcher.py).

The ranks get what `launch_gang` gives its children (loopback rendezvous on a free port, WORLD_SIZE,
LOCAL_WORLD_SIZE, RANK, LOCAL_RANK, gloo on `lo`), and end with this process however it ends, through the same
lifeline (`child_env` here, `bind_to_driver()` in the rank). `launch_gang` itself is not called, because it is a
server's launcher, and a benchmark's ranks are not servers:
- it reads the leader exiting on its own as a failure and kills the rest (a served gang ends only when told to);
  a benchmark's rank 0 exits when it has reported, often while the others are still leaving their process groups;
- it installs SIGTERM/SIGINT handlers in the calling process for good and binds that process to its own parent:
  right for the launcher process, which does nothing else, wrong for a driver that runs one gang after another
  (Ctrl-C would no longer stop it);
- it takes no per-run environment (the transport to use, a GPU to pin a one-GPU run to, from several threads at
  once), no timeout, and does not keep rank 0's output, which the driver reads its results from.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
import tempfile
import time

from services.common.lifeline import child_env, end_with_parent
from services.common.processes import wait_then_kill
from services.denoiser.gang.launcher import free_port

POLL_S = 0.1


@dataclasses.dataclass(frozen=True)
class RanksRun:
    codes: list[int]         # per rank; a rank still leaving its process group after rank 0 reported counts as 0
    output: str              # rank 0's stdout and stderr when captured, else ""
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return not self.timed_out and not any(self.codes)


def rank_envs(world: int, env: dict[str, str] | None = None, port: int | None = None) -> list[dict[str, str]]:
    """Each rank's environment: this process's, then `env`, then the rendezvous (so `env` cannot break it)."""
    master = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port or free_port()), "WORLD_SIZE": str(world),
              "LOCAL_WORLD_SIZE": str(world)}
    base = {**os.environ, **(env or {})}
    if "GLOO_SOCKET_IFNAME" not in base and "lo" in {name for _, name in socket.if_nameindex()}:
        master["GLOO_SOCKET_IFNAME"] = "lo"      # as launch_gang: the store and gloo stay off the network
    return [child_env({**base, **master, "RANK": str(rank), "LOCAL_RANK": str(rank)}) for rank in range(world)]


def run_ranks(argv: list[str], world: int, env: dict[str, str] | None = None, *, port: int | None = None,
              capture: bool = False, timeout: float | None = None, teardown_s: float = 60.0,
              failure_grace_s: float = 5.0) -> RanksRun:
    """Run `python argv...` as ranks 0..world-1 and wait for them.

    capture: keep rank 0's stdout and stderr (in a file, so a long log cannot fill a pipe and stall the rank) and
    silence the other ranks' stdout; otherwise every rank writes to this process's streams. A rank that fails
    stops the run: the others get `failure_grace_s`, then are killed (they would wait in a collective forever).
    Once rank 0 has exited cleanly the others get `teardown_s` to follow; one still stuck in process-group
    teardown then is killed and not counted as a failure (rank 0 has reported). Past `timeout` every rank is
    killed. However this returns or raises (Ctrl-C included), no rank outlives it."""
    log = tempfile.TemporaryFile(mode="w+") if capture else None
    children: list[subprocess.Popen] = []
    try:
        for rank, rank_env in enumerate(rank_envs(world, env, port)):
            out = (log if rank == 0 else subprocess.DEVNULL) if capture else None
            err = (subprocess.STDOUT if rank == 0 else None) if capture else None
            children.append(subprocess.Popen([sys.executable, *argv], env=rank_env, stdout=out, stderr=err))
        codes, timed_out = _wait(children, timeout, teardown_s, failure_grace_s)
        output = ""
        if log is not None:
            log.seek(0)
            output = log.read()
        return RanksRun(codes, output, timed_out)
    finally:
        wait_then_kill([child for child in children if child.poll() is None], grace_seconds=0.0)
        if log is not None:
            log.close()


def _wait(children: list[subprocess.Popen], timeout: float | None, teardown_s: float,
          failure_grace_s: float) -> tuple[list[int], bool]:
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        codes = [child.poll() for child in children]
        if any(code not in (None, 0) for code in codes):
            wait_then_kill(children, grace_seconds=failure_grace_s)
            return [child.returncode for child in children], False
        if codes[0] == 0:
            break
        if deadline is not None and time.monotonic() > deadline:
            wait_then_kill(children, grace_seconds=0.0)
            return [child.returncode for child in children], True
        time.sleep(POLL_S)
    teardown = time.monotonic() + teardown_s
    result = []
    for child in children:
        try:
            result.append(child.wait(timeout=max(0.0, teardown - time.monotonic())))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
            result.append(0)
    return result, False


def bind_to_driver() -> None:
    """Called first thing in a rank: end (SIGTERM) when the driver that started it dies, even by SIGKILL, so no
    rank is left holding a GPU."""
    end_with_parent()
