"""Several hosts on one machine: the server in one network namespace, each SuperNode in its own.

The SuperLink and the API run in namespace ``srv``; each of three SuperNodes runs in its own
namespace, joined to ``srv`` by a veth pair of its own (10.77.N.0/30), so it reaches the
SuperLink only over a real, non-loopback address. The test itself reaches the API over another
veth pair (10.77.0.0/30): over HTTPS, since Florist refuses plain text off loopback. TLS and
SuperNode authentication are on; each node's key is registered through the API.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from florist.server.certs import make_certs, make_node_key
from florist.server.processes import Managed, Supervisor, flower_env, free_port

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

NODES = 3
SERVER_IP = "10.77.0.2"  # the server's end of the test's own link


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@pytest.fixture
def namespaces() -> Iterator[tuple[str, list[str]]]:
    """``srv`` and one namespace per node, linked; removed afterwards (their links with them)."""
    tag = f"fl{os.getpid() % 100000}"
    server, nodes = f"{tag}srv", [f"{tag}n{i}" for i in range(NODES)]
    made: list[str] = []
    host_link = f"{tag}h"
    try:
        for ns in (server, *nodes):
            _ip("netns", "add", ns)
            made.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        # The test's own link into srv.
        _ip("link", "add", host_link, "type", "veth", "peer", "name", f"{tag}H", "netns", server)
        _ip("addr", "add", "10.77.0.1/30", "dev", host_link)
        _ip("link", "set", host_link, "up")
        _ip("-n", server, "addr", "add", f"{SERVER_IP}/30", "dev", f"{tag}H")
        _ip("-n", server, "link", "set", f"{tag}H", "up")
        for i, ns in enumerate(nodes, start=1):
            a, b = f"{tag}s{i}", f"{tag}c{i}"
            _ip("-n", server, "link", "add", a, "type", "veth", "peer", "name", b, "netns", ns)
            _ip("-n", server, "addr", "add", f"10.77.{i}.1/30", "dev", a)
            _ip("-n", server, "link", "set", a, "up")
            _ip("-n", ns, "addr", "add", f"10.77.{i}.2/30", "dev", b)
            _ip("-n", ns, "link", "set", b, "up")
    except (subprocess.CalledProcessError, FileNotFoundError) as exc:
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", host_link], capture_output=True)
        detail = getattr(exc, "stderr", "") or str(exc)
        pytest.skip(f"network namespaces cannot be made here (needs root and iproute2): {detail}")
    try:
        yield server, nodes
    finally:
        # Nothing may outlive its namespace: a SuperNode left behind (a child its `florist
        # client` did not stop in time) would poll a SuperLink that is gone for ever.
        for ns in made:
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
            for pid in pids.stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
        subprocess.run(["ip", "link", "del", host_link], capture_output=True)
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def _in(ns: str, argv: list[str]) -> list[str]:
    return ["ip", "netns", "exec", ns, *argv]


def test_three_hosts_train_over_tls_with_registered_keys(
    namespaces: tuple[str, list[str]], tmp_path: Path
) -> None:
    server, nodes = namespaces
    hosts = [SERVER_IP, *(f"10.77.{i}.1" for i in range(1, NODES + 1))]
    certs = make_certs(tmp_path / "certs", [*hosts, "localhost", "127.0.0.1"])
    control, fleet, api_port = free_port(), free_port(), free_port()
    env = flower_env(
        tmp_path,
        {
            "FLORIST_HOME": str(tmp_path / "home"),
            "FLORIST_DATABASE_URL": f"sqlite:///{tmp_path / 'florist.db'}",
            "FLORIST_TLS_DIR": str(certs.folder),
            "FLORIST_SUPERNODE_AUTH": "1",
            "FLORIST_SUPERLINK_CONTROL": f"127.0.0.1:{control}",
            "FLORIST_SUPERLINK_FLEET": f"0.0.0.0:{fleet}",
            "FLORIST_API_HOST": SERVER_IP,
            "FLORIST_API_PORT": str(api_port),
            "FLORIST_STATUS_POLL_S": "0.5",
        },
    )
    for name in ("FLORIST_FORCE_INSECURE", "FLORIST_INSECURE", "FLORIST_TLS_CA_CERT"):
        env.pop(name, None)
    cli = [sys.executable, "-m", "florist.server.cli"]
    logs = tmp_path / "logs"
    sup = Supervisor()
    base = f"https://{SERVER_IP}:{api_port}"
    # The API listens beyond loopback, so it asks for a token: an admin's, made as an operator
    # would make the first one, with `florist token create` on the server's database.
    made = subprocess.run(
        [*cli, "token", "create", "--role", "admin", "--name", "netns"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    headers = {"Authorization": f"Bearer {made.stdout.strip()}"}
    try:
        sup.add(Managed("superlink", _in(server, [*cli, "superlink"]), env, logs / "sl.log"))
        sup.add(Managed("api", _in(server, [*cli, "api"]), env, logs / "api.log"))
        with httpx.Client(
            base_url=base, verify=str(certs.ca_cert), timeout=30, headers=headers
        ) as api:
            deadline = time.monotonic() + 120
            while True:
                try:
                    if api.get("/api/v1/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, (logs / "api.log").read_text()
                time.sleep(1)
            for i, ns in enumerate(nodes):
                key = tmp_path / "keys" / f"site-{i}"
                pub = make_node_key(key).read_text()
                added = api.post("/api/v1/node-keys", json={"name": f"site-{i}", "public_key": pub})
                assert added.status_code == 201, added.text
                argv = [
                    *cli,
                    "client",
                    "--superlink",
                    f"10.77.{i + 1}.1:{fleet}",
                    "--root-certificates",
                    str(certs.ca_cert),
                    "--auth-key",
                    str(key),
                    "--partition-id",
                    str(i),
                    "--num-partitions",
                    str(NODES),
                    "--port",
                    str(free_port()),
                ]
                node_env = env | {"FLORIST_HOME": str(tmp_path / f"node-{i}")}
                # A client host has only the CA and its own key (given as options below).
                for name in ("FLORIST_TLS_DIR", "FLORIST_SUPERNODE_AUTH"):
                    node_env.pop(name)
                sup.add(Managed(f"node-{i}", _in(ns, argv), node_env, logs / f"node-{i}.log"))
            body = {
                "name": "netns",
                "strategy": {"name": "fedavg", "config": {}},
                "workload": {"name": "digits", "config": {"partitioner": {"name": "iid"}}},
                "rounds": 2,
                "clients": {"min": NODES},
            }
            created = api.post("/api/v1/experiments", json=body)
            assert created.status_code == 201, created.text
            exp_id = created.json()["id"]
            deadline = time.monotonic() + 400
            while True:
                exp = api.get(f"/api/v1/experiments/{exp_id}").json()
                if exp["status"] in ("completed", "failed", "cancelled"):
                    break
                assert time.monotonic() < deadline, _tails(logs)
                time.sleep(1)
            assert exp["status"] == "completed", f"{exp}\n{_tails(logs)}"
            rounds = api.get(f"/api/v1/experiments/{exp_id}/rounds").json()["data"]
            assert [r["server_round"] for r in rounds] == [1, 2]
            assert all(r["num_updates"] == NODES for r in rounds), rounds
            keys = api.get("/api/v1/node-keys").json()["data"]
            updates = api.get(f"/api/v1/experiments/{exp_id}/updates").json()["data"]
            assert {u["node_id"] for u in updates} == {k["node_id"] for k in keys}
    finally:
        sup.stop_all()


def _tails(logs: Path) -> str:
    return "\n".join(
        f"--- {p.name}\n{p.read_text(errors='replace')[-2000:]}" for p in sorted(logs.glob("*.log"))
    )
