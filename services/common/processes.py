"""Stopping child processes: shared by `diffmesh up` (which asks them with SIGTERM first) and the gang launcher
(which must not: a rank told to stop mid-collective would strand the others)."""

from __future__ import annotations

import subprocess
import time


def wait_then_kill(children: list[subprocess.Popen], grace_seconds: float) -> None:
    """Give all `children` one shared deadline to exit; kill and reap whichever has not."""
    deadline = time.monotonic() + grace_seconds
    for child in children:
        try:
            child.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
