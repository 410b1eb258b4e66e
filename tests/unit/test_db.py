"""Tests of the database layer: migrations, column types, engine settings and the repository."""

from __future__ import annotations

import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import delete, func, inspect, select, text
from sqlalchemy.exc import StatementError
from sqlalchemy.orm import Session, sessionmaker

from florist.server.db import repository
from florist.server.db.engine import make_engine, normalize_url, upgrade_database
from florist.server.db.models import (
    Base,
    ClientUpdate,
    Event,
    Experiment,
    Node,
    Round,
    Run,
)
from florist.server.db.status import TRANSITIONS, ExperimentStatus, IllegalTransition

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)

# The newest migration: bump it with each new revision.
HEAD = "0010"


def _experiment(session: Session, name: str = "exp") -> Experiment:
    return repository.create_experiment(
        session,
        name=name,
        strategy="fedavg",
        dataset="digits",
        num_rounds=3,
        spec={"strategy": {"name": "fedavg"}, "num_rounds": 3},
    )


def _run(session: Session, experiment: Experiment, flwr_run_id: int = 7) -> Run:
    run = Run(experiment_id=experiment.id, flwr_run_id=flwr_run_id, status="running")
    session.add(run)
    session.flush()
    return run


def _round(session: Session, run: Run, server_round: int, metrics: dict[str, float]) -> Round:
    row = Round(
        run_id=run.id,
        experiment_id=run.experiment_id,
        server_round=server_round,
        started_at=T0 + timedelta(minutes=server_round),
        finished_at=T0 + timedelta(minutes=server_round, seconds=30),
        duration_s=30.0,
        metrics=metrics,
        train_metrics={"loss": 1.0},
        evaluate_metrics={},
        num_updates=1,
        num_rejected=0,
        num_failures=0,
    )
    session.add(row)
    session.flush()
    return row


def _update(
    session: Session, run: Run, server_round: int, node_id: int, status: str = "accepted"
) -> ClientUpdate:
    row = ClientUpdate(
        run_id=run.id,
        experiment_id=run.experiment_id,
        server_round=server_round,
        node_id=node_id,
        status=status,
        metrics={"loss": 0.5},
        bytes_up=10,
        bytes_down=20,
    )
    session.add(row)
    session.flush()
    return row


# --- migrations ---------------------------------------------------------------------------


def test_migration_creates_all_tables(migrated_url: str) -> None:
    # Prepare
    engine = make_engine(migrated_url)

    # Execute
    with engine.connect() as connection:
        tables = set(inspect(connection).get_table_names())
        version = connection.execute(text("SELECT version_num FROM alembic_version")).scalar()
    engine.dispose()

    # Assert
    assert tables == set(Base.metadata.tables) | {"alembic_version"}
    assert version == HEAD


def test_second_upgrade_keeps_schema_and_data(
    migrated_url: str, session_factory: sessionmaker[Session]
) -> None:
    # Prepare
    with session_factory.begin() as session:
        _experiment(session)

    # Execute
    upgrade_database(migrated_url)

    # Assert
    with session_factory() as session:
        assert session.scalar(select(func.count()).select_from(Experiment)) == 1
        versions = session.execute(text("SELECT version_num FROM alembic_version")).all()
    assert [row[0] for row in versions] == [HEAD]


_UPGRADE_WHEN_TOLD = """
import sys, time
from pathlib import Path
from florist.server.db.engine import upgrade_database
url, ready, go = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
ready.touch()
while not go.exists():
    time.sleep(0.001)
upgrade_database(url)
"""


def test_concurrent_upgrades_both_succeed(database_url: str, tmp_path: Path) -> None:
    # Prepare: two processes, imports done, released at the same moment.
    go = tmp_path / "go"
    readies = [tmp_path / f"ready-{i}" for i in range(2)]
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", _UPGRADE_WHEN_TOLD, database_url, str(ready), str(go)],
            stderr=subprocess.PIPE,
            text=True,
        )
        for ready in readies
    ]
    deadline = time.monotonic() + 60
    while not all(ready.exists() for ready in readies) and time.monotonic() < deadline:
        time.sleep(0.01)

    # Execute
    go.touch()
    results = [(process.wait(timeout=120), process.stderr) for process in processes]

    # Assert
    for returncode, stderr in results:
        assert returncode == 0, stderr.read() if stderr else ""
    engine = make_engine(database_url)
    with engine.connect() as connection:
        assert set(inspect(connection).get_table_names()) >= set(Base.metadata.tables)
        versions = connection.execute(text("SELECT version_num FROM alembic_version")).all()
    engine.dispose()
    assert [row[0] for row in versions] == [HEAD]


