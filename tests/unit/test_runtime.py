"""The event-driven loop on an in-process Grid: FedAvg equivalence, FedAsync, FedBuff, clocks."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterable
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Error, Message
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity

from florist.client.task import task_to_config
from florist.client.training import evaluate
from florist.datasets import XY, load_test
from florist.server.recording import InMemoryRunRecorder
from florist.server.runtime import NO_REPLY, NOT_AGGREGATED
from florist.server.runtime.localgrid import LocalGrid, run_local
from florist.server.serverapp import RunResult, initial_arrays, run_experiment
from florist.server.spec import ExperimentSpec, resolve_workload, server_setup
from florist.strategies.events import (
    Arrival,
    Decision,
    EventStrategy,
    Retries,
    Weights,
    apply_delta,
    mix,
    weighted_mean,
)
from florist.strategies.fedasync import FedAsyncConfig, staleness_factor
from florist.strategies.fedavg import sampling_kwargs
from florist.strategies.fedbuff import FedBuff, FedBuffConfig


@pytest.fixture(autouse=True)
def task_identity() -> None:
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0


def spec(**overrides: Any) -> ExperimentSpec:
    body: dict[str, Any] = {
        "name": "runtime",
        "strategy": {"name": "fedavg", "config": {}},
        "dataset": {"name": "digits", "partitioner": {"name": "dirichlet", "alpha": 0.5}},
        "model": {"name": "logreg"},
        "training": {"local_epochs": 1},
        "rounds": 2,
        "clients": {"min": 3},
    }
    return ExperimentSpec.model_validate(body | overrides)


def weights(result: RunResult) -> dict[str, np.ndarray]:
    assert result.final_arrays is not None
    return {k: v.numpy() for k, v in result.final_arrays.items()}


def weights_to_state(w: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in w.items()}


# Seconds per local step by node, as a device profile would report them on the virtual clock.
SPEEDS = {1000: 1.0, 1001: 1.0, 1002: 3.0, 1003: 6.0}


def report_virtual_duration(node: int, request: Message, reply: Message) -> Message:
    if not reply.has_error():
        metrics = reply.content.metric_records["metrics"]
        metrics["virtual-duration"] = float(metrics["local-steps"]) * SPEEDS[node]
    return reply


def run(
    s: ExperimentSpec,
    nodes: int,
    tamper: Any = None,
    grid: LocalGrid | None = None,
    recorder: InMemoryRunRecorder | None = None,
) -> tuple[RunResult, InMemoryRunRecorder]:
    recorder = recorder or InMemoryRunRecorder()
    result = run_experiment(
        grid or LocalGrid(nodes, tamper),
        s,
        recorder,
        experiment_id=1,
        flwr_run_id=1,
        poll_interval=0,
    )
    return result, recorder


def assert_every_task_recorded_once(recorder: InMemoryRunRecorder, grid: LocalGrid) -> None:
    """Each task pushed is one update row, and the run's ``tasks`` event counts them alike."""
    rows = Counter(u.node_id for _, u in recorder.updates(1))
    (tasks,) = [e for e in recorder.events if e.kind == "tasks"]
    assert tasks.data is not None
    assert tasks.data["dispatched"] == grid.pushed == sum(rows.values())
    assert tasks.data["by_node"] == {str(n): c for n, c in sorted(rows.items())}
    # And each was announced as it left: one dispatch event per task, with its model version.
    dispatches = [e.data or {} for e in recorder.events if e.kind == "dispatch"]
    assert all(len(d["node_ids"]) == 1 for d in dispatches)
    assert Counter(d["node_ids"][0] for d in dispatches) == tasks.data["by_node"]
    assert all(d["server_round"] == d["model_version"] + 1 for d in dispatches)
    versions = Counter(u.model_version for _, u in recorder.updates(1))
    assert Counter(d["model_version"] for d in dispatches) == versions


def policy_notes(recorder: InMemoryRunRecorder) -> list[dict[str, Any]]:
    return [e.data or {} for e in recorder.events if e.kind == "policy"]


class InOrderGrid(LocalGrid):
    """Flower's own loop on a LocalGrid, its replies handed over in node order (the order
    replies come in is the transport's, not FedAvg's; Florist aggregates in node order)."""

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        replies = super().send_and_receive(messages, timeout=timeout)
        return sorted(replies, key=lambda m: m.metadata.src_node_id)


