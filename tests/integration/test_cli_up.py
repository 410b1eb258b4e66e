"""`florist up`, the demo's command, as a user runs it: everything up, a run followed, Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from florist.server.processes import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

UP = [sys.executable, "-m", "florist.server.cli", "up"]
EXPERIMENT = """\
name = "up-fedavg"
rounds = 2
[strategy]
name = "fedavg"
[dataset]
name = "digits"
[dataset.partitioner]
name = "iid"
"""


def _port_open(port: int) -> bool:
    try:
        with httpx.Client(timeout=1) as client:
            client.get(f"http://127.0.0.1:{port}/api/v1/healthz")
    except httpx.TransportError:
        return False
    return True


def test_up_runs_an_experiment_and_stops_everything_on_ctrl_c(tmp_path: Path) -> None:
    # Prepare: its own state folder and ports, so it cannot meet another Florist on this machine.
    api_port, node_port = free_port(), free_port()
    fleet = f"127.0.0.1:{free_port()}"
    simulation_port = free_port()
    env = dict(os.environ) | {
        "FLORIST_HOME": str(tmp_path / "home"),
        "FLORIST_API_PORT": str(api_port),
        "FLORIST_SUPERLINK_CONTROL": f"127.0.0.1:{free_port()}",
        "FLORIST_SUPERLINK_FLEET": fleet,
        "FLORIST_SUPERNODE_PORT": str(node_port),
        # The simulation SuperLink `florist up` starts beside the deployment one.
        "FLORIST_SIMULATION_CONTROL": f"127.0.0.1:{simulation_port}",
        "COLUMNS": "120",
    }
    env.pop("FLORIST_DATABASE_URL", None)
    spec = tmp_path / "experiment.toml"
    spec.write_text(EXPERIMENT)
    log = tmp_path / "up.log"

    # Execute: `florist up` as the demo runs it, with a short experiment instead of the demo's.
    with log.open("w") as out:
        proc = subprocess.Popen(
            [*UP, "--clients", "2", "--experiment", str(spec)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 300
        while "Press Ctrl-C to stop." not in log.read_text():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.5)
        listing = httpx.get(f"http://127.0.0.1:{api_port}/api/v1/experiments").json()["data"]
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)

    # Assert: the run completed with a progress bar, the dashboard stayed up until Ctrl-C, and
    # Ctrl-C took every process down with it.
    text = log.read_text()
    assert "Florist is up" in text and "Experiment 1 completed" in text, text
    assert "rounds" in text and "2/2" in text, text
    (exp,) = listing
    assert (exp["name"], exp["status"], exp["current_round"]) == ("up-fedavg", "completed", 2)
    assert code == 0, text
    assert not _port_open(api_port)
    assert not _port_open(simulation_port)
    # Each child names one of these addresses on its command line: the SuperLink and SuperNodes
    # the Fleet API, each warm executor its SuperNode's ClientApp-side port.
    for address in (fleet, f"127.0.0.1:{node_port}", f"127.0.0.1:{node_port + 1}"):
        found = subprocess.run(["pgrep", "-af", address], capture_output=True, text=True)
        assert found.stdout == "", found.stdout