def test_models_match_migrations(migrated_url: str) -> None:
    # Prepare
    engine = make_engine(migrated_url)

    # Execute
    with engine.connect() as connection:
        context = MigrationContext.configure(
            connection, opts={"compare_type": True, "compare_server_default": True}
        )
        differences = compare_metadata(context, Base.metadata)
    engine.dispose()

    # Assert
    assert differences == []


# --- column types -------------------------------------------------------------------------


@pytest.mark.parametrize("node_id", [0, 1, 2**63 - 1, 2**63, 2**64 - 1])
def test_uint64_round_trips(session_factory: sessionmaker[Session], node_id: int) -> None:
    # Prepare
    with session_factory.begin() as session:
        repository.upsert_node(session, node_id=node_id, node_config={"profile": "phone"})

    # Execute
    with session_factory() as session:
        nodes = repository.list_nodes(session)
        found = session.scalars(select(Node).where(Node.node_id == node_id)).one()
        raw = session.execute(text("SELECT node_id FROM nodes")).scalar_one()

    # Assert
    assert [node.node_id for node in nodes] == [node_id] == [found.node_id]
    assert -(2**63) <= raw < 2**63


@pytest.mark.parametrize("node_id", [-1, 2**64])
def test_uint64_refuses_out_of_range(session_factory: sessionmaker[Session], node_id: int) -> None:
    with session_factory() as session, pytest.raises(StatementError, match="unsigned 64-bit"):
        repository.upsert_node(session, node_id=node_id, node_config={})


def test_timestamps_come_back_aware_utc(session_factory: sessionmaker[Session]) -> None:
    # Prepare: an aware, non-UTC time.
    plus_two = datetime(2026, 3, 1, 14, 30, 15, 123456, tzinfo=timezone(timedelta(hours=2)))
    with session_factory.begin() as session:
        experiment = _experiment(session)
        repository.update_experiment(session, experiment_id=experiment.id, started_at=plus_two)

    # Execute
    with session_factory() as session:
        stored = repository.get_experiment(session, experiment_id=experiment.id)

    # Assert
    assert stored is not None and stored.started_at is not None
    assert stored.created_at.tzinfo is UTC
    assert stored.started_at.tzinfo is UTC
    assert stored.started_at == plus_two


def test_timestamps_written_elsewhere_read_as_the_same_utc_instant(
    session_factory: sessionmaker[Session],
) -> None:
    """Text another writer stored (no fraction of a second; an offset of its own) and, on
    PostgreSQL, a session moved off UTC read as the same aware UTC instants, on the ORM path
    and on the plain-row path of the listings alike."""
    # Prepare: written as SQL text, not through UtcDateTime.
    with session_factory.begin() as session:
        experiment = _experiment(session)
        session.execute(
            text(
                "UPDATE experiments SET started_at = '2026-03-01 12:30:15', "
                "finished_at = '2026-03-01 14:30:15.250000+02:00' WHERE id = :id"
            ),
            {"id": experiment.id},
        )
        postgres = session.get_bind().dialect.name == "postgresql"
    started = datetime(2026, 3, 1, 12, 30, 15, tzinfo=UTC)
    finished = datetime(2026, 3, 1, 12, 30, 15, 250000, tzinfo=UTC)

    # SQLite sessions have no time zone; a PostgreSQL one is read as set up, then moved off UTC.
    for zone in [None, "Asia/Kolkata"] if postgres else [None]:
        # Execute
        with session_factory() as session:
            if zone is not None:
                session.execute(text(f"SET TIME ZONE '{zone}'"))
            stored = session.get(Experiment, experiment.id)
            plain = session.connection().execute(
                select(Experiment.started_at, Experiment.finished_at).where(
                    Experiment.id == experiment.id
                )
            )
            plain_started, plain_finished = plain.one()

        # Assert
        assert stored is not None
        for value, expected in [
            (stored.started_at, started),
            (stored.finished_at, finished),
            (plain_started, started),
            (plain_finished, finished),
        ]:
            assert value == expected, zone
            assert value is not None and value.tzinfo is UTC, zone