def test_fedavg_on_the_one_loop_equals_flowers_own_loop() -> None:
    # Prepare: 3 of 5 nodes per round, so Flower's sampling is exercised too, and a sum of
    # three models, whose floating-point result depends on the order.
    s = spec(rounds=3, clients={"min": 3, "fraction_train": 0.6})
    random.seed(s.seed)
    reference = FedAvg(**sampling_kwargs(server_setup(s))).start(  # type: ignore[arg-type]
        grid=InOrderGrid(5),
        initial_arrays=initial_arrays(s),
        num_rounds=3,
        timeout=60,
        train_config=ConfigRecord(task_to_config(s.task())),
    )

    # Execute
    ours, recorder = run_local(s, 5)

    # Assert: bit for bit, and every round trained the 3 nodes Flower would have sampled.
    for key, value in reference.arrays.items():
        np.testing.assert_array_equal(value.numpy(), weights(ours)[key])
    rounds = recorder.rounds(1)
    assert [r.num_updates for r in rounds] == [3, 3, 3]
    assert all(
        u.staleness == 0 and u.model_version == r.server_round - 1
        for r in rounds
        for u in r.updates
    )


def test_federated_evaluation_is_the_example_weighted_mean_over_the_nodes_shards() -> None:
    s = spec(rounds=2, clients={"min": 3, "fraction_evaluate": 1.0})
    result, recorder = run_local(s, 3)

    # By hand: the final model on each node's slice of the test split, weighted by its size.
    workload, config = resolve_workload(s.workload_ref)
    model = workload.build_model(config)
    model.load_state_dict(weights_to_state(weights(result)))
    test = load_test(config.dataset())  # type: ignore[attr-defined]
    # Node pid evaluates every third example of the test split, starting at its own.
    shards = [evaluate(model, XY(test.x[pid::3], test.y[pid::3])) for pid in range(3)]
    total = sum(r.num_examples for r in shards)
    expected = sum(r.accuracy * r.num_examples for r in shards) / total
    first, last = recorder.rounds(1)
    assert last.evaluate_metrics["eval-accuracy"] == pytest.approx(expected, rel=1e-9)
    assert last.evaluate_metrics["eval-loss"] == pytest.approx(
        sum(r.loss * r.num_examples for r in shards) / total, rel=1e-9
    )
    assert "eval-accuracy" in first.evaluate_metrics
    # No evaluation asked for: none sent, none recorded.
    _, plain = run_local(spec(rounds=1), 3)
    assert plain.rounds(1)[0].evaluate_metrics == {}


def test_fedasync_aggregates_every_arrival_and_records_staleness() -> None:
    result, recorder = run(spec(strategy={"name": "fedasync", "config": {}}, rounds=9), 3)
    rounds = recorder.rounds(1)
    assert [r.server_round for r in rounds] == list(range(1, 10))
    assert all(r.num_updates == 1 for r in rounds)
    updates = [u for r in rounds for u in r.updates]
    assert all(u.staleness == u.arrival_version - u.model_version for u in updates)  # type: ignore[operator]
    assert max(u.staleness for u in updates) >= 1  # three nodes in flight: some are stale
    assert all(u.local_steps and u.dispatched_at and u.arrived_at for u in updates)
    assert rounds[-1].metrics["accuracy"] > result.initial_metrics["accuracy"]


def async_spec(seed: int = 0, **overrides: Any) -> ExperimentSpec:
    settings: dict[str, Any] = {
        "strategy": {"name": "fedasync", "config": {"alpha": 0.5}},
        "clock": "virtual",
        "rounds": 1000,
        "time_budget_s": 600.0,
        "seed": seed,
        "clients": {"min": 4},
        "training": {"local_steps": 10},
    }
    return spec(**(settings | overrides))


def test_virtual_clock_orders_by_simulated_time_and_fast_nodes_contribute_more() -> None:
    grid = LocalGrid(4, report_virtual_duration)
    _, recorder = run(async_spec(), 4, grid=grid)
    updates = [u for r in recorder.rounds(1) for u in r.updates]
    per_node = Counter(u.node_id for u in updates)
    # 600 virtual seconds at 10 s / 10 s / 30 s / 60 s per task.
    assert per_node[1000] >= 55 and per_node[1001] >= 55
    assert per_node[1000] > per_node[1002] > per_node[1003] >= 9
    times = [r.virtual_time_s for r in recorder.rounds(1)]
    assert times == sorted(times) and times[-1] >= 600  # type: ignore[type-var]
    assert all(u.virtual_duration_s == 10 * SPEEDS[u.node_id] for u in updates)
    # The tasks that would end after the budget never came, in virtual time: one row each.
    # The last update's node got none: the run was over.
    rounds = recorder.rounds(1)
    unfinished = [u for r, u in recorder.updates(1) if r == len(rounds) + 1]
    assert sorted(u.node_id for u in unfinished) == sorted(
        set(SPEEDS) - {rounds[-1].updates[-1].node_id}
    )
    assert all(u.status == "failed" and u.reason == NO_REPLY for u in unfinished)
    assert all(u.arrival_version is None and u.dispatched_at for u in unfinished)
    assert_every_task_recorded_once(recorder, grid)


