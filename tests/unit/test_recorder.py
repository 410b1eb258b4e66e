"""One contract for every RunRecorder, run against the in-memory and the SQL implementation."""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import StatementError
from sqlalchemy.orm import Session, sessionmaker

import florist.server.recording as recorder_module
import florist.server.recording.sql as recording_sql
from florist.server.db import repository
from florist.server.db.engine import make_engine, make_session_factory
from florist.server.db.models import ClientUpdate, Round, Run, utcnow
from florist.server.db.status import ExperimentStatus, IllegalTransition
from florist.server.recording import (
    DuplicateRoundError,
    InMemoryExperiment,
    InMemoryRunRecorder,
    ModelCheckpoint,
    RoundRecord,
    RunFinishedError,
    RunRecorder,
    RunSupersededError,
    SqlRunRecorder,
    StoredResume,
    UnknownExperimentError,
    UnknownRunError,
    UpdateRecord,
)

T0 = datetime(2026, 5, 1, 9, 0, tzinfo=UTC)
BIG_FLWR_RUN_ID = 2**64 - 3


def make_round(server_round: int, *, accuracy: float = 0.5) -> RoundRecord:
    start = T0 + timedelta(minutes=server_round)
    return RoundRecord(
        server_round=server_round,
        started_at=start,
        finished_at=start + timedelta(seconds=12.5),
        metrics={"accuracy": accuracy, "loss": 1.0 - accuracy},
        train_metrics={"train_loss": 0.7},
        evaluate_metrics={},
        updates=(
            UpdateRecord(
                node_id=2**64 - 1,
                status="accepted",
                num_examples=120,
                train_time_s=3.5,
                metrics={"train_loss": 0.6},
                bytes_up=1000,
                bytes_down=2000,
            ),
            UpdateRecord(node_id=11, status="rejected", staleness=4, reason="too stale"),
            UpdateRecord(node_id=12, status="failed", reason="timeout"),
        ),
    )


def task_update(node_id: int, status: recorder_module.UpdateStatus, **fields: Any) -> UpdateRecord:
    """An asynchronous task's update, every column set."""
    values: dict[str, Any] = {
        "num_examples": 60,
        "train_time_s": 1.25,
        "metrics": {"train-loss": 0.4, "virtual-duration": 30.0},
        "bytes_up": 512,
        "bytes_down": 1024,
        "staleness": 2,
        "model_version": 3,
        "arrival_version": 5,
        "local_steps": 20,
        "dispatched_at": T0,
        "arrived_at": T0 + timedelta(seconds=4),
        "wall_duration_s": 4.0,
        "virtual_duration_s": 30.0,
    }
    return UpdateRecord(node_id=node_id, status=status, **(values | fields))


LEFT_AT_THE_END = (
    task_update(5, "rejected", reason="run ended before it was aggregated"),
    task_update(
        6,
        "failed",
        reason="run ended before the reply",
        num_examples=None,
        train_time_s=None,
        metrics={},
        bytes_up=0,
        arrival_version=None,
        local_steps=None,
        arrived_at=None,
        virtual_duration_s=None,
    ),
)


@dataclass(frozen=True)
class ExperimentView:
    """The experiment columns the recorder is responsible for."""

    status: str
    flwr_run_id: int | None
    error: str | None
    started_at: datetime | None
    finished_at: datetime | None