def test_naive_timestamps_are_refused(session_factory: sessionmaker[Session]) -> None:
    with session_factory() as session:
        experiment = _experiment(session)
        with pytest.raises(StatementError, match="naive datetime"):
            repository.update_experiment(
                session, experiment_id=experiment.id, started_at=datetime(2026, 1, 1)
            )


def test_non_finite_json_floats_are_stored_as_null(
    session_factory: sessionmaker[Session],
) -> None:
    # Prepare
    with session_factory.begin() as session:
        run = _run(session, _experiment(session))
        _round(session, run, 1, {"loss": float("nan"), "accuracy": 0.5, "max": float("inf")})

    # Execute
    with session_factory() as session:
        (stored,) = repository.list_rounds(session, experiment_id=run.experiment_id)

    # Assert
    assert stored.metrics == {"loss": None, "accuracy": 0.5, "max": None}


# --- engine -------------------------------------------------------------------------------


def test_sqlite_engine_settings(tmp_path: Path) -> None:
    # Prepare: a parent folder that does not exist yet.
    url = f"sqlite:///{tmp_path / 'missing' / 'florist.db'}"

    # Execute
    engine = make_engine(url)
    with engine.connect() as connection:
        pragmas = {
            name: connection.exec_driver_sql(f"PRAGMA {name}").scalar()
            for name in ("journal_mode", "foreign_keys", "busy_timeout")
        }
    engine.dispose()

    # Assert
    assert pragmas == {"journal_mode": "wal", "foreign_keys": 1, "busy_timeout": 10000}


def test_plain_postgresql_urls_use_psycopg3() -> None:
    assert normalize_url("postgresql://u@h/db").drivername == "postgresql+psycopg"
    assert normalize_url("postgresql+psycopg://u@h/db").drivername == "postgresql+psycopg"
    assert normalize_url("sqlite:///x.db").drivername == "sqlite"


# --- repository ---------------------------------------------------------------------------


def test_experiment_create_get_and_page_newest_first(
    session_factory: sessionmaker[Session],
) -> None:
    # Prepare
    with session_factory.begin() as session:
        ids = [_experiment(session, name=f"exp-{i}").id for i in range(5)]

    # Execute
    with session_factory() as session:
        first_page, total = repository.list_experiments(session, offset=0, limit=2)
        second_page, _ = repository.list_experiments(session, offset=2, limit=2)
        fetched = repository.get_experiment(session, experiment_id=ids[0])
        missing = repository.get_experiment(session, experiment_id=10_000)

    # Assert
    assert total == 5
    assert [e.id for e in first_page + second_page] == list(reversed(ids))[:4]
    assert fetched is not None
    assert (fetched.name, fetched.status, fetched.num_rounds) == ("exp-0", "pending", 3)
    assert fetched.spec == {"strategy": {"name": "fedavg"}, "num_rounds": 3}
    assert fetched.flwr_run_id is None
    assert missing is None


def test_update_experiment(session_factory: sessionmaker[Session]) -> None:
    # Prepare
    with session_factory.begin() as session:
        experiment_id = _experiment(session).id

    # Execute
    with session_factory.begin() as session:
        repository.update_experiment(
            session, experiment_id=experiment_id, status="submitted", flwr_run_id=2**64 - 2
        )

    # Assert
    with session_factory() as session:
        stored = repository.get_experiment(session, experiment_id=experiment_id)
        assert stored is not None
        assert (stored.status, stored.flwr_run_id) == ("submitted", 2**64 - 2)
        with pytest.raises(TypeError, match="colour"):
            repository.update_experiment(session, experiment_id=experiment_id, colour="red")
        with pytest.raises(TypeError, match="id"):
            repository.update_experiment(session, experiment_id=experiment_id, id=5)
        with pytest.raises(ValueError, match="unknown status"):
            repository.update_experiment(session, experiment_id=experiment_id, status="done")
        with pytest.raises(repository.ExperimentNotFoundError):
            repository.update_experiment(session, experiment_id=10_000, status="failed")


