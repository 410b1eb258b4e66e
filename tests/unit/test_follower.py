"""The run follower's life cycle against a fake Control API (the e2e tests use the real one)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker

from florist.server.control import RunState, SuperLinkUnavailable
from florist.server.db import repository as repo
from florist.server.db.models import utcnow
from florist.server.db.status import ExperimentStatus
from florist.server.follower import RunFollower


class FakeControl:
    """Plays the SuperLink: a run's state is whatever the test sets."""

    def __init__(self) -> None:
        self.up = True
        self.states: dict[int, RunState] = {}
        self.started: list[dict[str, Any]] = []
        self.stopped: list[int] = []

    def _check(self) -> None:
        if not self.up:
            raise SuperLinkUnavailable("SuperLink at 127.0.0.1:1: connection refused")

    def start_run(self, run_config: dict[str, Any]) -> int:
        self._check()
        self.started.append(run_config)
        run_id = 2**64 - len(self.started)  # Flower's ids use the whole uint64 range
        self.states[run_id] = RunState(run_id, "pending", "", "")
        return run_id

    def run_state(self, run_id: int) -> RunState | None:
        self._check()
        return self.states.get(run_id)

    def stop_run(self, run_id: int) -> bool:
        self._check()
        self.stopped.append(run_id)
        self.states[run_id] = RunState(run_id, "finished", "stopped", "")
        return True

    def finish(self, run_id: int, sub_status: str, details: str = "") -> None:
        self.states[run_id] = RunState(run_id, "finished", sub_status, details)

    def close(self) -> None:
        pass


@pytest.fixture
def fake() -> FakeControl:
    return FakeControl()


def follower(sessions: sessionmaker[Session], fake: FakeControl, **kw: Any) -> RunFollower:
    return RunFollower(sessions, lambda: fake, database_url="sqlite:///x.db", **kw)  # type: ignore[arg-type, return-value]


def new_experiment(sessions: sessionmaker[Session]) -> int:
    with sessions() as s:
        exp = repo.create_experiment(
            s, name="e", strategy="fedavg", dataset="digits", num_rounds=3, spec={}
        )
        s.commit()
        return exp.id


def status(sessions: sessionmaker[Session], experiment_id: int) -> tuple[str, str | None]:
    with sessions() as s:
        exp = repo.get_experiment(s, experiment_id=experiment_id)
        assert exp is not None
        return exp.status, exp.error


def test_submit_run_complete(session_factory: sessionmaker[Session], fake: FakeControl) -> None:
    exp_id = new_experiment(session_factory)
    f = follower(session_factory, fake)
    f.tick()
    assert status(session_factory, exp_id) == ("submitted", None)
    assert fake.started == [{"experiment-id": exp_id, "database-url": "sqlite:///x.db"}]
    run_id = 2**64 - 1
    with session_factory() as s:
        assert repo.get_experiment(s, experiment_id=exp_id).flwr_run_id == run_id  # type: ignore[union-attr]
    fake.states[run_id] = RunState(run_id, "running", "", "")
    f.tick()
    assert status(session_factory, exp_id)[0] == "running"
    fake.finish(run_id, "completed")
    f.tick()
    assert status(session_factory, exp_id) == ("completed", None)
    f.tick()  # terminal experiments are left alone
    assert len(fake.started) == 1


def test_unreachable_superlink_waits_then_fails(
    session_factory: sessionmaker[Session], fake: FakeControl
) -> None:
    exp_id = new_experiment(session_factory)
    fake.up = False
    f = follower(session_factory, fake)
    f.tick()
    f.tick()
    assert status(session_factory, exp_id) == ("pending", None)
    with session_factory() as s:
        events = [e.kind for e in repo.list_events(s, experiment_id=exp_id)]
    assert events == ["superlink-unavailable"]  # said once, not per tick
    follower(session_factory, fake, submit_timeout=timedelta(0)).tick()
    state, error = status(session_factory, exp_id)
    assert state == "failed" and error is not None and "connection refused" in error


def test_flower_failure_keeps_the_serverapps_error(
    session_factory: sessionmaker[Session], fake: FakeControl
) -> None:
    a, b = new_experiment(session_factory), new_experiment(session_factory)
    f = follower(session_factory, fake)
    f.tick()
    with session_factory() as s:
        repo.update_experiment(s, experiment_id=a, error="ValueError: diverged")
        s.commit()
    fake.finish(2**64 - 1, "failed", "ServerApp exited with code 1")
    fake.finish(2**64 - 2, "failed", "ServerApp exited with code 1")
    f.tick()
    assert status(session_factory, a) == ("failed", "ValueError: diverged")
    assert status(session_factory, b) == ("failed", "ServerApp exited with code 1")


def test_cancel_sends_stop_and_ends_cancelled(
    session_factory: sessionmaker[Session], fake: FakeControl
) -> None:
    exp_id = new_experiment(session_factory)
    f = follower(session_factory, fake)
    f.tick()
    with session_factory() as s:
        repo.update_experiment(s, experiment_id=exp_id, status="cancelling")
        s.commit()
    f.tick()
    assert fake.stopped == [2**64 - 1]
    assert status(session_factory, exp_id)[0] == "cancelled"


def test_forgotten_run_fails_clearly(
    session_factory: sessionmaker[Session], fake: FakeControl
) -> None:
    exp_id = new_experiment(session_factory)
    f = follower(session_factory, fake)
    f.tick()
    fake.states.clear()  # an in-memory SuperLink restarted
    f.tick()
    state, error = status(session_factory, exp_id)
    assert state == "failed" and "no longer knows" in (error or "")


class RacingControl(FakeControl):
    """A SuperLink during whose StartRun someone else changes the experiment."""

    def __init__(self, meanwhile: Any) -> None:
        super().__init__()
        self.meanwhile = meanwhile

    def start_run(self, run_config: dict[str, Any]) -> int:
        run_id = super().start_run(run_config)
        self.meanwhile(run_config["experiment-id"], run_id)
        return run_id


def test_a_cancel_during_start_run_stops_the_new_run(
    session_factory: sessionmaker[Session],
) -> None:
    # Prepare: the user cancels the pending experiment while StartRun is on its way.
    def cancel(experiment_id: int, run_id: int) -> None:
        with session_factory.begin() as s:
            repo.update_experiment(
                s, experiment_id=experiment_id, status=ExperimentStatus.CANCELLED
            )

    fake = RacingControl(cancel)
    exp_id = new_experiment(session_factory)

    # Execute
    follower(session_factory, fake).tick()

    # Assert: the cancel stands, and the run nobody wants any more is stopped.
    assert status(session_factory, exp_id) == ("cancelled", None)
    assert fake.stopped == [2**64 - 1]


def test_a_serverapp_faster_than_the_follower_keeps_running(
    session_factory: sessionmaker[Session],
) -> None:
    # Prepare: the ServerApp starts and marks the experiment running before StartRun returns.
    def start(experiment_id: int, run_id: int) -> None:
        with session_factory.begin() as s:
            repo.start_experiment(
                s, experiment_id=experiment_id, flwr_run_id=run_id, started_at=utcnow()
            )

    fake = RacingControl(start)
    exp_id = new_experiment(session_factory)

    # Execute
    follower(session_factory, fake).tick()

    # Assert: not set back to submitted, and the run goes on.
    assert status(session_factory, exp_id) == ("running", None)
    assert fake.stopped == []
