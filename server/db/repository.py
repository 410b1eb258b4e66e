"""Keyword-only data-access functions for the REST API, the run follower and the recorder.

Every function takes the caller's session first, flushes what it writes (so ids and defaults
are filled in) and leaves the commit to the caller: one request, one transaction. This is the
only writer of ``experiments`` rows: each change of status goes through ``_transition``, which
enforces florist.server.db.status.TRANSITIONS in the UPDATE itself.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, cast

from sqlalchemy import ColumnElement, Select, and_, case, func, literal, or_, select, tuple_, update
from sqlalchemy import inspect as orm_inspect
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import CursorResult, Row
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from florist.server.db.models import (
    Checkpoint,
    ClientUpdate,
    Event,
    Experiment,
    Node,
    Round,
    utcnow,
)
from florist.server.db.status import (
    ExperimentStatus,
    IllegalTransition,
    as_status,
    finish_plan,
    legal_moves,
    plan_target,
    start_plan,
    to_status,
)
from florist.server.metrics import ACCURACY, VAL_ACCURACY, BestBy, best_round, metric

# Columns a caller may change after creation besides the status, which has its own argument.
_UPDATABLE_EXPERIMENT_FIELDS = frozenset(Experiment.__table__.columns.keys()) - {"id", "status"}
# A change of status can race with another writer's; retried this often when it does.
_TRANSITION_ATTEMPTS = 3


class ExperimentNotFoundError(LookupError):
    """No experiment has the requested id."""


@dataclass(frozen=True)
class Progress:
    """Where an experiment stands, for list views.

    ``current_round`` and ``last_metrics`` come from the latest run's newest round;
    ``best_round`` is the round chosen by :func:`florist.server.metrics.best_round` over all its
    rounds (the highest ``val-accuracy``; rounds recorded without one: the last round), ``best_by``
    the rule that chose it, and ``best_accuracy`` and ``best_val_accuracy`` that round's test and
    validation accuracy: the test split is reported, never chosen on;
    ``accepted_updates`` counts the client updates aggregated over all its runs (the progress
    measure of an asynchronous run, whose "rounds" are aggregations).
    """

    current_round: int = 0
    best_accuracy: float | None = None
    last_metrics: dict[str, Any] = field(default_factory=dict)
    accepted_updates: int = 0
    best_round: int | None = None
    best_val_accuracy: float | None = None
    best_by: BestBy | None = None


def create_experiment(
    session: Session,
    *,
    name: str,
    strategy: str,
    dataset: str,
    num_rounds: int,
    spec: Mapping[str, Any],
) -> Experiment:
    """Add a pending experiment."""
    experiment = Experiment(
        name=name,
        status=ExperimentStatus.PENDING,
        strategy=strategy,
        dataset=dataset,
        num_rounds=num_rounds,
        spec=dict(spec),
        created_at=utcnow(),
    )
    session.add(experiment)
    session.flush()
    return experiment


EXTERNAL = "external"


def get_or_create_external_experiment(
    session: Session,
    *,
    flwr_run_id: int,
    name: str,
    strategy: str,
    num_rounds: int,
    spec: Mapping[str, Any],
    status: ExperimentStatus = ExperimentStatus.SUBMITTED,
    started_at: datetime | None = None,
    finished_at: datetime | None = None,
    error: str | None = None,
    created_at: datetime | None = None,
) -> tuple[Experiment, bool]:
    """The experiment of Flower run ``flwr_run_id``, and whether it was created just now.

    A run nobody has a row for becomes an external experiment with the given columns; a run
    that already has one (Florist's own, or found first by another writer) is returned as it
    is. Two writers creating the same run at once (the recording ServerApp and the API's
    discovery) meet on the unique index of external run ids: the loser's flush raises
    IntegrityError, and its transaction must be rolled back and run again, when it finds the
    winner's row (``ensure_external_experiment`` does that).
    """
    found = _experiment_of_run(session, flwr_run_id)
    if found is not None:
        return found, False
    experiment = Experiment(
        name=name,
        status=as_status(status),
        source=EXTERNAL,
        strategy=strategy,
        dataset="",
        num_rounds=num_rounds,
        spec=dict(spec),
        flwr_run_id=flwr_run_id,
        created_at=created_at or utcnow(),
        started_at=started_at,
        finished_at=finished_at,
        error=error,
    )
    session.add(experiment)
    session.flush()
    return experiment, True


def ensure_external_experiment(
    sessions: sessionmaker[Session], **columns: Any
) -> tuple[Experiment, bool]:
    """``get_or_create_external_experiment`` in a transaction of its own, committed.

    The one function here that owns its transaction: losing the race for a run means a fresh
    transaction, and with it a fresh read of the winner's row. (A savepoint would not do:
    pysqlite's SAVEPOINT outside a transaction commits on release.)
    """
    for attempt in range(_TRANSITION_ATTEMPTS):
        try:
            with sessions.begin() as session:
                return get_or_create_external_experiment(session, **columns)
        except IntegrityError:
            if attempt == _TRANSITION_ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")


def _experiment_of_run(session: Session, flwr_run_id: int) -> Experiment | None:
    # An external row first: Florist's own rows are not unique by run id, an external one is.
    return session.scalars(
        select(Experiment)
        .where(Experiment.flwr_run_id == flwr_run_id)
        .order_by((Experiment.source == EXTERNAL).desc(), Experiment.id)
        .limit(1)
    ).first()


def known_flwr_run_ids(session: Session, *, flwr_run_ids: Iterable[int]) -> set[int]:
    """Those of ``flwr_run_ids`` that some experiment (Florist's or external) is linked to."""
    wanted = list(set(flwr_run_ids))
    if not wanted:
        return set()
    found = session.scalars(
        select(Experiment.flwr_run_id).where(Experiment.flwr_run_id.in_(wanted))
    ).all()
    return {run_id for run_id in found if run_id is not None}


def get_experiment(session: Session, *, experiment_id: int) -> Experiment | None:
    """Return the experiment, or None if there is none with this id."""
    return session.get(Experiment, experiment_id)


def list_experiments(
    session: Session,
    *,
    offset: int = 0,
    limit: int = 100,
    statuses: Iterable[ExperimentStatus] | None = None,
) -> tuple[list[Experiment], int]:
    """Return one page of experiments, newest first, and the total count; only those in
    ``statuses`` when given (an empty collection matches nothing)."""
    count = select(func.count()).select_from(Experiment)
    query = select(Experiment)
    if statuses is not None:
        wanted = [as_status(s).value for s in statuses]
        count = count.where(Experiment.status.in_(wanted))
        query = query.where(Experiment.status.in_(wanted))
    total = session.scalar(count) or 0
    page = session.scalars(
        query.order_by(Experiment.created_at.desc(), Experiment.id.desc())
        .offset(offset)
        .limit(limit)
    ).all()
    return list(page), total


def list_active_experiment_ids(session: Session) -> list[int]:
    """Ids of the experiments that have not ended, oldest first (the follower's work list)."""
    active = [s.value for s in ExperimentStatus if s.active]
    return list(
        session.scalars(
            select(Experiment.id).where(Experiment.status.in_(active)).order_by(Experiment.id)
        ).all()
    )


# Submission claims write the status with a conditional UPDATE of their own (the condition is
# the claim); the moves they make must be legal ones.
assert ExperimentStatus.PENDING.may_become(ExperimentStatus.SUBMITTED)


def claim_submission(session: Session, *, experiment_id: int, token: str, now: datetime) -> bool:
    """Claim a pending, unclaimed experiment for submission; True if this caller now holds it.

    One UPDATE decides, so of several followers (API processes) on one database exactly one
    wins. Commit before starting the run: the claim must outlive a crash during StartRun.
    """
    result = session.execute(
        update(Experiment)
        .where(
            Experiment.id == experiment_id,
            Experiment.status == ExperimentStatus.PENDING.value,
            Experiment.submission_token.is_(None),
        )
        .values(submission_token=token, claimed_at=now)
    )
    return cast(CursorResult[Any], result).rowcount == 1


def record_submission(
    session: Session, *, experiment_id: int, token: str, flwr_run_id: int
) -> bool:
    """The claimed experiment was submitted as Flower run ``flwr_run_id``: SUBMITTED, the claim
    released. False (nothing written) if the claim is no longer ``token``'s or the experiment
    is no longer pending (cancelled, released by reconciliation, or already started)."""
    result = session.execute(
        update(Experiment)
        .where(
            Experiment.id == experiment_id,
            Experiment.status == ExperimentStatus.PENDING.value,
            Experiment.submission_token == token,
        )
        .values(
            status=ExperimentStatus.SUBMITTED.value,
            flwr_run_id=flwr_run_id,
            submission_token=None,
            claimed_at=None,
        )
    )
    return cast(CursorResult[Any], result).rowcount == 1


def current_flwr_run_id(session: Session, *, experiment_id: int) -> int | None:
    """The Flower run the experiment is on now (None: none, e.g. waiting to be resubmitted)."""
    return session.scalar(select(Experiment.flwr_run_id).where(Experiment.id == experiment_id))


def requeue_lost_run(session: Session, *, experiment_id: int, flwr_run_id: int) -> bool:
    """The experiment's Flower run ``flwr_run_id`` was lost while it ran: the experiment is
    pending again (run id and claim cleared, ``resumes`` counted), to be submitted anew and
    resume from its last committed round. False, writing nothing, if it is no longer that run's
    or no longer submitted or running (a cancel or a finish got there first)."""
    assert ExperimentStatus.RUNNING.may_become(ExperimentStatus.PENDING)
    result = session.execute(
        update(Experiment)
        .where(
            Experiment.id == experiment_id,
            Experiment.flwr_run_id == flwr_run_id,
            Experiment.status.in_(
                [ExperimentStatus.SUBMITTED.value, ExperimentStatus.RUNNING.value]
            ),
        )
        .values(
            status=ExperimentStatus.PENDING.value,
            flwr_run_id=None,
            submission_token=None,
            claimed_at=None,
            resumes=Experiment.resumes + 1,
        )
    )
    return cast(CursorResult[Any], result).rowcount == 1


def reopen_failed(session: Session, *, experiment_id: int) -> bool:
    """A user's resume of a failed experiment: pending again, its error and end cleared, to
    go on from its last committed round. The one way out of FAILED, a terminal status for
    everything else (the follower never revisits it on its own). False if it is not failed."""
    result = session.execute(
        update(Experiment)
        .where(Experiment.id == experiment_id, Experiment.status == ExperimentStatus.FAILED.value)
        .values(
            status=ExperimentStatus.PENDING.value,
            flwr_run_id=None,
            submission_token=None,
            claimed_at=None,
            finished_at=None,
            error=None,
            resumes=Experiment.resumes + 1,
        )
    )
    return cast(CursorResult[Any], result).rowcount == 1


def release_claim(session: Session, *, experiment_id: int, token: str) -> bool:
    """Give up ``token``'s claim (no run carries it): the experiment may be submitted again."""
    result = session.execute(
        update(Experiment)
        .where(Experiment.id == experiment_id, Experiment.submission_token == token)
        .values(submission_token=None, claimed_at=None)
    )
    return cast(CursorResult[Any], result).rowcount == 1


def stale_claims(session: Session, *, claimed_before: datetime) -> list[tuple[int, str]]:
    """(experiment id, token) of pending experiments claimed before ``claimed_before`` and not
    yet recorded as submitted: their follower died, or its StartRun had an unknown outcome."""
    rows = session.execute(
        select(Experiment.id, Experiment.submission_token).where(
            Experiment.status == ExperimentStatus.PENDING.value,
            Experiment.submission_token.is_not(None),
            Experiment.claimed_at < claimed_before,
        )
    ).all()
    return [(experiment_id, str(token)) for experiment_id, token in rows]


def _check_fields(fields: Mapping[str, Any]) -> None:
    unknown = set(fields) - _UPDATABLE_EXPERIMENT_FIELDS
    if unknown:
        raise TypeError(
            f"unknown experiment fields {sorted(unknown)}; "
            f"known: {sorted(_UPDATABLE_EXPERIMENT_FIELDS)}"
        )


def _reload(session: Session, experiment_id: int) -> Experiment:
    experiment = session.get(Experiment, experiment_id, populate_existing=True)
    if experiment is None:
        raise ExperimentNotFoundError(f"experiment {experiment_id} does not exist")
    return experiment


def _transition(
    session: Session,
    experiment_id: int,
    plan: Mapping[ExperimentStatus, ExperimentStatus],
    fields: Mapping[str, Any],
) -> Experiment:
    """Move the experiment along ``plan`` (current status -> new status), writing ``fields``
    with the new status, in one UPDATE.

    The status is decided by the database from the row's status at the moment of the write,
    never from an earlier read, so a concurrent writer (the API's cancel, the ServerApp's
    finish) cannot be overwritten by a stale decision. A terminal status repeated writes
    nothing (see ``plan_target``). Raises IllegalTransition, having written nothing, when the
    current status has no legal target in the plan.
    """
    moves = legal_moves(plan)
    current = ExperimentStatus.PENDING  # overwritten by the first read below
    for _ in range(_TRANSITION_ATTEMPTS):
        if moves:
            changed = session.execute(
                update(Experiment)
                .where(
                    Experiment.id == experiment_id,
                    Experiment.status.in_([s.value for s in moves]),
                )
                .values(
                    status=case(
                        {old.value: new.value for old, new in moves.items()},
                        value=Experiment.status,
                    ),
                    **fields,
                )
                .execution_options(synchronize_session=False)
            )
            if cast(CursorResult[Any], changed).rowcount == 1:
                return _reload(session, experiment_id)
        found = session.scalar(select(Experiment.status).where(Experiment.id == experiment_id))
        if found is None:
            raise ExperimentNotFoundError(f"experiment {experiment_id} does not exist")
        current = found
        if plan_target(plan, current, experiment_id=experiment_id) is None:
            return _reload(session, experiment_id)
        # Otherwise the status changed between the UPDATE and this read: try again.
    raise IllegalTransition(current, plan.get(current), experiment_id)


def update_experiment(
    session: Session,
    *,
    experiment_id: int,
    status: ExperimentStatus | str | None = None,
    **fields: Any,
) -> Experiment:
    """Set the given columns on an experiment, and its status when given.

    A status must be allowed to follow the current one (florist.server.db.status.TRANSITIONS):
    IllegalTransition otherwise, with nothing written. Repeating a terminal status writes
    nothing, not even the other fields: the first finish wins. Raises TypeError for a name
    that is not an updatable column, ValueError for an unknown status, and
    ExperimentNotFoundError when the experiment does not exist.
    """
    _check_fields(fields)
    if status is not None:
        return _transition(session, experiment_id, to_status(as_status(status)), fields)
    experiment = session.get(Experiment, experiment_id)
    if experiment is None:
        raise ExperimentNotFoundError(f"experiment {experiment_id} does not exist")
    for name, value in fields.items():
        setattr(experiment, name, value)
    session.flush()
    return experiment


def start_experiment(
    session: Session, *, experiment_id: int, flwr_run_id: int, started_at: datetime
) -> Experiment:
    """Mark the experiment running as its ServerApp starts a run.

    A cancel requested before the run came up survives its start (CANCELLING stays, and the
    follower stops the run). A finished experiment is never set back to running, a cancelled
    one included: IllegalTransition.
    """
    fields = {"started_at": started_at, "flwr_run_id": flwr_run_id}
    return _transition(session, experiment_id, start_plan(), fields)


def locked_status(session: Session, *, experiment_id: int) -> ExperimentStatus | None:
    """The experiment's status, its row locked until the transaction ends (PostgreSQL; SQLite
    holds its one write lock once the transaction has written): a writer that checks the status
    and then writes cannot be overtaken by a status change in between. None: no such row."""
    return session.scalar(
        select(Experiment.status).where(Experiment.id == experiment_id).with_for_update()
    )


def finish_experiment(
    session: Session,
    *,
    experiment_id: int,
    status: ExperimentStatus | str,
    finished_at: datetime,
    error: str | None = None,
) -> Experiment:
    """End the experiment with ``status`` (completed, failed or cancelled).

    A cancel, under way or done, wins over the run's own outcome: the experiment ends (or
    stays) cancelled. Finishing it again with the status it has writes nothing (the first
    finish's time and error stay); finishing it with another terminal status is an
    IllegalTransition. The error is written only when given, so an earlier one is not wiped.
    """
    plan = finish_plan(as_status(status))
    fields: dict[str, Any] = {"finished_at": finished_at}
    if error is not None:
        fields["error"] = error
    return _transition(session, experiment_id, plan, fields)


def list_checkpoints(session: Session, *, experiment_id: int) -> list[Checkpoint]:
    """The experiment's kept models, oldest round first (their bytes are not loaded)."""
    stmt = (
        select(Checkpoint)
        .where(Checkpoint.experiment_id == experiment_id)
        .order_by(Checkpoint.server_round)
    )
    return list(session.scalars(stmt))


def get_checkpoint(
    session: Session, *, experiment_id: int, server_round: int | None = None
) -> Checkpoint | None:
    """The kept model of ``server_round``, or the latest one (the final model of a finished
    run); None if there is none."""
    stmt = select(Checkpoint).where(Checkpoint.experiment_id == experiment_id)
    if server_round is not None:
        stmt = stmt.where(Checkpoint.server_round == server_round)
    stmt = stmt.order_by(Checkpoint.server_round.desc()).limit(1)
    return session.scalars(stmt).first()


def list_rounds(session: Session, *, experiment_id: int) -> list[Round]:
    """Return the experiment's rounds, by run and then by server round."""
    rounds = session.scalars(
        select(Round)
        .where(Round.experiment_id == experiment_id)
        .order_by(Round.run_id, Round.server_round)
    ).all()
    return list(rounds)


def list_updates(
    session: Session, *, experiment_id: int, server_round: int | None = None
) -> list[ClientUpdate]:
    """Return the experiment's client updates, optionally of one server round, in order."""
    query = select(ClientUpdate).where(ClientUpdate.experiment_id == experiment_id)
    if server_round is not None:
        query = query.where(ClientUpdate.server_round == server_round)
    query = query.order_by(ClientUpdate.run_id, ClientUpdate.server_round, ClientUpdate.id)
    return list(session.scalars(query).all())


def experiment_progress(session: Session, *, experiment_ids: Sequence[int]) -> dict[int, Progress]:
    """Return the progress of each requested experiment; those without rounds get Progress()."""
    ids = list(dict.fromkeys(experiment_ids))
    progress = {experiment_id: Progress() for experiment_id in ids}
    if not ids:
        return progress

    # Metrics are JSON, and extracting a float from it differs per backend and fails on odd
    # values in PostgreSQL, so the best round is picked here, oldest round first.
    history: dict[int, list[tuple[int, dict[str, Any] | None]]] = {}
    for experiment_id, server_round, metrics in session.execute(
        select(Round.experiment_id, Round.server_round, Round.metrics)
        .where(Round.experiment_id.in_(ids))
        .order_by(Round.experiment_id, Round.run_id, Round.server_round)
    ):
        history.setdefault(experiment_id, []).append((server_round, metrics))
    best: dict[int, Progress] = {}
    for experiment_id, rounds in history.items():
        chosen = best_round([metrics for _, metrics in rounds])
        if chosen is not None:
            index, rule = chosen
            server_round, metrics = rounds[index]
            best[experiment_id] = Progress(
                best_round=server_round,
                best_accuracy=metric(metrics, ACCURACY),
                best_val_accuracy=metric(metrics, VAL_ACCURACY),
                best_by=rule,
            )

    accepted = dict(
        session.execute(
            select(ClientUpdate.experiment_id, func.count())
            .where(ClientUpdate.experiment_id.in_(ids), ClientUpdate.status == "accepted")
            .group_by(ClientUpdate.experiment_id)
        )
        .tuples()
        .all()
    )
    # The latest round closes each history (the order is run, then server round): a window
    # query for it cost as much as the rest of the summary (9 ms for 1,000 rounds, SQLite).
    for experiment_id, rounds in history.items():
        server_round, metrics = rounds[-1]
        progress[experiment_id] = replace(
            best.get(experiment_id, Progress()),
            current_round=server_round,
            last_metrics=dict(metrics or {}),
            accepted_updates=accepted.get(experiment_id, 0),
        )
    return progress


def _upsert_nodes(session: Session, rows: list[dict[str, Any]], *, update: Iterable[str]) -> None:
    """Insert node rows, or on a known node_id overwrite the columns named in ``update``."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        pg_statement = postgresql.insert(Node).values(rows)
        session.execute(
            pg_statement.on_conflict_do_update(
                index_elements=[Node.node_id],
                set_={name: pg_statement.excluded[name] for name in update},
            )
        )
    elif dialect == "sqlite":
        sqlite_statement = sqlite.insert(Node).values(rows)
        session.execute(
            sqlite_statement.on_conflict_do_update(
                index_elements=[Node.node_id],
                set_={name: sqlite_statement.excluded[name] for name in update},
            )
        )
    else:
        raise NotImplementedError(f"node upsert is not implemented for {dialect}")


def upsert_node(session: Session, *, node_id: int, node_config: Mapping[str, Any]) -> Node:
    """Register a node, or refresh a known node's config and last_seen."""
    now = utcnow()
    _upsert_nodes(
        session,
        [
            {
                "node_id": node_id,
                "node_config": dict(node_config),
                "first_seen": now,
                "last_seen": now,
            }
        ],
        update=("node_config", "last_seen"),
    )
    node = session.scalars(
        select(Node).where(Node.node_id == node_id).execution_options(populate_existing=True)
    ).one()
    return node


def touch_nodes(
    session: Session,
    *,
    node_ids: Iterable[int],
    seen_at: datetime,
    node_configs: Mapping[int, Mapping[str, Any]] | None = None,
) -> None:
    """Set last_seen for these nodes, registering unknown ones; a node in ``node_configs``
    also gets that config (otherwise a known node keeps its own, a new one gets ``{}``)."""
    configs = node_configs or {}
    # Sorted, so that concurrent writers lock rows in the same order and cannot deadlock;
    # de-duplicated, because PostgreSQL refuses to update one row twice in a statement.
    unique_ids = sorted(set(node_ids) | set(configs))
    if not unique_ids:
        return
    for with_config in (False, True):
        rows = [
            {
                "node_id": node_id,
                "node_config": dict(configs.get(node_id, {})),
                "first_seen": seen_at,
                "last_seen": seen_at,
            }
            for node_id in unique_ids
            if (node_id in configs) == with_config
        ]
        if rows:
            update = ("node_config", "last_seen") if with_config else ("last_seen",)
            _upsert_nodes(session, rows, update=update)


def list_nodes(session: Session) -> list[Node]:
    """Return every known node, in registration order."""
    return list(session.scalars(select(Node).order_by(Node.id)).all())


def add_event(
    session: Session,
    *,
    kind: str,
    message: str,
    experiment_id: int | None = None,
    run_id: int | None = None,
    data: Mapping[str, Any] | None = None,
) -> Event:
    """Append an event to the timeline."""
    event = Event(
        experiment_id=experiment_id,
        run_id=run_id,
        kind=kind,
        message=message,
        data=dict(data) if data is not None else None,
        created_at=utcnow(),
    )
    session.add(event)
    session.flush()
    return event


def list_events(session: Session, *, experiment_id: int) -> list[Event]:
    """Return the experiment's events, oldest first."""
    events = session.scalars(
        select(Event)
        .where(Event.experiment_id == experiment_id)
        .order_by(Event.created_at, Event.id)
    ).all()
    return list(events)


def events_after(
    session: Session,
    *,
    experiment_id: int,
    after_id: int = 0,
    kinds: Sequence[str] | None = None,
) -> list[Event]:
    """Return the experiment's events whose row id is above ``after_id``, in row order,
    only those of ``kinds`` when given (an empty list matches nothing)."""
    query = select(Event).where(Event.experiment_id == experiment_id, Event.id > after_id)
    if kinds is not None:
        query = query.where(Event.kind.in_(list(kinds)))
    return list(session.scalars(query.order_by(Event.id)).all())


def columns_of(entity: type[Any]) -> tuple[Any, ...]:
    """The entity's loaded column attributes, to select as plain rows (deferred ones left out)."""
    return tuple(
        getattr(entity, attr.key) for attr in orm_inspect(entity).column_attrs if not attr.deferred
    )


# Listings that can run to thousands of rows read plain rows on the session's connection, not
# ORM objects: the ORM's execute path and its object per row were a quarter of the read of a
# 1,000-row page (17 ms against 13 ms; benchmarks/api_latency).
_ROUND_COLUMNS = columns_of(Round)
_UPDATE_COLUMNS = columns_of(ClientUpdate)


def _plain_rows(session: Session, query: Select[Any]) -> list[Row[Any]]:
    """``query``'s rows, read on the session's connection (see _ROUND_COLUMNS)."""
    return list(session.connection().execute(query).all())


def _rows_after(
    session: Session,
    entity: type[Round] | type[ClientUpdate],
    *,
    experiment_id: int,
    after_id: int,
    limit: int | None,
) -> list[Row[Any]]:
    columns = _ROUND_COLUMNS if entity is Round else _UPDATE_COLUMNS
    return _plain_rows(
        session,
        select(*columns)
        .where(entity.experiment_id == experiment_id, entity.id > after_id)
        .order_by(entity.id)
        .limit(limit),
    )


def rounds_after(
    session: Session, *, experiment_id: int, after_id: int = 0, limit: int | None = None
) -> list[Row[Any]]:
    """Return the experiment's rounds (read-only rows) whose row id is above ``after_id``,
    oldest row first (the first ``limit`` of them if given)."""
    return _rows_after(session, Round, experiment_id=experiment_id, after_id=after_id, limit=limit)


def updates_after(
    session: Session, *, experiment_id: int, after_id: int = 0, limit: int | None = None
) -> list[Row[Any]]:
    """Return the experiment's client updates (read-only rows) whose row id is above
    ``after_id``, in row order (the first ``limit`` of them if given)."""
    return _rows_after(
        session, ClientUpdate, experiment_id=experiment_id, after_id=after_id, limit=limit
    )


def row_ids_through_round(
    session: Session, *, experiment_id: int, server_round: int
) -> tuple[int, int]:
    """Return the highest round and update row ids of server rounds up to ``server_round``.

    A stream that resumes "since round k" starts after these ids; (0, 0) when there are none.
    """
    round_id = session.scalar(
        select(func.max(Round.id)).where(
            Round.experiment_id == experiment_id, Round.server_round <= server_round
        )
    )
    update_id = session.scalar(
        select(func.max(ClientUpdate.id)).where(
            ClientUpdate.experiment_id == experiment_id,
            ClientUpdate.server_round <= server_round,
        )
    )
    return round_id or 0, update_id or 0


@dataclass(frozen=True)
class Page:
    """One page of a listing: its rows, the number of rows the listing has in all, and whether
    rows follow the page's last one (then its id is the next page's cursor)."""

    rows: list[Any]
    total: int
    more: bool

    @property
    def next_cursor(self) -> int | None:
        return self.rows[-1].id if self.more and self.rows else None


class UnknownCursorError(LookupError):
    """The cursor names no row of the listing (a cursor is the id of a page's last row)."""


def _page(
    session: Session, query: Select[Any], count: Select[Any], limit: int, *, plain: bool = False
) -> Page:
    """A page of ``query``'s entities, or of its plain rows when ``plain`` (a select of columns)."""
    # One row past the page says whether another page follows, without a second count.
    if plain:
        rows = _plain_rows(session, query.limit(limit + 1))
    else:
        rows = list(session.scalars(query.limit(limit + 1)).all())
    # Plain listings count on the connection as well: the ORM's execute path adds nothing there.
    total = session.connection().scalar(count) if plain else session.scalar(count)
    return Page(rows=rows[:limit], total=total or 0, more=len(rows) > limit)


def page_experiments(
    session: Session,
    *,
    limit: int,
    after_id: int | None = None,
    offset: int = 0,
    statuses: Iterable[ExperimentStatus] | None = None,
) -> Page:
    """Experiments newest first, ``limit`` of them after the one with id ``after_id``.

    Keyset pagination on (created_at, id): an experiment submitted while a client pages
    lands at the top, and never shifts a later page (as an offset would)."""
    where: list[ColumnElement[bool]] = []
    if statuses is not None:
        where.append(Experiment.status.in_([as_status(s).value for s in statuses]))
    count = select(func.count()).select_from(Experiment).where(*where)
    if after_id is not None:
        anchor = session.get(Experiment, after_id)
        if anchor is None:
            raise UnknownCursorError(f"no experiment {after_id}")
        where.append(
            or_(
                Experiment.created_at < anchor.created_at,
                and_(Experiment.created_at == anchor.created_at, Experiment.id < anchor.id),
            )
        )
    query = (
        select(Experiment)
        .where(*where)
        .order_by(Experiment.created_at.desc(), Experiment.id.desc())
        .offset(offset)
    )
    return _page(session, query, count, limit)


def page_rounds(
    session: Session, *, experiment_id: int, limit: int, after_id: int | None = None
) -> Page:
    """The experiment's rounds by run and server round, ``limit`` of them after row ``after_id``."""
    where: list[ColumnElement[bool]] = [Round.experiment_id == experiment_id]
    count = select(func.count()).select_from(Round).where(*where)
    key = tuple_(Round.run_id, Round.server_round, Round.id)
    if after_id is not None:
        anchor = session.get(Round, after_id)
        if anchor is None or anchor.experiment_id != experiment_id:
            raise UnknownCursorError(f"no round row {after_id} in experiment {experiment_id}")
        where.append(key > tuple_(*map(literal, (anchor.run_id, anchor.server_round, anchor.id))))
    query = (
        select(*_ROUND_COLUMNS).where(*where).order_by(Round.run_id, Round.server_round, Round.id)
    )
    return _page(session, query, count, limit, plain=True)


def page_updates(
    session: Session,
    *,
    experiment_id: int,
    limit: int,
    after_id: int | None = None,
    server_round: int | None = None,
) -> Page:
    """The experiment's client updates (of one server round if given) by run, round and row,
    ``limit`` of them after row ``after_id``."""
    where: list[ColumnElement[bool]] = [ClientUpdate.experiment_id == experiment_id]
    if server_round is not None:
        where.append(ClientUpdate.server_round == server_round)
    count = select(func.count()).select_from(ClientUpdate).where(*where)
    key = tuple_(ClientUpdate.run_id, ClientUpdate.server_round, ClientUpdate.id)
    if after_id is not None:
        anchor = session.get(ClientUpdate, after_id)
        if anchor is None or anchor.experiment_id != experiment_id:
            raise UnknownCursorError(f"no update row {after_id} in experiment {experiment_id}")
        where.append(key > tuple_(*map(literal, (anchor.run_id, anchor.server_round, anchor.id))))
    query = (
        select(*_UPDATE_COLUMNS)
        .where(*where)
        .order_by(ClientUpdate.run_id, ClientUpdate.server_round, ClientUpdate.id)
    )
    return _page(session, query, count, limit, plain=True)


def page_events(
    session: Session,
    *,
    experiment_id: int,
    limit: int,
    after_id: int = 0,
    kinds: Sequence[str] | None = None,
    cursor: int | None = None,
) -> Page:
    """The experiment's events of ``kinds`` (all if None) whose row id is above ``after_id``,
    by row id: ``limit`` of them after row ``cursor`` (``total`` counts them all)."""
    where: list[ColumnElement[bool]] = [Event.experiment_id == experiment_id, Event.id > after_id]
    if kinds is not None:
        where.append(Event.kind.in_(list(kinds)))
    count = select(func.count()).select_from(Event).where(*where)
    if cursor is not None:
        where.append(Event.id > cursor)
    return _page(session, select(Event).where(*where).order_by(Event.id), count, limit)
