"""Resume: a run that dies after a committed round goes on from it, on the virtual clock to the
very model an uninterrupted run reaches (bit for bit), with every round recorded exactly once."""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
from flwr.supercore.task_identity import TaskIdentity

from florist.server.db.status import ExperimentStatus
from florist.server.recording import InMemoryRunRecorder, RoundRecord, UpdateRecord
from florist.server.runtime.localgrid import LocalGrid
from florist.server.runtime.resume import ResumeError, dumps, loads
from florist.server.serverapp import RunResult, run_experiment
from florist.server.spec import ExperimentSpec


class Killed(BaseException):
    """The process died: nothing after it is written (a BaseException, as a signal's exit)."""


class DyingRecorder(InMemoryRunRecorder):
    """An in-memory database whose ServerApp dies as it is about to commit ``die_at``: every
    write from then on is lost, as with SIGKILL, until the next run starts."""

    def __init__(self, die_at: int | None) -> None:
        super().__init__()
        self.die_at = die_at
        self.dead = False

    def _alive(self) -> None:
        if self.dead:
            raise Killed

    def start_run(self, *, experiment_id: int, flwr_run_id: int) -> int:
        self.dead = False
        return super().start_run(experiment_id=experiment_id, flwr_run_id=flwr_run_id)

    def record_round(self, run_id: int, record: RoundRecord) -> None:
        self._alive()
        if record.server_round == self.die_at:
            self.dead, self.die_at = True, None
            raise Killed
        super().record_round(run_id, record)

    def record_updates(
        self, run_id: int, server_round: int, updates: Sequence[UpdateRecord]
    ) -> None:
        self._alive()
        super().record_updates(run_id, server_round, updates)

    def finish_run(self, run_id: int, **kwargs: Any) -> None:
        self._alive()
        super().finish_run(run_id, **kwargs)

    def record_event(self, **kwargs: Any) -> None:
        self._alive()
        super().record_event(**kwargs)


SPEEDS = [0.5, 1.0, 2.0, 3.0]

STRATEGIES: dict[str, dict[str, Any]] = {
    # Sampling 2 of 4 with `random` each round: the RNG state must come back.
    "fedavg": {"strategy": {"name": "fedavg"}, "clients": {"min": 2, "fraction_train": 0.5}},
    # Server-side Adam moments inside Flower's own strategy object.
    "fedadam": {"strategy": {"name": "fedadam", "config": {"eta": 0.05}}},
    # A buffer of updates and tasks in flight across aggregations.
    "fedbuff": {"strategy": {"name": "fedbuff", "config": {"buffer_size": 2}}},
    # Speed estimates, arrival groups, assigned steps, timers.
    "fedcompass": {"strategy": {"name": "fedcompass", "config": {"q_min": 4, "q_max": 16}}},
    # Every worker's latest update kept server-side; drawn local steps.
    "afa-cs": {
        "strategy": {"name": "afa-cs", "config": {"min_local_steps": 4, "max_local_steps": 12}}
    },
}


def spec(name: str) -> ExperimentSpec:
    body: dict[str, Any] = {
        "name": f"resume-{name}",
        "workload": {"name": "digits", "config": {"partitioner": {"name": "iid"}}},
        "training": {"lr": 0.05, "batch_size": 16, "local_steps": 8},
        "rounds": 5,
        "clock": "virtual",
        "clients": {"min": 4},
        "seed": 7,
    } | STRATEGIES[name]
    return ExperimentSpec.model_validate(body)


def run(spec: ExperimentSpec, recorder: InMemoryRunRecorder, flwr_run_id: int) -> RunResult:
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    grid = LocalGrid(4, node_configs=[{"seconds-per-step": s} for s in SPEEDS])
    return run_experiment(
        grid, spec, recorder, experiment_id=1, flwr_run_id=flwr_run_id, poll_interval=0.0
    )


def final_weights(result: RunResult) -> dict[str, np.ndarray]:
    assert result.final_arrays is not None
    return {k: v.numpy() for k, v in result.final_arrays.items()}


