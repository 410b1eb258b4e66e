"""An experiment's statuses and the transitions allowed between them, in one place."""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum


class ExperimentStatus(StrEnum):
    """Where an experiment is in its life.

    A ``StrEnum``: members equal their plain strings, so JSON, SQL and old comparisons such as
    ``status == "running"`` keep working.
    """

    PENDING = "pending"
    SUBMITTED = "submitted"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        """The experiment has ended: no status follows this one."""
        return not TRANSITIONS[self]

    @property
    def active(self) -> bool:
        """The run follower still has work to do on it."""
        return not self.terminal

    def may_become(self, to: ExperimentStatus) -> bool:
        """Whether ``to`` may follow this status.

        The same status again is allowed: on a status that is not terminal it lets a caller
        change other columns (a restarted ServerApp's run id, a second cancel request); on a
        terminal one it changes nothing at all (the first finish wins, see ``plan_target``).
        """
        return to == self or to in TRANSITIONS[self]


_S = ExperimentStatus

# Every change of status an experiment may make; a status absent on the right never follows.
TRANSITIONS: Mapping[ExperimentStatus, frozenset[ExperimentStatus]] = {
    # The follower submits it, or gives up on an unreachable SuperLink; a cancel needs no
    # StopRun yet. RUNNING: the ServerApp may start before the follower records the submission.
    _S.PENDING: frozenset({_S.SUBMITTED, _S.RUNNING, _S.FAILED, _S.CANCELLED}),
    # COMPLETED and FAILED straight from SUBMITTED: the follower may only see the run after
    # Flower has already finished it.
    # PENDING from SUBMITTED and RUNNING: the run was lost (its ServerApp died, the SuperLink
    # forgot it) and the follower submits the experiment again, to resume from its last round.
    _S.SUBMITTED: frozenset(
        {_S.PENDING, _S.RUNNING, _S.COMPLETED, _S.FAILED, _S.CANCELLING, _S.CANCELLED}
    ),
    _S.RUNNING: frozenset({_S.PENDING, _S.COMPLETED, _S.FAILED, _S.CANCELLING, _S.CANCELLED}),
    # A requested cancel ends cancelled whatever the run did, unless the run is lost (FAILED).
    _S.CANCELLING: frozenset({_S.CANCELLED, _S.FAILED}),
    _S.COMPLETED: frozenset(),
    _S.FAILED: frozenset(),
    _S.CANCELLED: frozenset(),
}

ACTIVE_STATUSES = frozenset(s for s in ExperimentStatus if s.active)
TERMINAL_STATUSES = frozenset(s for s in ExperimentStatus if s.terminal)


class IllegalTransition(ValueError):
    """An experiment was asked to take a status that may not follow its current one."""

    def __init__(
        self, current: ExperimentStatus, to: ExperimentStatus | None, experiment_id: int | None
    ) -> None:
        self.current = current
        self.to = to
        self.experiment_id = experiment_id
        which = "experiment" if experiment_id is None else f"experiment {experiment_id}"
        wanted = "this change" if to is None else f"{to.value!r}"
        allowed = sorted(s.value for s in TRANSITIONS[current]) or "nothing: it has ended"
        super().__init__(
            f"{which} is {current.value!r} and cannot become {wanted}; allowed: {allowed}"
        )


def as_status(value: str) -> ExperimentStatus:
    """The status named ``value``; ValueError names the known ones for an unknown name."""
    try:
        return ExperimentStatus(value)
    except ValueError:
        known = [s.value for s in ExperimentStatus]
        raise ValueError(f"unknown status {value!r}; known: {known}") from None


def plan_target(
    plan: Mapping[ExperimentStatus, ExperimentStatus],
    current: ExperimentStatus,
    *,
    experiment_id: int | None = None,
) -> ExperimentStatus | None:
    """The status ``plan`` moves ``current`` to, or None when nothing is to be written.

    A plan maps each status the experiment might be in to the one it should take: callers
    that race with others (the ServerApp with the API's cancel) say what to do in every case.
    None means a terminal status repeated (a duplicate finish): the first finish wins and its
    finished_at and error stay. Raises IllegalTransition if ``current`` has no legal target.
    """
    current = ExperimentStatus(current)  # a plain string is welcome too
    to = plan.get(current)
    if to is None or not current.may_become(to):
        raise IllegalTransition(current, to, experiment_id)
    return None if to == current and current.terminal else to


def legal_moves(
    plan: Mapping[ExperimentStatus, ExperimentStatus],
) -> dict[ExperimentStatus, ExperimentStatus]:
    """The entries of ``plan`` that write something: legal, and not a terminal status repeated."""
    moves = {}
    for current in plan:
        try:
            to = plan_target(plan, current)
        except IllegalTransition:
            continue
        if to is not None:
            moves[current] = to
    return moves


def to_status(to: ExperimentStatus) -> dict[ExperimentStatus, ExperimentStatus]:
    """The plan of an unconditional change: whatever the experiment is, it becomes ``to``."""
    return {current: to for current in ExperimentStatus}


def start_plan() -> dict[ExperimentStatus, ExperimentStatus]:
    """A ServerApp starts its run: RUNNING, except that a cancel under way stays CANCELLING
    (the follower stops the run). Ended experiments have no target: they never run again."""
    return to_status(_S.RUNNING) | {_S.CANCELLING: _S.CANCELLING}


def finish_plan(outcome: ExperimentStatus) -> dict[ExperimentStatus, ExperimentStatus]:
    """A run ended with ``outcome`` (a terminal status): the experiment takes it, except that
    a cancel, under way or done, wins over the run's own outcome."""
    if not outcome.terminal:
        raise ValueError(f"{outcome.value!r} does not end an experiment")
    return to_status(outcome) | {_S.CANCELLING: _S.CANCELLED, _S.CANCELLED: _S.CANCELLED}
