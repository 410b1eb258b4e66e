#!/usr/bin/env python3
"""The image's HEALTHCHECK (`florist-healthcheck`): is this container's one service serving?

One image runs three services, so the check reads which one from PID 1's command line:
- ``api``: GET /api/v1/healthz answers 200 (a "degraded" body still means the API serves;
  what is degraded is named in it and belongs to the other containers' checks);
- ``superlink``: Flower's gRPC health service answers SERVING at ``--health`` (the SuperLink
  exec'd without an init process shows ``--health-server-address`` instead);
- ``client`` / ``florist-replica``: the SuperNode accepts connections on its ClientApp-side API
  (``--port``, default 9094), which it opens once it is up.
Exit 0 healthy, 1 not (Docker's convention).
"""

from __future__ import annotations

import os
import socket
import ssl
import sys
import urllib.request
from collections.abc import Sequence
from pathlib import Path

TIMEOUT_S = 4.0


def role_of(argv: Sequence[str]) -> tuple[str, dict[str, str]]:
    """The service (api, superlink, client) and its ``--option value`` pairs."""
    options: dict[str, str] = {}
    for i, arg in enumerate(argv):
        if arg.startswith("--") and "=" in arg:
            key, value = arg.split("=", 1)
            options[key] = value
        elif arg.startswith("--") and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            options[arg] = argv[i + 1]
    names = [Path(a).name for a in argv]
    for name in names:
        if name in ("api", "superlink", "client"):
            return name, options
        if name in ("flower-superlink", "florist.server.superlink"):
            return "superlink", options
        if name == "florist-replica":
            return "client", options
    raise SystemExit(f"florist-healthcheck: no service in PID 1's command {list(argv)}")


def _local(address: str) -> tuple[str, int]:
    """Where to reach a listener bound to ``address`` from inside its own container."""
    host, port = address.rsplit(":", 1)
    host = host.strip("[]")
    return ("127.0.0.1" if host in ("", "0.0.0.0", "::") else host), int(port)


def _api_tls_context() -> ssl.SSLContext | None:
    """The API in a container listens on 0.0.0.0, so with TLS files it serves HTTPS (its
    certificate names 127.0.0.1 too): verify it with Florist's CA."""
    tls_dir = os.environ.get("FLORIST_TLS_DIR", "")
    ca = os.environ.get("FLORIST_TLS_CA_CERT", "") or (f"{tls_dir}/ca.crt" if tls_dir else "")
    return ssl.create_default_context(cafile=ca) if ca else None


def check_api(options: dict[str, str]) -> None:
    port = options.get("--port") or os.environ.get("FLORIST_API_PORT", "8080")
    context = _api_tls_context()
    url = f"{'https' if context else 'http'}://127.0.0.1:{port}/api/v1/healthz"
    with urllib.request.urlopen(url, timeout=TIMEOUT_S, context=context) as response:
        if response.status != 200:
            raise RuntimeError(f"{url}: {response.status}")


def check_superlink(options: dict[str, str]) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    address = options.get("--health") or options.get("--health-server-address")
    if not address:
        raise RuntimeError("the SuperLink runs without a health server (--health HOST:PORT)")
    host, port = _local(address)
    with grpc.insecure_channel(f"{host}:{port}") as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=TIMEOUT_S
        )
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        raise RuntimeError(f"SuperLink health: {reply.status}")


def check_client(options: dict[str, str]) -> None:
    with socket.create_connection(("127.0.0.1", int(options.get("--port", "9094"))), TIMEOUT_S):
        pass


def main() -> None:
    argv = Path("/proc/1/cmdline").read_bytes().rstrip(b"\0").decode().split("\0")
    role, options = role_of(argv)
    check = {"api": check_api, "superlink": check_superlink, "client": check_client}[role]
    try:
        check(options)
    except Exception as exc:
        print(f"{role} unhealthy: {exc}", file=sys.stderr)
        sys.exit(1)
    print(f"{role} healthy")


if __name__ == "__main__":
    main()
