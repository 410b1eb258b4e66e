"""Crashes that must lose nothing, on real processes: the API SIGKILLed mid-run (the run goes
on); the ServerApp, or the SuperLink with it, SIGKILLed mid-run (Flower fails the run, the
follower submits the experiment again and the new run resumes from the last committed round); a
SuperNode SIGKILLed and started again (its task is lost, the round goes on without it, the node
comes back). Every round is in the database exactly once afterwards, and the final model
downloads."""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from florist.server.processes import Managed, free_port, wait_for_port

from .conftest import FlowerStack, start_stack

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture(scope="module")
def flower_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FlowerStack]:
    # Slow enough nodes that the API can be killed and restarted while the run is going.
    profile: dict[str, int | float | str] = {"seconds-per-step": 0.05}
    home = tmp_path_factory.mktemp("flower")
    # The SuperLink keeps its state in a file, as under `florist up`: it can be killed and
    # started again.
    nodes = [dict(profile) for _ in range(3)]
    with start_stack(home, nodes, superlink_database=home / "superlink.db") as s:
        yield s


def _api(stack: FlowerStack, database_url: str, home: Path, port: int, n: int) -> Managed:
    env = dict(os.environ) | {
        "FLORIST_DATABASE_URL": database_url,
        "FLORIST_HOME": str(home),
        "FLORIST_SUPERLINK_CONTROL": stack.control,
        "FLORIST_STATUS_POLL_S": "0.5",
    }
    cmd = [sys.executable, "-m", "florist.server.cli", "api", "--host", "127.0.0.1"]
    managed = Managed(f"api-{n}", [*cmd, "--port", str(port)], env, home / f"api-{n}.log", False)
    managed.start()
    wait_for_port(f"127.0.0.1:{port}")
    return managed


def _wait(client: httpx.Client, experiment_id: int, until: Any, timeout: float = 240) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        exp = client.get(f"/api/v1/experiments/{experiment_id}").json()
        if until(exp):
            return exp
        assert time.monotonic() < deadline, exp
        time.sleep(0.3)


def _body(name: str, rounds: int, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "strategy": {"name": "fedavg", "config": {}},
        "workload": {"name": "digits", "config": {"partitioner": {"name": "iid"}}},
        "training": {"local_steps": 20},
        "rounds": rounds,
        "clients": {"min": 3},
    } | extra


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_the_api_killed_mid_run_loses_nothing(
    flower_stack: FlowerStack, migrated_url: str, tmp_path: Path
) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    body = _body("api-killed", 6)
    first = _api(flower_stack, migrated_url, tmp_path, port, 1)
    try:
        with httpx.Client(base_url=base, timeout=30) as client:
            exp = client.post("/api/v1/experiments", json=body).json()
            _wait(client, exp["id"], lambda e: e["current_round"] >= 1)
        # Execute: the API dies without a chance to clean up, mid-run.
        assert first.proc is not None
        os.killpg(first.proc.pid, signal.SIGKILL)
        first.proc.wait(10)
    finally:
        first.stop()
    time.sleep(2)  # rounds go on being committed by the ServerApp meanwhile
    second = _api(flower_stack, migrated_url, tmp_path, port, 2)
    try:
        with httpx.Client(base_url=base, timeout=30) as client:
            done = _wait(client, exp["id"], lambda e: e["status"] in ("completed", "failed"))
            rounds = client.get(f"/api/v1/experiments/{exp['id']}/rounds").json()["data"]
            model = client.get(f"/api/v1/experiments/{exp['id']}/model")
    finally:
        second.stop()

    # Assert: the run finished on its own; every round is there exactly once.
    assert done["status"] == "completed", f"{done}\n{flower_stack.logs()}"
    assert [r["server_round"] for r in rounds] == [1, 2, 3, 4, 5, 6]
    assert model.status_code == 200 and model.headers["x-florist-round"] == "6"


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (read from /proc: children of children included)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _serverapps(stack: FlowerStack) -> list[int]:
    superlink = next(m for m in stack.supervisor.processes if m.name == "superlink")
    assert superlink.proc is not None
    out = []
    for pid in _descendants(superlink.proc.pid):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if b"flwr-serverapp" in cmdline:
            out.append(pid)
    return out


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_the_serverapp_killed_mid_run_resumes_from_its_last_round(
    flower_stack: FlowerStack, migrated_url: str, tmp_path: Path
) -> None:
    # Prepare: an experiment running on the API (auto-resume on, its default).
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    body = _body("serverapp-killed", 6)
    api = _api(flower_stack, migrated_url, tmp_path, port, 3)
    try:
        with httpx.Client(base_url=base, timeout=30) as client:
            exp = client.post("/api/v1/experiments", json=body).json()
            running = _wait(client, exp["id"], lambda e: e["current_round"] >= 2)

            # Execute: the ServerApp dies without a chance to clean up, mid-run.
            pids = _serverapps(flower_stack)
            assert pids, flower_stack.logs()
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            # Flower fails a run whose ServerApp stopped sending heartbeats (about a minute).
            done = _wait(
                client, exp["id"], lambda e: e["status"] in ("completed", "failed"), timeout=400
            )
            rounds = client.get(f"/api/v1/experiments/{exp['id']}/rounds").json()["data"]
            log = client.get(f"/api/v1/experiments/{exp['id']}/log", params={"limit": 500})
            model = client.get(f"/api/v1/experiments/{exp['id']}/model")
    finally:
        api.stop()

    # Assert: resumed once by a new Flower run, every round exactly once, the model of round 6.
    assert done["status"] == "completed", f"{done}\n{flower_stack.logs()}"
    assert done["resumes"] == 1
    assert done["flwr_run_id"] != running["flwr_run_id"]
    assert [r["server_round"] for r in rounds] == [1, 2, 3, 4, 5, 6]
    kinds = [e["kind"] for e in log.json()["data"]]
    assert kinds.count("run-lost") == 1 and kinds.count("resumed") == 1, kinds
    resumed = next(e for e in log.json()["data"] if e["kind"] == "resumed")
    assert resumed["data"]["model_version"] >= running["current_round"]
    assert model.status_code == 200 and model.headers["x-florist-round"] == "6"


