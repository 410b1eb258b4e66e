"""The run recorder: the ServerApp's single writer of runs, rounds, client updates and events."""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, get_args

from sqlalchemy import select
from sqlalchemy.engine import URL, Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from florist.server.db.engine import make_engine, make_session_factory
from florist.server.db.models import ClientUpdate, Round, Run, utcnow
from florist.server.db.repository import (
    ExperimentNotFoundError,
    add_event,
    finish_experiment,
    start_experiment,
    touch_nodes,
)
from florist.server.db.status import (
    ExperimentStatus,
    IllegalTransition,
    finish_plan,
    plan_target,
    start_plan,
)

UpdateStatus = Literal["accepted", "rejected", "failed"]
RunOutcome = Literal["completed", "failed", "stopped"]

# Experiment status after a run ends on its own; "stopped" only happens when someone stops it.
# A cancel the user asked for wins over either (status.finish_plan).
_EXPERIMENT_STATUS_FOR = {
    "completed": ExperimentStatus.COMPLETED,
    "failed": ExperimentStatus.FAILED,
    "stopped": ExperimentStatus.CANCELLED,
}
# The event recorded when a run's outcome comes after its experiment ended otherwise.
FINISH_REFUSED = "finish-refused"
_UINT64_LIMIT = 2**64


class RecorderError(Exception):
    """A recorder call that cannot be honoured."""


class UnknownRunError(RecorderError, LookupError):
    """No run has the given id."""


class UnknownExperimentError(RecorderError, LookupError):
    """No experiment has the given id."""


class DuplicateRoundError(RecorderError):
    """The round was already recorded for this run; the first record is kept."""


class RunFinishedError(RecorderError):
    """The run has already finished and takes no more rounds or outcomes."""


def _require_aware(name: str, value: datetime) -> None:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware (UTC), got {value!r}")


@dataclass(frozen=True)
class UpdateRecord:
    """One client's reply in a round."""

    node_id: int
    status: UpdateStatus
    num_examples: int | None = None
    train_time_s: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    bytes_up: int = 0
    bytes_down: int = 0
    staleness: int = 0
    reason: str | None = None
    model_version: int | None = None
    arrival_version: int | None = None
    local_steps: int | None = None
    dispatched_at: datetime | None = None
    arrived_at: datetime | None = None
    wall_duration_s: float | None = None
    virtual_duration_s: float | None = None
    # The node's --node-config as its reply echoed it (profile, partition); None when unknown.
    node_config: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        for name in ("dispatched_at", "arrived_at"):
            value = getattr(self, name)
            if value is not None:
                _require_aware(name, value)
        if not 0 <= self.node_id < _UINT64_LIMIT:
            raise ValueError(f"node_id {self.node_id} is not an unsigned 64-bit integer")
        if self.status not in get_args(UpdateStatus):
            raise ValueError(f"status {self.status!r} is not one of {get_args(UpdateStatus)}")
        if min(self.bytes_up, self.bytes_down, self.staleness) < 0:
            raise ValueError("bytes_up, bytes_down and staleness must not be negative")


@dataclass(frozen=True)
class RoundRecord:
    """One finished server round and every client update it handled."""

    server_round: int
    started_at: datetime
    finished_at: datetime
    metrics: dict[str, float]  # centralized evaluation of the global model
    train_metrics: dict[str, float]
    evaluate_metrics: dict[str, float]
    updates: tuple[UpdateRecord, ...]
    virtual_time_s: float | None = None

    def __post_init__(self) -> None:
        _require_aware("started_at", self.started_at)
        _require_aware("finished_at", self.finished_at)
        if self.finished_at < self.started_at:
            raise ValueError("finished_at is earlier than started_at")

    @property
    def num_updates(self) -> int:
        """Updates accepted into the aggregate."""
        return sum(update.status == "accepted" for update in self.updates)

    @property
    def num_rejected(self) -> int:
        """Updates that arrived but were refused (too stale, failed validation, ...)."""
        return sum(update.status == "rejected" for update in self.updates)

    @property
    def num_failures(self) -> int:
        """Clients that did not deliver an update."""
        return sum(update.status == "failed" for update in self.updates)

    @property
    def seen_node_ids(self) -> set[int]:
        """Nodes that replied; a failure may be a node that never answered, so it is not seen."""
        return _seen_node_ids(self.updates)


