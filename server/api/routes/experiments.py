"""Experiments: submit, list, read rounds, updates and the event log, cancel, resume."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from operator import itemgetter
from typing import Any, Literal

import torch
from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response, status
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from sqlalchemy.engine import Row

from florist.client.task import WorkloadRef
from florist.client.workloads import WorkloadConfig
from florist.server.api.deps import (
    DB_INT_MAX,
    PAGE_LIMIT_DEFAULT,
    ExperimentId,
    FollowerDep,
    PageCursor,
    PageLimit,
    SessionDep,
    SettingsDep,
)
from florist.server.api.errors import ErrorPublic, body_problems, error_responses
from florist.server.api.external import external_to_public, row_fields
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
from florist.server.db.models import Event, Experiment
from florist.server.db.repository import EXTERNAL, Page, Progress, UnknownCursorError
from florist.server.db.status import ExperimentStatus, IllegalTransition
from florist.server.recording.artifacts import to_torch_file
from florist.server.simulation import simulation_errors
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
    return ExperimentPublic(
        **row_fields(exp, progress),
        strategy=spec.strategy,
        mode=spec.mode,
        workload=spec.workload_ref,
        training=spec.training.model_dump(mode="json"),
        clients=spec.clients,
        asynchronous=_is_asynchronous(spec.strategy.name),
    )


# Every RoundPublic and UpdatePublic field is a column of the same name (the timeline ones
# included); rows come as plain rows from the repository's listings.
_ROUND_FIELDS = tuple(RoundPublic.model_fields)
_UPDATE_FIELDS = tuple(UpdatePublic.model_fields)


def _fields_of(rows: Sequence[Row[Any]], names: tuple[str, ...]) -> list[dict[str, Any]]:
    """Each row as a dict of the columns ``names``."""
    if not rows:
        return []
    # The columns' positions are looked up once a page: a Row's ``_fields`` builds its tuple
    # anew on every call (5% of a 1,000-row page), and its attribute lookups cost ten times
    # as much as a zip (py-spy on the serving process).
    pick = itemgetter(*map(rows[0]._fields.index, names))
    return [dict(zip(names, pick(row), strict=True)) for row in rows]


def round_fields(rows: Sequence[Row[Any]]) -> list[dict[str, Any]]:
    return _fields_of(rows, _ROUND_FIELDS)


def update_fields(rows: Sequence[Row[Any]]) -> list[dict[str, Any]]:
    data = _fields_of(rows, _UPDATE_FIELDS)
    for fields in data:
        fields["node_id"] = str(fields["node_id"])  # uint64: a string, which JavaScript keeps whole
    return data


def rounds_to_public(rows: Sequence[Row[Any]]) -> list[RoundPublic]:
    return [RoundPublic.model_validate(fields) for fields in round_fields(rows)]


def updates_to_public(rows: Sequence[Row[Any]]) -> list[UpdatePublic]:
    return [UpdatePublic.model_validate(fields) for fields in update_fields(rows)]


def json_response(model: BaseModel) -> Response:
    """``model`` as the response body, serialised once.

    For long listings: FastAPI would validate the returned model again against the route's
    ``response_model`` and encode it twice more, which was about half of a 1,000-row page's
    time (benchmarks/api_latency). The route keeps its ``response_model`` for the schema.
    """
    return Response(model.model_dump_json(), media_type="application/json")


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


def _strict_errors(exc: ValidationError, *prefix: str | int) -> list[dict[str, Any]]:
    return [
        {"loc": (*prefix, *err["loc"]), "msg": err["msg"], "type": err["type"]}
        for err in exc.errors(include_url=False, include_context=False)
    ]


def _check_strict(model: type[BaseModel], raw: Any, *prefix: str | int) -> None:
    """Validate ``raw`` (parsed JSON) as ``model`` in strict JSON mode: ``"5"`` is not 5 and
    ``true`` is not 1. Only here, at the edge: stored specs are read back as they were."""
    try:
        model.model_validate_json(json.dumps(raw), strict=True)
    except ValidationError as exc:
        raise _body_errors(_strict_errors(exc, *prefix)) from exc


async def checked_body(request: Request) -> None:
    """What FastAPI's body validation lets through: NaN, Infinity, NUL bytes, lone surrogates
    and oversized integers anywhere in the body (config dicts included), and coerced types
    (pydantic's lax mode turns ``"5"`` into 5). Runs before that validation."""
    try:
        raw = json.loads(await request.body())
    except ValueError:
        return  # not JSON: FastAPI's own parsing answers it, in the same format
    if problems := list(body_problems(raw)):
        raise RequestValidationError(problems)
    _check_strict(ExperimentCreate, raw)


def check_spec(spec: ExperimentSpec, *, max_parameters: int | None = None) -> WorkloadConfig:
    """What field validation cannot see: the strategy's and the workload's own configs (in
    strict mode, as the body), and whether the workload's model can be built and is not too
    large (``max_parameters``). Returns the validated workload config."""
    try:
        plugin, config = resolve_strategy(spec.strategy)
        workload, workload_config = resolve_workload(spec.workload_ref)
    except StrategySpecError as exc:
        raise _body_errors(exc.errors) from exc
    _check_strict(plugin.config_model, spec.strategy.config, "strategy", "config")
    _check_strict(workload.config_model, spec.workload_ref.config, "workload", "config")
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
    model_loc = ("workload", "config", "model")
    try:
        # On the meta device: shapes are checked and parameters counted, but no memory is
        # taken, however big the model (the request must not build a 10⁹-parameter model).
        with torch.device("meta"):
            model = workload.build_model(workload_config)
    except (ValueError, TypeError, RuntimeError) as exc:
        raise _body_errors(
            [{"loc": model_loc, "msg": str(exc), "type": "model_dataset_mismatch"}]
        ) from exc
    if plugin.model_check is not None and (reason := plugin.model_check(model)):
        raise _body_errors([{"loc": ("workload", "name"), "msg": reason, "type": "unsupported"}])
    parameters = sum(p.numel() for p in model.parameters())
    if max_parameters is not None and parameters > max_parameters:
        raise _body_errors(
            [
                {
                    "loc": model_loc,
                    "msg": f"the model has {parameters:,} parameters, more than this server "
                    f"takes ({max_parameters:,}; FLORIST_MAX_MODEL_PARAMETERS)",
                    "type": "model_too_large",
                }
            ]
        )
    return workload_config


def _get(session: SessionDep, experiment_id: int) -> Experiment:
    exp = repo.get_experiment(session, experiment_id=experiment_id)
    if exp is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"experiment {experiment_id} not found")
    return exp