def test_virtual_clock_is_deterministic_given_the_seed() -> None:
    a, rec_a = run(async_spec(time_budget_s=120.0), 4, report_virtual_duration)
    b, rec_b = run(async_spec(time_budget_s=120.0), 4, report_virtual_duration)
    c, _ = run(async_spec(seed=1, time_budget_s=120.0), 4, report_virtual_duration)

    def order(recorder: InMemoryRunRecorder) -> list[tuple[int, int]]:
        return [(u.node_id, u.model_version or 0) for r in recorder.rounds(1) for u in r.updates]

    assert order(rec_a) == order(rec_b)
    for key, value in weights(a).items():
        np.testing.assert_array_equal(value, weights(b)[key])
    assert any(not np.array_equal(v, weights(c)[k]) for k, v in weights(a).items())


def test_fedbuff_aggregates_every_k_arrivals() -> None:
    s = spec(strategy={"name": "fedbuff", "config": {"buffer_size": 2}}, rounds=4)
    _, recorder = run(s, 3)
    rounds = recorder.rounds(1)
    assert [r.num_updates for r in rounds] == [2, 2, 2, 2]


def test_updates_handled_since_the_last_aggregation_are_recorded_at_the_end() -> None:
    # Prepare: K = 3 on the virtual clock, tasks of 10, 10, 30 and 60 s, a 25 s budget. The
    # third update (node 1000 at 20 s) aggregates; 1001 at 20 s waits in the buffer, and at 30 s
    # 1002 (sent at 0 s, first of the three replies ending then) joins it, when the budget has
    # run out; 1000 and 1001 (sent at 20 s) and 1003 would report after it.
    grid = LocalGrid(4, report_virtual_duration)
    s = async_spec(strategy={"name": "fedbuff", "config": {"buffer_size": 3}}, time_budget_s=25.0)

    # Execute
    _, recorder = run(s, 4, grid=grid)

    # Assert
    (only,) = recorder.rounds(1)
    assert only.num_updates == 3
    left = [(u.node_id, u.status, u.reason) for r, u in recorder.updates(1) if r == 2]
    assert left[:2] == [(1001, "rejected", NOT_AGGREGATED), (1002, "rejected", NOT_AGGREGATED)]
    # 1002 got no task at 30 s, when the budget was spent.
    assert sorted(left[2:]) == [(n, "failed", NO_REPLY) for n in (1000, 1001, 1003)]
    assert_every_task_recorded_once(recorder, grid)


def test_replies_pulled_and_tasks_in_flight_when_the_run_ends_are_recorded() -> None:
    # Prepare: four nodes answering at once and K = 3: the first three replies of the first
    # pull aggregate the only round, the fourth is pulled but not handled; 1000 and 1001 got
    # new tasks before the aggregation, 1002 none after it: the run was over.
    grid = LocalGrid(4)
    s = spec(strategy={"name": "fedbuff", "config": {"buffer_size": 3}}, rounds=1)

    # Execute
    _, recorder = run(s, 4, grid=grid)

    # Assert
    left = [u for r, u in recorder.updates(1) if r == 2]
    assert [(u.node_id, u.status, u.reason) for u in left] == [
        (1003, "rejected", NOT_AGGREGATED),
        (1000, "failed", NO_REPLY),
        (1001, "failed", NO_REPLY),
    ]
    pulled, *in_flight = left
    assert pulled.arrived_at and pulled.bytes_up > 0 and pulled.local_steps
    assert all(u.arrived_at is None and u.arrival_version is None for u in in_flight)
    assert [(u.model_version, u.staleness) for u in in_flight] == [(0, 1), (0, 1)]
    assert all(u.bytes_down > 0 and u.dispatched_at for u in left)
    assert_every_task_recorded_once(recorder, grid)


