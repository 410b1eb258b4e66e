"""Experiments: submit, list, read rounds, updates and the event log, cancel."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, HTTPException, Query, status
from fastapi.exceptions import RequestValidationError

from florist.client.models import build_model
from florist.datasets import dataset_info
from florist.server.api.deps import DB_INT_MAX, ExperimentId, FollowerDep, SessionDep
from florist.server.api.external import external_to_public
from florist.server.api.schemas import (
    EventPublic,
    EventsPublic,
    ExperimentCreate,
    ExperimentPublic,
    ExperimentsPublic,
    RoundPublic,
    RoundsPublic,
    UpdatePublic,
    UpdatesPublic,
)
from florist.server.db import repository as repo
from florist.server.db.models import ClientUpdate, Event, Experiment, Round
from florist.server.db.repository import EXTERNAL, Progress
from florist.server.db.status import ExperimentStatus, IllegalTransition
from florist.server.spec import (
    ExperimentSpec,
    StrategySpecError,
    experiment_row,
    resolve_strategy,
    server_setup,
)
from florist.strategies import default_registry
from florist.strategies.events import DropoutPolicyError
from florist.strategies.fal import FalConfig, clip_range_errors
from florist.strategies.flower_adapter import as_scheduler
from florist.strategies.registry import StrategyRegistryError

router = APIRouter(prefix="/experiments", tags=["experiments"])


def _is_asynchronous(strategy: str) -> bool:
    try:
        return "async" in default_registry().get(strategy).tags
    except StrategyRegistryError:  # uninstalled since the experiment ran: it still lists
        return False


def to_public(exp: Experiment, progress: Progress | None = None) -> ExperimentPublic:
    if exp.source == EXTERNAL:
        return external_to_public(exp, progress)
    spec = ExperimentSpec.model_validate(exp.spec)
    progress = progress or Progress()
    return ExperimentPublic(
        id=exp.id,
        name=exp.name,
        status=exp.status,
        strategy=spec.strategy,
        dataset=spec.dataset.model_dump(mode="json"),
        model=spec.model.model_dump(mode="json"),
        training=spec.training.model_dump(mode="json"),
        clients=spec.clients,
        num_rounds=exp.num_rounds,
        current_round=progress.current_round,
        asynchronous=_is_asynchronous(spec.strategy.name),
        accepted_updates=progress.accepted_updates,
        best_accuracy=progress.best_accuracy,
        best_round=progress.best_round,
        best_val_accuracy=progress.best_val_accuracy,
        best_by=progress.best_by,
        flwr_run_id=None if exp.flwr_run_id is None else str(exp.flwr_run_id),
        error=exp.error,
        created_at=exp.created_at,
        started_at=exp.started_at,
        finished_at=exp.finished_at,
    )


def round_to_public(row: Round) -> RoundPublic:
    return RoundPublic.model_validate(row, from_attributes=True)


def update_to_public(row: ClientUpdate) -> UpdatePublic:
    # Every UpdatePublic field is a column of the same name (the timeline ones included).
    fields = {name: getattr(row, name) for name in UpdatePublic.model_fields if name != "node_id"}
    return UpdatePublic.model_validate({**fields, "node_id": str(row.node_id)})


# Event data that holds node ids: uint64, so sent as strings that JavaScript keeps whole.
_NODE_ID_KEY = "node_id"
_NODE_ID_LIST_KEYS = frozenset({"node_ids", "queued", "lost", "waiting_for"})


def _as_id(value: Any) -> Any:
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


def _with_string_ids(data: dict[str, Any]) -> dict[str, Any]:
    out = dict(data)
    if _NODE_ID_KEY in out:
        out[_NODE_ID_KEY] = _as_id(out[_NODE_ID_KEY])
    for key in _NODE_ID_LIST_KEYS & out.keys():
        if isinstance(out[key], list):
            out[key] = [_as_id(v) for v in out[key]]
    return out


def event_to_public(row: Event) -> EventPublic:
    data = None if row.data is None else _with_string_ids(row.data)
    return EventPublic(
        id=row.id,
        run_id=row.run_id,
        kind=row.kind,
        message=row.message,
        data=data,
        created_at=row.created_at,
    )


def _body_errors(errors: list[dict[str, Any]]) -> RequestValidationError:
    return RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in errors])


def check_spec(spec: ExperimentSpec) -> None:
    """What field validation cannot see: the strategy's own config, model/dataset fit."""
    try:
        plugin, config = resolve_strategy(spec.strategy)
    except StrategySpecError as exc:
        raise _body_errors(exc.errors) from exc
    try:
        scheduler = as_scheduler(plugin.build_server(config, server_setup(spec)))
    except (ValueError, TypeError) as exc:  # e.g. a Flower strategy refusing its arguments
        raise _body_errors(
            [{"loc": ("strategy", "config"), "msg": str(exc), "type": "strategy_refused"}]
        ) from exc
    # An explicit clip range that cuts off some inputs would move them by more than ε.
    if isinstance(config, FalConfig) and (errors := clip_range_errors(config, spec.dataset)):
        raise _body_errors(errors)
    # Refused now rather than when the run starts: e.g. FedAsync has no rounds to police.
    try:
        scheduler.use_dropout_policy(spec.dropout)
    except DropoutPolicyError as exc:
        raise _body_errors(
            [{"loc": ("dropout",), "msg": str(exc), "type": "dropout_unsupported"}]
        ) from exc
    try:
        build_model(spec.model, dataset_info(spec.dataset))
    except ValueError as exc:
        raise _body_errors(
            [{"loc": ("model", "name"), "msg": str(exc), "type": "model_dataset_mismatch"}]
        ) from exc


