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
# PostgreSQL's server binaries, for the job store's tests against a real PostgreSQL (tests/unit/
# test_job_database.py starts a throwaway cluster): Debian's package, only when missing and we can install it
# (root, apt-get). Without them those tests are skipped and say why.
if ! command -v initdb >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 \
    && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql; } \
    >/dev/null 2>&1 || echo "setup.sh: could not install postgresql; its tests will be skipped" >&2
fi
# iproute2 (`ip netns`, `ss`), for tests/integration/test_hosts.py's hosts in network namespaces; Debian's package,
# only when missing. kubectl (its built-in kustomize renders deploy/k8s for the tests) comes with the machine's image;
# without it or a standalone kustomize the deploy tests fail and say so.
if ! command -v ip >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends iproute2; } \
    >/dev/null 2>&1 || echo "setup.sh: could not install iproute2; tests/integration/test_hosts.py will be skipped" >&2
fi
if ! command -v kubectl >/dev/null 2>&1 && ! command -v kustomize >/dev/null 2>&1; then
  echo "setup.sh: neither kubectl nor kustomize is installed: tests/unit/test_deploy_files.py needs one" >&2
fi
