"""A child server's stand-in: records how it was started, then serves (sleeps) until a signal ends it."""

from __future__ import annotations

import json
import os
import pathlib
import sys
import time

from services.common.lifeline import end_with_parent


def main(argv: list[str]) -> None:
    end_with_parent()       # what run_server does first
    pathlib.Path(argv[0]).write_text(json.dumps({
        "pid": os.getpid(), "parent": os.getppid(), "argv": argv,
        "imported_before_the_fork": __name__ != "__main__",     # else run by `python -m`
        "cmdline": pathlib.Path(f"/proc/{os.getpid()}/cmdline").read_bytes().decode().split("\0"),
        "env": os.environ.get("PROBE")}))
    time.sleep(120)


if __name__ == "__main__":
    main(sys.argv[1:])
