"""Operations: /metrics read from a real database, round costs, JSON logs with experiment ids."""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from flwr.app import Context, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.orm import Session, sessionmaker

from florist.client.task import task_to_config
from florist.server import serverapp
from florist.server.api.app import create_app
from florist.server.db import repository
from florist.server.db.engine import make_engine, make_session_factory
from florist.server.db.models import utcnow
from florist.server.logs import _UVICORN, configure_logging, log_context
from florist.server.observability import ExperimentCollector
from florist.server.recording import (
    InMemoryRunRecorder,
    RoundRecord,
    SqlRunRecorder,
    UpdateRecord,
)
from florist.server.runtime import EventLoop
from florist.server.runtime.localgrid import LocalGrid
from florist.server.settings import Settings
from florist.server.spec import ExperimentSpec, resolve_strategy, server_setup
from florist.strategies.events import Arrival, Decision, Weights
from florist.strategies.flower_adapter import as_scheduler
from tests.unit.test_follower import FakeControl

from .test_api import BODY

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(client: TestClient) -> Samples:
    """Every sample of /metrics by (name, sorted labels)."""
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


def of(samples: Samples, sample: str, /, **labels: str) -> float | None:
    return samples.get((sample, tuple(sorted(labels.items()))))


@pytest.fixture
def logs_restored() -> Iterator[None]:
    """configure_logging changes process-wide state: put it back after the test."""
    loggers = [logging.getLogger(name) for name in ("", "flwr", *_UVICORN)]
    saved = [(list(log.handlers), log.level, log.propagate) for log in loggers]
    yield
    for log, (handlers, level, propagate) in zip(loggers, saved, strict=True):
        log.handlers[:] = handlers
        log.setLevel(level)
        log.propagate = propagate


# --- round costs: measured by the loop, stored by the recorder --------------------------------


def test_each_round_records_the_strategys_aggregation_time_and_its_traffic() -> None:
    # Prepare: FedAvg whose aggregating call takes at least 0.2 s longer; its other calls don't.
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    spec = ExperimentSpec.model_validate(
        BODY | {"model": {"name": "logreg"}, "training": {"local_epochs": 1}, "rounds": 2}
    )
    plugin, config = resolve_strategy(spec.strategy)
    strategy = as_scheduler(plugin.build_server(config, server_setup(spec)))
    on_arrival = strategy.on_arrival

    def slow_aggregation(arrival: Arrival, weights: Weights) -> Decision:
        decision = on_arrival(arrival, weights)
        if decision.weights is not None:
            time.sleep(0.2)
        return decision

    strategy.on_arrival = slow_aggregation  # type: ignore[method-assign]
    recorder = InMemoryRunRecorder()
    run_id = recorder.start_run(experiment_id=1, flwr_run_id=1)
    loop = EventLoop(
        LocalGrid(3),
        spec,
        strategy,
        recorder,
        run_id,
        lambda v, a: {},
        task_to_config(spec.task()),
        poll_interval=0,
    )

    # Execute
    loop.run(serverapp.initial_arrays(spec))

    # Assert: a lower bound only (the sleep is in the timed call; nothing else sleeps there).
    rounds = recorder.rounds(run_id)
    assert [r.server_round for r in rounds] == [1, 2]
    for record in rounds:
        assert record.aggregate_s is not None and record.aggregate_s >= 0.2
        assert record.aggregate_s <= (record.finished_at - record.started_at).total_seconds()
        # Three tasks a round: the model out to each node, an update of the same size back.
        assert record.bytes_out == 3 * record.updates[0].bytes_down > 0
        assert record.bytes_in == record.bytes_out


