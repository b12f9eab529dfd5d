#!/usr/bin/env bash
# Install diffmesh with its test tools, then lint (ruff) and run the whole test suite (unit, integration with
# real services).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
python3 -m ruff check .
exec python3 -m pytest tests -q -p no:cacheprovider "$@"