# A legal way into each status that has a way out, from a new (pending) experiment.
_PATH_TO = {
    ExperimentStatus.PENDING: (),
    ExperimentStatus.SUBMITTED: (ExperimentStatus.SUBMITTED,),
    ExperimentStatus.RUNNING: (ExperimentStatus.SUBMITTED, ExperimentStatus.RUNNING),
    ExperimentStatus.CANCELLING: (ExperimentStatus.SUBMITTED, ExperimentStatus.CANCELLING),
    ExperimentStatus.COMPLETED: (ExperimentStatus.RUNNING, ExperimentStatus.COMPLETED),
    ExperimentStatus.FAILED: (ExperimentStatus.FAILED,),
    ExperimentStatus.CANCELLED: (ExperimentStatus.CANCELLED,),
}


def _experiment_in(session: Session, status: ExperimentStatus) -> Experiment:
    experiment = _experiment(session, name=f"in-{status}")
    for step in _PATH_TO[status]:
        repository.update_experiment(session, experiment_id=experiment.id, status=step)
    assert experiment.status == status
    return experiment


def _row(session: Session, experiment_id: int) -> tuple[object, ...]:
    row = session.execute(
        select(
            Experiment.status,
            Experiment.error,
            Experiment.flwr_run_id,
            Experiment.started_at,
            Experiment.finished_at,
        ).where(Experiment.id == experiment_id)
    ).one()
    return tuple(row)


def test_every_allowed_transition_is_stored(session_factory: sessionmaker[Session]) -> None:
    # Prepare
    pairs = [(current, to) for current, targets in TRANSITIONS.items() for to in targets]
    assert len(pairs) == 17  # the table in docs/architecture.md
    with session_factory.begin() as session:
        ids = {pair: _experiment_in(session, pair[0]).id for pair in pairs}

    # Execute: each change in its own transaction, with a column written alongside.
    for (current, to), experiment_id in ids.items():
        with session_factory.begin() as session:
            repository.update_experiment(
                session, experiment_id=experiment_id, status=to, error=f"{current}->{to}"
            )

    # Assert
    with session_factory() as session:
        for (current, to), experiment_id in ids.items():
            assert _row(session, experiment_id)[:2] == (to, f"{current}->{to}")


def test_an_illegal_transition_is_refused_and_stores_nothing(
    session_factory: sessionmaker[Session],
) -> None:
    # Prepare
    pairs = [
        (current, to)
        for current in ExperimentStatus
        for to in ExperimentStatus
        if to not in TRANSITIONS[current] and to != current
    ]
    with session_factory.begin() as session:
        ids = {pair: _experiment_in(session, pair[0]).id for pair in pairs}
    with session_factory() as session:
        before = {pair: _row(session, experiment_id) for pair, experiment_id in ids.items()}

    # Execute / Assert
    for (current, to), experiment_id in ids.items():
        with session_factory() as session:
            with pytest.raises(IllegalTransition) as refused:
                repository.update_experiment(
                    session,
                    experiment_id=experiment_id,
                    status=to,
                    error="must not be stored",
                    flwr_run_id=99,
                    finished_at=T0,
                )
            assert (refused.value.current, refused.value.to) == (current, to)
            session.commit()
    with session_factory() as session:
        after = {pair: _row(session, experiment_id) for pair, experiment_id in ids.items()}
    assert after == before
    # Every status with a target it may not take was tried (a submitted experiment may take
    # every other status: its run may be lost, i.e. pending again, or end any way).
    assert {pair[0] for pair in pairs} == set(ExperimentStatus) - {ExperimentStatus.SUBMITTED}


def test_terminal_statuses_are_never_left(session_factory: sessionmaker[Session]) -> None:
    with session_factory() as session:
        for ended in (s for s in ExperimentStatus if s.terminal):
            experiment = _experiment_in(session, ended)
            for to in ExperimentStatus:
                if to == ended:
                    continue
                with pytest.raises(IllegalTransition, match="it has ended"):
                    repository.update_experiment(session, experiment_id=experiment.id, status=to)
            assert _row(session, experiment.id)[0] == ended