def test_a_failing_run_still_records_its_tasks() -> None:
    # Prepare: the sixth push blows up, as a lost SuperLink would.
    def tamper(node: int, request: Message, reply: Message) -> Message:
        if grid.pushed == 5:
            raise ConnectionError("SuperLink gone")
        return reply

    grid = LocalGrid(3, tamper)
    recorder = InMemoryRunRecorder()
    s = spec(strategy={"name": "fedasync", "config": {}}, rounds=20)

    # Execute
    with pytest.raises(ConnectionError, match="SuperLink gone"):
        run(s, 3, grid=grid, recorder=recorder)

    # Assert: one row per task pushed before the error; a lost SuperLink is not the
    # experiment's failure: the run is interrupted and the experiment left to resume.
    assert grid.pushed == 5
    assert recorder.runs[1].status == "interrupted"
    assert recorder.experiments[1].status == "running"
    assert_every_task_recorded_once(recorder, grid)


def test_a_recorder_failing_at_the_end_does_not_hide_the_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def tamper(node: int, request: Message, reply: Message) -> Message:
        if grid.pushed == 4:
            raise ConnectionError("SuperLink gone")
        return reply

    def broken(*args: object) -> None:
        raise RuntimeError("database gone")

    grid = LocalGrid(3, tamper)
    monkeypatch.setattr(InMemoryRunRecorder, "record_updates", broken)
    with pytest.raises(ConnectionError, match="SuperLink gone"):
        run(spec(strategy={"name": "fedasync", "config": {}}, rounds=20), 3, grid=grid)


def test_lost_and_malformed_tasks_are_recorded_and_the_run_goes_on() -> None:
    seen: Counter[int] = Counter()

    def tamper(node: int, request: Message, reply: Message) -> Message:
        seen[node] += 1
        if node == 1001 and seen[node] == 1:
            return Message(Error(code=0, reason="dropped out"), reply_to=request)
        if node == 1002 and seen[node] == 1:
            arrays = reply.content.array_records["arrays"]
            key = next(iter(arrays))
            arrays[key] = type(arrays[key])(np.full_like(arrays[key].numpy(), np.nan))
        return reply

    _, recorder = run(spec(strategy={"name": "fedasync", "config": {}}, rounds=6), 3, tamper)
    updates = [u for r in recorder.rounds(1) for u in r.updates]
    statuses = {(u.node_id, u.status) for u in updates}
    assert (1001, "failed") in statuses and (1002, "rejected") in statuses
    assert (1001, "accepted") in statuses and (1002, "accepted") in statuses
    assert sum(r.num_updates for r in recorder.rounds(1)) == 6
    # What the strategy did about each loss is a policy event naming the node.
    notes = {n["node_id"]: n for n in policy_notes(recorder)}
    assert set(notes) == {1001, 1002}
    assert notes[1001]["action"] == "re-sent" and notes[1001]["reason"] == "dropped out"
    assert notes[1002]["action"] == "re-sent" and notes[1002]["failures_in_a_row"] == 1


@pytest.mark.parametrize("strategy", ["fedasync", "fedbuff"])
def test_a_node_that_keeps_failing_is_given_up(strategy: str) -> None:
    # Prepare: node 1002 is gone: every task it gets fails at once.
    def tamper(node: int, request: Message, reply: Message) -> Message:
        if node == 1002:
            return Message(Error(code=0, reason="node unavailable"), reply_to=request)
        return reply

    grid = LocalGrid(3, tamper)
    config = {"max_failures": 3} | ({"buffer_size": 2} if strategy == "fedbuff" else {})
    s = spec(strategy={"name": strategy, "config": config}, rounds=8)

    # Execute
    _, recorder = run(s, 3, grid=grid)

    # Assert
    updates = [u for _, u in recorder.updates(1)]
    assert [u.status for u in updates if u.node_id == 1002] == ["failed"] * 3
    in_rounds = [u for r in recorder.rounds(1) for u in r.updates if u.node_id != 1002]
    assert in_rounds and all(u.status == "accepted" for u in in_rounds)
    notes = [n for n in policy_notes(recorder) if n["node_id"] == 1002]
    assert [n["action"] for n in notes] == ["re-sent", "re-sent", "given-up"]
    assert [n["failures_in_a_row"] for n in notes] == [1, 2, 3]
    assert all(n["reason"] == "node unavailable" for n in notes)
    assert len(recorder.rounds(1)) == 8
    assert_every_task_recorded_once(recorder, grid)


