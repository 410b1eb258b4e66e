"""FedCompass: the staleness-weighted update and the arrival-group scheduler by hand, and a run
on nodes of different speeds where the assigned local steps follow the speeds."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from flwr.supercore.task_identity import TaskIdentity
from pydantic import ValidationError

from florist.server.runtime.localgrid import run_local
from florist.server.spec import ExperimentSpec
from florist.strategies.events import Arrival
from florist.strategies.fedcompass import (
    CompassScheduler,
    FedCompass,
    FedCompassConfig,
    compass_update,
    staleness_factor,
)
from tests.unit.updates import vec


@pytest.fixture(autouse=True)
def task_identity() -> None:
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0


def back(
    node: int,
    x: list[float],
    sent: list[float],
    sent_version: int,
    steps: int,
    took: float,
    at: float,
) -> Arrival:
    return Arrival(node, vec(*x), vec(*sent), sent_version, sent_version, 10, steps, {}, took, at)


def test_staleness_factor_decays() -> None:
    # (τ + 1)^(−a): the sign the early standalone code got wrong would give 2, not 0.5, at τ = 3.
    assert staleness_factor(0, 0.5) == 1.0
    assert staleness_factor(3, 0.5) == pytest.approx(0.5)
    assert staleness_factor(3, 0.0) == 1.0


def test_compass_update_by_hand() -> None:
    # x = [1, 1]; N = 4 clients; α = 0.9; a = 0.5. A fresh Δ = [4, 0] and a 3-stale Δ = [0, 8]:
    # x + 0.9·(1·¼·[4, 0] + 0.5·¼·[0, 8]) = [1 + 0.9, 1 + 0.9] = [1.9, 1.9].
    new = compass_update(
        vec(1.0, 1.0),
        [vec(4.0, 0.0), vec(0.0, 8.0)],
        [0, 3],
        num_clients=4,
        server_lr=0.9,
        exponent=0.5,
    )
    np.testing.assert_allclose(new["w"], [1.9, 1.9])


def test_equal_speeds_stay_one_group_of_q_max() -> None:
    s = CompassScheduler(q_min=20, q_max=100, latest_time_factor=1.5, momentum=0.9)
    first = s.assign_all([1, 2, 3], now=0.0)
    assert {a.gid for a in first} == {0} and {a.steps for a in first} == {100}
    for n in (1, 2, 3):
        s.measured(n, 100.0, 100)  # 1 s per step
        s.back(n)
    (group,) = s.due(100.0)
    s.close(group)
    again = s.assign_all([1, 2, 3], now=100.0)
    assert len({a.gid for a in again}) == 1 and {a.steps for a in again} == {100}


def test_slower_clients_join_the_fast_clients_group_with_fewer_steps() -> None:
    # Prepare: speeds 1, 2 and 4 s/step measured in the first round (all got Q_max = 100).
    s = CompassScheduler(q_min=20, q_max=100, latest_time_factor=1.5, momentum=0.9)
    s.assign_all([1, 2, 3], now=0.0)
    for node, took in ((1, 100.0), (2, 200.0), (3, 400.0)):
        s.measured(node, took, 100)
        s.back(node)
    (group,) = s.due(400.0)
    s.close(group)

    # Execute: all three sent work at t = 400, fastest first.
    assigned = s.assign_all([3, 1, 2], now=400.0)

    # Assert: node 1 opens a group expected at 400 + 100·1 = 500, latest 400 + 1.5·100 = 550;
    # node 2 joins with ⌊100/2⌋ = 50 steps, node 3 with ⌊100/4⌋ = 25: Q ∝ 1/s.
    assert [(a.node_id, a.steps) for a in assigned] == [(1, 100), (2, 50), (3, 25)]
    assert len({a.gid for a in assigned}) == 1
    (open_group,) = s.groups.values()
    assert (open_group.expected_at, open_group.latest_at) == (500.0, 550.0)
    assert s.next_deadline() == 550.0


def test_too_slow_for_q_min_opens_its_own_group() -> None:
    s = CompassScheduler(q_min=20, q_max=100, latest_time_factor=1.5, momentum=0.9)
    s.speed = {1: 1.0, 2: 10.0}  # node 2 would get ⌊100/10⌋ = 10 < Q_min steps
    a1, a2 = s.assign_all([1, 2], now=0.0)
    assert a1.gid != a2.gid and a2.steps == 100


def test_speed_is_a_moving_average() -> None:
    s = CompassScheduler(q_min=1, q_max=10, latest_time_factor=1.5, momentum=0.9)
    s.measured(1, 10.0, 10)  # first: 1.0
    s.measured(1, 30.0, 10)  # 0.1·1 + 0.9·3 = 2.8
    assert s.speed[1] == pytest.approx(2.8)


def test_a_late_member_waits_in_the_buffer_for_the_next_aggregation() -> None:
    # Prepare: two nodes, speeds known (1 and 2 s/step); both sent the version-0 model [0] at
    # t = 0: node 1 with 100 steps (group expected at 100, latest at 150), node 2 joins with 50.
    server = FedCompass(FedCompassConfig(q_min=20, q_max=100, server_lr=1.0))
    server.nodes = {1, 2}
    server.scheduler.speed = {1: 1.0, 2: 2.0}
    start = server._dispatch([1, 2])
    assert start.local_steps == {1: 100, 2: 50} and start.wake_in == 150.0

    # Execute: node 1 is back at 100 (waits); node 2 is not back by the latest time, 150.
    waiting = server.on_arrival(back(1, [2.0], [0.0], 0, 100, 100.0, 100.0), vec(0.0))
    tick = server.on_tick(150.0, vec(0.0))

    # Assert: the tick aggregates node 1 alone: 0 + 1·1·½·2 = 1 (N = 2), and sends node 1 work.
    assert waiting.weights is None and waiting.dispatch == ()
    assert tick.weights is not None
    np.testing.assert_allclose(tick.weights["w"], [1.0])
    assert tick.dispatch == (1,)

    # Execute: node 2 is back late, at 160, with Δ = [4] on version 0 (now 1 version stale).
    late = server.on_arrival(back(2, [4.0], [0.0], 0, 50, 160.0, 160.0), tick.weights)

    # Assert: it gets work at once. Its speed is now 0.1·2 + 0.9·(160/50) = 3.08 s/step, so it
    # joins node 1's group (opened at 150, expected at 250) with ⌊(250 − 160)/3.08⌋ = 29 steps.
    assert late.weights is None and late.dispatch == (2,)
    assert late.local_steps == {2: 29}
    assert server.scheduler.group_of[2] == server.scheduler.group_of[1]
    # The notes the dashboard draws the groups from: group 0 (expected at 100, latest 150), then
    # group 1, opened at 150 by node 1 (100 steps at 1 s/step: latest 150 + 1.5·100·1 = 300).
    assert [n.data["groups"] for n in start.notes] == [
        [{"group": 0, "expected_at": 100.0, "latest_at": 150.0}]
    ]
    assert [n.data["assignments"] for n in late.notes] == [
        [{"node_id": 2, "group": 1, "local_steps": 29}]
    ]
    assert [n.data["groups"] for n in late.notes] == [
        [{"group": 1, "expected_at": 250.0, "latest_at": 300.0}]
    ]

    # Execute: both are back at 250: node 1 with Δ = [1], node 2 with Δ = [2], both on version 1.
    first = server.on_arrival(back(1, [2.0], [1.0], 1, 100, 100.0, 250.0), tick.weights)
    second = server.on_arrival(back(2, [3.0], [1.0], 1, 29, 90.0, 250.0), tick.weights)

    # Assert: the group aggregates its two fresh updates and the buffered late one, 1 version
    # stale, weighted S(1) = 2^-½: 1 + ½·1 + ½·2 + ½·2^-½·4 = 2.5 + √2.
    assert first.weights is None
    assert second.weights is not None
    np.testing.assert_allclose(second.weights["w"], [2.5 + np.sqrt(2.0)])
    assert server.buffer == []


def test_config_refuses_crossed_step_bounds() -> None:
    with pytest.raises(ValidationError, match="q_min"):
        FedCompassConfig(q_min=50, q_max=10)


def spec(**overrides: Any) -> ExperimentSpec:
    body: dict[str, Any] = {
        "name": "compass",
        "strategy": {"name": "fedcompass", "config": {"q_min": 4, "q_max": 16}},
        "workload": {"name": "digits", "config": {"partitioner": {"name": "iid"}}},
        "training": {"lr": 0.05, "batch_size": 16},
        "rounds": 6,
        "clock": "virtual",
        "clients": {"min": 3},
    }
    return ExperimentSpec.model_validate(body | overrides)


def test_a_run_on_nodes_of_different_speeds_assigns_steps_by_speed() -> None:
    # Prepare: three nodes at 0.5, 1 and 2 virtual seconds per step.
    speeds = [0.5, 1.0, 2.0]
    configs: list[dict[str, Any]] = [{"seconds-per-step": s} for s in speeds]

    # Execute
    result, recorder = run_local(spec(), 3, node_configs=configs)

    # Assert: after the first group (Q_max for all), slower nodes are given fewer steps.
    updates = [u for r in recorder.rounds(1) for u in r.updates if u.status == "accepted"]
    later = [u for u in updates if (u.model_version or 0) >= 1]
    steps = {u.node_id: u.local_steps for u in later}
    assert steps[1000] == 16 and steps[1000] > steps[1001] > steps[1002], steps
    rounds = recorder.rounds(1)
    assert rounds[-1].metrics["accuracy"] > result.initial_metrics["accuracy"]
    kinds = {e.kind for e in recorder.events}
    assert {"fedcompass-assign", "fedcompass-aggregate"} <= kinds