def test_a_repeated_finish_writes_nothing(session_factory: sessionmaker[Session]) -> None:
    # Prepare
    with session_factory.begin() as session:
        experiment_id = _experiment_in(session, ExperimentStatus.RUNNING).id
        repository.finish_experiment(
            session, experiment_id=experiment_id, status="failed", finished_at=T0, error="first"
        )

    # Execute: the same end again, as a second writer would report it.
    with session_factory.begin() as session:
        repeated = repository.finish_experiment(
            session,
            experiment_id=experiment_id,
            status="failed",
            finished_at=T0 + timedelta(hours=1),
            error="second",
        )

    # Assert: the first finish stands; a different end is refused.
    assert (repeated.status, repeated.error, repeated.finished_at) == ("failed", "first", T0)
    with session_factory() as session:
        status, error, _, _, finished_at = _row(session, experiment_id)
        assert (status, error, finished_at) == ("failed", "first", T0)
        with pytest.raises(IllegalTransition):
            repository.finish_experiment(
                session, experiment_id=experiment_id, status="completed", finished_at=T0
            )
        with pytest.raises(ValueError, match="does not end"):
            repository.finish_experiment(
                session, experiment_id=experiment_id, status="running", finished_at=T0
            )


@pytest.mark.parametrize("cancel", [ExperimentStatus.CANCELLING, ExperimentStatus.CANCELLED])
def test_finish_and_start_keep_a_cancel(
    session_factory: sessionmaker[Session], cancel: ExperimentStatus
) -> None:
    # Prepare
    with session_factory.begin() as session:
        experiment_id = _experiment_in(session, cancel).id

    # Execute / Assert: a start keeps a cancel under way and refuses a finished one;
    # a finish, whatever the run's outcome, ends cancelled.
    with session_factory.begin() as session:
        if cancel == ExperimentStatus.CANCELLING:
            started = repository.start_experiment(
                session, experiment_id=experiment_id, flwr_run_id=3, started_at=T0
            )
            assert (started.status, started.flwr_run_id) == (cancel, 3)
        else:
            with pytest.raises(IllegalTransition):
                repository.start_experiment(
                    session, experiment_id=experiment_id, flwr_run_id=3, started_at=T0
                )
        ended = repository.finish_experiment(
            session, experiment_id=experiment_id, status="completed", finished_at=T0
        )
        assert ended.status == ExperimentStatus.CANCELLED


def test_a_stale_read_cannot_overwrite_a_concurrent_change(
    session_factory: sessionmaker[Session],
) -> None:
    # Prepare: one session holds the experiment as submitted ...
    with session_factory.begin() as session:
        experiment_id = _experiment_in(session, ExperimentStatus.SUBMITTED).id
    stale = session_factory()
    held = repository.get_experiment(stale, experiment_id=experiment_id)
    assert held is not None and held.status == ExperimentStatus.SUBMITTED
    # ... while another commits a cancel.
    with session_factory.begin() as session:
        repository.update_experiment(
            session, experiment_id=experiment_id, status=ExperimentStatus.CANCELLING
        )

    # Execute / Assert: the first session's "running" is judged by the row, not by its read.
    with stale, pytest.raises(IllegalTransition, match="'cancelling' and cannot become"):
        repository.update_experiment(
            stale, experiment_id=experiment_id, status=ExperimentStatus.RUNNING
        )
    with session_factory() as session:
        assert _row(session, experiment_id)[0] == ExperimentStatus.CANCELLING


def test_list_experiments_filters_by_status(session_factory: sessionmaker[Session]) -> None:
    # Prepare
    with session_factory.begin() as session:
        running = _experiment_in(session, ExperimentStatus.RUNNING).id
        _experiment_in(session, ExperimentStatus.PENDING)
        failed = _experiment_in(session, ExperimentStatus.FAILED).id

    # Execute
    with session_factory() as session:
        page, total = repository.list_experiments(
            session, statuses=[ExperimentStatus.RUNNING, ExperimentStatus.FAILED]
        )
        _, none = repository.list_experiments(session, statuses=[])
        active = repository.list_active_experiment_ids(session)

    # Assert
    assert ([e.id for e in page], total, none) == ([failed, running], 2, 0)
    assert len(active) == 2 and failed not in active