class Harness(ABC):
    """A recorder plus the API-side actions and views that the contract needs."""

    recorder: RunRecorder

    @abstractmethod
    def new_experiment(self) -> int:
        """Create a submitted experiment, as the API would; return its id."""

    @abstractmethod
    def set_status(self, experiment_id: int, status: str) -> None:
        """Change the experiment's status, as the API does on a cancel request (an ended
        status with its finished_at, as every writer of one sets it)."""

    @abstractmethod
    def lose_run(self, experiment_id: int, flwr_run_id: int) -> None:
        """Play the follower finding the experiment's run lost: pending again, no run."""

    @abstractmethod
    def experiment(self, experiment_id: int) -> ExperimentView:
        """Read the experiment back."""

    @abstractmethod
    def event_kinds(self, experiment_id: int) -> list[str]:
        """The kinds of the experiment's events, oldest first."""

    @abstractmethod
    def break_node_tracking(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Make the next record_round fail after the round itself was written."""


class InMemoryHarness(Harness):
    def __init__(self) -> None:
        self.recorder: InMemoryRunRecorder = InMemoryRunRecorder()

    def new_experiment(self) -> int:
        experiment_id = len(self.recorder.experiments) + 1
        self.recorder.experiments[experiment_id] = InMemoryExperiment(status="submitted")
        return experiment_id

    def set_status(self, experiment_id: int, status: str) -> None:
        experiment = self.recorder.experiments[experiment_id]
        experiment.status = ExperimentStatus(status)
        if experiment.status.terminal:
            experiment.finished_at = utcnow()

    def lose_run(self, experiment_id: int, flwr_run_id: int) -> None:
        experiment = self.recorder.experiments[experiment_id]
        assert experiment.flwr_run_id == flwr_run_id
        experiment.status, experiment.flwr_run_id = ExperimentStatus.PENDING, None

    def experiment(self, experiment_id: int) -> ExperimentView:
        e = self.recorder.experiments[experiment_id]
        return ExperimentView(e.status, e.flwr_run_id, e.error, e.started_at, e.finished_at)

    def event_kinds(self, experiment_id: int) -> list[str]:
        return [e.kind for e in self.recorder.events if e.experiment_id == experiment_id]

    def break_node_tracking(self, monkeypatch: pytest.MonkeyPatch) -> None:
        def fail(*args: object) -> None:
            raise RuntimeError("injected failure")

        monkeypatch.setattr(self.recorder, "_touch_nodes", fail)


class SqlHarness(Harness):
    def __init__(self, session_factory: sessionmaker[Session]) -> None:
        self.session_factory = session_factory
        self.recorder: SqlRunRecorder = SqlRunRecorder(session_factory)

    def new_experiment(self) -> int:
        with self.session_factory.begin() as session:
            experiment = repository.create_experiment(
                session, name="e", strategy="fedavg", dataset="digits", num_rounds=3, spec={}
            )
            repository.update_experiment(session, experiment_id=experiment.id, status="submitted")
            return experiment.id

    def set_status(self, experiment_id: int, status: str) -> None:
        ended = {"finished_at": utcnow()} if ExperimentStatus(status).terminal else {}
        with self.session_factory.begin() as session:
            repository.update_experiment(
                session, experiment_id=experiment_id, status=status, **ended
            )

    def lose_run(self, experiment_id: int, flwr_run_id: int) -> None:
        with self.session_factory.begin() as session:
            assert repository.requeue_lost_run(
                session, experiment_id=experiment_id, flwr_run_id=flwr_run_id
            )

    def experiment(self, experiment_id: int) -> ExperimentView:
        with self.session_factory() as session:
            e = repository.get_experiment(session, experiment_id=experiment_id)
            assert e is not None
            return ExperimentView(e.status, e.flwr_run_id, e.error, e.started_at, e.finished_at)

    def event_kinds(self, experiment_id: int) -> list[str]:
        with self.session_factory() as session:
            return [e.kind for e in repository.list_events(session, experiment_id=experiment_id)]

    def break_node_tracking(self, monkeypatch: pytest.MonkeyPatch) -> None:
        def fail(*args: object, **kwargs: object) -> None:
            raise RuntimeError("injected failure")

        monkeypatch.setattr(recording_sql, "touch_nodes", fail)


class RunRecorderContract:
    """Behaviour every RunRecorder shares; subclasses provide the ``harness`` fixture."""

    @pytest.fixture
    def harness(self) -> Iterator[Harness]:
        raise NotImplementedError

    def test_start_run_marks_experiment_running(self, harness: Harness) -> None:
        # Prepare
        experiment_id = harness.new_experiment()

        # Execute
        run_id = harness.recorder.start_run(
            experiment_id=experiment_id, flwr_run_id=BIG_FLWR_RUN_ID
        )

        # Assert
        view = harness.experiment(experiment_id)
        assert isinstance(run_id, int)
        assert (view.status, view.flwr_run_id) == ("running", BIG_FLWR_RUN_ID)
        assert view.started_at is not None and view.started_at.tzinfo is not None
        assert view.finished_at is None
        assert harness.recorder.rounds(run_id) == []

    def test_rounds_read_back_in_order(self, harness: Harness) -> None:
        # Prepare
        run_id = harness.recorder.start_run(experiment_id=harness.new_experiment(), flwr_run_id=1)
        records = [make_round(2, accuracy=0.8), make_round(1, accuracy=0.6)]

        # Execute
        for record in records:
            harness.recorder.record_round(run_id, record)
        stored = harness.recorder.rounds(run_id)

        # Assert
        assert stored == sorted(records, key=lambda r: r.server_round)
        assert (stored[0].num_updates, stored[0].num_rejected, stored[0].num_failures) == (1, 1, 1)
        assert all(r.started_at.tzinfo is not None for r in stored)

    def test_duplicate_round_raises_and_keeps_the_first(self, harness: Harness) -> None:
        # Prepare
        run_id = harness.recorder.start_run(experiment_id=harness.new_experiment(), flwr_run_id=1)
        first = make_round(1, accuracy=0.6)
        harness.recorder.record_round(run_id, first)

        # Execute
        with pytest.raises(DuplicateRoundError):
            harness.recorder.record_round(run_id, make_round(1, accuracy=0.9))

        # Assert
        assert harness.recorder.rounds(run_id) == [first]

    def test_failed_round_leaves_nothing_and_recorder_usable(
        self, harness: Harness, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # Prepare
        run_id = harness.recorder.start_run(experiment_id=harness.new_experiment(), flwr_run_id=1)
        harness.break_node_tracking(monkeypatch)

        # Execute
        with pytest.raises(RuntimeError, match="injected failure"):
            harness.recorder.record_round(run_id, make_round(1))
        monkeypatch.undo()
        after_failure = harness.recorder.rounds(run_id)
        harness.recorder.record_round(run_id, make_round(1))

        # Assert
        assert after_failure == []
        assert harness.recorder.rounds(run_id) == [make_round(1)]

    def test_checkpoints_are_kept_and_dropped_with_their_round(
        self, harness: Harness, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # Prepare: three rounds, the third dropping the first's model.
        run_id = harness.recorder.start_run(experiment_id=harness.new_experiment(), flwr_run_id=1)
        models = {r: f"model-{r}".encode() for r in (1, 2, 3)}
        for r, drop in ((1, ()), (2, ())):
            with_model = replace(make_round(r), checkpoint=ModelCheckpoint(models[r], drop))
            harness.recorder.record_round(run_id, with_model)
        harness.break_node_tracking(monkeypatch)

        # Execute: the third round fails after writing its row, then succeeds.
        third = replace(make_round(3), checkpoint=ModelCheckpoint(models[3], (1,)))
        with pytest.raises(RuntimeError, match="injected failure"):
            harness.recorder.record_round(run_id, third)
        after_failure = harness.recorder.checkpoints(run_id)
        monkeypatch.undo()
        harness.recorder.record_round(run_id, third)

        # Assert: a failed round neither stores its model nor drops any; a stored one does both.
        assert after_failure == {1: models[1], 2: models[2]}
        assert harness.recorder.checkpoints(run_id) == {2: models[2], 3: models[3]}

    def test_a_new_run_resumes_from_the_last_round_and_never_records_it_twice(
        self, harness: Harness, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # Prepare: rounds 1 and 2 committed with their models and resume points; round 3 fails
        # after writing its row (so neither its point nor its model may be left behind).
        experiment_id = harness.new_experiment()
        assert harness.recorder.resume_from(experiment_id) is None
        lost = harness.recorder.start_run(experiment_id=experiment_id, flwr_run_id=1)
        for r in (1, 2):
            record = replace(
                make_round(r), checkpoint=ModelCheckpoint(f"m{r}".encode()), resume=f"p{r}".encode()
            )
            harness.recorder.record_round(lost, record)
        harness.break_node_tracking(monkeypatch)
        with pytest.raises(RuntimeError, match="injected failure"):
            harness.recorder.record_round(lost, replace(make_round(3), resume=b"p3"))
        monkeypatch.undo()

        # Execute: a new run of the experiment takes over.
        stored = harness.recorder.resume_from(experiment_id)
        taken_over = harness.recorder.start_run(experiment_id=experiment_id, flwr_run_id=2)

        # Assert: it starts from round 2's point and model; the lost run is closed; no round is
        # recorded twice across the two runs; a round without a point leaves none behind.
        assert stored == StoredResume(2, b"p2", b"m2")
        with pytest.raises(RunFinishedError):
            harness.recorder.record_round(lost, make_round(3))
        with pytest.raises(DuplicateRoundError):
            harness.recorder.record_round(taken_over, make_round(2))
        third = replace(make_round(3), checkpoint=ModelCheckpoint(b"m3"), resume=None)
        harness.recorder.record_round(taken_over, third)
        assert harness.recorder.resume_from(experiment_id) == StoredResume(3, None, b"m3")

    def test_a_lost_run_that_lives_on_writes_nothing_beside_its_successor(
        self, harness: Harness
    ) -> None:
        # Prepare: run 1 records round 1, then the follower finds it lost (its ServerApp lives
        # on, cut off) and the experiment waits to be submitted again.
        experiment_id = harness.new_experiment()
        lost = harness.recorder.start_run(experiment_id=experiment_id, flwr_run_id=1)
        harness.recorder.record_round(lost, make_round(1))
        harness.lose_run(experiment_id, 1)

        # Execute / Assert: it can record no round and no update; its end (it fails, cut off)
        # closes it but leaves the experiment pending, with an event saying why.
        with pytest.raises(RunSupersededError, match="waiting to be submitted again"):
            harness.recorder.record_round(lost, make_round(2))
        with pytest.raises(RunSupersededError):
            harness.recorder.record_updates(lost, 2, LEFT_AT_THE_END)
        harness.recorder.finish_run(lost, status="failed", error="KeyboardInterrupt")
        view = harness.experiment(experiment_id)
        assert (view.status, view.error, view.finished_at) == ("pending", None, None)
        assert harness.event_kinds(experiment_id)[-1] == recorder_module.FINISH_REFUSED

        # The run that takes over records round 2.
        taken_over = harness.recorder.start_run(experiment_id=experiment_id, flwr_run_id=2)
        harness.recorder.record_round(taken_over, make_round(2))
        assert harness.recorder.rounds(taken_over) == [make_round(2)]

    def test_an_interrupted_run_closes_and_leaves_its_experiment_to_resume(
        self, harness: Harness
    ) -> None:
        running = harness.new_experiment()
        cancelling = harness.new_experiment()
        first = harness.recorder.start_run(experiment_id=running, flwr_run_id=1)
        second = harness.recorder.start_run(experiment_id=cancelling, flwr_run_id=2)
        harness.set_status(cancelling, "cancelling")

        harness.recorder.finish_run(first, status="interrupted", error="KeyboardInterrupt: ")
        harness.recorder.finish_run(second, status="interrupted", error="KeyboardInterrupt: ")

        assert harness.experiment(running).status == "running"
        assert harness.experiment(running).error is None
        assert harness.experiment(cancelling).status == "cancelling"
        assert harness.event_kinds(running) == [recorder_module.RUN_INTERRUPTED]
        with pytest.raises(RunFinishedError):
            harness.recorder.record_round(first, make_round(1))

    def test_finish_run_completes_the_experiment(self, harness: Harness) -> None:
        # Prepare
        experiment_id = harness.new_experiment()
        run_id = harness.recorder.start_run(experiment_id=experiment_id, flwr_run_id=1)

        # Execute
        harness.recorder.finish_run(run_id, status="completed", final_metrics={"accuracy": 0.9})

        # Assert
        view = harness.experiment(experiment_id)
        assert (view.status, view.error) == ("completed", None)
        assert view.finished_at is not None and view.started_at is not None
        assert view.finished_at >= view.started_at

    def test_failed_run_copies_the_error(self, harness: Harness) -> None:
        # Prepare
        experiment_id = harness.new_experiment()
        run_id = harness.recorder.start_run(experiment_id=experiment_id, flwr_run_id=1)

        # Execute
        harness.recorder.finish_run(run_id, status="failed", error="all clients failed")

        # Assert
        view = harness.experiment(experiment_id)
        assert (view.status, view.error) == ("failed", "all clients failed")

    @pytest.mark.parametrize("cancel_status", ["cancelling", "cancelled"])
    @pytest.mark.parametrize("outcome", ["completed", "failed", "stopped"])
    def test_finish_run_keeps_a_cancellation(
        self, harness: Harness, cancel_status: str, outcome: recorder_module.RunOutcome
    ) -> None:
        # Prepare
        experiment_id = harness.new_experiment()
        run_id = harness.recorder.start_run(experiment_id=experiment_id, flwr_run_id=1)
        harness.set_status(experiment_id, cancel_status)

        # Execute
        harness.recorder.finish_run(run_id, status=outcome)

        # Assert
        view = harness.experiment(experiment_id)
        assert view.status == "cancelled"
        assert view.finished_at is not None

    def test_stopped_run_cancels_the_experiment(self, harness: Harness) -> None:
        # Prepare
        experiment_id = harness.new_experiment()
        run_id = harness.recorder.start_run(experiment_id=experiment_id, flwr_run_id=1)

        # Execute
        harness.recorder.finish_run(run_id, status="stopped")

        # Assert
        assert harness.experiment(experiment_id).status == "cancelled"

    def test_start_run_keeps_an_earlier_cancellation(self, harness: Harness) -> None:
        # Prepare
        experiment_id = harness.new_experiment()
        harness.set_status(experiment_id, "cancelling")

        # Execute
        harness.recorder.start_run(experiment_id=experiment_id, flwr_run_id=5)

        # Assert
        view = harness.experiment(experiment_id)
        assert (view.status, view.flwr_run_id) == ("cancelling", 5)

    @pytest.mark.parametrize("ended", ["completed", "failed", "cancelled"])
    def test_start_run_refuses_an_ended_experiment(self, harness: Harness, ended: str) -> None:
        # Prepare
        experiment_id = harness.new_experiment()
        harness.set_status(experiment_id, ended)
        before = harness.experiment(experiment_id)

        # Execute / Assert: a finished experiment never runs again, and nothing is written.
        with pytest.raises(IllegalTransition, match=f"is '{ended}' and cannot become 'running'"):
            harness.recorder.start_run(experiment_id=experiment_id, flwr_run_id=5)
        assert harness.experiment(experiment_id) == before
        assert before.flwr_run_id is None and before.started_at is None

    @pytest.mark.parametrize("ended", ["cancelled", "failed"])
    def test_an_ended_experiment_takes_no_more_rounds(self, harness: Harness, ended: str) -> None:
        # Prepare: round 1 committed; then the experiment ended while its ServerApp still ran
        # (a cancel lands between the SuperLink stopping the run and the process noticing).
        experiment_id = harness.new_experiment()
        run_id = harness.recorder.start_run(experiment_id=experiment_id, flwr_run_id=1)
        harness.recorder.record_round(run_id, make_round(1))
        harness.set_status(experiment_id, ended)

        # Execute / Assert: no round is written; the tasks it leaves unfinished still get
        # their rows (bookkeeping of what was dispatched, not part of the history).
        with pytest.raises(recorder_module.ExperimentEndedError, match=f"has ended {ended}"):
            harness.recorder.record_round(run_id, make_round(2))
        harness.recorder.record_updates(run_id, 3, [task_update(7, "failed")])
        assert harness.recorder.rounds(run_id) == [make_round(1)]
        # The ServerApp then closes its run "stopped"; the experiment keeps its own end.
        harness.recorder.finish_run(run_id, status="stopped")
        assert harness.experiment(experiment_id).status == ended

    def test_finish_after_another_end_keeps_the_first_and_says_so(self, harness: Harness) -> None:
        # Prepare: the follower failed the experiment (its run was lost) while it ran.
        experiment_id = harness.new_experiment()
        run_id = harness.recorder.start_run(experiment_id=experiment_id, flwr_run_id=1)
        harness.set_status(experiment_id, "failed")
        before = harness.experiment(experiment_id)

        # Execute
        harness.recorder.finish_run(run_id, status="completed", error="late word")

        # Assert: the experiment keeps its status; the run is closed; an event tells.
        assert harness.experiment(experiment_id) == before
        assert harness.event_kinds(experiment_id) == [recorder_module.FINISH_REFUSED]
        with pytest.raises(RunFinishedError):
            harness.recorder.finish_run(run_id, status="completed")

    def test_a_duplicate_finish_changes_nothing(self, harness: Harness) -> None:
        # Prepare: the experiment already ended completed (the follower saw Flower's end first).
        experiment_id = harness.new_experiment()
        run_id = harness.recorder.start_run(experiment_id=experiment_id, flwr_run_id=1)
        harness.set_status(experiment_id, "completed")
        before = harness.experiment(experiment_id)

        # Execute
        harness.recorder.finish_run(run_id, status="completed")

        # Assert: the first finish's time stands, and a repeat is no refusal.
        assert harness.experiment(experiment_id) == before
        assert before.status == "completed" and before.finished_at is not None
        assert harness.event_kinds(experiment_id) == []

    def test_finished_run_takes_no_more_writes(self, harness: Harness) -> None:
        # Prepare
        run_id = harness.recorder.start_run(experiment_id=harness.new_experiment(), flwr_run_id=1)
        harness.recorder.finish_run(run_id, status="completed")

        # Execute / Assert
        with pytest.raises(RunFinishedError):
            harness.recorder.record_round(run_id, make_round(1))
        with pytest.raises(RunFinishedError):
            harness.recorder.finish_run(run_id, status="failed", error="late")
        assert harness.recorder.rounds(run_id) == []

    def test_unknown_run_is_refused(self, harness: Harness) -> None:
        with pytest.raises(UnknownRunError):
            harness.recorder.record_round(999, make_round(1))
        with pytest.raises(UnknownRunError):
            harness.recorder.finish_run(999, status="completed")
        with pytest.raises(UnknownRunError):
            harness.recorder.record_event(run_id=999, kind="k", message="m")
        with pytest.raises(UnknownRunError):
            harness.recorder.rounds(999)

    def test_events_attach_to_the_run_experiment(self, harness: Harness) -> None:
        # Prepare
        experiment_id = harness.new_experiment()
        run_id = harness.recorder.start_run(experiment_id=experiment_id, flwr_run_id=1)

        # Execute
        harness.recorder.record_event(run_id=run_id, kind="started", message="run started")
        harness.recorder.record_event(run_id=None, kind="system", message="no run")
        harness.recorder.record_event(
            run_id=run_id, kind="warning", message="slow", data={"node_id": 3}
        )

        # Assert
        assert harness.event_kinds(experiment_id) == ["started", "warning"]

    def test_task_columns_read_back(self, harness: Harness) -> None:
        # Prepare
        run_id = harness.recorder.start_run(experiment_id=harness.new_experiment(), flwr_run_id=1)
        record = RoundRecord(
            server_round=1,
            started_at=T0,
            finished_at=T0 + timedelta(seconds=5),
            metrics={"accuracy": 0.5},
            train_metrics={},
            evaluate_metrics={},
            updates=(task_update(2**64 - 1, "accepted"), task_update(7, "rejected", reason="x")),
            virtual_time_s=90.0,
        )

        # Execute
        harness.recorder.record_round(run_id, record)

        # Assert
        assert harness.recorder.rounds(run_id) == [record]
        assert harness.recorder.updates(run_id) == [(1, u) for u in record.updates]

    def test_updates_outside_rounds_are_kept_in_order(self, harness: Harness) -> None:
        # Prepare
        run_id = harness.recorder.start_run(experiment_id=harness.new_experiment(), flwr_run_id=1)
        first = make_round(1)
        harness.recorder.record_round(run_id, first)

        # Execute
        harness.recorder.record_updates(run_id, 2, LEFT_AT_THE_END)

        # Assert: they belong to no round.
        assert harness.recorder.rounds(run_id) == [first]
        assert harness.recorder.updates(run_id) == [(1, u) for u in first.updates] + [
            (2, u) for u in LEFT_AT_THE_END
        ]

    def test_record_updates_is_refused_where_record_round_is(self, harness: Harness) -> None:
        # Prepare
        run_id = harness.recorder.start_run(experiment_id=harness.new_experiment(), flwr_run_id=1)
        harness.recorder.record_round(run_id, make_round(1))

        # Execute / Assert: a recorded round already holds its updates.
        with pytest.raises(DuplicateRoundError):
            harness.recorder.record_updates(run_id, 1, LEFT_AT_THE_END)
        with pytest.raises(UnknownRunError):
            harness.recorder.record_updates(999, 2, LEFT_AT_THE_END)
        with pytest.raises(UnknownRunError):
            harness.recorder.updates(999)
        harness.recorder.finish_run(run_id, status="completed")
        with pytest.raises(RunFinishedError):
            harness.recorder.record_updates(run_id, 2, LEFT_AT_THE_END)
        assert len(harness.recorder.updates(run_id)) == len(make_round(1).updates)


class TestInMemoryRunRecorder(RunRecorderContract):
    @pytest.fixture
    def harness(self) -> Iterator[Harness]:
        yield InMemoryHarness()

    def test_seen_nodes_are_tracked(self) -> None:
        # Prepare
        recorder = InMemoryRunRecorder()
        run_id = recorder.start_run(experiment_id=1, flwr_run_id=1)

        record = make_round(1)

        # Execute
        recorder.record_round(run_id, record)

        # Assert: the failed node did not answer, so it was not seen.
        assert recorder.nodes_last_seen == {2**64 - 1: record.finished_at, 11: record.finished_at}

    def test_node_configs_are_kept(self) -> None:
        recorder = InMemoryRunRecorder()
        run_id = recorder.start_run(experiment_id=1, flwr_run_id=1)
        now = datetime(2026, 1, 1, tzinfo=UTC)
        update = UpdateRecord(node_id=4, status="accepted", num_examples=1, node_config={"x": 1})
        recorder.record_round(run_id, RoundRecord(1, now, now, {}, {}, {}, (update,)))
        assert recorder.node_configs == {4: {"x": 1}}

    def test_updates_outside_rounds_touch_the_nodes_that_replied(self) -> None:
        recorder = InMemoryRunRecorder()
        run_id = recorder.start_run(experiment_id=1, flwr_run_id=1)
        recorder.record_updates(run_id, 1, LEFT_AT_THE_END)
        assert set(recorder.nodes_last_seen) == {5}


class TestSqlRunRecorder(RunRecorderContract):
    @pytest.fixture
    def harness(self, session_factory: sessionmaker[Session]) -> Iterator[Harness]:
        yield SqlHarness(session_factory)

    def test_round_row_counts_and_nodes(self, session_factory: sessionmaker[Session]) -> None:
        # Prepare
        harness = SqlHarness(session_factory)
        experiment_id = harness.new_experiment()
        run_id = harness.recorder.start_run(experiment_id=experiment_id, flwr_run_id=1)
        record = make_round(1)

        # Execute
        harness.recorder.record_round(run_id, record)

        # Assert
        with session_factory() as session:
            (row,) = repository.list_rounds(session, experiment_id=experiment_id)
            updates = repository.list_updates(session, experiment_id=experiment_id)
            nodes = {n.node_id: n for n in repository.list_nodes(session)}
        assert (row.num_updates, row.num_rejected, row.num_failures) == (1, 1, 1)
        assert row.duration_s == pytest.approx(12.5)
        assert [u.node_id for u in updates] == [2**64 - 1, 11, 12]
        assert set(nodes) == {2**64 - 1, 11}
        assert nodes[11].last_seen == record.finished_at

    def test_node_config_echoed_by_a_reply_is_stored_with_the_node(
        self, session_factory: sessionmaker[Session]
    ) -> None:
        # Prepare: node 11 has a config from an earlier round; 12 is new; 13 echoes nothing.
        harness = SqlHarness(session_factory)
        run_id = harness.recorder.start_run(experiment_id=harness.new_experiment(), flwr_run_id=1)
        now = datetime(2026, 1, 1, tzinfo=UTC)
        with session_factory.begin() as session:
            repository.upsert_node(session, node_id=13, node_config={"profile": "fast"})
        slow = {"partition-id": 0, "num-partitions": 3, "profile": "slow"}
        updates = (
            UpdateRecord(node_id=11, status="accepted", num_examples=5, node_config={"a": 1}),
            UpdateRecord(node_id=12, status="accepted", num_examples=5, node_config=slow),
            UpdateRecord(node_id=13, status="accepted", num_examples=5),
        )
        harness.recorder.record_round(
            run_id,
            RoundRecord(1, now, now, {}, {}, {}, updates[:1]),
        )

        # Execute
        harness.recorder.record_round(
            run_id,
            RoundRecord(2, now, now + timedelta(seconds=1), {}, {}, {}, updates[1:]),
        )
        harness.recorder.record_updates(
            run_id,
            3,
            [UpdateRecord(node_id=11, status="rejected", node_config={"a": 2})],
        )

        # Assert: the latest echo wins; a reply without one leaves the stored config alone.
        with session_factory() as session:
            nodes = {n.node_id: n.node_config for n in repository.list_nodes(session)}
        assert nodes == {11: {"a": 2}, 12: slow, 13: {"profile": "fast"}}

    def test_unstorable_update_rolls_back_the_whole_round(
        self, session_factory: sessionmaker[Session]
    ) -> None:
        # Prepare: a metric value that cannot be serialised to JSON fails the update rows,
        # after the round row itself was flushed.
        harness = SqlHarness(session_factory)
        run_id = harness.recorder.start_run(experiment_id=harness.new_experiment(), flwr_run_id=1)
        bad = UpdateRecord(node_id=1, status="accepted", metrics=cast(Any, {"x": object()}))
        record = RoundRecord(
            server_round=1,
            started_at=T0,
            finished_at=T0,
            metrics={},
            train_metrics={},
            evaluate_metrics={},
            updates=(UpdateRecord(node_id=2, status="accepted"), bad),
        )

        # Execute: SQLite wraps the TypeError in a StatementError, psycopg raises it as is.
        with pytest.raises((StatementError, TypeError), match="not JSON serializable"):
            harness.recorder.record_round(run_id, record)

        # Assert
        with session_factory() as session:
            assert session.scalar(select(func.count()).select_from(Round)) == 0
            assert session.scalar(select(func.count()).select_from(ClientUpdate)) == 0
            assert repository.list_nodes(session) == []

    def test_updates_outside_rounds_are_rows_and_touch_the_nodes_that_replied(
        self, session_factory: sessionmaker[Session]
    ) -> None:
        # Prepare
        harness = SqlHarness(session_factory)
        experiment_id = harness.new_experiment()
        run_id = harness.recorder.start_run(experiment_id=experiment_id, flwr_run_id=1)

        # Execute
        harness.recorder.record_updates(run_id, 1, LEFT_AT_THE_END)

        # Assert
        with session_factory() as session:
            rows = repository.list_updates(session, experiment_id=experiment_id)
            nodes = [n.node_id for n in repository.list_nodes(session)]
            progress = repository.experiment_progress(session, experiment_ids=[experiment_id])
            assert repository.list_rounds(session, experiment_id=experiment_id) == []
        assert [(r.server_round, r.node_id, r.status) for r in rows] == [
            (1, 5, "rejected"),
            (1, 6, "failed"),
        ]
        assert nodes == [5]  # the failed task's node never answered
        assert progress[experiment_id].accepted_updates == 0

    def test_unstorable_update_outside_a_round_writes_nothing(
        self, session_factory: sessionmaker[Session]
    ) -> None:
        # Prepare
        harness = SqlHarness(session_factory)
        run_id = harness.recorder.start_run(experiment_id=harness.new_experiment(), flwr_run_id=1)
        bad = UpdateRecord(node_id=1, status="rejected", metrics=cast(Any, {"x": object()}))

        # Execute
        with pytest.raises((StatementError, TypeError), match="not JSON serializable"):
            harness.recorder.record_updates(run_id, 1, (LEFT_AT_THE_END[0], bad))

        # Assert
        with session_factory() as session:
            assert session.scalar(select(func.count()).select_from(ClientUpdate)) == 0
            assert repository.list_nodes(session) == []

    def test_another_engine_sees_a_committed_round(
        self, session_factory: sessionmaker[Session], migrated_url: str
    ) -> None:
        # Prepare: a reader with its own engine, as the API process has.
        harness = SqlHarness(session_factory)
        experiment_id = harness.new_experiment()
        run_id = harness.recorder.start_run(experiment_id=experiment_id, flwr_run_id=1)
        reader_engine = make_engine(migrated_url)
        reader = make_session_factory(reader_engine)
        with reader() as session:
            before = repository.list_rounds(session, experiment_id=experiment_id)

        # Execute
        harness.recorder.record_round(run_id, make_round(1, accuracy=0.75))

        # Assert
        with reader() as session:
            after = repository.list_rounds(session, experiment_id=experiment_id)
            progress = repository.experiment_progress(session, experiment_ids=[experiment_id])
        reader_engine.dispose()
        assert before == []
        assert [r.server_round for r in after] == [1]
        assert progress[experiment_id].best_accuracy == 0.75

    def test_rounds_survive_a_concurrent_writer(
        self, session_factory: sessionmaker[Session], migrated_url: str
    ) -> None:
        # Prepare: another engine keeps writing, as the API does while a run goes on.
        harness = SqlHarness(session_factory)
        experiment_id = harness.new_experiment()
        run_id = harness.recorder.start_run(experiment_id=experiment_id, flwr_run_id=1)
        other_engine = make_engine(migrated_url)
        other = make_session_factory(other_engine)
        stop = threading.Event()
        errors: list[BaseException] = []

        def keep_writing() -> None:
            try:
                while not stop.is_set():
                    with other.begin() as session:
                        repository.add_event(
                            session, kind="poll", message="tick", experiment_id=experiment_id
                        )
                        repository.upsert_node(session, node_id=11, node_config={"p": 1})
            except BaseException as error:
                errors.append(error)

        writer = threading.Thread(target=keep_writing)
        writer.start()

        # Execute
        try:
            for server_round in range(1, 31):
                harness.recorder.record_round(run_id, make_round(server_round))
        finally:
            stop.set()
            writer.join()
            other_engine.dispose()

        # Assert
        assert errors == []
        assert [r.server_round for r in harness.recorder.rounds(run_id)] == list(range(1, 31))

    def test_unknown_experiment_is_refused(self, session_factory: sessionmaker[Session]) -> None:
        recorder = SqlRunRecorder(session_factory)
        with pytest.raises(UnknownExperimentError):
            recorder.start_run(experiment_id=404, flwr_run_id=1)
        with session_factory() as session:
            assert session.scalar(select(func.count()).select_from(Run)) == 0

    def test_from_url_writes_to_the_same_database(
        self, migrated_url: str, session_factory: sessionmaker[Session]
    ) -> None:
        # Prepare
        experiment_id = SqlHarness(session_factory).new_experiment()
        recorder = SqlRunRecorder.from_url(migrated_url)

        # Execute
        try:
            run_id = recorder.start_run(experiment_id=experiment_id, flwr_run_id=2**63)
            recorder.finish_run(run_id, status="completed", final_metrics={"accuracy": 0.5})
        finally:
            recorder.close()

        # Assert
        with session_factory() as session:
            run = session.get(Run, run_id)
            assert run is not None
            assert (run.status, run.flwr_run_id, run.final_metrics) == (
                "completed",
                2**63,
                {"accuracy": 0.5},
            )


def test_records_refuse_naive_times_and_bad_values() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        RoundRecord(1, datetime(2026, 1, 1), T0, {}, {}, {}, ())
    with pytest.raises(ValueError, match="earlier"):
        RoundRecord(1, T0, T0 - timedelta(seconds=1), {}, {}, {}, ())
    with pytest.raises(ValueError, match="unsigned 64-bit"):
        UpdateRecord(node_id=2**64, status="accepted")
    with pytest.raises(ValueError, match="status"):
        UpdateRecord(node_id=1, status=cast(Any, "lost"))
