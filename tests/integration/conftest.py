"""Real Flower processes on loopback: one SuperLink, three SuperNodes, and the API in a thread."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from florist.client.workloads import default_workloads
from florist.server.api.app import create_app
from florist.server.processes import (
    Managed,
    Supervisor,
    flower_env,
    free_port,
    superlink_command,
    supernode_command,
    supernode_processes,
    wait_for_port,
)
from florist.server.settings import Settings
from florist.strategies import default_registry

THIRD_PARTY = Path(__file__).parents[1] / "fixtures" / "thirdparty"
NUM_NODES = 3


@dataclass
class FlowerStack:
    home: Path
    control: str
    fleet: str
    supervisor: Supervisor

    def logs(self, lines: int = 30) -> str:
        """The tail of every process log, for failure messages."""
        out = []
        for m in self.supervisor.processes:
            text = m.log_path.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {m.name} ({m.log_path})\n" + "\n".join(text))
        return "\n".join(out)


@contextmanager
def start_stack(
    home: Path,
    node_configs: list[dict[str, int | float | str]],
    *,
    warm: bool = True,
    superlink_database: Path | None = None,
) -> Iterator[FlowerStack]:
    """A SuperLink and one SuperNode per node-config (partition ids added), on free ports.

    ``warm``: Florist's default client (tuned SuperNode polls, a warm executor beside it);
    otherwise stock ``flower-supernode`` starting a ClientApp process per message.
    ``superlink_database``: the SuperLink's state file (default: in memory).
    """
    control, fleet = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    # The third-party plugin must be importable where the ServerApp and ClientApps run.
    pythonpath = os.pathsep.join(filter(None, [str(THIRD_PARTY), os.environ.get("PYTHONPATH")]))
    env = flower_env(home, {"PYTHONPATH": pythonpath})
    sup = Supervisor()
    logs = home / "logs"
    try:
        cmd = superlink_command(control=control, fleet=fleet, database=superlink_database)
        sup.add(Managed("superlink", cmd, env, logs / "superlink.log", restart=False))
        wait_for_port(control)
        wait_for_port(fleet)
        n = len(node_configs)
        for i, extra in enumerate(node_configs):
            node_config = {"partition-id": i, "num-partitions": n, **extra}
            if not warm:
                cmd = supernode_command(
                    superlink=fleet, clientappio=f"127.0.0.1:{free_port()}", node_config=node_config
                )
                sup.add(
                    Managed(f"supernode-{i}", cmd, env, logs / f"supernode-{i}.log", restart=False)
                )
                continue
            for managed in supernode_processes(
                f"supernode-{i}",
                superlink=fleet,
                clientappio=f"127.0.0.1:{free_port()}",
                node_config=node_config,
                env=env,
                log_dir=logs,
                restart=False,
                executors_on_host=n,
            ):
                sup.add(managed)
        yield FlowerStack(home=home, control=control, fleet=fleet, supervisor=sup)
    finally:
        sup.stop_all()


@pytest.fixture(scope="module")
def flower_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FlowerStack]:
    """Three SuperNodes of the same speed; a test module may override it with its own fleet."""
    with start_stack(tmp_path_factory.mktemp("flower"), [{} for _ in range(NUM_NODES)]) as stack:
        yield stack


@dataclass
class Api:
    base: str
    client: httpx.Client
    stack: FlowerStack

    def submit(self, body: dict[str, Any]) -> dict[str, Any]:
        response = self.client.post("/api/v1/experiments", json=body)
        assert response.status_code == 201, response.text
        return dict(response.json())

    def experiment(self, experiment_id: int) -> dict[str, Any]:
        return dict(self.client.get(f"/api/v1/experiments/{experiment_id}").json())

    def wait(self, experiment_id: int, until: Any, timeout: float = 300) -> dict[str, Any]:
        """Poll until ``until(experiment)`` holds; fail with the process logs otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            exp = self.experiment(experiment_id)
            if until(exp):
                return exp
            if time.monotonic() > deadline:
                pytest.fail(f"timed out; experiment is {exp}\n{self.stack.logs()}")
            time.sleep(0.5)

    def wait_finished(self, experiment_id: int, timeout: float = 300) -> dict[str, Any]:
        return self.wait(
            experiment_id, lambda e: e["status"] in ("completed", "failed", "cancelled"), timeout
        )


@pytest.fixture
def api(
    flower_stack: FlowerStack, database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Api]:
    """The real API (uvicorn, its run follower) on a free port, on the test's database."""
    with serve_api(flower_stack, database_url, tmp_path, monkeypatch) as served:
        yield served


@contextmanager
def serve_api(
    flower_stack: FlowerStack, database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Api]:
    """The real API (uvicorn, its run follower) on a free port, on ``database_url``."""
    # The API validates strategy names too: the third-party plugin is "installed" here as well.
    monkeypatch.syspath_prepend(str(THIRD_PARTY))
    default_registry.cache_clear()
    default_workloads.cache_clear()
    port = free_port()
    settings = Settings(
        home=tmp_path,
        database_url=database_url,
        api_port=port,
        superlink_control=flower_stack.control,
        status_poll_s=0.5,
    )
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for_port(f"127.0.0.1:{port}")
    base = f"http://127.0.0.1:{port}"
    with httpx.Client(base_url=base, timeout=30) as client:
        yield Api(base=base, client=client, stack=flower_stack)
    server.should_exit = True
    thread.join(timeout=15)
    default_registry.cache_clear()
    default_workloads.cache_clear()