def test_the_status_column_refuses_an_unknown_name(session_factory: sessionmaker[Session]) -> None:
    with session_factory() as session:
        experiment = _experiment(session)
        experiment.status = "done"  # type: ignore[assignment]
        with pytest.raises(StatementError, match="unknown status 'done'"):
            session.flush()


def test_rounds_and_updates_are_ordered_and_filtered(
    session_factory: sessionmaker[Session],
) -> None:
    # Prepare: two runs, rows inserted out of order.
    with session_factory.begin() as session:
        experiment = _experiment(session)
        other = _experiment(session, name="other")
        first, second = _run(session, experiment), _run(session, experiment)
        _round(session, second, 1, {})
        _round(session, first, 2, {})
        _round(session, first, 1, {})
        _round(session, _run(session, other), 1, {})
        _update(session, first, 2, node_id=9)
        _update(session, first, 1, node_id=8)
        _update(session, first, 1, node_id=2**64 - 1)

    # Execute
    with session_factory() as session:
        rounds = repository.list_rounds(session, experiment_id=experiment.id)
        updates = repository.list_updates(session, experiment_id=experiment.id)
        round_one = repository.list_updates(session, experiment_id=experiment.id, server_round=1)

    # Assert
    assert [(r.run_id, r.server_round) for r in rounds] == [
        (first.id, 1),
        (first.id, 2),
        (second.id, 1),
    ]
    assert [u.node_id for u in updates] == [8, 2**64 - 1, 9]
    assert [u.node_id for u in round_one] == [8, 2**64 - 1]
    assert (updates[0].bytes_up, updates[0].bytes_down, updates[0].staleness) == (10, 20, 0)


def test_experiment_progress(session_factory: sessionmaker[Session]) -> None:
    # Prepare: a restarted experiment, one without accuracy, one without rounds.
    with session_factory.begin() as session:
        restarted, no_accuracy, fresh = (_experiment(session, name=n) for n in "abc")
        first = _run(session, restarted)
        _round(session, first, 1, {"accuracy": 0.6})
        _round(session, first, 2, {"accuracy": 0.9})
        _round(session, first, 3, {"accuracy": 0.8})
        second = _run(session, restarted)
        _round(session, second, 1, {"accuracy": 0.7, "loss": 0.4})
        # Accepted updates count over every run; rejected ones do not.
        for run, node_id in ((first, 1), (first, 2), (second, 1)):
            _update(session, run, 1, node_id=node_id)
        _update(session, second, 1, node_id=2, status="rejected")
        _round(session, _run(session, no_accuracy), 4, {"loss": 0.2})
        ids = [restarted.id, no_accuracy.id, fresh.id]

    # Execute
    with session_factory() as session:
        progress = repository.experiment_progress(session, experiment_ids=ids)
        empty = repository.experiment_progress(session, experiment_ids=[])

    # Assert: these rounds have no val-accuracy, so the last round (of the latest run) stands in
    # for the best one, not the round with the highest test accuracy (0.9).
    assert progress == {
        restarted.id: repository.Progress(
            1, 0.7, {"accuracy": 0.7, "loss": 0.4}, 3, best_round=1, best_by="last-round"
        ),
        no_accuracy.id: repository.Progress(4, None, {"loss": 0.2}),
        fresh.id: repository.Progress(0, None, {}),
    }
    assert empty == {}


