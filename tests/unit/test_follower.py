"""The run follower's life cycle against a fake Control API (the e2e tests use the real one)."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker

from florist.server.control import RunState, SuperLinkUnavailable, app_fab_id
from florist.server.db import repository as repo
from florist.server.db.models import Experiment, utcnow
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
        # As the SuperLink does, ListRuns reports the run config the run was started with.
        self.states[run_id] = RunState(
            run_id, "pending", "", "", fab_id=app_fab_id(), override_config=dict(run_config)
        )
        return run_id

    def list_runs(self) -> list[RunState]:
        self._check()
        return list(self.states.values())

    def run_state(self, run_id: int) -> RunState | None:
        self._check()
        return self.states.get(run_id)

    def stop_run(self, run_id: int) -> bool:
        self._check()
        self.stopped.append(run_id)
        self.states[run_id] = replace(self.states[run_id], status="finished", sub_status="stopped")
        return True

    def finish(self, run_id: int, sub_status: str, details: str = "") -> None:
        self.states[run_id] = replace(
            self.states[run_id], status="finished", sub_status=sub_status, details=details
        )

    def set(self, run_id: int, status: str) -> None:
        self.states[run_id] = replace(self.states[run_id], status=status)

    def flwr_run(self, run_id: int, status: str = "pending", **fields: Any) -> None:
        """A run somebody started with `flwr run`, not through Florist."""
        fields = {"sub_status": "", "details": "", "fab_id": "team/app", **fields}
        self.states[run_id] = RunState(run_id, status, **fields)

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
    (config,) = fake.started
    assert config["experiment-id"] == exp_id and config["database-url"] == "sqlite:///x.db"
    run_id = 2**64 - 1
    with session_factory() as s:
        assert repo.get_experiment(s, experiment_id=exp_id).flwr_run_id == run_id  # type: ignore[union-attr]
    fake.set(run_id, "running")
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
    late = follower(session_factory, fake, submit_timeout=timedelta(0), claim_timeout=timedelta(0))
    late.tick()
    state, error = status(session_factory, exp_id)
    assert state == "failed" and error is not None and "connection refused" in error


def test_flower_failure_keeps_the_serverapps_error(
    session_factory: sessionmaker[Session], fake: FakeControl
) -> None:
    a, b = new_experiment(session_factory), new_experiment(session_factory)
    f = follower(session_factory, fake, auto_resume=0)
    f.tick()
    with session_factory() as s:
        repo.update_experiment(s, experiment_id=a, error="ValueError: diverged")
        s.commit()
    fake.finish(2**64 - 1, "failed", "ServerApp exited with code 1")
    fake.finish(2**64 - 2, "failed", "ServerApp exited with code 1")
    f.tick()
    assert status(session_factory, a) == ("failed", "ValueError: diverged")
    state, error = status(session_factory, b)
    assert state == "failed" and "lost: ServerApp exited with code 1" in (error or "")


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
    f = follower(session_factory, fake, auto_resume=0)
    f.tick()
    fake.states.clear()  # an in-memory SuperLink restarted
    f.tick()
    state, error = status(session_factory, exp_id)
    assert state == "failed" and "no longer knows" in (error or "")
    assert "auto-resume is off" in (error or "")


def resumes(sessions: sessionmaker[Session], experiment_id: int) -> int:
    with sessions() as s:
        exp = repo.get_experiment(s, experiment_id=experiment_id)
        assert exp is not None
        return exp.resumes


def test_a_lost_run_is_submitted_again_until_the_limit_then_fails(
    session_factory: sessionmaker[Session], fake: FakeControl
) -> None:
    # Prepare: a running experiment whose ServerApp dies (Flower fails the run, nothing of
    # Florist's recorded an end), three times over, with auto-resume 2.
    exp_id = new_experiment(session_factory)
    f = follower(session_factory, fake, auto_resume=2)
    f.tick()
    for attempt in (1, 2):
        run_id = 2**64 - attempt
        fake.set(run_id, "running")
        f.tick()
        assert status(session_factory, exp_id) == ("running", None)

        # Execute: the run is lost.
        fake.finish(run_id, "failed", "No heartbeat received from the run.")
        f.tick()  # pending again
        assert status(session_factory, exp_id) == ("pending", None)
        f.tick()  # submitted again

        # Assert: a new run carries the experiment, counted as a resume, with an event.
        assert len(fake.started) == attempt + 1
        assert fake.started[-1]["experiment-id"] == exp_id
        assert status(session_factory, exp_id) == ("submitted", None)
        assert resumes(session_factory, exp_id) == attempt
    with session_factory() as s:
        kinds = [e.kind for e in repo.list_events(s, experiment_id=exp_id)]
    assert kinds.count("run-lost") == 2

    # The third loss is past the limit: failed, naming the run and how to resume by hand.
    fake.finish(2**64 - 3, "failed", "No heartbeat received from the run.")
    f.tick()
    state, error = status(session_factory, exp_id)
    assert state == "failed" and "resumed 2 times already" in (error or "")
    assert f"/experiments/{exp_id}/resume" in (error or "")
    assert len(fake.started) == 3


def test_a_failure_the_serverapp_recorded_is_not_resumed(
    session_factory: sessionmaker[Session], fake: FakeControl
) -> None:
    exp_id = new_experiment(session_factory)
    f = follower(session_factory, fake, auto_resume=3)
    f.tick()
    with session_factory() as s:
        repo.update_experiment(s, experiment_id=exp_id, error="AggregationError: no node")
        s.commit()
    fake.finish(2**64 - 1, "failed", "ServerApp exited with code 1")
    f.tick()
    assert status(session_factory, exp_id) == ("failed", "AggregationError: no node")
    assert len(fake.started) == 1


def test_a_lost_external_run_fails_and_is_not_started_again(
    session_factory: sessionmaker[Session], fake: FakeControl
) -> None:
    fake.flwr_run(7, "running")
    f = follower(session_factory, fake, auto_resume=3)
    f.tick()
    fake.finish(7, "failed", "No heartbeat received from the run.")
    f.tick()
    with session_factory() as s:
        (exp,), _ = repo.list_experiments(s)
        assert exp.status == "failed" and "was lost" in (exp.error or "")
    assert fake.started == []


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


# --- runs Florist did not start ---------------------------------------------------------------


def experiments(sessions: sessionmaker[Session]) -> list[Experiment]:
    with sessions() as s:
        return repo.list_experiments(s)[0]


def test_a_flwr_run_becomes_an_external_experiment_and_is_followed(
    session_factory: sessionmaker[Session], fake: FakeControl
) -> None:
    # Prepare: somebody ran their own app with `flwr run`.
    t0 = utcnow() - timedelta(minutes=1)
    fake.flwr_run(7, fab_version="1.0.0", override_config={"lr": 0.1}, pending_at=t0)
    f = follower(session_factory, fake)

    # Execute / Assert: found as it waits, then followed like any other run.
    f.tick()
    (exp,) = experiments(session_factory)
    assert (exp.source, exp.status, exp.flwr_run_id, exp.name) == (
        "external",
        "submitted",
        7,
        "team/app",
    )
    assert exp.created_at == t0 and exp.strategy == "" and exp.num_rounds == 0
    assert exp.spec["run_config"] == {"lr": 0.1} and exp.spec["app_version"] == "1.0.0"
    fake.set(7, "running")
    f.tick()
    assert status(session_factory, exp.id) == ("running", None)
    fake.finish(7, "completed")
    f.tick()
    f.tick()
    assert status(session_factory, exp.id) == ("completed", None)
    assert len(experiments(session_factory)) == 1 and fake.started == []


@pytest.mark.parametrize(
    ("sub_status", "details", "expected"),
    [
        ("completed", "", ("completed", None)),
        ("stopped", "", ("cancelled", None)),
        (
            "failed",
            "ServerApp failed with exception: boom",
            ("failed", "ServerApp failed with exception: boom"),
        ),
    ],
)
def test_a_run_that_ended_before_the_api_looked_is_listed_as_it_ended(
    session_factory: sessionmaker[Session],
    fake: FakeControl,
    sub_status: str,
    details: str,
    expected: tuple[str, str | None],
) -> None:
    # Prepare
    fake.flwr_run(9, status="finished", sub_status=sub_status, details=details)

    # Execute
    follower(session_factory, fake).tick()

    # Assert
    (exp,) = experiments(session_factory)
    assert (exp.status, exp.error) == expected and exp.source == "external"


def test_runs_of_florists_own_app_and_runs_with_a_row_are_not_external(
    session_factory: sessionmaker[Session], fake: FakeControl
) -> None:
    # Prepare: Florist's app run by hand (`flwr run server/flwr_app`) before its ServerApp
    # linked it, and a `flwr run` that a recording ServerApp has already given a row.
    fake.states[11] = RunState(11, "pending", "", "", fab_id=app_fab_id())
    fake.flwr_run(12, status="running")
    recorded, _ = repo.ensure_external_experiment(
        session_factory,
        flwr_run_id=12,
        name="team/app",
        strategy="FedAvg",
        num_rounds=3,
        spec={"app": "team/app"},
        status=ExperimentStatus.RUNNING,
    )

    # Execute
    f = follower(session_factory, fake)
    f.tick()
    f.tick()

    # Assert: only the recorded one, unchanged.
    (exp,) = experiments(session_factory)
    assert (exp.id, exp.strategy, exp.status) == (recorded.id, "FedAvg", "running")


def test_discovery_trouble_does_not_stall_florists_experiments(
    session_factory: sessionmaker[Session], fake: FakeControl
) -> None:
    # Prepare: a SuperLink whose ListRuns of every run fails.
    def broken() -> list[RunState]:
        raise RuntimeError("ListRuns failed")

    fake.list_runs = broken  # type: ignore[method-assign]
    exp_id = new_experiment(session_factory)

    # Execute
    follower(session_factory, fake).tick()

    # Assert
    assert status(session_factory, exp_id) == ("submitted", None)


def test_two_writers_of_one_run_meet_on_one_experiment(
    session_factory: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: another writer created the run's row after this one looked and found none.
    columns: dict[str, Any] = {
        "flwr_run_id": 2**64 - 3,
        "name": "team/app",
        "strategy": "",
        "num_rounds": 0,
        "spec": {},
    }
    winner, created = repo.ensure_external_experiment(session_factory, **columns)
    looks = []
    real_lookup = repo._experiment_of_run

    def stale_first_look(session: Session, flwr_run_id: int) -> Experiment | None:
        looks.append(flwr_run_id)
        return None if len(looks) == 1 else real_lookup(session, flwr_run_id)

    monkeypatch.setattr(repo, "_experiment_of_run", stale_first_look)

    # Execute: the insert hits the unique index; the retry reads the winner's row.
    loser, loser_created = repo.ensure_external_experiment(session_factory, **columns)

    # Assert
    assert created and not loser_created and loser.id == winner.id and len(looks) == 2
    assert len(experiments(session_factory)) == 1


def _events(sessions: sessionmaker[Session], experiment_id: int) -> list[str]:
    with sessions() as s:
        return [e.kind for e in repo.list_events(s, experiment_id=experiment_id)]


def _run_id(sessions: sessionmaker[Session], experiment_id: int) -> int | None:
    with sessions() as s:
        exp = repo.get_experiment(s, experiment_id=experiment_id)
        assert exp is not None
        return exp.flwr_run_id


def test_a_crash_between_start_run_and_the_commit_starts_one_run_not_two(
    session_factory: sessionmaker[Session], fake: FakeControl, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: the first follower dies right after StartRun, before recording the run.
    exp_id = new_experiment(session_factory)

    def crash(*args: Any, **kwargs: Any) -> bool:
        raise RuntimeError("process killed")

    monkeypatch.setattr("florist.server.follower.record_submission", crash)
    follower(session_factory, fake).tick()
    monkeypatch.undo()
    assert len(fake.started) == 1 and status(session_factory, exp_id)[0] == "pending"

    # Execute: another follower (a restarted API) once the claim is stale.
    other = follower(session_factory, fake, claim_timeout=timedelta(0))
    other.tick()
    other.tick()

    # Assert: the run that was started is the experiment's; none other was started.
    assert len(fake.started) == 1
    assert status(session_factory, exp_id)[0] == "submitted"
    assert _run_id(session_factory, exp_id) == 2**64 - 1
    assert "submission-reconciled" in _events(session_factory, exp_id)
    assert fake.stopped == []


def test_a_start_whose_outcome_is_unknown_is_retried_only_once_no_run_is_found(
    session_factory: sessionmaker[Session], fake: FakeControl, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: StartRun fails in transit and the SuperLink never made the run.
    exp_id = new_experiment(session_factory)
    fake.up = False
    f = follower(session_factory, fake, claim_timeout=timedelta(hours=1))
    f.tick()
    fake.up = True
    f.tick()  # the claim is fresh: no second StartRun yet
    assert fake.started == []

    # Execute: once the claim is stale, the SuperLink has no run with its token.
    late = follower(session_factory, fake, claim_timeout=timedelta(0))
    late.tick()
    late.tick()

    # Assert: released, submitted once.
    assert len(fake.started) == 1
    assert status(session_factory, exp_id)[0] == "submitted"


def test_a_claimed_experiment_is_not_submitted_by_another_follower(
    session_factory: sessionmaker[Session], fake: FakeControl
) -> None:
    exp_id = new_experiment(session_factory)
    with session_factory() as s, s.begin():
        assert repo.claim_submission(s, experiment_id=exp_id, token="a" * 32, now=utcnow())
    with session_factory() as s, s.begin():  # one UPDATE decides: a second claim loses
        assert not repo.claim_submission(s, experiment_id=exp_id, token="b" * 32, now=utcnow())
    follower(session_factory, fake).tick()
    assert fake.started == []


def test_a_slow_start_that_lost_its_claim_stops_its_own_run(
    session_factory: sessionmaker[Session], fake: FakeControl
) -> None:
    # Prepare: follower A claimed and is still inside StartRun (no run yet) when B, seeing a
    # stale claim, finds no run, releases it and submits the experiment itself.
    exp_id = new_experiment(session_factory)
    with session_factory() as s, s.begin():
        repo.claim_submission(s, experiment_id=exp_id, token="a" * 32, now=utcnow())
    b = follower(session_factory, fake, claim_timeout=timedelta(0))
    b.tick()
    b.tick()
    tracked = _run_id(session_factory, exp_id)
    assert tracked is not None

    # Execute: A's StartRun returns at last.
    late_run = fake.start_run({"experiment-id": exp_id, "florist-submission": "a" * 32})
    follower(session_factory, fake)._record_submission(exp_id, "a" * 32, late_run)

    # Assert: A records nothing and stops its run; the experiment keeps B's.
    assert fake.stopped == [late_run]
    assert _run_id(session_factory, exp_id) == tracked


def test_the_run_config_carries_no_database_password(
    session_factory: sessionmaker[Session], fake: FakeControl
) -> None:
    # Prepare: the API's database needs a password.
    url = "postgresql://florist:s3cret-pw@db.internal:5432/florist"
    exp_id = new_experiment(session_factory)
    f = RunFollower(session_factory, lambda: fake, database_url=url)  # type: ignore[arg-type, return-value]

    # Execute
    f.tick()

    # Assert: the run names the database, user and all, but not the password.
    (config,) = fake.started
    assert config["experiment-id"] == exp_id
    assert config["database-url"] == "postgresql://florist@db.internal:5432/florist"
    assert "s3cret-pw" not in json.dumps(config)
