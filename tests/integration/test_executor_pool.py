"""The shared executor pool end to end: one process imports torch and the app once and forks a
warm executor per SuperNode (what `florist up` runs); real SuperLink, SuperNodes and runs."""

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
    executor_pool,
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
    "name": "pool-digits-fedavg",
    "strategy": {"name": "fedavg", "config": {}},
    "workload": {
        "name": "digits",
        "config": {"partitioner": {"name": "dirichlet", "alpha": 0.5}, "seed": 0},
    },
    "training": {"local_epochs": 1, "batch_size": 32},
    "rounds": 2,
    "clients": {"min": NUM_NODES},
}


@pytest.fixture(scope="module")
def flower_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FlowerStack]:
    home = tmp_path_factory.mktemp("flower-pool")
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
        addresses = [f"127.0.0.1:{free_port()}" for _ in range(NUM_NODES)]
        for i, address in enumerate(addresses):
            for managed in supernode_processes(
                f"supernode-{i}",
                superlink=fleet,
                clientappio=address,
                node_config={"partition-id": i, "num-partitions": NUM_NODES},
                env=env,
                log_dir=home / "logs",
                restart=False,
                executor=False,
            ):
                sup.add(managed)
        pool = executor_pool(addresses, env=env, log_dir=home / "logs")
        pool.restart = False  # the last test stops it on purpose
        sup.add(pool)
        watcher.start()
        yield FlowerStack(home=home, control=control, fleet=fleet, supervisor=sup)
    finally:
        stop.set()
        if watcher.is_alive():
            watcher.join(5)
        sup.stop_all()


def _pool(api: Api) -> Managed:
    (found,) = [m for m in api.stack.supervisor.processes if m.name == "executors"]
    assert found.proc is not None
    return found


def _children(pid: int) -> set[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return {int(c) for c in path.read_text().split()} if path.exists() else set()


def _run(api: Api, name: str) -> None:
    exp = api.submit(FEDAVG | {"name": name})
    done = api.wait_finished(exp["id"])
    assert done["status"] == "completed", f"{done}\n{api.stack.logs()}"
    updates = api.client.get(f"/api/v1/experiments/{exp['id']}/updates").json()
    assert updates["count"] == 2 * NUM_NODES
    assert {u["status"] for u in updates["data"]} == {"accepted"}


def _wait(condition: Any, what: str, api: Api, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}\n{api.stack.logs()}"
        time.sleep(0.2)


def test_one_pool_serves_every_supernode_from_one_import(api: Api) -> None:
    # Execute
    _run(api, "pool-fedavg")

    # Assert: one executor process per SuperNode, each a child of the pool; the app was
    # imported once, by the pool, and every SuperNode's tasks ran in its own executor.
    pool = _pool(api)
    assert pool.proc is not None
    assert len(_children(pool.proc.pid)) == NUM_NODES
    assert pool.log_path is not None
    log = pool.log_path.read_text()
    assert log.count("preloaded florist.client.clientapp") == 1, log[-3000:]
    addresses = [pool.argv[i + 1] for i, a in enumerate(pool.argv) if a == "--clientappio"]
    assert len(addresses) == NUM_NODES
    for address in addresses:
        assert log.count(f"[{address}]: task ") >= 2, (address, log[-3000:])


def test_a_killed_executor_is_forked_again_and_sigterm_stops_them_all(api: Api) -> None:
    # Prepare
    pool = _pool(api)
    assert pool.proc is not None
    _wait(lambda: len(_children(pool.proc.pid)) == NUM_NODES, "no executors", api)  # type: ignore[union-attr]
    victim = min(_children(pool.proc.pid))

    # Execute: kill one executor as the OOM killer would.
    os.kill(victim, signal.SIGKILL)

    # Assert: the pool forks a new one (no new import), and the next run completes.
    _wait(
        lambda: (
            victim not in _children(pool.proc.pid)  # type: ignore[union-attr]
            and len(_children(pool.proc.pid)) == NUM_NODES
        ),  # type: ignore[union-attr]
        "the killed executor was not forked again",
        api,
    )
    _run(api, "pool-after-kill")
    assert pool.log_path is not None
    log = pool.log_path.read_text()
    assert "restarting in" in log and log.count("preloaded florist.client.clientapp") == 1

    # Execute: SIGTERM to the pool alone.
    children = _children(pool.proc.pid)
    os.kill(pool.proc.pid, signal.SIGTERM)

    # Assert: every executor stops with it; none is left behind.
    _wait(lambda: pool.proc is not None and pool.proc.poll() is not None, "pool still up", api)
    _wait(lambda: not any(Path(f"/proc/{c}").exists() for c in children), "executors left", api)