def test_experiment_progress_reports_test_accuracy_of_the_best_validation_round(
    session_factory: sessionmaker[Session],
) -> None:
    # Prepare: the highest test accuracy (0.95) is not in the round with the best validation.
    with session_factory.begin() as session:
        experiment = _experiment(session)
        run = _run(session, experiment)
        _round(session, run, 1, {"accuracy": 0.9, "val-accuracy": 0.7})
        _round(session, run, 2, {"accuracy": 0.8, "val-accuracy": 0.85})
        _round(session, run, 3, {"accuracy": 0.95, "val-accuracy": 0.8})
        # Stored as null: never the best.
        _round(session, run, 4, {"accuracy": 0.99, "val-accuracy": float("nan")})

    # Execute
    with session_factory() as session:
        progress = repository.experiment_progress(session, experiment_ids=[experiment.id])

    # Assert
    got = progress[experiment.id]
    assert (got.best_round, got.best_by) == (2, "validation")
    assert got.best_accuracy == 0.8
    assert got.best_val_accuracy == 0.85
    assert got.current_round == 4


def test_upsert_node_refreshes_config_and_keeps_first_seen(
    session_factory: sessionmaker[Session],
) -> None:
    # Prepare
    with session_factory.begin() as session:
        created = repository.upsert_node(session, node_id=42, node_config={"profile": "phone"})
        repository.upsert_node(session, node_id=7, node_config={})

    # Execute
    with session_factory.begin() as session:
        updated = repository.upsert_node(session, node_id=42, node_config={"profile": "laptop"})

    # Assert
    with session_factory() as session:
        nodes = repository.list_nodes(session)
    assert [n.node_id for n in nodes] == [42, 7]
    assert nodes[0].node_config == updated.node_config == {"profile": "laptop"}
    assert nodes[0].first_seen == created.first_seen
    assert nodes[0].last_seen >= created.last_seen


def test_touch_nodes_registers_unknown_nodes(session_factory: sessionmaker[Session]) -> None:
    # Prepare
    with session_factory.begin() as session:
        repository.upsert_node(session, node_id=1, node_config={"profile": "phone"})

    # Execute
    with session_factory.begin() as session:
        repository.touch_nodes(session, node_ids=[3, 1, 3], seen_at=T0)

    # Assert
    with session_factory() as session:
        nodes = {n.node_id: n for n in repository.list_nodes(session)}
    assert set(nodes) == {1, 3}
    assert nodes[1].node_config == {"profile": "phone"}
    assert nodes[1].last_seen == nodes[3].last_seen == nodes[3].first_seen == T0


def test_events_are_listed_oldest_first(session_factory: sessionmaker[Session]) -> None:
    # Prepare
    with session_factory.begin() as session:
        experiment = _experiment(session)
        run = _run(session, experiment)
        repository.add_event(session, kind="submitted", message="sent", experiment_id=experiment.id)
        repository.add_event(
            session,
            kind="round",
            message="round 1",
            experiment_id=experiment.id,
            run_id=run.id,
            data={"server_round": 1},
        )
        repository.add_event(session, kind="system", message="not this experiment's")

    # Execute
    with session_factory() as session:
        events = repository.list_events(session, experiment_id=experiment.id)

    # Assert
    assert [(e.kind, e.run_id, e.data) for e in events] == [
        ("submitted", None, None),
        ("round", run.id, {"server_round": 1}),
    ]
    assert all(e.created_at.tzinfo is UTC for e in events)


@pytest.mark.parametrize("how", ["orm", "sql"])
def test_deleting_an_experiment_cascades(session_factory: sessionmaker[Session], how: str) -> None:
    # Prepare
    with session_factory.begin() as session:
        doomed, kept = _experiment(session, name="doomed"), _experiment(session, name="kept")
        for experiment in (doomed, kept):
            run = _run(session, experiment)
            _round(session, run, 1, {})
            _update(session, run, 1, node_id=5)
            repository.add_event(session, kind="k", message="m", experiment_id=experiment.id)

    # Execute
    with session_factory.begin() as session:
        if how == "orm":
            target = repository.get_experiment(session, experiment_id=doomed.id)
            assert target is not None
            session.delete(target)
        else:
            session.execute(delete(Experiment).where(Experiment.id == doomed.id))

    # Assert
    with session_factory() as session:
        for model in (Run, Round, ClientUpdate, Event):
            owners = session.scalars(select(model.experiment_id)).all()
            assert owners == [kept.id], model.__tablename__