@router.post(
    "",
    response_model=ExperimentPublic,
    status_code=status.HTTP_201_CREATED,
    responses=error_responses(400),
    dependencies=[Depends(checked_body)],
)
def create_experiment(
    body: ExperimentCreate, session: SessionDep, follower: FollowerDep, settings: SettingsDep
) -> ExperimentPublic:
    workload_config = check_spec(body, max_parameters=settings.max_model_parameters)
    if errors := simulation_errors(
        body,
        max_virtual=settings.simulation_max_virtual_clients,
        enabled=bool(settings.simulation_control),
    ):
        raise _body_errors(errors)
    spec = ExperimentSpec.model_validate(body.model_dump())
    # Stored with every default spelled out: a run reads the same settings even if a default
    # changes in a later version.
    spec.workload = WorkloadRef(
        name=spec.workload_ref.name, config=workload_config.model_dump(mode="json")
    )
    exp = repo.create_experiment(session, **experiment_row(spec))
    session.commit()
    if follower is not None:
        follower.wake()
    return to_public(exp)


def _cursor_error(exc: UnknownCursorError) -> RequestValidationError:
    return RequestValidationError(
        [{"loc": ("query", "cursor"), "msg": str(exc), "type": "unknown_cursor"}]
    )


@router.get("", response_model=ExperimentsPublic)
def list_experiments(
    session: SessionDep,
    offset: int = Query(
        0, ge=0, le=DB_INT_MAX, description="Skip this many (after `cursor`, if given)."
    ),
    limit: int = Query(100, ge=1, le=1000, description="Rows per page (default 100)."),
    cursor: PageCursor = None,
    status_: list[ExperimentStatus] | None = Query(
        None, alias="status", description="Only experiments in these statuses (repeatable)."
    ),
) -> ExperimentsPublic:
    """Experiments, newest first, one page at a time (`next_cursor`)."""
    try:
        page = repo.page_experiments(
            session, limit=limit, after_id=cursor, offset=offset, statuses=status_
        )
    except UnknownCursorError as exc:
        raise _cursor_error(exc) from exc
    experiments: list[Experiment] = page.rows
    progress = repo.experiment_progress(session, experiment_ids=[e.id for e in experiments])
    return ExperimentsPublic(
        data=[to_public(e, progress.get(e.id)) for e in experiments],
        count=page.total,
        next_cursor=page.next_cursor,
    )


@router.get("/{experiment_id}", response_model=ExperimentPublic, responses=error_responses(404))
def get_experiment(experiment_id: ExperimentId, session: SessionDep) -> ExperimentPublic:
    exp = _get(session, experiment_id)
    progress = repo.experiment_progress(session, experiment_ids=[exp.id])
    return to_public(exp, progress.get(exp.id))


def _paged(read: Callable[[], Page]) -> Page:
    try:
        page = read()
    except UnknownCursorError as exc:
        raise _cursor_error(exc) from exc
    return page


