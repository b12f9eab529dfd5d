#!/usr/bin/env python3
"""Container health check for diffmesh (docker compose `healthcheck`, and the Kubernetes stages' exec probes).

    diffmesh-healthcheck grpc 127.0.0.1:50061               # grpc.health.v1.Health/Check, overall service ""
    diffmesh-healthcheck http http://127.0.0.1:8000/health  # any 2xx

Exit 0 when healthy, 1 otherwise, with one line on stderr saying why. No curl or grpc_health_probe needed:
it uses the grpcio and grpcio-health-checking packages already in the image, or the standard library.

With the server's TLS env set (DIFFMESH_TLS_CERT, DIFFMESH_TLS_KEY, DIFFMESH_TLS_CA) it speaks TLS, verifies the
server against the CA and presents the same certificate, as a stage under mutual TLS requires (the certificate
must name 127.0.0.1 or localhost). Kubernetes' native gRPC probes cannot do TLS, so the manifests run this as an
exec probe.
"""

from __future__ import annotations

import os
import ssl
import sys
import urllib.error
import urllib.request


def check_grpc(target: str, timeout: float) -> str | None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    cert, key, ca = (os.environ.get(f"DIFFMESH_TLS_{part}") or None for part in ("CERT", "KEY", "CA"))
    if cert or ca:
        def read(path: str | None) -> bytes | None:
            return open(path, "rb").read() if path else None

        credentials = grpc.ssl_channel_credentials(read(ca), read(key), read(cert))
        channel = grpc.secure_channel(target, credentials)
    else:
        channel = grpc.insecure_channel(target)
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.RpcError as error:
            return f"{target}: {error.code().name} {error.details()}"
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        return f"{target}: {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}"
    return None


def check_http(url: str, timeout: float) -> str | None:
    ca = os.environ.get("DIFFMESH_TLS_CA") or None
    context = ssl.create_default_context(cafile=ca) if url.startswith("https:") else None
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as response:
            if 200 <= response.status < 300:
                return None
            return f"{url}: HTTP {response.status}"
    except (urllib.error.URLError, OSError) as error:
        return f"{url}: {error}"


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3) or argv[0] not in ("grpc", "http"):
        print("usage: diffmesh-healthcheck grpc HOST:PORT | http URL [TIMEOUT_S]", file=sys.stderr)
        return 2
    timeout = float(argv[2]) if len(argv) == 3 else 3.0
    problem = (check_grpc if argv[0] == "grpc" else check_http)(argv[1], timeout)
    if problem:
        print(f"unhealthy: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
