#!/usr/bin/env bash
# Install diffmesh and its test tools into the current Python environment.
# On a machine without an accelerator, CPU torch goes in first: an unpinned torch would pull several GB of
# CUDA packages. Set DIFFMESH_TORCH to choose another torch requirement (e.g. for CUDA or XPU builds).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c "import torch" 2>/dev/null; then
  "$PYTHON" -m pip install -q "${DIFFMESH_TORCH:-torch==2.13.0}"
fi
"$PYTHON" -m pip install -q -e ".[dev]"
