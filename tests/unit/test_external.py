"""recorded(): a Flower app's own strategy loop, recorded into Florist's database (in process)."""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from florist.server.api.app import create_app
from florist.server.control import RunState
from florist.server.db import repository as repo
from florist.server.db.models import Experiment
from florist.server.db.models import Run as RunRow
from florist.server.external import recorded
from florist.server.follower import discovered_experiment
from florist.server.runtime.localgrid import LocalGrid
from florist.server.settings import Settings

APP = Path(__file__).parents[1] / "fixtures" / "flowerapp"
FAB_ID = "florist-tests/digits-flowerapp"
RUN_ID = 2**64 - 7  # Flower's run ids use the whole uint64 range


@pytest.fixture
def app_modules(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """The fixture app's modules, importable as in a ServerApp process; messages need a run id."""
    monkeypatch.syspath_prepend(str(APP))
    import digits_flowerapp.client_app as client_app
    import digits_flowerapp.server_app as server_app

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    yield client_app, server_app


def flower_run(database_url: str, **config: bool | int | float | str) -> Run:
    run = Run.create_empty(RUN_ID)
    run.fab_id, run.fab_version = FAB_ID, "1.0.0"
    run.override_config = {
        "database-url": database_url,
        "num-server-rounds": 2,
        "fraction-evaluate": 1.0,
        "local-epochs": 1,
        "learning-rate": 0.3,
        **config,
    }
    return run


def start(grid: Grid, strategy: FedAvg, *, num_rounds: int = 2, evaluate_fn: Any = None) -> Result:
    from digits_flowerapp.task import Net

    return recorded(strategy).start(
        grid,
        ArrayRecord(Net().state_dict()),
        num_rounds=num_rounds,
        timeout=10,
        train_config=ConfigRecord({"lr": 0.3}),
        evaluate_fn=evaluate_fn,
    )


def only_experiment(sessions: sessionmaker[Session]) -> Experiment:
    with sessions() as session:
        experiments = session.scalars(select(Experiment)).all()
    assert len(experiments) == 1, experiments
    return experiments[0]


def test_the_recorded_server_app_is_the_unmodified_one_plus_two_lines() -> None:
    # Prepare
    plain = (APP / "digits_flowerapp" / "server_app_unmodified.py").read_text().splitlines()
    changed = (APP / "digits_flowerapp" / "server_app.py").read_text().splitlines()

    # Execute
    diff = list(difflib.unified_diff(plain, changed, lineterm="", n=0))

    # Assert: one line gone, two lines new: the import and the wrap.
    removed = [line[1:] for line in diff if line.startswith("-") and not line.startswith("---")]
    added = [line[1:] for line in diff if line.startswith("+") and not line.startswith("+++")]
    assert len(removed) == 1 and len(added) == 2, diff
    assert added[0] == "from florist.server.external import recorded"
    assert added[1] == removed[0].replace("FedAvg(", "recorded(FedAvg(", 1) + ")"


def test_the_apps_main_records_every_round(
    app_modules: Any, session_factory: sessionmaker[Session], migrated_url: str
) -> None:
    # Prepare: the app's own main, on three in-process nodes running its own ClientApp.
    client_app, server_app = app_modules
    run = flower_run(migrated_url)
    grid = LocalGrid(3, app=client_app.app, run=run)

    # Execute
    server_app.main(grid, _context(run))

    # Assert: an external experiment, completed, with both rounds and six updates.
    exp = only_experiment(session_factory)
    assert (exp.source, exp.status, exp.flwr_run_id) == ("external", "completed", RUN_ID)
    assert (exp.name, exp.strategy, exp.num_rounds) == (FAB_ID, "FedAvg", 2)
    assert "database-url" not in exp.spec["run_config"]  # the API shows it; it may hold a password
    assert exp.spec["clients"] == {"min": 3, "fraction_train": 1.0, "fraction_evaluate": 1.0}
    with session_factory() as session:
        rounds = repo.list_rounds(session, experiment_id=exp.id)
        updates = repo.list_updates(session, experiment_id=exp.id)
        events = repo.list_events(session, experiment_id=exp.id)
        runs = session.scalars(select(RunRow)).all()
    assert [r.server_round for r in rounds] == [1, 2]
    for r in rounds:
        assert set(r.metrics) == {"accuracy", "loss"}
        assert set(r.train_metrics) == {"train_loss"}
        assert set(r.evaluate_metrics) == {"eval_loss", "eval_acc"}
        assert (r.num_updates, r.num_rejected, r.num_failures) == (3, 0, 0)
    assert rounds[1].metrics["accuracy"] > rounds[0].metrics["accuracy"] - 0.05
    assert [(u.server_round, u.status) for u in updates] == [(1, "accepted")] * 3 + [
        (2, "accepted")
    ] * 3
    assert {u.node_id for u in updates} == set(grid.node_ids)
    for u in updates:
        assert u.num_examples is not None and u.num_examples > 0
        assert set(u.metrics) == {"train_loss", "num-examples"}
        assert u.bytes_up > 0 and u.bytes_down > 0 and u.model_version == u.server_round - 1
        assert u.wall_duration_s is not None and u.wall_duration_s >= 0
    assert [e.kind for e in events] == ["initial-evaluation"]
    assert [(r.status, r.final_metrics) for r in runs] == [("completed", rounds[1].metrics)]


def _context(run: Run) -> Any:
    from flwr.app import Context, RecordDict

    return Context(
        run_id=run.run_id,
        node_id=0,
        node_config={},
        state=RecordDict(),
        run_config=dict(run.override_config),
    )


def test_a_run_the_api_found_first_is_recorded_under_that_experiment(
    app_modules: Any, session_factory: sessionmaker[Session], migrated_url: str
) -> None:
    # Prepare: the follower's row for the run, made from what the SuperLink says of it.
    client_app, _ = app_modules
    run = flower_run(migrated_url)
    found = RunState(RUN_ID, "pending", "", "", fab_id=FAB_ID, fab_version="1.0.0")
    repo.ensure_external_experiment(session_factory, **discovered_experiment(found))

    # Execute
    start(LocalGrid(2, app=client_app.app, run=run), FedAvg(), num_rounds=1)

    # Assert: still one experiment, now knowing its strategy and rounds.
    exp = only_experiment(session_factory)
    assert (exp.status, exp.strategy, exp.num_rounds) == ("completed", "FedAvg", 1)
    assert exp.spec["strategy"]["name"] == "FedAvg"
    with session_factory() as session:
        assert len(repo.list_rounds(session, experiment_id=exp.id)) == 1


def test_error_replies_are_failed_updates_and_the_rest_is_aggregated(
    app_modules: Any, session_factory: sessionmaker[Session], migrated_url: str
) -> None:
    # Prepare: node 1001 answers every training task with an error.
    client_app, _ = app_modules

    def tamper(node: int, request: Message, reply: Message) -> Message:
        if node == 1001:
            return Message(Error(code=0, reason="out of memory"), reply_to=request)
        return reply

    grid = LocalGrid(3, tamper, app=client_app.app, run=flower_run(migrated_url))

    # Execute: no federated evaluation, so only training replies come back.
    start(grid, FedAvg(fraction_evaluate=0.0), num_rounds=1)

    # Assert
    exp = only_experiment(session_factory)
    with session_factory() as session:
        (round_,) = repo.list_rounds(session, experiment_id=exp.id)
        updates = repo.list_updates(session, experiment_id=exp.id)
    assert (round_.num_updates, round_.num_failures) == (2, 1)
    assert round_.metrics == {} and round_.evaluate_metrics == {}  # no evaluate_fn, none asked
    failed = [u for u in updates if u.status == "failed"]
    assert [(u.node_id, u.reason) for u in failed] == [(1001, "out of memory")]


def test_a_failing_evaluate_fn_fails_the_experiment_and_keeps_its_rounds(
    app_modules: Any, session_factory: sessionmaker[Session], migrated_url: str
) -> None:
    # Prepare: the server's evaluation breaks in round 2.
    client_app, _ = app_modules
    grid = LocalGrid(2, app=client_app.app, run=flower_run(migrated_url))

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        if server_round == 2:
            raise RuntimeError("test set missing")
        return MetricRecord({"accuracy": 0.5})

    # Execute
    with pytest.raises(RuntimeError, match="test set missing"):
        start(grid, FedAvg(fraction_evaluate=0.0), evaluate_fn=evaluate_fn)

    # Assert: round 1 whole; round 2's updates kept without a round; the experiment failed.
    exp = only_experiment(session_factory)
    assert exp.status == "failed" and exp.error == "RuntimeError: test set missing"
    with session_factory() as session:
        rounds = repo.list_rounds(session, experiment_id=exp.id)
        updates = repo.list_updates(session, experiment_id=exp.id)
    assert [(r.server_round, r.metrics) for r in rounds] == [(1, {"accuracy": 0.5})]
    assert [u.server_round for u in updates] == [1, 1, 2, 2]


def test_a_strategy_with_its_own_loop_is_refused() -> None:
    class OwnLoop(FedAvg):
        def start(self, *args: Any, **kwargs: Any) -> Result:
            return Result()

    with pytest.raises(TypeError, match="OwnLoop overrides start"):
        recorded(OwnLoop())


def test_the_wrapper_reads_through_to_the_strategy() -> None:
    strategy = recorded(FedAvg(fraction_train=0.5))
    assert strategy.fraction_train == 0.5 and strategy.strategy.min_train_nodes == 2


def test_the_api_shows_an_external_experiment(
    app_modules: Any, session_factory: sessionmaker[Session], migrated_url: str, tmp_path: Path
) -> None:
    # Prepare: one recorded run and one run only found on the SuperLink.
    client_app, _ = app_modules
    start(LocalGrid(2, app=client_app.app, run=flower_run(migrated_url)), FedAvg(), num_rounds=1)
    found = RunState(
        5, "finished", "failed", "ServerApp failed", fab_id="team/app", override_config={"x": 1}
    )
    repo.ensure_external_experiment(session_factory, **discovered_experiment(found))
    settings = Settings(home=tmp_path, database_url=migrated_url)

    # Execute
    with TestClient(create_app(settings, follow_runs=False)) as client:
        listed = client.get("/api/v1/experiments").json()
        by_run = {e["flwr_run_id"]: e for e in listed["data"]}
        recorded_id = by_run[str(RUN_ID)]["id"]
        one = client.get(f"/api/v1/experiments/{recorded_id}").json()
        rounds = client.get(f"/api/v1/experiments/{recorded_id}/rounds").json()
        updates = client.get(f"/api/v1/experiments/{recorded_id}/updates").json()

    # Assert
    assert listed["count"] == 2
    assert one == by_run[str(RUN_ID)]
    assert one["source"] == "external" and one["status"] == "completed"
    assert one["strategy"]["name"] == "FedAvg" and one["app"] == f"{FAB_ID} 1.0.0"
    assert (one["workload"], one["training"]) == (None, {})
    # No evaluate_fn, so no centralized accuracy to choose a best round on.
    assert (one["current_round"], one["best_round"], one["best_accuracy"]) == (1, None, None)
    assert rounds["count"] == 1 and updates["count"] == 2
    other = by_run["5"]
    assert other["source"] == "external" and other["status"] == "failed"
    assert other["error"] == "ServerApp failed" and other["strategy"]["name"] == "unknown"
    assert other["clients"] is None and other["num_rounds"] == 0
    assert (other["app"], other["run_config"]) == ("team/app", {"x": 1})
