"""Florist's app on stock Flower tools: flower-supernode (a process per message), flwr run."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from florist.server.db import repository as repo
from florist.server.db.engine import make_engine, make_session_factory, upgrade_database
from florist.server.processes import flower_env
from florist.server.spec import ExperimentSpec, experiment_row

from .conftest import Api, FlowerStack, start_stack
from .test_e2e import FEDAVG

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slow,
    pytest.mark.parametrize("database_url", ["sqlite"], indirect=True),
]


FLWR_APP = Path(__file__).parents[2] / "server" / "flwr_app"


@pytest.fixture(scope="module")
def flower_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FlowerStack]:
    with start_stack(tmp_path_factory.mktemp("stock"), [{}, {}, {}], warm=False) as stack:
        yield stack


def test_fedavg_on_stock_supernodes(api: Api) -> None:
    exp = api.submit(FEDAVG | {"name": "e2e-stock", "rounds": 2})
    done = api.wait_finished(exp["id"])
    assert done["status"] == "completed", f"{done}\n{api.stack.logs()}"
    updates = api.client.get(f"/api/v1/experiments/{exp['id']}/updates").json()
    assert updates["count"] == 6 and {u["status"] for u in updates["data"]} == {"accepted"}


def test_flwr_run_drives_the_app_on_stock_tools(
    flower_stack: FlowerStack, database_url: str, tmp_path: Path
) -> None:
    """No API: an experiment row, then Flower's own `flwr run` on server/flwr_app."""
    # Prepare: the experiment the ServerApp will read, and a `flwr` connection to the SuperLink.
    upgrade_database(database_url)
    spec = ExperimentSpec.model_validate(FEDAVG | {"name": "e2e-flwr-run", "rounds": 2})
    engine = make_engine(database_url)
    sessions = make_session_factory(engine)
    with sessions.begin() as session:
        experiment_id = repo.create_experiment(session, **experiment_row(spec)).id
    env = flower_env(tmp_path)
    Path(env["FLWR_HOME"]).mkdir(parents=True)
    (Path(env["FLWR_HOME"]) / "config.toml").write_text(
        f'[superlink.stack]\naddress = "{flower_stack.control}"\ninsecure = true\n'
    )

    # Execute
    out = subprocess.run(
        [
            str(Path(sys.executable).parent / "flwr"),
            "run",
            str(FLWR_APP),
            "stack",
            "--stream",
            "--run-config",
            f'experiment-id={experiment_id} database-url="{database_url}"',
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )

    # Assert: the run's rounds and updates are in the database, as with a REST submission.
    assert out.returncode == 0, out.stdout + out.stderr + flower_stack.logs()
    with sessions() as session:
        rounds = repo.list_rounds(session, experiment_id=experiment_id)
        updates = repo.list_updates(session, experiment_id=experiment_id)
    engine.dispose()
    assert [r.server_round for r in rounds] == [1, 2], out.stdout + flower_stack.logs()
    assert len(updates) == 6 and {u.status for u in updates} == {"accepted"}
