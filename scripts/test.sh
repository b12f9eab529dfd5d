#!/usr/bin/env bash
# Install diffmesh with its test tools, then lint (ruff) and run the whole test suite (unit, integration with
# real services).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
python3 -m ruff check .
# Two test processes (DIFFMESH_TEST_WORKERS; 0 runs them in this one): much of a test's time is one process
# waiting on another (the gateway on a stage, pytest on a server starting), so a 2-core machine runs two side by
# side; each file stays on one worker, so its module fixtures start once.
exec python3 -m pytest tests -q -p no:cacheprovider -n "${DIFFMESH_TEST_WORKERS:-2}" --dist loadfile "$@"