def _seen_node_ids(updates: Sequence[UpdateRecord]) -> set[int]:
    return {update.node_id for update in updates if update.status != "failed"}


def _node_configs(updates: Sequence[UpdateRecord]) -> dict[int, dict[str, Any]]:
    """Each node's config as its latest reply in ``updates`` echoed it."""
    return {u.node_id: u.node_config for u in updates if u.node_config is not None}


class RunRecorder(ABC):
    """Records one ServerApp's runs; every call is atomic."""

    @abstractmethod
    def start_run(self, *, experiment_id: int, flwr_run_id: int) -> int:
        """Open a run and mark its experiment running; return the run id.

        A cancelling experiment stays cancelling. Raises IllegalTransition, opening nothing,
        if the experiment has ended: a finished experiment never runs again.
        """

    @abstractmethod
    def record_round(self, run_id: int, record: RoundRecord) -> None:
        """Store a round with its client updates, all or nothing.

        Raises DuplicateRoundError if this server round is already recorded for the run.
        """

    @abstractmethod
    def finish_run(
        self,
        run_id: int,
        *,
        status: RunOutcome,
        error: str | None = None,
        final_metrics: dict[str, float] | None = None,
    ) -> None:
        """Close the run and its experiment; a cancelled experiment stays cancelled.

        The run is closed even if its experiment has already ended with another status (the
        follower got there first): the experiment keeps that status, and an event of kind
        ``finish-refused`` records the run's outcome. Finishing it again with the status it
        has changes nothing.
        """

    @abstractmethod
    def record_event(
        self, *, run_id: int | None, kind: str, message: str, data: dict[str, Any] | None = None
    ) -> None:
        """Append an event, tied to the run's experiment when a run is given."""

    @abstractmethod
    def record_updates(
        self, run_id: int, server_round: int, updates: Sequence[UpdateRecord]
    ) -> None:
        """Store client updates that belong to no recorded round, all or nothing.

        For what is left when a run ends: updates handled since the last aggregation and tasks
        still in flight, under the round they would have contributed to. Raises
        DuplicateRoundError if that round is already recorded: its updates came with it.
        """

    @abstractmethod
    def rounds(self, run_id: int) -> list[RoundRecord]:
        """Return the run's recorded rounds, in server-round order."""

    @abstractmethod
    def updates(self, run_id: int) -> list[tuple[int, UpdateRecord]]:
        """Return every update of the run, a round's or not, as (server round, update), in the
        order they were recorded."""


def _refused_finish(exc: IllegalTransition, outcome: RunOutcome, error: str | None) -> str:
    return f"run ended {outcome} after the experiment had ended {exc.current}" + (
        f": {error}" if error else ""
    )


@dataclass
class InMemoryExperiment:
    """The experiment columns the recorder writes, as the in-memory recorder keeps them.

    Its status follows the same transitions as an experiments row (status.plan_target).
    """

    status: ExperimentStatus = ExperimentStatus.PENDING
    flwr_run_id: int | None = None
    error: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None


@dataclass
class InMemoryRun:
    """A run as the in-memory recorder keeps it."""

    experiment_id: int
    flwr_run_id: int
    started_at: datetime
    status: str = "running"
    finished_at: datetime | None = None
    error: str | None = None
    final_metrics: dict[str, float] | None = None
    rounds: dict[int, RoundRecord] = field(default_factory=dict)
    updates: list[tuple[int, UpdateRecord]] = field(default_factory=list)


@dataclass(frozen=True)
class InMemoryEvent:
    """An event as the in-memory recorder keeps it."""

    experiment_id: int | None
    run_id: int | None
    kind: str
    message: str
    data: dict[str, Any] | None
    created_at: datetime


