#!/usr/bin/env python3
"""`florist client` for one replica of many: which partition, profile and data folder are mine.

Installed in the image as `florist-replica`; extra arguments go to `florist client` as they are.
Compose has no per-replica variable and a StatefulSet gives only the pod name, so the replica's
index is found here, by REPLICA_SOURCE:

- ``compose`` (default): `docker compose --scale client=N` names the containers
  ``<project>-client-1`` … ``<project>-client-N``, and Docker's DNS resolves those names on the
  project network. The replica is the ``i`` whose name resolves to this container's own address;
  index ``i - 1``. REPLICA_NAME_PREFIX is ``<project>-client`` (default ``florist-client``).
- ``ordinal``: the hostname's numeric suffix (a StatefulSet pod ``florist-supernode-3`` → 3).
- ``env``: PARTITION_ID, as given.

Then NUM_PARTITIONS (the replica count) makes ``--partition-id INDEX --num-partitions N``
(INDEX + PARTITION_OFFSET, for a second group of replicas sharing the federation);
DATA_PATH_TEMPLATE (``/data/site-{index}``) makes ``--data-path`` instead; PROFILES
(``fast,normal,slow``) gives replica ``index`` the profile ``PROFILES[index % len]``;
NODE_CONFIG is passed as ``--node-config``.
"""

from __future__ import annotations

import os
import re
import socket
import sys
import time
from collections.abc import Callable, Mapping, Sequence

Resolve = Callable[[str], set[str]]


class ReplicaError(RuntimeError):
    pass


def _addresses(name: str) -> set[str]:
    try:
        return set(socket.gethostbyname_ex(name)[2])
    except OSError:
        return set()


def compose_index(
    prefix: str,
    limit: int,
    *,
    own: set[str],
    resolve: Resolve = _addresses,
    attempts: int = 10,
    pause_s: float = 1.0,
) -> int:
    """0-based index of the compose replica ``prefix-<i>`` whose address is one of ``own``."""
    for attempt in range(attempts):
        for i in range(1, limit + 1):
            if resolve(f"{prefix}-{i}") & own:
                return i - 1
        # Docker registers a container's name in its DNS as the container starts: try again.
        if attempt + 1 < attempts:
            time.sleep(pause_s)
    raise ReplicaError(
        f"no container named {prefix}-1 … {prefix}-{limit} has this container's address "
        f"{sorted(own)}: scale the client service to at most NUM_PARTITIONS={limit}, and set "
        f"REPLICA_NAME_PREFIX=<project>-client when the compose project is not `florist`"
    )


def ordinal_index(hostname: str) -> int:
    """A StatefulSet pod's ordinal: the number after its name's last dash."""
    match = re.search(r"-(\d+)$", hostname)
    if match is None:
        raise ReplicaError(f"hostname {hostname!r} has no ordinal suffix (-N)")
    return int(match.group(1))


def replica_index(env: Mapping[str, str], *, resolve: Resolve = _addresses) -> int:
    source = env.get("REPLICA_SOURCE", "compose")
    if source == "env":
        return int(env["PARTITION_ID"])
    if source == "ordinal":
        return ordinal_index(env.get("HOSTNAME") or socket.gethostname())
    if source == "compose":
        # /etc/hosts maps our own hostname to our address(es) on the project network.
        own = _addresses(socket.gethostname())
        limit = int(env.get("NUM_PARTITIONS", "0")) or 1000
        prefix = env.get("REPLICA_NAME_PREFIX", "florist-client")
        return compose_index(prefix, limit, own=own, resolve=resolve)
    raise ReplicaError(f"REPLICA_SOURCE must be compose, ordinal or env, not {source!r}")


def client_argv(index: int, env: Mapping[str, str], extra: Sequence[str] = ()) -> list[str]:
    """`florist client …` for replica ``index``, as the environment describes it."""
    argv = ["florist", "client"]
    template = env.get("DATA_PATH_TEMPLATE", "")
    if template:
        argv += ["--data-path", template.format(index=index)]
    else:
        if not env.get("NUM_PARTITIONS"):
            raise ReplicaError("set NUM_PARTITIONS (the replica count) or DATA_PATH_TEMPLATE")
        total = int(env["NUM_PARTITIONS"])
        # A second group of replicas (another Helm release) takes the partitions after the
        # first group's: PARTITION_OFFSET.
        partition = int(env.get("PARTITION_OFFSET") or 0) + index
        if not 0 <= partition < total:
            raise ReplicaError(f"partition {partition} is not in [0, NUM_PARTITIONS={total})")
        argv += ["--partition-id", str(partition), "--num-partitions", str(total)]
    profiles = [p.strip() for p in env.get("PROFILES", "").split(",") if p.strip()]
    if profiles:
        argv += ["--profile", profiles[index % len(profiles)]]
    if env.get("NODE_CONFIG"):
        argv += ["--node-config", env["NODE_CONFIG"]]
    # One key per replica: a key admits one SuperNode, so replicas cannot share one.
    key = env.get("FLORIST_SUPERNODE_AUTH_KEY", "")
    if "{index}" in key:
        argv += ["--auth-key", key.format(index=index)]
    return [*argv, *extra]


def main() -> None:
    try:
        index = replica_index(os.environ)
        argv = client_argv(index, os.environ, sys.argv[1:])
    except (ReplicaError, KeyError, ValueError) as exc:
        sys.exit(f"florist-replica: {exc}")
    print(f"florist-replica: replica {index}: {' '.join(argv)}", flush=True)
    # exec: `florist client` becomes this process and gets the container's SIGTERM itself.
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    main()