def _managed(stack: FlowerStack, name: str) -> Managed:
    return next(m for m in stack.supervisor.processes if m.name == name)


def _kill(managed: Managed) -> None:
    """SIGKILL the process and everything it started (its process group), as a container dies."""
    assert managed.proc is not None
    os.killpg(managed.proc.pid, signal.SIGKILL)
    managed.proc.wait(10)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_the_superlink_killed_mid_run_comes_back_and_the_run_resumes(
    flower_stack: FlowerStack, migrated_url: str, tmp_path: Path
) -> None:
    port = free_port()
    api = _api(flower_stack, migrated_url, tmp_path, port, 4)
    superlink = _managed(flower_stack, "superlink")
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            exp = client.post("/api/v1/experiments", json=_body("superlink-killed", 6)).json()
            _wait(client, exp["id"], lambda e: e["current_round"] >= 2)

            # Execute: the SuperLink dies with its ServerApp, and is started again on its
            # state file (as a supervisor or a container runtime restarts it).
            _kill(superlink)
            time.sleep(2)
            superlink.start()
            wait_for_port(flower_stack.control)
            done = _wait(
                client, exp["id"], lambda e: e["status"] in ("completed", "failed"), timeout=400
            )
            rounds = client.get(f"/api/v1/experiments/{exp['id']}/rounds").json()["data"]
            log = client.get(f"/api/v1/experiments/{exp['id']}/log", params={"limit": 500})
            model = client.get(f"/api/v1/experiments/{exp['id']}/model")
    finally:
        api.stop()

    # Assert: the SuperNodes came back to it, the run resumed, every round exactly once.
    assert done["status"] == "completed", f"{done}\n{flower_stack.logs()}"
    assert done["resumes"] >= 1
    assert [r["server_round"] for r in rounds] == [1, 2, 3, 4, 5, 6]
    assert "resumed" in [e["kind"] for e in log.json()["data"]]
    assert model.status_code == 200 and model.headers["x-florist-round"] == "6"


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_supernode_killed_mid_run_loses_its_task_not_the_run(
    flower_stack: FlowerStack, migrated_url: str, tmp_path: Path
) -> None:
    port = free_port()
    api = _api(flower_stack, migrated_url, tmp_path, port, 5)
    node = [_managed(flower_stack, n) for n in ("supernode-2", "supernode-2-executor")]
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            body = _body("supernode-killed", 6, round_timeout_s=20)
            exp = client.post("/api/v1/experiments", json=body).json()
            _wait(client, exp["id"], lambda e: e["current_round"] >= 1)

            # Execute: one SuperNode and its executor die mid-run, and start again.
            for managed in node:
                _kill(managed)
            time.sleep(1)
            for managed in node:
                managed.start()
            done = _wait(
                client, exp["id"], lambda e: e["status"] in ("completed", "failed"), timeout=400
            )
            rounds = client.get(f"/api/v1/experiments/{exp['id']}/rounds").json()["data"]
            updates = client.get(
                f"/api/v1/experiments/{exp['id']}/updates", params={"limit": 500}
            ).json()["data"]
    finally:
        api.stop()

    # Assert: the run completed in one go; the lost task is one failed update; the node took
    # part again after it came back.
    assert done["status"] == "completed", f"{done}\n{flower_stack.logs()}"
    assert done["resumes"] == 0
    assert [r["server_round"] for r in rounds] == [1, 2, 3, 4, 5, 6]
    failed = [u for u in updates if u["status"] == "failed"]
    assert failed, updates
    last_round = [u for u in updates if u["server_round"] == 6 and u["status"] == "accepted"]
    assert len(last_round) == 3, updates
