"""The one-device denoiser imports nothing of the gang: a server with one device never loads torch.distributed's
gang machinery, and the gang can change without touching the one-device path."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHECK = ("import services.denoiser.engine, sys; "
         "leaked = sorted(m for m in sys.modules if m.startswith('services.denoiser.gang')); "
         "assert not leaked, leaked")


def test_the_one_device_engine_imports_nothing_from_the_gang():
    # A fresh interpreter: this one has imported the gang for other tests.
    result = subprocess.run([sys.executable, "-c", CHECK], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


LOAD = ("import sys; from services.common.platform import set_platform; "
        "from services.common.models import resolve_model_dir; from services.common.tiny import write_tiny; "
        "from services.denoiser.engine import DenoiserEngine; "
        "DenoiserEngine(resolve_model_dir(write_tiny(sys.argv[1], sys.argv[2])), set_platform('cpu')); "
        "leaked = sorted(m for m in sys.modules if m.startswith('services.denoiser.gang')); "
        "assert not leaked, leaked")


@pytest.mark.parametrize("family", ["wan", "flux"])
def test_loading_a_model_on_one_device_imports_nothing_from_the_gang(tmp_path, family):
    # Loading installs the family's kernels (the ones a gang runs too): that must not pull the gang in.
    result = subprocess.run([sys.executable, "-c", LOAD, str(tmp_path / family), family], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