@router.get("/{experiment_id}/rounds", response_model=RoundsPublic, responses=error_responses(404))
def list_rounds(
    experiment_id: ExperimentId,
    session: SessionDep,
    limit: PageLimit = PAGE_LIMIT_DEFAULT,
    cursor: PageCursor = None,
) -> Response:
    """The experiment's rounds by run and server round, one page at a time (`next_cursor`)."""
    _get(session, experiment_id)
    page = _paged(
        lambda: repo.page_rounds(session, experiment_id=experiment_id, limit=limit, after_id=cursor)
    )
    data = round_fields(page.rows)
    # One validation of the whole page: the rows come from typed columns, but the body must
    # still be what the schema says.
    return json_response(
        RoundsPublic.model_validate(
            {"data": data, "count": page.total, "next_cursor": page.next_cursor}
        )
    )


@router.get(
    "/{experiment_id}/checkpoints",
    response_model=CheckpointsPublic,
    responses=error_responses(404),
)
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
        404: {
            "model": ErrorPublic,
            "description": "No such experiment, or no model kept for that round (yet).",
        },
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


@router.get(
    "/{experiment_id}/updates", response_model=UpdatesPublic, responses=error_responses(404)
)
def list_updates(
    experiment_id: ExperimentId,
    session: SessionDep,
    server_round: int | None = Query(None, ge=0, le=DB_INT_MAX),
    limit: PageLimit = PAGE_LIMIT_DEFAULT,
    cursor: PageCursor = None,
) -> Response:
    """The experiment's client updates by run, round and arrival, one page at a time."""
    _get(session, experiment_id)
    page = _paged(
        lambda: repo.page_updates(
            session,
            experiment_id=experiment_id,
            limit=limit,
            after_id=cursor,
            server_round=server_round,
        )
    )
    data = update_fields(page.rows)
    return json_response(
        UpdatesPublic.model_validate(
            {"data": data, "count": page.total, "next_cursor": page.next_cursor}
        )
    )


@router.get(
    "/{experiment_id}/log",
    response_model=EventsPublic,
    summary="Read an experiment's event log",
    description="The runtime's decisions and the run's state changes, oldest first (by id): "
    "`submitted`, `initial-evaluation`, `dispatch` (work sent: `node_ids`, `model_version`, "
    "`server_round`), `policy` (a dropout or lost-task decision: `node_id`, `action`, "
    "`reason`, …), `tasks` (the tasks dispatched per node, at the end), `cancel`, and others. "
    "Filter with `kind` (repeatable) and read on from the last id seen with `after`; a long "
    "log comes in pages (`limit`, `next_cursor`).",
    responses=error_responses(404),
)
def list_log(
    experiment_id: ExperimentId,
    session: SessionDep,
    kind: list[str] | None = Query(None, description="Only events of these kinds."),
    after: int = Query(
        0, ge=0, le=DB_INT_MAX, description="Only events whose id is above this one."
    ),
    limit: PageLimit = PAGE_LIMIT_DEFAULT,
    cursor: PageCursor = None,
) -> EventsPublic:
    if kind is not None and (problems := list(body_problems(kind, ("query", "kind")))):
        raise RequestValidationError(problems)
    _get(session, experiment_id)
    # The cursor is an event id, so it needs no anchor row: it reads on after that id.
    page = repo.page_events(
        session, experiment_id=experiment_id, limit=limit, after_id=after, kinds=kind, cursor=cursor
    )
    data = [event_to_public(e) for e in page.rows]
    return EventsPublic(data=data, count=page.total, next_cursor=page.next_cursor)


@router.post(
    "/{experiment_id}/cancel",
    response_model=ExperimentPublic,
    responses=error_responses(404, 409),
)
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


@router.post(
    "/{experiment_id}/resume",
    response_model=ExperimentPublic,
    responses=error_responses(404, 409),
    summary="Resume a failed experiment from its last committed round",
    description="A failed experiment is submitted again: its new run goes on from the last "
    "committed round (the model and the whole strategy state stored with it), so no round is "
    "lost or run twice. A run lost while running (its ServerApp or the SuperLink died) is "
    "resumed automatically (`FLORIST_AUTO_RESUME` times); this is for the rest. 409 unless "
    "the experiment failed, or when it is another app's (external) run.",
)
def resume_experiment(
    experiment_id: ExperimentId, session: SessionDep, follower: FollowerDep
) -> ExperimentPublic:
    exp = _get(session, experiment_id)
    if exp.source != "florist":
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            f"experiment {experiment_id} is another app's Flower run: Florist cannot start it",
        )
    previous = exp.error
    if not repo.reopen_failed(session, experiment_id=exp.id):
        session.rollback()
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            f"experiment {experiment_id} is {exp.status}: only a failed experiment resumes",
        )
    repo.add_event(
        session,
        experiment_id=exp.id,
        kind="resume",
        message="resume requested: submitted again to go on from its last committed round",
        data={"previous_error": previous},
    )
    session.commit()
    if follower is not None:
        follower.wake()
    return get_experiment(experiment_id, session)