class InMemoryRunRecorder(RunRecorder):
    """A recorder without a database, for unit tests of server logic.

    Experiments are created on first use; tests may set ``experiments[id].status`` to play
    the API's part (for example, a cancellation).
    """

    def __init__(self) -> None:
        self.experiments: dict[int, InMemoryExperiment] = {}
        self.runs: dict[int, InMemoryRun] = {}
        self.events: list[InMemoryEvent] = []
        self.nodes_last_seen: dict[int, datetime] = {}
        self.node_configs: dict[int, dict[str, Any]] = {}
        # The async runtime may record from several threads.
        self._lock = threading.Lock()

    def start_run(self, *, experiment_id: int, flwr_run_id: int) -> int:
        now = utcnow()
        with self._lock:
            experiment = self.experiments.setdefault(experiment_id, InMemoryExperiment())
            to = plan_target(start_plan(), experiment.status, experiment_id=experiment_id)
            assert to is not None  # start_plan repeats no terminal status
            experiment.status = to
            experiment.started_at = now
            experiment.flwr_run_id = flwr_run_id
            run_id = len(self.runs) + 1
            self.runs[run_id] = InMemoryRun(
                experiment_id=experiment_id, flwr_run_id=flwr_run_id, started_at=now
            )
            return run_id

    def _open_run(self, run_id: int) -> InMemoryRun:
        run = self.runs.get(run_id)
        if run is None:
            raise UnknownRunError(f"run {run_id} does not exist")
        if run.finished_at is not None:
            raise RunFinishedError(f"run {run_id} has already finished")
        return run

    def _touch_nodes(self, updates: Sequence[UpdateRecord], seen_at: datetime) -> None:
        for node_id in _seen_node_ids(updates):
            self.nodes_last_seen[node_id] = seen_at
        self.node_configs.update(_node_configs(updates))

    def record_round(self, run_id: int, record: RoundRecord) -> None:
        with self._lock:
            run = self._open_run(run_id)
            if record.server_round in run.rounds:
                raise DuplicateRoundError(
                    f"round {record.server_round} of run {run_id} is already recorded"
                )
            # Nodes first: if that fails, the round is not stored either.
            self._touch_nodes(record.updates, record.finished_at)
            run.rounds[record.server_round] = record
            run.updates.extend((record.server_round, update) for update in record.updates)

    def record_updates(
        self, run_id: int, server_round: int, updates: Sequence[UpdateRecord]
    ) -> None:
        with self._lock:
            run = self._open_run(run_id)
            if server_round in run.rounds:
                raise DuplicateRoundError(f"round {server_round} of run {run_id} is recorded")
            self._touch_nodes(updates, utcnow())
            run.updates.extend((server_round, update) for update in updates)

    def finish_run(
        self,
        run_id: int,
        *,
        status: RunOutcome,
        error: str | None = None,
        final_metrics: dict[str, float] | None = None,
    ) -> None:
        now = utcnow()
        with self._lock:
            run = self._open_run(run_id)
            run.status = status
            run.finished_at = now
            run.error = error
            run.final_metrics = dict(final_metrics) if final_metrics is not None else None
            experiment = self.experiments[run.experiment_id]
            plan = finish_plan(_EXPERIMENT_STATUS_FOR[status])
            try:
                to = plan_target(plan, experiment.status, experiment_id=run.experiment_id)
            except IllegalTransition as exc:
                message = _refused_finish(exc, status, error)
                event = InMemoryEvent(run.experiment_id, run_id, FINISH_REFUSED, message, None, now)
                self.events.append(event)
                return
            if to is None:  # the same end again: the first finish stands
                return
            experiment.status = to
            experiment.finished_at = now
            if error is not None:
                experiment.error = error

    def record_event(
        self, *, run_id: int | None, kind: str, message: str, data: dict[str, Any] | None = None
    ) -> None:
        with self._lock:
            experiment_id = None
            if run_id is not None:
                run = self.runs.get(run_id)
                if run is None:
                    raise UnknownRunError(f"run {run_id} does not exist")
                experiment_id = run.experiment_id
            self.events.append(InMemoryEvent(experiment_id, run_id, kind, message, data, utcnow()))

    def rounds(self, run_id: int) -> list[RoundRecord]:
        with self._lock:
            run = self.runs.get(run_id)
            if run is None:
                raise UnknownRunError(f"run {run_id} does not exist")
            return [run.rounds[key] for key in sorted(run.rounds)]

    def updates(self, run_id: int) -> list[tuple[int, UpdateRecord]]:
        with self._lock:
            run = self.runs.get(run_id)
            if run is None:
                raise UnknownRunError(f"run {run_id} does not exist")
            return list(run.updates)


