"""`florist up --secure` as a user runs it: certificates and keys made, the demo run over TLS."""

from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from florist.server.certs import parse_node_public_key
from florist.server.processes import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

EXPERIMENT = """\
name = "up-secure"
rounds = 2
[strategy]
name = "fedavg"
[workload]
name = "digits"
[workload.config.partitioner]
name = "iid"
"""


def test_up_secure_runs_the_experiment_over_tls_with_registered_keys(tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = dict(os.environ) | {
        "FLORIST_HOME": str(home),
        "FLORIST_API_PORT": str(free_port()),
        "FLORIST_SUPERLINK_CONTROL": f"127.0.0.1:{free_port()}",
        "FLORIST_SUPERLINK_FLEET": f"127.0.0.1:{free_port()}",
        "FLORIST_SUPERNODE_PORT": str(free_port()),
        "COLUMNS": "120",
    }
    for name in ("FLORIST_DATABASE_URL", "FLORIST_TLS_DIR", "FLORIST_SUPERNODE_AUTH"):
        env.pop(name, None)
    spec = tmp_path / "experiment.toml"
    spec.write_text(EXPERIMENT)
    cmd = [sys.executable, "-m", "florist.server.cli", "up", "--secure", "--clients", "2"]
    result = subprocess.run(
        [*cmd, "--experiment", str(spec), "--exit-after"],
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    output = result.stdout + result.stderr
    logs = "\n".join(
        f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
        for p in sorted((home / "logs").glob("*.log"))
    )
    assert result.returncode == 0, output + logs
    assert "completed" in output, output + logs

    # Certificates and keys were made, their private halves for their owner only.
    certs = home / "certs"
    for name in ("ca.key", "server.key"):
        assert stat.S_IMODE((certs / name).stat().st_mode) == 0o600
    keys = sorted((home / "node-keys").glob("supernode-*.pub"))
    assert [k.name for k in keys] == ["supernode-0.pub", "supernode-1.pub"]
    fingerprints = {parse_node_public_key(k.read_text()).fingerprint for k in keys}

    # The SuperLink ran with TLS and SuperNode authentication; the run's updates came from the
    # two registered nodes, and from no other.
    superlink = (home / "logs" / "superlink.log").read_text(errors="replace")
    assert "SuperNode authentication is disabled" not in superlink
    assert "--insecure" not in superlink and "insecure HTTP server" not in superlink
    db = sqlite3.connect(home / "florist.db")
    try:
        rows = db.execute("SELECT fingerprint, node_id FROM node_keys").fetchall()
        updates = db.execute("SELECT DISTINCT node_id, status FROM client_updates").fetchall()
    finally:
        db.close()
    assert {fingerprint for fingerprint, _ in rows} == fingerprints
    assert {node for node, _ in updates} == {node for _, node in rows}
    assert {status for _, status in updates} == {"accepted"}
