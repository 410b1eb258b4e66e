"""Experiments: submit, list, read rounds and updates, cancel."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, HTTPException, Query, status
from fastapi.exceptions import RequestValidationError

from florist.client.models import build_model
from florist.datasets import dataset_info
from florist.server.api.deps import FollowerDep, SessionDep
from florist.server.api.schemas import (
    ExperimentCreate,
    ExperimentPublic,
    ExperimentsPublic,
    RoundPublic,
    RoundsPublic,
    UpdatePublic,
    UpdatesPublic,
)
from florist.server.db import repository as repo
from florist.server.db.models import ClientUpdate, Experiment, Round
from florist.server.db.repository import Progress
from florist.server.spec import (
    ExperimentSpec,
    StrategySpecError,
    resolve_strategy,
    runtime_of,
    server_setup,
)
from florist.strategies import default_registry
from florist.strategies.events import DropoutPolicyError
from florist.strategies.registry import StrategyRegistryError

router = APIRouter(prefix="/experiments", tags=["experiments"])


def _is_asynchronous(strategy: str) -> bool:
    try:
        return "async" in default_registry().get(strategy).tags
    except StrategyRegistryError:  # uninstalled since the experiment ran: it still lists
        return False


def to_public(exp: Experiment, progress: Progress | None = None) -> ExperimentPublic:
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


def _body_errors(errors: list[dict[str, Any]]) -> RequestValidationError:
    return RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in errors])


def check_spec(spec: ExperimentSpec) -> None:
    """What field validation cannot see: the strategy's own config, model/dataset fit."""
    try:
        plugin, config = resolve_strategy(spec.strategy)
        runtime = runtime_of(spec, plugin)
    except StrategySpecError as exc:
        raise _body_errors(exc.errors) from exc
    if runtime == "event" and plugin.build_event_server is not None:
        # Refused now rather than when the run starts: e.g. FedAsync has no rounds to police.
        try:
            plugin.build_event_server(config, server_setup(spec)).use_dropout_policy(spec.dropout)
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
    exp = repo.create_experiment(
        session,
        name=spec.name,
        strategy=spec.strategy.name,
        dataset=spec.dataset.name,
        num_rounds=spec.rounds,
        spec=spec.model_dump(mode="json"),
    )
    session.commit()
    if follower is not None:
        follower.wake()
    return to_public(exp)


@router.get("", response_model=ExperimentsPublic)
def list_experiments(
    session: SessionDep,
    offset: int = Query(0, ge=0),
    limit: int = Query(100, ge=1, le=1000),
) -> ExperimentsPublic:
    experiments, count = repo.list_experiments(session, offset=offset, limit=limit)
    progress = repo.experiment_progress(session, experiment_ids=[e.id for e in experiments])
    return ExperimentsPublic(
        data=[to_public(e, progress.get(e.id)) for e in experiments], count=count
    )


@router.get("/{experiment_id}", response_model=ExperimentPublic)
def get_experiment(experiment_id: int, session: SessionDep) -> ExperimentPublic:
    exp = _get(session, experiment_id)
    progress = repo.experiment_progress(session, experiment_ids=[exp.id])
    return to_public(exp, progress.get(exp.id))


@router.get("/{experiment_id}/rounds", response_model=RoundsPublic)
def list_rounds(experiment_id: int, session: SessionDep) -> RoundsPublic:
    _get(session, experiment_id)
    rounds = repo.list_rounds(session, experiment_id=experiment_id)
    data = [round_to_public(r) for r in rounds]
    return RoundsPublic(data=data, count=len(data))


@router.get("/{experiment_id}/updates", response_model=UpdatesPublic)
def list_updates(
    experiment_id: int, session: SessionDep, server_round: int | None = Query(None, ge=0)
) -> UpdatesPublic:
    _get(session, experiment_id)
    updates = repo.list_updates(session, experiment_id=experiment_id, server_round=server_round)
    data = [update_to_public(u) for u in updates]
    return UpdatesPublic(data=data, count=len(data))


@router.post("/{experiment_id}/cancel", response_model=ExperimentPublic)
def cancel_experiment(
    experiment_id: int, session: SessionDep, follower: FollowerDep
) -> ExperimentPublic:
    exp = _get(session, experiment_id)
    if exp.status in ("completed", "failed", "cancelled"):
        raise HTTPException(
            status.HTTP_409_CONFLICT, f"experiment {experiment_id} already {exp.status}"
        )
    if exp.status != "cancelling":
        # Not yet on the SuperLink: nothing to stop. Otherwise the follower sends StopRun.
        fields: dict[str, Any] = (
            {"status": "cancelled", "finished_at": datetime.now(UTC)}
            if exp.status == "pending"
            else {"status": "cancelling"}
        )
        repo.update_experiment(session, experiment_id=exp.id, **fields)
        repo.add_event(session, experiment_id=exp.id, kind="cancel", message="cancel requested")
        session.commit()
    if follower is not None:
        follower.wake()
    return get_experiment(experiment_id, session)
