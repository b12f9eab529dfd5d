#!/usr/bin/env bash
# The demo: install, start the mesh on the tiny model, generate an image through the gateway, stop the mesh.
#   bash scripts/demo.sh [PROMPT] [OUTPUT.png]
# Env: DIFFMESH_SKIP_INSTALL=1 skips the install; DEMO_GRPC_PORT / DEMO_HTTP_PORT pick the gateway's ports.
set -euo pipefail
cd "$(dirname "$0")/.."
PROMPT=${1:-"a lighthouse on a cliff at dusk, waves below"}
OUTPUT=${2:-demo.png}
GRPC_PORT=${DEMO_GRPC_PORT:-50051}
HTTP_PORT=${DEMO_HTTP_PORT:-8000}
export HF_HUB_OFFLINE=1

[ "${DIFFMESH_SKIP_INSTALL:-0}" = 1 ] || bash scripts/setup.sh

LOG=$(mktemp -t diffmesh-demo.XXXXXX)
diffmesh up --grpc-port "$GRPC_PORT" --http-port "$HTTP_PORT" --default-steps 20 >"$LOG" 2>&1 &
MESH_PID=$!
trap 'kill -INT $MESH_PID 2>/dev/null; wait $MESH_PID 2>/dev/null; rm -f "$LOG"' EXIT

for _ in $(seq 1 600); do
  grep -q "diffmesh is up" "$LOG" && break
  if ! kill -0 $MESH_PID 2>/dev/null; then cat "$LOG"; echo "the mesh failed to start" >&2; exit 1; fi
  sleep 0.5
done
grep "diffmesh is up" "$LOG" || { cat "$LOG"; echo "the mesh did not come up in time" >&2; exit 1; }

diffmesh generate --gateway "127.0.0.1:$GRPC_PORT" --prompt "$PROMPT" --size 256x256 --seed 42 -o "$OUTPUT"
echo "The mesh stops now. Keep one running with 'diffmesh up', then try REST:"
echo "  curl -s localhost:8000/v1/images/generations -H 'content-type: application/json' -d '{\"prompt\":\"a fox\",\"size\":\"256x256\"}'"