def test_sql_rounds_keep_aggregation_time_and_traffic(
    session_factory: sessionmaker[Session],
) -> None:
    # Prepare
    with session_factory.begin() as session:
        exp = repository.create_experiment(
            session, name="e", strategy="fedavg", dataset="digits", num_rounds=3, spec={}
        )
        experiment_id = exp.id
    recorder = SqlRunRecorder(session_factory)
    run_id = recorder.start_run(experiment_id=experiment_id, flwr_run_id=7)
    now = utcnow()
    record = RoundRecord(
        server_round=1,
        started_at=now - timedelta(seconds=3),
        finished_at=now,
        metrics={},
        train_metrics={},
        evaluate_metrics={},
        updates=(
            UpdateRecord(node_id=1, status="accepted", bytes_up=100, bytes_down=300),
            UpdateRecord(node_id=2, status="failed", bytes_down=300),
        ),
        aggregate_s=0.125,
    )

    # Execute
    recorder.record_round(run_id, record)

    # Assert: the row, and what the recorder reads back
    with session_factory() as session:
        (row,) = repository.list_rounds(session, experiment_id=experiment_id)
    assert (row.aggregate_s, row.bytes_in, row.bytes_out) == (0.125, 100, 600)
    (back,) = recorder.rounds(run_id)
    assert back.aggregate_s == 0.125 and (back.bytes_in, back.bytes_out) == (100, 600)


def test_a_negative_aggregation_time_is_refused() -> None:
    now = utcnow()
    with pytest.raises(ValueError, match="aggregate_s"):
        RoundRecord(1, now, now, {}, {}, {}, (), aggregate_s=-1.0)


# --- /metrics ----------------------------------------------------------------------------------


@pytest.fixture
def api(database_url: str, tmp_path: Path) -> Iterator[tuple[TestClient, str]]:
    settings = Settings(home=tmp_path, database_url=database_url, metrics_max_experiments=3)
    with TestClient(create_app(settings, follow_runs=False)) as client:
        yield client, database_url


def a_round(server_round: int, *, ago_s: float, node_base: int = 10) -> RoundRecord:
    """A round that took 4 s, of one accepted, one rejected and one failed update; its replies
    arrived ``ago_s`` seconds ago."""
    end = utcnow() - timedelta(seconds=ago_s)
    arrived = {"arrived_at": end}
    return RoundRecord(
        server_round=server_round,
        started_at=end - timedelta(seconds=4),
        finished_at=end,
        metrics={"accuracy": 0.5 + server_round / 10, "loss": 1.0},
        train_metrics={},
        evaluate_metrics={},
        updates=(
            UpdateRecord(
                node_id=node_base, status="accepted", bytes_up=1000, bytes_down=1500, **arrived
            ),
            UpdateRecord(
                node_id=node_base + 1, status="rejected", bytes_up=1000, bytes_down=1500, **arrived
            ),
            # An error reply: it came back, but the node did not train.
            UpdateRecord(node_id=node_base + 2, status="failed", bytes_down=1500, **arrived),
        ),
        aggregate_s=0.5,
    )


def test_experiment_series_move_with_the_rounds_the_serverapp_records(
    api: tuple[TestClient, str],
) -> None:
    # Prepare: an experiment submitted through the API, its run opened as the ServerApp does
    client, url = api
    exp = client.post("/api/v1/experiments", json=BODY).json()
    key = {"experiment_id": str(exp["id"])}
    recorder = SqlRunRecorder.from_url(url)
    run_id = recorder.start_run(experiment_id=exp["id"], flwr_run_id=99)
    before = scrape(client)

    # Execute: one round whose replies are old (nodes no longer count as connected), then one
    # whose replies are fresh
    recorder.record_round(run_id, a_round(1, ago_s=3600, node_base=20))
    after_one = scrape(client)
    recorder.record_round(run_id, a_round(2, ago_s=5))
    after_two = scrape(client)
    recorder.close()

    # Assert
    info = {"name": BODY["name"], "strategy": "fedavg", "status": "running", **key}
    assert of(before, "florist_experiment_info", **info) == 1
    assert of(before, "florist_experiment_rounds_done", **key) == 0
    assert of(before, "florist_experiment_rounds_planned", **key) == 5
    assert of(before, "florist_experiment_updates_total", status="accepted", **key) == 0
    assert of(after_one, "florist_experiment_rounds_done", **key) == 1
    assert of(after_one, "florist_experiment_connected_nodes", **key) == 0
    assert of(after_two, "florist_experiment_rounds_done", **key) == 2
    for status in ("accepted", "rejected", "failed"):
        assert of(after_two, "florist_experiment_updates_total", status=status, **key) == 2
    assert of(after_two, "florist_experiment_round_duration_seconds_count", **key) == 2
    assert of(after_two, "florist_experiment_round_duration_seconds_sum", **key) == 8.0
    assert of(after_two, "florist_experiment_last_round_duration_seconds", **key) == 4.0
    assert of(after_two, "florist_experiment_aggregate_seconds_count", **key) == 2
    assert of(after_two, "florist_experiment_aggregate_seconds_sum", **key) == 1.0
    assert of(after_two, "florist_experiment_received_bytes_total", **key) == 4000
    assert of(after_two, "florist_experiment_sent_bytes_total", **key) == 9000
    # The fresh round's accepted and rejected nodes replied; its failed node did not.
    assert of(after_two, "florist_experiment_connected_nodes", **key) == 2
    assert of(after_two, "florist_experiment_round_metric", metric="accuracy", **key) == 0.7
    assert of(after_two, "florist_experiments", status="running") == 1
    assert of(after_two, "florist_database_up") == 1