def test_retries_count_losses_in_a_row_only() -> None:
    retries = Retries(limit=2)
    assert retries.lost(7, "timeout").dispatch == (7,)
    retries.reported(7)
    assert retries.lost(7, "timeout").dispatch == (7,)
    given_up = retries.lost(7, "timeout")
    assert given_up.dispatch == () and given_up.notes[0].data["action"] == "given-up"
    assert retries.given_up == {7}
    never = Retries(limit=0)
    assert all(never.lost(1, "x").dispatch == (1,) for _ in range(50))


def test_the_default_failure_handling_resends_and_says_so() -> None:
    class Minimal(EventStrategy):
        def on_arrival(self, arrival: Arrival, weights: Weights) -> Decision:
            return Decision()

    decision = Minimal().on_failure(5, "dropped out", {})
    assert decision.dispatch == (5,)
    (note,) = decision.notes
    assert note.kind == "policy" and dict(note.data) == {
        "node_id": 5,
        "reason": "dropped out",
        "action": "re-sent",
    }


# --- the pure server maths -------------------------------------------------------------------


def test_staleness_functions() -> None:
    poly = FedAsyncConfig(staleness="polynomial", a=0.5)
    hinge = FedAsyncConfig(staleness="hinge", a=0.5, b=2)
    assert staleness_factor(FedAsyncConfig(staleness="constant"), 7) == 1.0
    assert staleness_factor(poly, 0) == 1.0 and staleness_factor(poly, 3) == pytest.approx(0.5)
    assert staleness_factor(hinge, 2) == 1.0
    assert staleness_factor(hinge, 4) == pytest.approx(1 / (0.5 * 2 + 1))


def test_fedbuff_step_by_hand() -> None:
    w = {"w": np.array([1.0, 1.0], dtype=np.float32)}

    def arrival(x: list[float], sent_version: int, version: int) -> Arrival:
        return Arrival(0, {"w": np.array(x, np.float32)}, w, sent_version, version, 1, 1, {}, 0.0)

    buff = FedBuff(FedBuffConfig(buffer_size=2, server_lr=0.5, staleness_scaling=True))
    assert buff.on_arrival(arrival([3.0, 1.0], 0, 0), w).weights is None
    new = buff.on_arrival(arrival([1.0, 4.0], 0, 3), w).weights
    # Δ1 = (2, 0) unscaled; Δ2 = (0, 3)/√4; mean = (1, 0.75); x + 0.5·mean.
    assert new is not None
    np.testing.assert_allclose(new["w"], [1.5, 1.375])
    assert new["w"].dtype == np.float32


def test_mixing_and_weighted_mean() -> None:
    a, b = {"w": np.array([0.0, 2.0])}, {"w": np.array([4.0, 2.0])}
    np.testing.assert_allclose(mix(a, b, 0.25)["w"], [1.0, 2.0])
    np.testing.assert_allclose(weighted_mean([a, b], [3, 1])["w"], [1.0, 2.0])
    np.testing.assert_allclose(apply_delta(a, b, 0.5)["w"], [2.0, 3.0])


class JoiningGrid(LocalGrid):
    """Node 1002 connects only after the first two tasks were pushed."""

    def get_node_ids(self) -> Iterable[int]:
        return self.node_ids if self.pushed >= 2 else self.node_ids[:2]


@pytest.mark.parametrize("strategy", ["fedavg", "fedasync"])
def test_a_node_that_joins_later_gets_work(strategy: str) -> None:
    # Prepare: the run starts with the 2 nodes it needs; a third connects during round 1.
    s = spec(strategy={"name": strategy, "config": {}}, rounds=3, clients={"min": 2})
    grid = JoiningGrid(3)

    # Execute
    recorder = InMemoryRunRecorder()
    run_experiment(
        grid, s, recorder, experiment_id=1, flwr_run_id=1, poll_interval=0, node_poll_s=0
    )

    # Assert: it trains from then on, as on Flower's own loop, which samples each round anew.
    rounds = recorder.rounds(1)
    first_of_joiner = min(r.server_round for r in rounds for u in r.updates if u.node_id == 1002)
    if strategy == "fedavg":
        assert [r.num_updates for r in rounds] == [2, 3, 3]
        assert first_of_joiner == 2
    else:
        assert first_of_joiner <= 3
    assert_every_task_recorded_once(recorder, grid)
