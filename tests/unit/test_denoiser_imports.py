"""The one-device denoiser imports nothing of the gang: a server with one device never loads torch.distributed's
gang machinery, and the gang can change without touching the one-device path."""

from __future__ import annotations

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHECK = ("import services.denoiser.engine, sys; "
         "leaked = sorted(m for m in sys.modules if m.startswith('services.denoiser.gang')); "
         "assert not leaked, leaked")


def test_the_one_device_engine_imports_nothing_from_the_gang():
    # A fresh interpreter: this one has imported the gang for other tests.
    result = subprocess.run([sys.executable, "-c", CHECK], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
