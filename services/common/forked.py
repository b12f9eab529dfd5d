"""Child servers forked from a preloaded forkserver instead of started as fresh interpreters.

A fresh `python -m services.X.server` imports torch, diffusers and the model families again: about 5 s of CPU per
process (on a 2-core host a 4-rank gang spent most of its 20 s start there, and `diffmesh up` its stages' starts).
A multiprocessing forkserver imports them once; each child forks from it. The forkserver is a clean exec'd process
(no CUDA, no threads), as PyTorch advises for accelerator children; it lives while any child does (each holds its
"alive" pipe), so a child is bound to the process that started it by pid (lifeline.end_with_process), not to its
parent. The child gets exactly the environment it is given, before any of its own code runs.

A starter that has itself imported what its children need forks them directly (`from_here`): a gang's launcher
parsed its flags and checked the model through the stage's own module, so a forkserver would only import all of it a
second time (≈ 8 s of CPU on the 2-core test host). Like the forkserver, the launcher has touched no accelerator and
runs no work on other threads when it forks (torch's import leaves the same idle native thread in both).

A library that initializes an accelerator when imported spoils this: no child of the forkserver could use the device
(torchao does, asking the GPU its compute capability at import, which diffusers' import brings in). A child that
finds itself so (`accelerator_lost_to_fork`) execs a fresh interpreter instead, bound to its starter the same way:
slower to start, as before the forkserver, but it runs.
"""

from __future__ import annotations

import importlib
import multiprocessing
import os
import shlex
import subprocess
import sys
from collections.abc import Sequence

import setproctitle

from services.common import platform
from services.common.lifeline import STARTER_PID_ENV, end_with_process


def _run(module: str, argv: list[str], env: dict[str, str], starter: int, new_session: bool) -> None:
    """In the forkserver's child: `module.main(argv)`, as `python -m module argv` would run it."""
    if new_session:
        os.setsid()
    if platform.accelerator_lost_to_fork():
        print(f"forkserver: a preloaded module initialized the accelerator, which a forked {module} cannot use: "
              "starting it as a fresh interpreter", file=sys.stderr, flush=True)
        os.execve(sys.executable, [sys.executable, "-m", module, *argv], {**env, STARTER_PID_ENV: str(starter)})
    # The platform's default start method again, as in a fresh interpreter: forkserver's children inherit
    # "forkserver", under which every named semaphore (tqdm's lock, for one) is tracked, and reported as leaked
    # when a server ends with os._exit.
    multiprocessing.set_start_method(None, force=True)
    # The command line a fresh interpreter would show (ps, /proc/PID/cmdline), not the forkserver's; before the
    # environment changes, which setproctitle finds the command line's memory by.
    setproctitle.setproctitle(shlex.join([sys.executable, "-m", module, *argv]))
    os.environ.clear()
    os.environ.update(env)
    end_with_process(starter)
    importlib.import_module(module).main(argv)


class ForkedProcess:
    """A child server with the subprocess.Popen calls its starters make (poll, wait, send_signal, kill, pid)."""

    def __init__(self, module: str, argv: Sequence[str], env: dict[str, str], preload: Sequence[str],
                 name: str, new_session: bool = False, from_here: bool = False) -> None:
        modules = list(dict.fromkeys([module, *preload]))
        if from_here:
            # Forked from this very process, which has imported the modules the child needs (a gang's launcher
            # has): no forkserver importing them a second time. Only for a starter that has started no threads of
            # its own work and touched no accelerator yet.
            for preloaded in modules:
                importlib.import_module(preloaded)
            context = multiprocessing.get_context("fork")
        else:
            context = multiprocessing.get_context("forkserver")
            # Taken by the forkserver when it starts (the first child); later children share what it preloaded.
            context.set_forkserver_preload(modules)
        self.process = context.Process(target=_run, args=(module, list(argv), dict(env), os.getpid(), new_session),
                                       name=name)
        self.process.start()
        self.pid = self.process.pid

    @property
    def returncode(self) -> int | None:
        return self.process.exitcode

    def poll(self) -> int | None:
        return self.process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self.process.join(timeout)
        if self.process.exitcode is None:
            raise subprocess.TimeoutExpired(self.process.name, timeout)
        return self.process.exitcode

    def send_signal(self, signum: int) -> None:
        if self.process.exitcode is None:
            os.kill(self.pid, signum)

    def kill(self) -> None:
        self.process.kill()
