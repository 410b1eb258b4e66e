"""The in-memory run recorder: the contract of the SQL one, for tests and in-process runs."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from florist.server.db.models import utcnow
from florist.server.db.status import (
    TERMINAL_STATUSES,
    ExperimentStatus,
    IllegalTransition,
    finish_plan,
    plan_target,
    start_plan,
)

from .base import (
    _EXPERIMENT_STATUS_FOR,
    FINISH_REFUSED,
    RUN_INTERRUPTED,
    DuplicateRoundError,
    RoundRecord,
    RunFinishedError,
    RunOutcome,
    RunRecorder,
    RunSupersededError,
    StoredResume,
    UnknownRunError,
    UpdateRecord,
    _node_configs,
    _refused_finish,
    _seen_node_ids,
    ended_error,
    superseded_message,
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
        # experiment id -> round -> the global model (safetensors)
        self.models: dict[int, dict[int, bytes]] = {}
        # experiment id -> (round, resume point) after its last committed round
        self.resume_points: dict[int, tuple[int, bytes | None]] = {}
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
            for earlier in self.runs.values():
                if earlier.experiment_id == experiment_id and earlier.finished_at is None:
                    earlier.status, earlier.finished_at = "interrupted", now
                    earlier.error = f"lost; Flower run {flwr_run_id} took over the experiment"
            run_id = len(self.runs) + 1
            self.runs[run_id] = InMemoryRun(
                experiment_id=experiment_id, flwr_run_id=flwr_run_id, started_at=now
            )
            return run_id

    def _open_run(self, run_id: int, *, current: bool = True) -> InMemoryRun:
        run = self.runs.get(run_id)
        if run is None:
            raise UnknownRunError(f"run {run_id} does not exist")
        if run.finished_at is not None:
            raise RunFinishedError(f"run {run_id} has already finished")
        experiment = self.experiments[run.experiment_id]
        if current and experiment.flwr_run_id != run.flwr_run_id:
            raise RunSupersededError(
                superseded_message(run_id, run.flwr_run_id, experiment.flwr_run_id)
            )
        return run

    def _touch_nodes(self, updates: Sequence[UpdateRecord], seen_at: datetime) -> None:
        for node_id in _seen_node_ids(updates):
            self.nodes_last_seen[node_id] = seen_at
        self.node_configs.update(_node_configs(updates))

    def record_round(self, run_id: int, record: RoundRecord) -> None:
        with self._lock:
            run = self._open_run(run_id)
            status = self.experiments[run.experiment_id].status
            if status in TERMINAL_STATUSES:
                raise ended_error(run_id, run.experiment_id, status)
            if record.server_round in self._experiment_rounds(run.experiment_id):
                raise DuplicateRoundError(
                    f"round {record.server_round} of run {run_id} is already recorded"
                )
            # Nodes first: if that fails, the round is not stored either.
            self._touch_nodes(record.updates, record.finished_at)
            run.rounds[record.server_round] = record
            run.updates.extend((record.server_round, update) for update in record.updates)
            if record.checkpoint is not None:
                models = self.models.setdefault(run.experiment_id, {})
                models[record.server_round] = record.checkpoint.safetensors
                for old in record.checkpoint.drop_rounds:
                    models.pop(old, None)
            self.resume_points[run.experiment_id] = (record.server_round, record.resume)

    def _experiment_rounds(self, experiment_id: int) -> set[int]:
        runs = [run for run in self.runs.values() if run.experiment_id == experiment_id]
        return {r for run in runs for r in run.rounds}

    def resume_from(self, experiment_id: int) -> StoredResume | None:
        with self._lock:
            rounds = self._experiment_rounds(experiment_id)
            if not rounds:
                return None
            last = max(rounds)
            saved_round, state = self.resume_points.get(experiment_id, (None, None))
            return StoredResume(
                last,
                state if saved_round == last else None,
                self.models.get(experiment_id, {}).get(last),
            )

    def checkpoints(self, run_id: int) -> dict[int, bytes]:
        with self._lock:
            run = self.runs.get(run_id)
            if run is None:
                raise UnknownRunError(f"run {run_id} does not exist")
            return dict(sorted(self.models.get(run.experiment_id, {}).items()))

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
            run = self._open_run(run_id, current=False)
            run.status = status
            run.finished_at = now
            run.error = error
            run.final_metrics = dict(final_metrics) if final_metrics is not None else None
            experiment = self.experiments[run.experiment_id]
            if status == "interrupted" and experiment.flwr_run_id == run.flwr_run_id:
                message = f"run {run_id} was interrupted ({error}); the experiment is left"
                kind = RUN_INTERRUPTED
                event = InMemoryEvent(run.experiment_id, run_id, kind, message, None, now)
                self.events.append(event)
                return
            if experiment.flwr_run_id != run.flwr_run_id:
                message = superseded_message(run_id, run.flwr_run_id, experiment.flwr_run_id)
                message += f"; its own end ({status}) leaves the experiment as it is"
                event = InMemoryEvent(run.experiment_id, run_id, FINISH_REFUSED, message, None, now)
                self.events.append(event)
                return
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
