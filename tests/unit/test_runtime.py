"""The event-driven loop on an in-process Grid: FedAvg equivalence, FedAsync, FedBuff, clocks."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import pytest
from flwr.app import Error, Message
from flwr.supercore.task_identity import TaskIdentity

from florist.server.localgrid import LocalGrid, run_local
from florist.server.recorder import InMemoryRunRecorder
from florist.server.serverapp import RunResult, run_experiment
from florist.server.spec import ExperimentSpec
from florist.strategies.events import Arrival, apply_delta, mix, weighted_mean
from florist.strategies.fedasync import FedAsyncConfig, staleness_factor
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


# Seconds per local step by node, as a device profile would report them on the virtual clock.
SPEEDS = {1000: 1.0, 1001: 1.0, 1002: 3.0, 1003: 6.0}


def report_virtual_duration(node: int, request: Message, reply: Message) -> Message:
    if not reply.has_error():
        metrics = reply.content.metric_records["metrics"]
        metrics["virtual-duration"] = float(metrics["local-steps"]) * SPEEDS[node]
    return reply


def run(s: ExperimentSpec, nodes: int, tamper: Any = None) -> tuple[RunResult, InMemoryRunRecorder]:
    recorder = InMemoryRunRecorder()
    result = run_experiment(
        LocalGrid(nodes, tamper), s, recorder, experiment_id=1, flwr_run_id=1, poll_interval=0
    )
    return result, recorder


def test_fedavg_on_the_event_loop_equals_flowers_fedavg() -> None:
    flower, _ = run_local(spec(runtime="flower"), 3)
    event, recorder = run_local(spec(runtime="event"), 3)
    for key, value in weights(flower).items():
        np.testing.assert_array_equal(value, weights(event)[key])
    rounds = recorder.rounds(1)
    assert [r.num_updates for r in rounds] == [3, 3]
    assert all(
        u.staleness == 0 and u.model_version == r.server_round - 1
        for r in rounds
        for u in r.updates
    )


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
    _, recorder = run(async_spec(), 4, report_virtual_duration)
    updates = [u for r in recorder.rounds(1) for u in r.updates]
    per_node = Counter(u.node_id for u in updates)
    # 600 virtual seconds at 10 s / 10 s / 30 s / 60 s per task.
    assert per_node[1000] >= 55 and per_node[1001] >= 55
    assert per_node[1000] > per_node[1002] > per_node[1003] >= 9
    times = [r.virtual_time_s for r in recorder.rounds(1)]
    assert times == sorted(times) and times[-1] >= 600  # type: ignore[type-var]
    assert all(u.virtual_duration_s == 10 * SPEEDS[u.node_id] for u in updates)


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