def test_metrics_report_unfinished_and_recently_finished_experiments_only(
    api: tuple[TestClient, str],
) -> None:
    # Prepare: five experiments; the oldest finished long ago, the second an hour ago less a
    # minute; at most three are reported (the api fixture's metrics_max_experiments)
    client, url = api
    ids = [client.post("/api/v1/experiments", json=BODY).json()["id"] for _ in range(5)]
    sessions = make_session_factory(make_engine(url))
    with sessions.begin() as session:
        for exp_id, ago in ((ids[0], timedelta(hours=5)), (ids[1], timedelta(minutes=59))):
            repository.update_experiment(
                session, experiment_id=exp_id, status="cancelled", finished_at=utcnow() - ago
            )

    # Execute
    samples = scrape(client)

    # Assert: the three newest; with room for more, the old one would still be left out
    listed = {
        dict(labels)["experiment_id"]
        for (name, labels) in samples
        if name == "florist_experiment_rounds_done"
    }
    assert listed == {str(i) for i in ids[2:]}
    with sessions() as session:
        from florist.server.observability import read_snapshot

        snapshot = read_snapshot(
            session, now=utcnow(), recent_s=3600, max_experiments=50, node_window_s=300
        )
    assert {f.id for f in snapshot.experiments} == set(ids[1:])
    assert snapshot.by_status["cancelled"] == 2 and snapshot.by_status["pending"] == 3


def test_request_metrics_count_each_route_by_its_template(api: tuple[TestClient, str]) -> None:
    client, _ = api
    exp_id = client.post("/api/v1/experiments", json=BODY).json()["id"]
    client.get(f"/api/v1/experiments/{exp_id}")
    client.get(f"/api/v1/experiments/{exp_id}")
    client.get("/api/v1/experiments/123456")

    samples = scrape(client)

    route = "/api/v1/experiments/{experiment_id}"
    assert of(samples, "http_requests_total", handler=route, method="GET", status="2xx") == 2
    assert of(samples, "http_requests_total", handler=route, method="GET", status="4xx") == 1
    assert not any(dict(labels).get("handler") == "/metrics" for _, labels in samples)


def test_a_database_that_cannot_be_read_costs_the_series_not_the_scrape(tmp_path: Path) -> None:
    def broken() -> sessionmaker[Session]:
        return make_session_factory(make_engine(f"sqlite:///{tmp_path}/missing/dir/x.db"))

    families = list(ExperimentCollector(broken, Settings(home=tmp_path)).collect())

    assert [f.name for f in families] == ["florist_database_up"]
    assert families[0].samples[0].value == 0