def _get(session: SessionDep, experiment_id: int) -> Experiment:
    exp = repo.get_experiment(session, experiment_id=experiment_id)
    if exp is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"experiment {experiment_id} not found")
    return exp


@router.post("", response_model=ExperimentPublic, status_code=status.HTTP_201_CREATED)
def create_experiment(
    body: ExperimentCreate, session: SessionDep, follower: FollowerDep
) -> ExperimentPublic:
    check_spec(body)
    spec = ExperimentSpec.model_validate(body.model_dump())
    exp = repo.create_experiment(session, **experiment_row(spec))
    session.commit()
    if follower is not None:
        follower.wake()
    return to_public(exp)


@router.get("", response_model=ExperimentsPublic)
def list_experiments(
    session: SessionDep,
    offset: int = Query(0, ge=0, le=DB_INT_MAX),
    limit: int = Query(100, ge=1, le=1000),
    status_: list[ExperimentStatus] | None = Query(
        None, alias="status", description="Only experiments in these statuses (repeatable)."
    ),
) -> ExperimentsPublic:
    experiments, count = repo.list_experiments(
        session, offset=offset, limit=limit, statuses=status_
    )
    progress = repo.experiment_progress(session, experiment_ids=[e.id for e in experiments])
    return ExperimentsPublic(
        data=[to_public(e, progress.get(e.id)) for e in experiments], count=count
    )


@router.get("/{experiment_id}", response_model=ExperimentPublic)
def get_experiment(experiment_id: ExperimentId, session: SessionDep) -> ExperimentPublic:
    exp = _get(session, experiment_id)
    progress = repo.experiment_progress(session, experiment_ids=[exp.id])
    return to_public(exp, progress.get(exp.id))


@router.get("/{experiment_id}/rounds", response_model=RoundsPublic)
def list_rounds(experiment_id: ExperimentId, session: SessionDep) -> RoundsPublic:
    _get(session, experiment_id)
    rounds = repo.list_rounds(session, experiment_id=experiment_id)
    data = [round_to_public(r) for r in rounds]
    return RoundsPublic(data=data, count=len(data))


@router.get("/{experiment_id}/updates", response_model=UpdatesPublic)
def list_updates(
    experiment_id: ExperimentId,
    session: SessionDep,
    server_round: int | None = Query(None, ge=0, le=DB_INT_MAX),
) -> UpdatesPublic:
    _get(session, experiment_id)
    updates = repo.list_updates(session, experiment_id=experiment_id, server_round=server_round)
    data = [update_to_public(u) for u in updates]
    return UpdatesPublic(data=data, count=len(data))


@router.get(
    "/{experiment_id}/log",
    response_model=EventsPublic,
    summary="Read an experiment's event log",
    description="The runtime's decisions and the run's state changes, oldest first (by id): "
    "`submitted`, `initial-evaluation`, `dispatch` (work sent: `node_ids`, `model_version`, "
    "`server_round`), `policy` (a dropout or lost-task decision: `node_id`, `action`, "
    "`reason`, …), `tasks` (the tasks dispatched per node, at the end), `cancel`, and others. "
    "Filter with `kind` (repeatable) and read on from the last id seen with `after`.",
)
def list_log(
    experiment_id: ExperimentId,
    session: SessionDep,
    kind: list[str] | None = Query(None, description="Only events of these kinds."),
    after: int = Query(
        0, ge=0, le=DB_INT_MAX, description="Only events whose id is above this one."
    ),
) -> EventsPublic:
    _get(session, experiment_id)
    events = repo.events_after(session, experiment_id=experiment_id, after_id=after, kinds=kind)
    data = [event_to_public(e) for e in events]
    return EventsPublic(data=data, count=len(data))


@router.post("/{experiment_id}/cancel", response_model=ExperimentPublic)
def cancel_experiment(
    experiment_id: ExperimentId, session: SessionDep, follower: FollowerDep
) -> ExperimentPublic:
    exp = _get(session, experiment_id)
    if exp.status.terminal:
        raise HTTPException(
            status.HTTP_409_CONFLICT, f"experiment {experiment_id} already {exp.status}"
        )
    if exp.status != ExperimentStatus.CANCELLING:
        # Not yet on the SuperLink: nothing to stop. Otherwise the follower sends StopRun.
        fields: dict[str, Any] = (
            {"status": ExperimentStatus.CANCELLED, "finished_at": datetime.now(UTC)}
            if exp.status == ExperimentStatus.PENDING
            else {"status": ExperimentStatus.CANCELLING}
        )
        try:
            repo.update_experiment(session, experiment_id=exp.id, **fields)
        except IllegalTransition as exc:  # it moved on since it was read (e.g. it finished)
            session.rollback()
            raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from exc
        repo.add_event(session, experiment_id=exp.id, kind="cancel", message="cancel requested")
        session.commit()
    if follower is not None:
        follower.wake()
    return get_experiment(experiment_id, session)
