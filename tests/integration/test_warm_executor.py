"""Warm executors end to end: SuperNodes with ``--isolation process``, one executor each, real runs.

This module brings its own ``flower_stack`` (overriding the package's) so that conftest's ``api``
fixture runs the REST API against SuperNodes served by florist.client.executor, under a
Supervisor that is checked in the background as ``florist up`` does.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from florist.server.processes import (
    Managed,
    Supervisor,
    flower_env,
    free_port,
    superlink_command,
    supernode_processes,
    wait_for_port,
)

from .conftest import NUM_NODES, THIRD_PARTY, Api, FlowerStack

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slow,
    pytest.mark.parametrize("database_url", ["sqlite"], indirect=True),
]

FEDAVG: dict[str, Any] = {
    "name": "warm-digits-fedavg",
    "strategy": {"name": "fedavg", "config": {}},
    "dataset": {"name": "digits", "partitioner": {"name": "dirichlet", "alpha": 0.5}, "seed": 0},
    "model": {"name": "mlp"},
    "training": {"local_epochs": 2, "lr": 0.05, "momentum": 0.9, "batch_size": 32},
    "rounds": 3,
    "clients": {"min": 3},
}


@pytest.fixture(scope="module")
def flower_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FlowerStack]:
    home = tmp_path_factory.mktemp("flower-warm")
    control, fleet = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    pythonpath = os.pathsep.join(filter(None, [str(THIRD_PARTY), os.environ.get("PYTHONPATH")]))
    env = flower_env(home, {"PYTHONPATH": pythonpath})
    sup = Supervisor()
    stop = threading.Event()

    def supervise() -> None:
        while not stop.wait(0.5):
            sup.check()

    watcher = threading.Thread(target=supervise, daemon=True)
    try:
        sup.add(
            Managed(
                "superlink",
                superlink_command(control=control, fleet=fleet),
                env,
                home / "logs" / "superlink.log",
                restart=False,
            )
        )
        wait_for_port(control)
        wait_for_port(fleet)
        for i in range(NUM_NODES):
            for managed in supernode_processes(
                f"supernode-{i}",
                superlink=fleet,
                clientappio=f"127.0.0.1:{free_port()}",
                node_config={"partition-id": i, "num-partitions": NUM_NODES},
                env=env,
                log_dir=home / "logs",
                restart=False,
                executors_on_host=NUM_NODES,
            ):
                sup.add(managed)
        watcher.start()
        yield FlowerStack(home=home, control=control, fleet=fleet, supervisor=sup)
    finally:
        stop.set()
        if watcher.is_alive():
            watcher.join(5)
        sup.stop_all()


def _managed(api: Api, name: str) -> Managed:
    (found,) = [m for m in api.stack.supervisor.processes if m.name == name]
    return found


def _check_completed(api: Api, exp_id: int, rounds: int) -> list[dict[str, Any]]:
    done = api.wait_finished(exp_id)
    assert done["status"] == "completed", f"{done}\n{api.stack.logs()}"
    listed = api.client.get(f"/api/v1/experiments/{exp_id}/rounds").json()
    assert [r["server_round"] for r in listed["data"]] == list(range(1, rounds + 1))
    assert all(r["num_updates"] == NUM_NODES for r in listed["data"])
    updates = api.client.get(f"/api/v1/experiments/{exp_id}/updates").json()
    assert updates["count"] == rounds * NUM_NODES
    assert {u["status"] for u in updates["data"]} == {"accepted"}
    assert len({u["node_id"] for u in updates["data"]}) == NUM_NODES
    return list(listed["data"])


def test_fedavg_runs_on_warm_executors(api: Api) -> None:
    exp = api.submit(FEDAVG)
    rounds = _check_completed(api, exp["id"], 3)
    assert rounds[-1]["metrics"]["accuracy"] >= 0.75

    # The ClientApps ran in the executors, not in per-message flwr-clientapp processes.
    for i in range(NUM_NODES):
        log = _managed(api, f"supernode-{i}-executor").log_path.read_text()
        assert log.count("completed in") >= 3, log[-2000:]


def test_a_killed_executor_is_restarted_and_the_next_run_completes(api: Api) -> None:
    victim = _managed(api, "supernode-0-executor")
    assert victim.proc is not None
    old_pid, restarts = victim.proc.pid, victim.restarts
    os.killpg(old_pid, signal.SIGKILL)

    deadline = time.monotonic() + 30
    while not (victim.restarts > restarts and victim.alive()):
        assert time.monotonic() < deadline, f"executor not restarted\n{api.stack.logs()}"
        time.sleep(0.2)
    assert victim.proc is not None and victim.proc.pid != old_pid

    exp = api.submit(FEDAVG | {"name": "warm-after-restart", "rounds": 2})
    _check_completed(api, exp["id"], 2)
    assert "warm executor ready" in Path(victim.log_path).read_text()