# --- JSON logs -----------------------------------------------------------------------------------


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_a_json_line_carries_the_experiment_and_run_ids_bound_where_it_was_logged(
    logs_restored: None,
) -> None:
    # Prepare
    stream = io.StringIO()
    configure_logging("json", stream=stream)
    log = logging.getLogger("florist.test")

    # Execute
    log.info("outside")
    with log_context(experiment_id=7, flwr_run_id=2**64 - 1):
        log.warning("inside %s", "the run")
        with log_context(run_id=3):
            try:
                raise RuntimeError("boom")
            except RuntimeError:
                log.exception("failed")
    log.info("after")

    # Assert: every line the same keys; the ids where bound, null elsewhere
    outside, inside, failed, after = json_lines(stream.getvalue())
    assert outside["experiment_id"] is None and after["experiment_id"] is None
    assert (inside["experiment_id"], inside["flwr_run_id"], inside["run_id"]) == (
        7,
        2**64 - 1,
        None,
    )
    assert inside["message"] == "inside the run" and inside["level"] == "WARNING"
    assert (failed["experiment_id"], failed["run_id"]) == (7, 3)
    assert "RuntimeError: boom" in failed["exception"]
    assert (
        {*outside} == {*inside} - set()
        and "time" in outside
        and outside["logger"] == "florist.test"
    )


def test_text_lines_name_the_bound_ids(logs_restored: None) -> None:
    stream = io.StringIO()
    configure_logging("text", stream=stream)
    with log_context(experiment_id=4, run_id=2):
        logging.getLogger("florist.test").info("hello")
    assert stream.getvalue().strip() == "INFO florist.test [experiment=4 run=2]: hello"


def test_the_serverapp_logs_json_lines_that_name_its_experiment(
    migrated_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    logs_restored: None,
) -> None:
    # Prepare: an experiment stored as the API stores it; the process's environment says json
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    monkeypatch.setenv("FLORIST_LOG_FORMAT", "json")
    body = BODY | {"model": {"name": "logreg"}, "training": {"local_epochs": 1}, "rounds": 2}
    spec = ExperimentSpec.model_validate(body)
    sessions = make_session_factory(make_engine(migrated_url))
    with sessions.begin() as session:
        exp = repository.create_experiment(
            session,
            name="json-logs",
            strategy="fedavg",
            dataset="digits",
            num_rounds=2,
            spec=spec.model_dump(mode="json"),
        )
        experiment_id = exp.id
    context = Context(
        run_id=4242,
        node_id=0,
        node_config={},
        state=RecordDict(),
        run_config={"experiment-id": experiment_id, "database-url": migrated_url},
    )

    # Execute: the ServerApp's entry point, as the SuperLink calls it
    serverapp.main(LocalGrid(3), context)

    # Assert: its lines on stderr are JSON, and the recorder's carry all three ids
    lines = json_lines(capsys.readouterr().err)
    rounds = [line for line in lines if line["message"].startswith("round ")]
    assert [line["message"].split(":")[0] for line in rounds] == [
        "round 1 recorded",
        "round 2 recorded",
    ]
    for line in rounds:
        assert line["experiment_id"] == experiment_id and line["flwr_run_id"] == 4242
        assert line["run_id"] is not None
    assert any(
        line["message"].startswith("run ") and "finished completed" in line["message"]
        for line in lines
    )


def test_the_follower_logs_name_the_experiment_they_handle(
    session_factory: sessionmaker[Session], logs_restored: None
) -> None:
    from florist.server.follower import RunFollower

    stream = io.StringIO()
    configure_logging("json", stream=stream)
    with session_factory.begin() as session:
        experiment_id = repository.create_experiment(
            session, name="e", strategy="fedavg", dataset="digits", num_rounds=3, spec={}
        ).id
    fake = FakeControl()
    follower = RunFollower(session_factory, lambda: fake, database_url="sqlite:///x.db")  # type: ignore[arg-type, return-value]

    follower.tick()

    (submitted,) = [
        line for line in json_lines(stream.getvalue()) if "submitted" in line["message"]
    ]
    assert submitted["experiment_id"] == experiment_id
