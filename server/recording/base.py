"""What a run recorder writes (update and round records) and the interface both recorders keep."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, get_args

from florist.server.db.status import (
    ExperimentStatus,
    IllegalTransition,
)

UpdateStatus = Literal["accepted", "rejected", "failed"]
# "interrupted": the run was cut off from the SuperLink or told to stop; the experiment is not
# finished by it (the follower resumes it, or a cancel under way ends it).
RunOutcome = Literal["completed", "failed", "stopped", "interrupted"]

# Experiment status after a run ends on its own; "stopped" only happens when someone stops it.
# A cancel the user asked for wins over either (status.finish_plan).
_EXPERIMENT_STATUS_FOR = {
    "completed": ExperimentStatus.COMPLETED,
    "failed": ExperimentStatus.FAILED,
    "stopped": ExperimentStatus.CANCELLED,
}
# The event recorded when a run's outcome comes after its experiment ended otherwise.
FINISH_REFUSED = "finish-refused"
# The event recorded when a run ends interrupted: the experiment is left for the follower.
RUN_INTERRUPTED = "run-interrupted"
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


class ExperimentEndedError(RunFinishedError):
    """The run's experiment has ended (a cancel, or the follower failed it): a ServerApp that
    outlives the end writes no more rounds, so an ended experiment's history stays as it was."""


class RunSupersededError(RunFinishedError):
    """The run's experiment has moved on to another Flower run (this one was lost and the
    experiment resumed elsewhere): it writes no more rounds."""


def ended_error(run_id: int, experiment_id: int, status: str) -> ExperimentEndedError:
    return ExperimentEndedError(
        f"run {run_id}: experiment {experiment_id} has ended {status}; it takes no more rounds"
    )


def superseded_message(run_id: int, flwr_run_id: int, current: int | None) -> str:
    now = "is waiting to be submitted again" if current is None else f"is Flower run {current}'s"
    return f"run {run_id} (Flower run {flwr_run_id}) was lost: its experiment {now}"


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
class ModelCheckpoint:
    """The global model a round produced, stored in the round's transaction, and the earlier
    checkpoints of the experiment the retention policy drops in that same transaction."""

    safetensors: bytes
    drop_rounds: tuple[int, ...] = ()


@dataclass(frozen=True)
class StoredResume:
    """What a run resumes from: the experiment's last committed round, its resume point (None
    when that round has none) and its global model (safetensors)."""

    server_round: int
    state: bytes | None
    model: bytes | None


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
    checkpoint: ModelCheckpoint | None = None
    # The loop's resume point after this round (server/runtime/resume.py), stored in the round's
    # transaction in place of the experiment's previous one.
    resume: bytes | None = None
    # Wall seconds the strategy took to make this round's model (None: not measured).
    aggregate_s: float | None = None

    def __post_init__(self) -> None:
        _require_aware("started_at", self.started_at)
        _require_aware("finished_at", self.finished_at)
        if self.finished_at < self.started_at:
            raise ValueError("finished_at is earlier than started_at")
        if self.aggregate_s is not None and not self.aggregate_s >= 0:
            raise ValueError(f"aggregate_s must be a non-negative number, got {self.aggregate_s}")

    @property
    def bytes_in(self) -> int:
        """Bytes of the updates the server received in this round (their arrays)."""
        return sum(update.bytes_up for update in self.updates)

    @property
    def bytes_out(self) -> int:
        """Bytes of the models the server sent for the tasks this round handled."""
        return sum(update.bytes_down for update in self.updates)

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
    def checkpoints(self, run_id: int) -> dict[int, bytes]:
        """The stored global models of the run's experiment (safetensors), by round."""

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
    def resume_from(self, experiment_id: int) -> StoredResume | None:
        """Where a new run of the experiment starts: None before its first committed round."""

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
