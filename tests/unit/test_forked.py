"""services/common/forked.py: children forked from a preloaded forkserver, or from the starter itself
(`from_here`, as a gang's launcher forks its ranks), and the way out when a preloaded module spoiled the fork for
them (initialized the accelerator, which a forked child then cannot use): the child execs a fresh interpreter, with
the environment it was given, still bound to the process that started it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux pidfds and /proc")

STARTER = textwrap.dedent("""
    import os, sys, time
    from services.common.forked import ForkedProcess
    from_here, preload = sys.argv[2] == "here", sys.argv[3:]
    child = ForkedProcess("tests.unit.forkserver_probe.child", [sys.argv[1]], {**os.environ, "PROBE": "given"},
                          preload, name="probe", from_here=from_here)
    time.sleep(120)
""")


def started(tmp_path, preload: list[str], from_here: bool) -> tuple[subprocess.Popen, dict]:
    """A starter process that forks the probe child; the child's record once it has written it."""
    record = tmp_path / "child.json"
    starter = subprocess.Popen([sys.executable, "-c", STARTER, str(record), "here" if from_here else "server",
                                *preload], cwd=os.getcwd())
    deadline = time.monotonic() + 60
    while not (record.exists() and record.read_text()):
        assert starter.poll() is None and time.monotonic() < deadline, "the child never started"
        time.sleep(0.1)
    return starter, json.loads(record.read_text())


def ends_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("from_here", [False, True], ids=["forkserver", "from-here"])
@pytest.mark.parametrize("spoiled", [False, True], ids=["forked", "spoiled-execs"])
def test_the_child_runs_with_its_environment_and_ends_with_its_starter(spoiled, from_here, tmp_path):
    preload = ["tests.unit.forkserver_probe.spoiled"] if spoiled else []
    starter, child = started(tmp_path, preload, from_here)
    try:
        # Forked from the starter itself, or from the forkserver the starter started
        assert (child["parent"] == starter.pid) is from_here
        assert child["env"] == "given"
        # What ps shows either way (setproctitle writes a forked child's as one string).
        assert " ".join(child["cmdline"]).split()[1:3] == ["-m", "tests.unit.forkserver_probe.child"]
        # Forked, the child runs the module imported before the fork; after the exec, a fresh interpreter's `-m`.
        assert child["imported_before_the_fork"] is (not spoiled)
        starter.send_signal(signal.SIGKILL)      # the starter dies outright: the child must not outlive it
        starter.wait(10)
        assert ends_within(child["pid"], 10)
    finally:
        starter.kill()
        try:
            os.kill(child["pid"], signal.SIGKILL)
        except ProcessLookupError:
            pass
