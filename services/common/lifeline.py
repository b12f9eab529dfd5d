"""Children that end with their parent: a server that `diffmesh up` or the gang launcher started must not outlive
it, however it dies (SIGKILL included), or it goes on holding its port and answering as if nothing happened.

The parent marks the children it wants bound to it (`child_env`); each child, early in its start-up, asks the kernel
for SIGTERM when its parent dies (Linux PR_SET_PDEATHSIG) or, where it cannot, watches its parent's pid from a
thread. A child forked from a forkserver (services/common/forked.py) is not its starter's child: it watches the
starter's pid instead (`end_with_process`). SIGTERM, not SIGKILL: the child shuts down as on any stop (NOT_SERVING,
in-flight calls finished).
"""

from __future__ import annotations

import ctypes
import logging
import os
import select
import signal
import sys
import threading
import time

logger = logging.getLogger(__name__)

PARENT_PID_ENV = "DIFFMESH_PARENT_PID"
# Set instead on a forkserver's child that had to exec a fresh interpreter (forked.py): the process it is bound to.
STARTER_PID_ENV = "DIFFMESH_STARTER_PID"
PR_SET_PDEATHSIG = 1        # <linux/prctl.h>
POLL_S = 0.5


def child_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a child process that must end when this process does."""
    return {**(os.environ if env is None else env), PARENT_PID_ENV: str(os.getpid())}


def end_with_parent(signum: int = signal.SIGTERM) -> None:
    """If this process was started with `child_env`, have it get `signum` once that parent is gone (or, started
    by a forkserver's child as a fresh interpreter, once its starter is: `STARTER_PID_ENV`)."""
    # Both popped: our own children are bound to us, not to them.
    starter = os.environ.pop(STARTER_PID_ENV, None)
    expected = os.environ.pop(PARENT_PID_ENV, None)
    if starter and starter.isdecimal():
        end_with_process(int(starter), signum)
        return
    if not expected or not expected.isdecimal():
        return
    parent = int(expected)
    by_kernel = _set_parent_death_signal(signum)
    if os.getppid() != parent:      # it died before we asked
        os.kill(os.getpid(), signum)
        return
    if not by_kernel:               # (both at once would signal twice, and a second SIGTERM cuts a drain short)
        threading.Thread(target=_watch_parent, args=(parent, signum), name="lifeline", daemon=True).start()


def end_with_process(pid: int, signum: int = signal.SIGTERM) -> None:
    """Get `signum` once process `pid`, which need not be this one's parent, has ended: a gang rank forked by its
    launcher's forkserver is bound to the launcher this way (the forkserver lives on while any rank does). A Linux
    pidfd reports the end at once, reaped or not; elsewhere the pid is polled."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:      # it ended before we asked
        os.kill(os.getpid(), signum)
        return
    except (AttributeError, OSError):
        pidfd = None
    threading.Thread(target=_watch_process, args=(pid, pidfd, signum), name="lifeline", daemon=True).start()


def _watch_process(pid: int, pidfd: int | None, signum: int) -> None:
    if pidfd is not None:
        select.select([pidfd], [], [])
    else:
        while _exists(pid):
            time.sleep(POLL_S)
    logger.warning("process %d this one serves under is gone: stopping", pid)
    os.kill(os.getpid(), signum)


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:     # alive, another user's
        pass
    return True


def _set_parent_death_signal(signum: int) -> bool:
    """Linux delivers `signum` when the parent *thread* that forked us exits: parents spawn from the main thread.
    (ctypes for one prctl call, rather than python-prctl, a C extension that needs libcap to build.)"""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent: int, signum: int) -> None:
    """The portable fallback: once the parent is gone this process is re-parented, and its parent pid changes."""
    while True:
        time.sleep(POLL_S)
        if os.getppid() != parent:
            logger.warning("parent process %d is gone: stopping", parent)
            os.kill(os.getpid(), signum)
            return
