"""Experiments: submit, list, read rounds, updates and the event log, cancel."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

import torch
from fastapi import APIRouter, HTTPException, Query, Response, status
from fastapi.exceptions import RequestValidationError

from florist.client.task import WorkloadRef
from florist.server.api.deps import DB_INT_MAX, ExperimentId, FollowerDep, SessionDep
from florist.server.api.external import external_to_public
from florist.server.api.schemas import (
    CheckpointPublic,
    CheckpointsPublic,
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
from florist.server.recording.artifacts import to_torch_file
from florist.server.spec import (
    ExperimentSpec,
    StrategySpecError,
    experiment_row,
    resolve_strategy,
    resolve_workload,
    server_setup,
)
from florist.server.workloads import known_extent
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
        workload=spec.workload_ref,
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
    """What field validation cannot see: the strategy's and the workload's own configs, and
    whether the workload's model can be built."""
    try:
        plugin, config = resolve_strategy(spec.strategy)
        workload, workload_config = resolve_workload(spec.workload_ref)
    except StrategySpecError as exc:
        raise _body_errors(exc.errors) from exc
    try:
        scheduler = as_scheduler(plugin.build_server(config, server_setup(spec)))
    except (ValueError, TypeError) as exc:  # e.g. a Flower strategy refusing its arguments
        raise _body_errors(
            [{"loc": ("strategy", "config"), "msg": str(exc), "type": "strategy_refused"}]
        ) from exc
    # An explicit clip range that cuts off some inputs would move them by more than ε.
    if isinstance(config, FalConfig) and (
        errors := clip_range_errors(
            config, workload.name, lambda: known_extent(workload, workload_config)
        )
    ):
        raise _body_errors(errors)
    # Refused now rather than when the run starts: e.g. FedAsync has no rounds to police.
    try:
        scheduler.use_dropout_policy(spec.dropout)
    except DropoutPolicyError as exc:
        raise _body_errors(
            [{"loc": ("dropout",), "msg": str(exc), "type": "dropout_unsupported"}]
        ) from exc
    try:
        # On the meta device: shapes are checked, no memory is taken, however big the model.
        with torch.device("meta"):
            workload.build_model(workload_config)
    except (ValueError, TypeError, RuntimeError) as exc:
        raise _body_errors(
            [
                {
                    "loc": ("workload", "config", "model"),
                    "msg": str(exc),
                    "type": "model_dataset_mismatch",
                }
            ]
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
    # Stored with every default spelled out: a run reads the same settings even if a default
    # changes in a later version.
    _, workload_config = resolve_workload(spec.workload_ref)
    spec.workload = WorkloadRef(
        name=spec.workload_ref.name, config=workload_config.model_dump(mode="json")
    )
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


@router.get("/{experiment_id}/checkpoints", response_model=CheckpointsPublic)
def list_checkpoints(experiment_id: ExperimentId, session: SessionDep) -> CheckpointsPublic:
    """The global models the experiment kept (its `checkpoints` policy), oldest first."""
    _get(session, experiment_id)
    rows = repo.list_checkpoints(session, experiment_id=experiment_id)
    data = [CheckpointPublic.model_validate(r, from_attributes=True) for r in rows]
    return CheckpointsPublic(data=data, count=len(data))


ModelFormat = Literal["safetensors", "pt"]


@router.get(
    "/{experiment_id}/model",
    response_class=Response,
    responses={
        200: {
            "content": {"application/octet-stream": {}},
            "description": "The model: safetensors (keys as in the model's state_dict), or a "
            "torch state_dict for `format=pt`.",
        },
        404: {"description": "No such experiment, or no model kept for that round (yet)."},
    },
)
def download_model(
    experiment_id: ExperimentId,
    session: SessionDep,
    server_round: int | None = Query(
        None,
        alias="round",
        ge=1,
        le=DB_INT_MAX,
        description="A kept round's model; the latest (the final model of a finished run) if "
        "absent.",
    ),
    format_: ModelFormat = Query("safetensors", alias="format"),
) -> Response:
    exp = _get(session, experiment_id)
    row = repo.get_checkpoint(session, experiment_id=experiment_id, server_round=server_round)
    if row is None:
        kept = [c.server_round for c in repo.list_checkpoints(session, experiment_id=exp.id)]
        what = "no model yet" if server_round is None else f"no model kept for round {server_round}"
        raise HTTPException(
            status.HTTP_404_NOT_FOUND, f"experiment {experiment_id}: {what} (kept rounds: {kept})"
        )
    data = bytes(row.data)
    if format_ == "pt":
        data = to_torch_file(data)
    filename = f"experiment-{experiment_id}-round-{row.server_round}.{format_}"
    return Response(
        content=data,
        media_type="application/octet-stream",
        headers={
            "Content-Disposition": f'attachment; filename="{filename}"',
            "X-Florist-Round": str(row.server_round),
            "ETag": f'"{row.sha256}-{format_}"',
        },
    )


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
