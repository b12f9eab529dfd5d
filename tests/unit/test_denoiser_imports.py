"""The one-device denoiser imports nothing of the gang: a server with one device never loads torch.distributed's
gang machinery, and the gang can change without touching the one-device path."""

from __future__ import annotations

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]

# One fresh interpreter (this one has imported the gang for other tests) checks after the import, then after
# loading each family's model: loading installs the family's kernels (the ones a gang runs too), and that must not
# pull the gang in either. One process for all three: each costs the CI machine seconds of imports.
CHECK = """
import sys

def leaked(after):
    found = sorted(m for m in sys.modules if m.startswith('services.denoiser.gang'))
    assert not found, f'{after}: {found}'

import services.denoiser.engine
leaked('importing the engine')
from services.common.models import resolve_model_dir
from services.common.platform import set_platform
from services.common.tiny import write_tiny
from services.denoiser.engine import DenoiserEngine

platform = set_platform('cpu')
for family in ('wan', 'flux'):
    DenoiserEngine(resolve_model_dir(write_tiny(f'{sys.argv[1]}/{family}', family)), platform)
    leaked(f'loading {family}')
print('checked')
"""


def test_the_one_device_engine_imports_nothing_from_the_gang_even_once_a_model_is_loaded(tmp_path):
    result = subprocess.run([sys.executable, "-c", CHECK, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                            timeout=180)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("checked"), result.stdout
