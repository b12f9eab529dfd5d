"""The README's demo command (install skipped: the suite has installed already) writes a valid PNG."""

from __future__ import annotations

import os
import pathlib
import subprocess

from PIL import Image

from .conftest import free_port

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_demo_script_writes_a_png_of_the_requested_size(tmp_path):
    output = tmp_path / "demo.png"
    env = {**os.environ, "DIFFMESH_SKIP_INSTALL": "1", "DIFFMESH_HOME": str(tmp_path / "home"),
           "DEMO_GRPC_PORT": str(free_port()), "DEMO_HTTP_PORT": str(free_port())}
    done = subprocess.run(["bash", str(ROOT / "scripts" / "demo.sh"), "a cat", str(output)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    image = Image.open(output)
    assert image.format == "PNG" and image.size == (256, 256)
    assert (tmp_path / "home" / "models" / "wan2.1-tiny" / "model_index.json").is_file()  # written offline