def test_0002_keeps_rounds_recorded_under_0001(database_url: str) -> None:
    """A database holding a synchronous run from before the timeline columns upgrades intact."""
    from alembic import command
    from alembic.config import Config

    from florist.server.db.engine import _MIGRATIONS_DIR, normalize_url

    # Prepare: the schema as revision 0001 left it, with one round in it.
    config = Config()
    config.set_main_option("script_location", str(_MIGRATIONS_DIR))
    rendered = normalize_url(database_url).render_as_string(hide_password=False)
    config.set_main_option("sqlalchemy.url", rendered.replace("%", "%%"))
    command.upgrade(config, "0001")
    engine = make_engine(database_url)
    with engine.begin() as c:
        c.execute(
            text(
                "INSERT INTO experiments (id, name, status, strategy, dataset, num_rounds, spec, "
                "created_at) VALUES (1, 'old', 'completed', 'fedavg', 'digits', 1, '{}', "
                "CURRENT_TIMESTAMP)"
            )
        )
        c.execute(
            text(
                "INSERT INTO runs (id, experiment_id, flwr_run_id, status, started_at) "
                "VALUES (1, 1, 5, 'completed', CURRENT_TIMESTAMP)"
            )
        )
        c.execute(
            text(
                "INSERT INTO client_updates (run_id, experiment_id, server_round, node_id, status, "
                "metrics, bytes_up, bytes_down, staleness, created_at) "
                "VALUES (1, 1, 1, 7, 'accepted', '{}', 10, 10, 0, CURRENT_TIMESTAMP)"
            )
        )

    # Execute
    upgrade_database(database_url)

    # Assert
    with engine.connect() as c:
        row = c.execute(
            text("SELECT node_id, staleness, model_version, virtual_duration_s FROM client_updates")
        ).one()
    engine.dispose()
    assert tuple(row) == (7, 0, None, None)


def test_0003_makes_earlier_experiments_florists_own(database_url: str) -> None:
    """Experiments from before external ones existed upgrade as source 'florist', and may keep
    sharing a run id; two external experiments of one run are refused by the database."""
    from alembic import command
    from alembic.config import Config
    from sqlalchemy.exc import IntegrityError

    from florist.server.db.engine import _MIGRATIONS_DIR, normalize_url

    # Prepare: two experiments under revision 0002 that name the same Flower run.
    config = Config()
    config.set_main_option("script_location", str(_MIGRATIONS_DIR))
    rendered = normalize_url(database_url).render_as_string(hide_password=False)
    config.set_main_option("sqlalchemy.url", rendered.replace("%", "%%"))
    command.upgrade(config, "0002")
    engine = make_engine(database_url)
    insert = text(
        "INSERT INTO experiments (name, status, strategy, dataset, num_rounds, spec, "
        "flwr_run_id, created_at) VALUES ('old', 'completed', 'fedavg', 'digits', 1, '{}', 5, "
        "CURRENT_TIMESTAMP)"
    )
    with engine.begin() as c:
        c.execute(insert)
        c.execute(insert)

    # Execute
    upgrade_database(database_url)

    # Assert
    with engine.connect() as c:
        sources = c.execute(text("SELECT source FROM experiments")).scalars().all()
    assert sources == ["florist", "florist"]
    external = text(
        "INSERT INTO experiments (name, status, strategy, dataset, num_rounds, spec, "
        "flwr_run_id, source, created_at) VALUES ('ext', 'running', '', '', 0, '{}', 5, "
        "'external', CURRENT_TIMESTAMP)"
    )
    with engine.begin() as c:
        c.execute(external)
    with pytest.raises(IntegrityError), engine.begin() as c:
        c.execute(external)
    engine.dispose()


def test_0003_downgrades(migrated_url: str) -> None:
    from alembic import command
    from alembic.config import Config

    from florist.server.db.engine import _MIGRATIONS_DIR, normalize_url

    config = Config()
    config.set_main_option("script_location", str(_MIGRATIONS_DIR))
    rendered = normalize_url(migrated_url).render_as_string(hide_password=False)
    config.set_main_option("sqlalchemy.url", rendered.replace("%", "%%"))
    command.downgrade(config, "0002")
    engine = make_engine(migrated_url)
    with engine.connect() as c:
        columns = {col["name"] for col in inspect(c).get_columns("experiments")}
    engine.dispose()
    assert "source" not in columns
