"""The SQL run recorder: writes runs, rounds, client updates and events, one transaction a call."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.engine import URL, Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from florist.server.db.engine import make_engine, make_session_factory
from florist.server.db.models import (
    Checkpoint,
    ClientUpdate,
    ResumePointRow,
    Round,
    Run,
    utcnow,
)
from florist.server.db.repository import (
    ExperimentNotFoundError,
    add_event,
    current_flwr_run_id,
    finish_experiment,
    locked_status,
    start_experiment,
    touch_nodes,
)
from florist.server.db.status import (
    TERMINAL_STATUSES,
    IllegalTransition,
)

from .artifacts import digest
from .base import (
    _EXPERIMENT_STATUS_FOR,
    FINISH_REFUSED,
    RUN_INTERRUPTED,
    DuplicateRoundError,
    ModelCheckpoint,
    RoundRecord,
    RunFinishedError,
    RunOutcome,
    RunRecorder,
    RunSupersededError,
    StoredResume,
    UnknownExperimentError,
    UnknownRunError,
    UpdateRecord,
    _node_configs,
    _refused_finish,
    _seen_node_ids,
    ended_error,
    superseded_message,
)

log = logging.getLogger(__name__)


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
    def _open_run(session: Session, run_id: int, *, current: bool = True) -> Run:
        """The run, open; ``current``: and still its experiment's run (a ServerApp that
        outlived its lost run must not write beside the run that took over)."""
        run = session.get(Run, run_id)
        if run is None:
            raise UnknownRunError(f"run {run_id} does not exist")
        if run.finished_at is not None:
            raise RunFinishedError(f"run {run_id} has already finished")
        if current:
            now = _current_flwr_run(session, run)
            if now != run.flwr_run_id:
                raise RunSupersededError(superseded_message(run_id, run.flwr_run_id, now))
        return run

    @staticmethod
    def _refuse_if_ended(session: Session, run: Run) -> None:
        """Raise ExperimentEndedError if the run's experiment has ended. Called after the
        transaction's first write: SQLite then holds the write lock and PostgreSQL locks the
        experiment row, so a cancel commits either before this check or after the round."""
        status = locked_status(session, experiment_id=run.experiment_id)
        if status in TERMINAL_STATUSES:
            raise ended_error(run.id, run.experiment_id, status)

    def start_run(self, *, experiment_id: int, flwr_run_id: int) -> int:
        now = utcnow()
        with self._session_factory() as session, session.begin():
            try:
                start_experiment(
                    session, experiment_id=experiment_id, flwr_run_id=flwr_run_id, started_at=now
                )
            except ExperimentNotFoundError as exc:
                raise UnknownExperimentError(str(exc)) from exc
            # An earlier run of the experiment still open was lost (its ServerApp died): it is
            # closed now, so nothing it might still send is recorded beside this run's rounds.
            session.execute(
                update(Run)
                .where(Run.experiment_id == experiment_id, Run.finished_at.is_(None))
                .values(
                    status="interrupted",
                    finished_at=now,
                    error=f"lost; Flower run {flwr_run_id} took over the experiment",
                )
            )
            run = Run(
                experiment_id=experiment_id,
                flwr_run_id=flwr_run_id,
                status="running",
                started_at=now,
            )
            session.add(run)
            session.flush()
            run_id = run.id
        # Named on the line itself: the ServerApp's log context knows the experiment, not the
        # run that this call opens.
        ids = {"experiment_id": experiment_id, "run_id": run_id, "flwr_run_id": flwr_run_id}
        log.info("run %d started (Flower run %d)", run_id, flwr_run_id, extra=ids)
        return run_id

    @staticmethod
    def _round_exists(session: Session, run_id: int, server_round: int) -> bool:
        # Any run of the experiment: a resumed run never records a round an earlier one did.
        experiment_id = select(Run.experiment_id).where(Run.id == run_id).scalar_subquery()
        found = session.scalar(
            select(Round.id).where(
                Round.experiment_id == experiment_id, Round.server_round == server_round
            )
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
                        aggregate_s=record.aggregate_s,
                        bytes_in=record.bytes_in,
                        bytes_out=record.bytes_out,
                    )
                )
                # The round goes first, so a concurrent duplicate fails here on the unique
                # constraint before any update row is written.
                session.flush()
                self._refuse_if_ended(session, run)
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
                if record.checkpoint is not None:
                    _store_checkpoint(session, run, record.server_round, record.checkpoint)
                _store_resume_point(session, run, record.server_round, record.resume)
                experiment_id = run.experiment_id
        except IntegrityError as error:
            # Another writer may have stored the same round between our check and insert.
            with self._session_factory() as session:
                if self._round_exists(session, run_id, record.server_round):
                    raise duplicate from error
            raise
        log.info(
            "round %d recorded: %d accepted, %d rejected, %d failed; %.1f s, aggregation %s; "
            "%d bytes in, %d bytes out",
            record.server_round,
            record.num_updates,
            record.num_rejected,
            record.num_failures,
            (record.finished_at - record.started_at).total_seconds(),
            "not measured" if record.aggregate_s is None else f"{record.aggregate_s:.3f} s",
            record.bytes_in,
            record.bytes_out,
            extra={"experiment_id": experiment_id, "run_id": run_id},
        )

    def checkpoints(self, run_id: int) -> dict[int, bytes]:
        with self._session_factory() as session:
            run = session.get(Run, run_id)
            if run is None:
                raise UnknownRunError(f"run {run_id} does not exist")
            rows = session.execute(
                select(Checkpoint.server_round, Checkpoint.data)
                .where(Checkpoint.experiment_id == run.experiment_id)
                .order_by(Checkpoint.server_round)
            ).all()
            return {r: bytes(data) for r, data in rows}

    def resume_from(self, experiment_id: int) -> StoredResume | None:
        with self._session_factory() as session:
            last = session.scalar(
                select(func.max(Round.server_round)).where(Round.experiment_id == experiment_id)
            )
            if last is None:
                return None
            state = session.scalar(
                select(ResumePointRow.data).where(
                    ResumePointRow.experiment_id == experiment_id,
                    ResumePointRow.server_round == last,
                )
            )
            model = session.scalar(
                select(Checkpoint.data).where(
                    Checkpoint.experiment_id == experiment_id, Checkpoint.server_round == last
                )
            )
            return StoredResume(
                last,
                bytes(state) if state is not None else None,
                bytes(model) if model is not None else None,
            )

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
            run = self._open_run(session, run_id, current=False)
            experiment_id = run.experiment_id
            run.status = status
            run.finished_at = now
            run.error = error
            run.final_metrics = dict(final_metrics) if final_metrics is not None else None
            session.flush()
            current = _current_flwr_run(session, run)
            if status == "interrupted" and current == run.flwr_run_id:
                add_event(
                    session,
                    kind=RUN_INTERRUPTED,
                    message=f"run {run_id} was interrupted ({error}); the experiment is left "
                    "to resume from its last committed round",
                    experiment_id=run.experiment_id,
                    run_id=run_id,
                )
                return
            if current != run.flwr_run_id:
                # Its end is not the experiment's: another run carries it on.
                message = superseded_message(run_id, run.flwr_run_id, current)
                add_event(
                    session,
                    kind=FINISH_REFUSED,
                    message=f"{message}; its own end ({status}) leaves the experiment as it is",
                    experiment_id=run.experiment_id,
                    run_id=run_id,
                )
                return
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
        ids = {"experiment_id": experiment_id, "run_id": run_id}
        log.info("run %d finished %s%s", run_id, status, f": {error}" if error else "", extra=ids)

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
                    aggregate_s=row.aggregate_s,
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


def _store_checkpoint(
    session: Session, run: Run, server_round: int, checkpoint: ModelCheckpoint
) -> None:
    # In the round's transaction: a committed round always has its model, and what the
    # retention policy drops goes in the same commit.
    if checkpoint.drop_rounds:
        session.execute(
            delete(Checkpoint).where(
                Checkpoint.experiment_id == run.experiment_id,
                Checkpoint.server_round.in_(checkpoint.drop_rounds),
            )
        )
    # A resumed run may aggregate a round again: its model replaces the earlier one.
    session.execute(
        delete(Checkpoint).where(
            Checkpoint.experiment_id == run.experiment_id,
            Checkpoint.server_round == server_round,
        )
    )
    data = checkpoint.safetensors
    session.add(
        Checkpoint(
            experiment_id=run.experiment_id,
            run_id=run.id,
            server_round=server_round,
            sha256=digest(data),
            num_bytes=len(data),
            data=data,
        )
    )


def _store_resume_point(session: Session, run: Run, server_round: int, data: bytes | None) -> None:
    # Replaced in the round's transaction: the point on record always follows the last
    # committed round, or there is none (a strategy whose state cannot be saved).
    session.execute(delete(ResumePointRow).where(ResumePointRow.experiment_id == run.experiment_id))
    if data is not None:
        session.add(
            ResumePointRow(
                experiment_id=run.experiment_id,
                run_id=run.id,
                server_round=server_round,
                sha256=digest(data),
                num_bytes=len(data),
                data=data,
            )
        )


def _current_flwr_run(session: Session, run: Run) -> int | None:
    return current_flwr_run_id(session, experiment_id=run.experiment_id)
