"""FedFix and asynchronous FedAvg: hand-computed server rules, and FedFix's FedAvg equivalence."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from flwr.app import Message
from flwr.supercore.task_identity import TaskIdentity

from florist.server.runtime.localgrid import LocalGrid, run_local
from florist.server.spec import ExperimentSpec
from florist.strategies.events import Arrival
from florist.strategies.fedfix import AsyncFedAvg, AsyncFedAvgConfig, FedFix, FedFixConfig
from tests.unit.test_runtime import assert_every_task_recorded_once
from tests.unit.updates import vec


@pytest.fixture(autouse=True)
def task_identity() -> None:
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0


def timed(node: int, x: list[float], sent: list[float], n: float, tau: float) -> Arrival:
    return Arrival(node, vec(*x), vec(*sent), 0, 0, n, 1, {}, tau)


def test_fedfix_tick_by_hand_weights_by_periods_and_data() -> None:
    # Prepare: Δt = 2 s; node 1 (n = 10) took 1 s, node 2 (n = 30) took 3 s: ⌈τ/Δt⌉ = 1 and 2,
    # p = 0.25 and 0.75, so d = 0.25 and 1.5. Node 2 started from [0, 0], the model is [1, 1] now.
    server = FedFix(FedFixConfig(period_s=2.0, server_lr=0.5))
    current = vec(1.0, 1.0)
    assert server.on_arrival(timed(1, [3.0, 1.0], [1.0, 1.0], 10, 1.0), current).weights is None
    assert server.on_arrival(timed(2, [0.0, 2.0], [0.0, 0.0], 30, 3.0), current).weights is None

    # Execute
    decision = server.on_tick(2.0, current)

    # Assert: x + η_g·Σ d_i·(x_i − x_sent(i)) = [1, 1] + 0.5·(0.25·[2, 0] + 1.5·[0, 2])
    #       = [1.25, 2.5]
    assert decision.weights is not None
    np.testing.assert_allclose(decision.weights["w"], [1.25, 2.5])
    assert decision.dispatch == (1, 2) and decision.wake_in == 2.0
    # Nothing finished by the next tick: no new model, the clock goes on.
    quiet = server.on_tick(4.0, decision.weights)
    assert quiet.weights is None and quiet.dispatch == () and quiet.wake_in == 2.0


def test_async_fedavg_time_weights_by_hand() -> None:
    # τ = 1 s and 2 s, equal data (p = 0.5): d_2 = (1/1 + 1/2)·2·0.5 = 1.5, d_1 = 1.5·1·0.5 = 0.75.
    server = AsyncFedAvg(AsyncFedAvgConfig(weighting="time"))
    start = vec(0.0)
    first = server.on_arrival(timed(1, [1.0], [0.0], 10, 1.0), start)
    # Only node 1 known yet: (1/1)·1·1 = 1.
    assert first.weights is not None
    np.testing.assert_allclose(first.weights["w"], [1.0])
    second = server.on_arrival(timed(2, [2.0], [0.0], 10, 2.0), first.weights)
    assert second.weights is not None
    np.testing.assert_allclose(second.weights["w"], [1.0 + 1.5 * 2.0])
    third = server.on_arrival(timed(1, [4.0], [4.0 - 2.0], 10, 1.0), second.weights)
    assert third.weights is not None
    np.testing.assert_allclose(third.weights["w"], [4.0 + 0.75 * 2.0])
    assert third.dispatch == (1,)
    plain = AsyncFedAvg(AsyncFedAvgConfig(weighting="none"))
    moved = plain.on_arrival(timed(2, [2.0], [0.0], 10, 2.0), vec(5.0)).weights
    assert moved is not None
    np.testing.assert_allclose(moved["w"], [7.0])


def spec(**overrides: Any) -> ExperimentSpec:
    body: dict[str, Any] = {
        "name": "fedfix",
        "strategy": {"name": "fedavg", "config": {}},
        "dataset": {"name": "digits", "partitioner": {"name": "dirichlet", "alpha": 0.5}},
        "model": {"name": "logreg"},
        "training": {"local_epochs": 1},
        "clock": "virtual",
        "rounds": 2,
        "clients": {"min": 4},
    }
    return ExperimentSpec.model_validate(body | overrides)


SECONDS_PER_STEP = {1000: 1.0, 1001: 1.0, 1002: 3.0, 1003: 6.0}


def speeds(node: int, request: Message, reply: Message) -> Message:
    metrics = reply.content.metric_records["metrics"]
    metrics["virtual-duration"] = float(metrics["local-steps"]) * SECONDS_PER_STEP[node]
    return reply


def test_fedfix_with_a_period_past_the_slowest_client_is_fedavg() -> None:
    # Every client's τ is below Δt, so each period aggregates everyone with d_i = p_i: FedAvg.
    avg, _ = run_local(spec(), 4, speeds)
    fix, recorder = run_local(
        spec(strategy={"name": "fedfix", "config": {"period_s": 10_000.0}}), 4, speeds
    )
    assert avg.final_arrays is not None and fix.final_arrays is not None
    for key, value in avg.final_arrays.items():
        np.testing.assert_allclose(fix.final_arrays[key].numpy(), value.numpy(), atol=1e-6)
    assert [r.num_updates for r in recorder.rounds(1)] == [4, 4]
    assert [r.virtual_time_s for r in recorder.rounds(1)] == [10_000.0, 20_000.0]


def test_fedfix_short_periods_aggregate_the_fast_and_keep_every_task_on_record() -> None:
    # The slow nodes take several periods: early ticks aggregate only the fast ones.
    grid = LocalGrid(4, speeds)
    s = spec(strategy={"name": "fedfix", "config": {"period_s": 40.0}}, rounds=3)
    from florist.server.recording import InMemoryRunRecorder
    from florist.server.serverapp import run_experiment

    recorder = InMemoryRunRecorder()
    run_experiment(grid, s, recorder, experiment_id=1, flwr_run_id=1, poll_interval=0)
    first = recorder.rounds(1)[0]
    assert {u.node_id for u in first.updates} < {1000, 1001, 1002, 1003}
    assert {1000, 1001} <= {u.node_id for u in first.updates}
    assert_every_task_recorded_once(recorder, grid)
