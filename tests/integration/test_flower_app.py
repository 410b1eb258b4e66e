"""A team's own Flower app on Florist's SuperLink: `flwr run`, then its runs through the API."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from florist.server.processes import flower_env

from .conftest import Api, FlowerStack, start_stack

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

APP = Path(__file__).parents[1] / "fixtures" / "flowerapp"
SERVERAPP = 'serverapp = "digits_flowerapp.server_app:app"'
UNMODIFIED_SERVERAPP = 'serverapp = "digits_flowerapp.server_app_unmodified:app"'
FLWR = str(Path(sys.executable).parent / "flwr")


@pytest.fixture(scope="module")
def database_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One database for the module: the SuperLink's ServerApps write it, the API reads it."""
    return f"sqlite:///{tmp_path_factory.mktemp('db') / 'florist.db'}"


@pytest.fixture(scope="module")
def flower_stack(
    tmp_path_factory: pytest.TempPathFactory, database_url: str
) -> Iterator[FlowerStack]:
    """Florist's own SuperNodes (warm executors): a foreign app's FAB runs on them as it is."""
    with ExitStack() as stack:
        # The app names no database: the recorded ServerApp finds it through Florist's settings
        # in the SuperLink's environment, which start_stack hands on to its processes.
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("FLORIST_DATABASE_URL", database_url)
            flower = stack.enter_context(
                start_stack(tmp_path_factory.mktemp("flowerapp"), [{}, {}, {}])
            )
        yield flower


def flwr_run(stack: FlowerStack, app: Path, home: Path, *config: str, stream: bool = True) -> int:
    """`flwr run <app> florist [--stream]`, as the team would type it; returns Flower's run id.

    With ``stream`` it returns when the run has ended, else as soon as it is submitted.
    """
    env = flower_env(home)
    Path(env["FLWR_HOME"]).mkdir(parents=True, exist_ok=True)
    (Path(env["FLWR_HOME"]) / "config.toml").write_text(
        f'[superlink.florist]\naddress = "{stack.control}"\ninsecure = true\n'
    )
    extra = ["--run-config", " ".join(config)] if config else []
    out = subprocess.run(
        [FLWR, "run", str(app), "florist", *(["--stream"] if stream else []), *extra],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 0, out.stdout + out.stderr + stack.logs()
    found = re.search(r"Successfully started run (\d+)", out.stdout + out.stderr)
    assert found, out.stdout + out.stderr
    return int(found.group(1))


def copy_app(target: Path, *, unmodified: bool = False) -> Path:
    shutil.copytree(APP, target, ignore=shutil.ignore_patterns("__pycache__"))
    if unmodified:
        pyproject = target / "pyproject.toml"
        text = pyproject.read_text()
        assert SERVERAPP in text
        pyproject.write_text(text.replace(SERVERAPP, UNMODIFIED_SERVERAPP))
    return target


def experiments_when(api: Api, until: Any, timeout: float = 60) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        data: list[dict[str, Any]] = api.client.get("/api/v1/experiments").json()["data"]
        if until(data):
            return data
        if time.monotonic() > deadline:
            pytest.fail(f"timed out; experiments: {data}\n{api.stack.logs()}")
        time.sleep(0.5)


def test_flwr_run_apps_show_as_external_experiments(
    flower_stack: FlowerStack, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    # Prepare: the app as the team has it after the two-line change, and as it was before.
    recorded_app = copy_app(tmp_path / "recorded")
    unmodified_app = copy_app(tmp_path / "unmodified", unmodified=True)

    # Execute: both with Flower's own CLI, side by side on the SuperLink (the unmodified one
    # short: one round, no federated evaluation), then Florist's API on the same database.
    unmodified_run = flwr_run(
        flower_stack,
        unmodified_app,
        tmp_path / "cli",
        "num-server-rounds=1 fraction-evaluate=0.0",
        stream=False,
    )
    recorded_run = flwr_run(flower_stack, recorded_app, tmp_path / "cli")
    api: Api = request.getfixturevalue("api")
    finished = experiments_when(
        api,
        lambda data: (
            len(data) >= 2
            and all(e["status"] in ("completed", "failed", "cancelled") for e in data)
        ),
    )

    # Assert: two external experiments, one per Flower run (the recorded run, which the
    # follower also finds on the SuperLink, is not listed twice).
    by_run = {e["flwr_run_id"]: e for e in finished}
    assert len(finished) == 2 and set(by_run) == {str(recorded_run), str(unmodified_run)}
    recorded, unmodified = by_run[str(recorded_run)], by_run[str(unmodified_run)]
    for exp in (recorded, unmodified):
        assert exp["source"] == "external", exp
        assert exp["status"] == "completed", f"{exp}\n{flower_stack.logs()}"
        assert exp["name"] == "florist-tests/digits-flowerapp"
        assert exp["app"] == "florist-tests/digits-flowerapp 1.0.0"
    assert recorded["strategy"]["name"] == "FedAvg"
    assert recorded["strategy"]["config"]["min_available_nodes"] == 3
    assert recorded["num_rounds"] == 2 and recorded["current_round"] == 2
    assert recorded["best_accuracy"] is not None and recorded["best_by"] == "last-round"
    assert recorded["clients"] == {"min": 3, "fraction_train": 1.0, "fraction_evaluate": 1.0}
    # The ServerApp's run config is the installed app's defaults fused with the overrides.
    assert recorded["run_config"] == {
        "num-server-rounds": 2,
        "fraction-evaluate": 1.0,
        "local-epochs": 1,
        "learning-rate": 0.3,
    }
    assert unmodified["strategy"]["name"] == "unknown" and unmodified["current_round"] == 0
    assert unmodified["run_config"]["num-server-rounds"] == 1

    # Assert: the recorded run's rounds and updates, through the API.
    rounds = api.client.get(f"/api/v1/experiments/{recorded['id']}/rounds").json()
    assert [r["server_round"] for r in rounds["data"]] == [1, 2]
    for r in rounds["data"]:
        assert set(r["metrics"]) == {"accuracy", "loss"}  # the app's evaluate_fn
        assert set(r["train_metrics"]) >= {"train_loss"}  # FedAvg's aggregate of the replies
        assert set(r["evaluate_metrics"]) >= {"eval_loss", "eval_acc"}  # federated evaluation
        assert (r["num_updates"], r["num_failures"]) == (3, 0)
    updates = api.client.get(f"/api/v1/experiments/{recorded['id']}/updates").json()
    assert updates["count"] == 6
    assert {u["status"] for u in updates["data"]} == {"accepted"}
    assert all(u["num_examples"] > 0 and "train_loss" in u["metrics"] for u in updates["data"])
    assert len({u["node_id"] for u in updates["data"]}) == 3
    for server_round in (1, 2):
        nodes = {u["node_id"] for u in updates["data"] if u["server_round"] == server_round}
        assert len(nodes) == 3
    log = api.client.get(f"/api/v1/experiments/{recorded['id']}/log").json()
    assert "initial-evaluation" in {e["kind"] for e in log["data"]}
    empty = api.client.get(f"/api/v1/experiments/{unmodified['id']}/rounds").json()
    assert empty == {"data": [], "count": 0}