def committed(recorder: InMemoryRunRecorder) -> list[tuple[int, int]]:
    """(run, round) of every committed round, in order."""
    return sorted((run_id, r) for run_id, run in recorder.runs.items() for r in run.rounds)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_a_run_killed_after_round_two_resumes_to_the_uninterrupted_model(name: str) -> None:
    # Prepare: the same experiment run through, and run again with its ServerApp killed as it
    # commits round 3 (rounds 1 and 2 are in the database).
    whole_recorder = DyingRecorder(die_at=None)
    whole = run(spec(name), whole_recorder, flwr_run_id=1)
    recorder = DyingRecorder(die_at=3)
    with pytest.raises(Killed):
        run(spec(name), recorder, flwr_run_id=1)
    assert committed(recorder) == [(1, 1), (1, 2)]

    # Execute: a new run of the same experiment.
    resumed = run(spec(name), recorder, flwr_run_id=2)

    # Assert: the final model is the uninterrupted run's, bit for bit; rounds 3–5 were recorded
    # by the new run and every round exists exactly once; the lost run is closed as interrupted.
    expected, got = final_weights(whole), final_weights(resumed)
    assert list(got) == list(expected)
    for key in expected:
        assert np.array_equal(got[key], expected[key]), key
    assert committed(recorder) == [(1, 1), (1, 2), (2, 3), (2, 4), (2, 5)]
    assert recorder.runs[1].status == "interrupted"
    assert recorder.experiments[1].status == ExperimentStatus.COMPLETED
    same_rounds = whole_recorder.rounds(1)
    after = {r.server_round: r for r in recorder.rounds(2)}
    for r in same_rounds[2:]:
        assert after[r.server_round].metrics == r.metrics
        assert after[r.server_round].virtual_time_s == r.virtual_time_s
    assert [e.kind for e in recorder.events if e.kind == "resumed"] == ["resumed"]


def test_a_run_killed_after_its_last_round_completes_without_training_again() -> None:
    # Prepare: the ServerApp dies after committing the final round, before it could finish.
    recorder = DyingRecorder(die_at=None)
    whole = run(spec("fedbuff"), recorder, flwr_run_id=1)
    run_ = recorder.runs[1]
    run_.finished_at, run_.status = None, "running"
    recorder.experiments[1].status = ExperimentStatus.RUNNING
    recorder.experiments[1].finished_at = None

    # Execute
    resumed = run(spec("fedbuff"), recorder, flwr_run_id=2)

    # Assert: no round is run again; the final model and metrics are the last round's.
    assert committed(recorder) == [(1, r) for r in range(1, 6)]
    assert recorder.experiments[1].status == ExperimentStatus.COMPLETED
    assert recorder.runs[2].final_metrics == run_.rounds[5].metrics
    for key, value in final_weights(whole).items():
        assert np.array_equal(final_weights(resumed)[key], value)


def test_a_round_without_a_resume_point_is_not_run_twice() -> None:
    # Prepare: rounds 1–2 committed, but round 2's resume point is missing (a strategy whose
    # state could not be saved).
    recorder = DyingRecorder(die_at=3)
    with pytest.raises(Killed):
        run(spec("fedavg"), recorder, flwr_run_id=1)
    recorder.resume_points[1] = (2, None)

    # Execute / Assert: the new run fails at once, saying why, and records no round.
    with pytest.raises(ResumeError, match="round 2 is committed but its resume point"):
        run(spec("fedavg"), recorder, flwr_run_id=2)
    assert committed(recorder) == [(1, 1), (1, 2)]
    assert recorder.experiments[1].status == ExperimentStatus.FAILED


def test_a_resume_point_of_another_format_is_refused() -> None:
    recorder = DyingRecorder(die_at=3)
    with pytest.raises(Killed):
        run(spec("fedavg"), recorder, flwr_run_id=1)
    _, state = recorder.resume_points[1]
    assert state is not None
    point = loads(state)
    assert point.version == 2

    with pytest.raises(ResumeError, match="wrong header"):
        loads(b"not a resume point")
    with pytest.raises(ResumeError, match="another version"):
        loads(dumps(point)[: len(b"florist-resume\n")] + pickle.dumps({"format": 1}))


class CutOffGrid(LocalGrid):
    """A Grid whose SuperLink stops taking the run after ``pushes`` tasks: Flower's heartbeat
    then raises SIGINT in the ServerApp (a KeyboardInterrupt)."""

    def __init__(self, pushes: int, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.left = pushes

    def push_messages(self, messages: Any) -> Any:
        self.left -= 1
        if self.left < 0:
            raise KeyboardInterrupt
        return super().push_messages(messages)


def test_a_run_cut_off_from_the_superlink_is_left_to_resume_not_failed() -> None:
    # Prepare
    recorder = DyingRecorder(die_at=None)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    configs = [{"seconds-per-step": s} for s in SPEEDS]
    grid = CutOffGrid(9, 4, node_configs=configs)

    # Execute: the ServerApp is interrupted after a few rounds, then a new run takes over.
    with pytest.raises(KeyboardInterrupt):
        run_experiment(grid, spec("fedbuff"), recorder, experiment_id=1, flwr_run_id=1)
    interrupted = (recorder.experiments[1].status, recorder.runs[1].status)
    kinds = [e.kind for e in recorder.events]
    run(spec("fedbuff"), recorder, flwr_run_id=2)

    # Assert: the interruption did not fail the experiment; the next run finished it.
    assert interrupted == (ExperimentStatus.RUNNING, "interrupted")
    assert "run-interrupted" in kinds
    assert recorder.experiments[1].status == ExperimentStatus.COMPLETED
    assert [r for _, r in committed(recorder)] == [1, 2, 3, 4, 5]