class SqlRunRecorder(RunRecorder):
    """A recorder writing through SQLAlchemy; each call is its own transaction.

    A failing call rolls back everything it wrote and re-raises.
    """

    def __init__(self, session_factory: sessionmaker[Session]) -> None:
        self._session_factory = session_factory
        self._owned_engine: Engine | None = None

    @classmethod
    def from_url(cls, url: str | URL) -> SqlRunRecorder:
        """Build a recorder with its own engine; the caller migrates the database first."""
        engine = make_engine(url)
        recorder = cls(make_session_factory(engine))
        recorder._owned_engine = engine
        return recorder

    def close(self) -> None:
        """Release the connections of an engine built by ``from_url``."""
        if self._owned_engine is not None:
            self._owned_engine.dispose()

    @staticmethod
    def _open_run(session: Session, run_id: int) -> Run:
        run = session.get(Run, run_id)
        if run is None:
            raise UnknownRunError(f"run {run_id} does not exist")
        if run.finished_at is not None:
            raise RunFinishedError(f"run {run_id} has already finished")
        return run

    def start_run(self, *, experiment_id: int, flwr_run_id: int) -> int:
        now = utcnow()
        with self._session_factory() as session, session.begin():
            try:
                start_experiment(
                    session, experiment_id=experiment_id, flwr_run_id=flwr_run_id, started_at=now
                )
            except ExperimentNotFoundError as exc:
                raise UnknownExperimentError(str(exc)) from exc
            run = Run(
                experiment_id=experiment_id,
                flwr_run_id=flwr_run_id,
                status="running",
                started_at=now,
            )
            session.add(run)
            session.flush()
            return run.id

    @staticmethod
    def _round_exists(session: Session, run_id: int, server_round: int) -> bool:
        found = session.scalar(
            select(Round.id).where(Round.run_id == run_id, Round.server_round == server_round)
        )
        return found is not None

    def record_round(self, run_id: int, record: RoundRecord) -> None:
        duplicate = DuplicateRoundError(
            f"round {record.server_round} of run {run_id} is already recorded"
        )
        try:
            with self._session_factory() as session, session.begin():
                run = self._open_run(session, run_id)
                if self._round_exists(session, run_id, record.server_round):
                    raise duplicate
                session.add(
                    Round(
                        run_id=run_id,
                        experiment_id=run.experiment_id,
                        server_round=record.server_round,
                        started_at=record.started_at,
                        finished_at=record.finished_at,
                        duration_s=(record.finished_at - record.started_at).total_seconds(),
                        metrics=dict(record.metrics),
                        train_metrics=dict(record.train_metrics),
                        evaluate_metrics=dict(record.evaluate_metrics),
                        num_updates=record.num_updates,
                        num_rejected=record.num_rejected,
                        num_failures=record.num_failures,
                        virtual_time_s=record.virtual_time_s,
                    )
                )
                # The round goes first, so a concurrent duplicate fails here on the unique
                # constraint before any update row is written.
                session.flush()
                session.add_all(
                    _update_rows(run, record.server_round, record.updates, created_at=utcnow())
                )
                session.flush()
                touch_nodes(
                    session,
                    node_ids=record.seen_node_ids,
                    seen_at=record.finished_at,
                    node_configs=_node_configs(record.updates),
                )
        except IntegrityError as error:
            # Another writer may have stored the same round between our check and insert.
            with self._session_factory() as session:
                if self._round_exists(session, run_id, record.server_round):
                    raise duplicate from error
            raise

    def record_updates(
        self, run_id: int, server_round: int, updates: Sequence[UpdateRecord]
    ) -> None:
        now = utcnow()
        with self._session_factory() as session, session.begin():
            run = self._open_run(session, run_id)
            if self._round_exists(session, run_id, server_round):
                raise DuplicateRoundError(f"round {server_round} of run {run_id} is recorded")
            session.add_all(_update_rows(run, server_round, updates, created_at=now))
            session.flush()
            touch_nodes(
                session,
                node_ids=_seen_node_ids(updates),
                seen_at=now,
                node_configs=_node_configs(updates),
            )

    def finish_run(
        self,
        run_id: int,
        *,
        status: RunOutcome,
        error: str | None = None,
        final_metrics: dict[str, float] | None = None,
    ) -> None:
        now = utcnow()
        with self._session_factory() as session, session.begin():
            run = self._open_run(session, run_id)
            run.status = status
            run.finished_at = now
            run.error = error
            run.final_metrics = dict(final_metrics) if final_metrics is not None else None
            session.flush()
            try:
                # The status is decided inside one UPDATE, so that a cancellation the API
                # commits meanwhile is never overwritten by a stale read.
                finish_experiment(
                    session,
                    experiment_id=run.experiment_id,
                    status=_EXPERIMENT_STATUS_FOR[status],
                    finished_at=now,
                    error=error,
                )
            except IllegalTransition as exc:
                # Nothing was written to the experiment; the run still closes.
                add_event(
                    session,
                    kind=FINISH_REFUSED,
                    message=_refused_finish(exc, status, error),
                    experiment_id=run.experiment_id,
                    run_id=run_id,
                )

    def record_event(
        self, *, run_id: int | None, kind: str, message: str, data: dict[str, Any] | None = None
    ) -> None:
        with self._session_factory() as session, session.begin():
            experiment_id = None
            if run_id is not None:
                run = session.get(Run, run_id)
                if run is None:
                    raise UnknownRunError(f"run {run_id} does not exist")
                experiment_id = run.experiment_id
            add_event(
                session,
                kind=kind,
                message=message,
                experiment_id=experiment_id,
                run_id=run_id,
                data=data,
            )

    def rounds(self, run_id: int) -> list[RoundRecord]:
        with self._session_factory() as session:
            if session.get(Run, run_id) is None:
                raise UnknownRunError(f"run {run_id} does not exist")
            rows = session.scalars(
                select(Round).where(Round.run_id == run_id).order_by(Round.server_round)
            ).all()
            updates: dict[int, list[UpdateRecord]] = {row.server_round: [] for row in rows}
            for server_round, update in self._updates(session, run_id):
                updates.setdefault(server_round, []).append(update)
            return [
                RoundRecord(
                    server_round=row.server_round,
                    started_at=row.started_at,
                    finished_at=row.finished_at,
                    metrics=dict(row.metrics),
                    train_metrics=dict(row.train_metrics),
                    evaluate_metrics=dict(row.evaluate_metrics),
                    updates=tuple(updates[row.server_round]),
                    virtual_time_s=row.virtual_time_s,
                )
                for row in rows
            ]

    def updates(self, run_id: int) -> list[tuple[int, UpdateRecord]]:
        with self._session_factory() as session:
            if session.get(Run, run_id) is None:
                raise UnknownRunError(f"run {run_id} does not exist")
            return self._updates(session, run_id)

    @staticmethod
    def _updates(session: Session, run_id: int) -> list[tuple[int, UpdateRecord]]:
        rows = session.scalars(
            select(ClientUpdate).where(ClientUpdate.run_id == run_id).order_by(ClientUpdate.id)
        )
        return [
            (
                row.server_round,
                UpdateRecord(metrics=dict(row.metrics), **{f: getattr(row, f) for f in _COLUMNS}),
            )
            for row in rows
        ]


# The UpdateRecord fields stored as client_updates columns of the same name (metrics aside: it is
# copied, and node_config goes to the nodes table), so writing and reading back stay in step.
_COLUMNS = (
    "node_id",
    "status",
    "reason",
    "num_examples",
    "train_time_s",
    "bytes_up",
    "bytes_down",
    "staleness",
    "model_version",
    "arrival_version",
    "local_steps",
    "dispatched_at",
    "arrived_at",
    "wall_duration_s",
    "virtual_duration_s",
)


def _update_rows(
    run: Run, server_round: int, updates: Sequence[UpdateRecord], *, created_at: datetime
) -> list[ClientUpdate]:
    return [
        ClientUpdate(
            run_id=run.id,
            experiment_id=run.experiment_id,
            server_round=server_round,
            created_at=created_at,
            metrics=dict(update.metrics),
            **{f: getattr(update, f) for f in _COLUMNS},
        )
        for update in updates
    ]
