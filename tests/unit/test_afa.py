"""AFA-CD and AFA-CS: the step-normalised server rules by hand (unequal K_i, a stale worker), the
workers' own step choice, and runs through the one loop."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import RecordDict
from flwr.supercore.task_identity import TaskIdentity
from pydantic import ValidationError

from florist.client.profiles import ProfileError, profile_from_node_config
from florist.client.training import TrainingConfig, TrainTask
from florist.datasets import XY
from florist.server.runtime.localgrid import run_local
from florist.server.spec import ExperimentSpec
from florist.strategies.afa import AfaCd, AfaConfig, AfaCs, local_steps_drawn, train
from florist.strategies.events import Arrival
from tests.unit.updates import vec


@pytest.fixture(autouse=True)
def task_identity() -> None:
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0


def back(
    node: int, x: list[float], sent: list[float], steps: int, sent_version: int = 0
) -> Arrival:
    return Arrival(node, vec(*x), vec(*sent), sent_version, sent_version, 10, steps, {}, 1.0)


def test_afa_cd_averages_step_normalised_updates() -> None:
    # Prepare: m = 2, η = 2. Node 1 moved [0] → [4] in K = 2 steps (2 per step); node 2 moved
    # [0] → [3] in K = 3 steps (1 per step).
    server = AfaCd(AfaConfig(arrivals_per_update=2, server_lr=2.0))
    start = vec(0.0)

    # Execute
    first = server.on_arrival(back(1, [4.0], [0.0], 2), start)
    second = server.on_arrival(back(2, [3.0], [0.0], 3), start)

    # Assert: x + η·mean(Δ_i/K_i) = 0 + 2·(2 + 1)/2 = 3. Without the 1/K_i normalisation it
    # would be 2·(4 + 3)/2 = 7: the worker with more steps would dominate.
    assert first.weights is None and first.dispatch == (1,)
    assert second.weights is not None and second.dispatch == (2,)
    np.testing.assert_allclose(second.weights["w"], [3.0])
    assert server.buffer == []


def test_afa_cd_uses_a_stale_update_as_it_is() -> None:
    # The model moved to [5] meanwhile; node 3's update is against the [0] it was sent.
    server = AfaCd(AfaConfig(arrivals_per_update=1, server_lr=1.0))
    new = server.on_arrival(back(3, [8.0], [0.0], 4), vec(5.0)).weights
    assert new is not None
    np.testing.assert_allclose(new["w"], [5.0 + 8.0 / 4])


def test_afa_cs_averages_every_workers_latest_update_over_all_m() -> None:
    # Prepare: M = 3 workers, m = 1, η = 3.
    server = AfaCs(AfaConfig(arrivals_per_update=1, server_lr=3.0))
    server.begin([1, 2, 3], vec(0.0))

    # Execute: node 1 (Δ/K = [2]), then node 2 (Δ/K = [1]), then node 1 again (Δ/K = [-1]).
    a = server.on_arrival(back(1, [4.0], [0.0], 2), vec(0.0)).weights
    assert a is not None
    b = server.on_arrival(back(2, [3.0], [0.0], 3), a).weights
    assert b is not None
    c = server.on_arrival(back(1, [1.0], [2.0], 1, sent_version=1), b).weights

    # Assert: each step is η·(1/M)·Σ of the latest per worker, an unheard worker as 0:
    # a = 3·(2 + 0 + 0)/3 = 2; b = 2 + 3·(2 + 1 + 0)/3 = 5; c = 5 + 3·(−1 + 1 + 0)/3 = 5.
    np.testing.assert_allclose(a["w"], [2.0])
    np.testing.assert_allclose(b["w"], [5.0])
    assert c is not None
    np.testing.assert_allclose(c["w"], [5.0])


def test_default_server_step_is_the_theorys() -> None:
    assert AfaConfig(arrivals_per_update=4, max_local_steps=9).step == pytest.approx(6.0)
    with pytest.raises(ValidationError, match="min_local_steps"):
        AfaConfig(min_local_steps=10, max_local_steps=5)


def _task(seed: int, server_round: int) -> TrainTask[AfaConfig]:
    x = np.random.default_rng(0).normal(size=(40, 3)).astype(np.float32)
    return TrainTask(
        model=torch.nn.Linear(3, 2),
        data=XY(x=x, y=(x[:, 0] > 0).astype(np.int64)),
        training=TrainingConfig(batch_size=4, local_epochs=1),
        config=AfaConfig(min_local_steps=2, max_local_steps=7),
        server_round=server_round,
        seed=seed,
        state=RecordDict(),
    )


def test_workers_draw_their_own_local_steps_in_the_range() -> None:
    draws = {local_steps_drawn(_task(seed, r)) for seed in range(5) for r in range(1, 6)}
    assert draws <= set(range(2, 8)) and len(draws) > 2
    # Reproducible, and what the worker reports is what it ran.
    task = _task(3, 2)
    assert train(task).steps == local_steps_drawn(_task(3, 2))


@pytest.mark.parametrize(
    ("node", "expected"),
    [
        ({"min-local-steps": 4, "max-local-steps": 5}, {4, 5}),  # inside the experiment's range
        ({"max-local-steps": 3}, {2, 3}),  # a tighter top
        ({"min-local-steps": 30}, {30}),  # a device that runs at least 30: its bound wins
        ({}, set(range(2, 8))),  # no bounds of its own: the experiment's 2–7
    ],
)
def test_a_nodes_own_step_range_bounds_its_draws(node: dict[str, int], expected: set[int]) -> None:
    profile = profile_from_node_config(node)
    draws = {
        local_steps_drawn(replace(_task(seed, r), profile=profile))
        for seed in range(6)
        for r in range(1, 8)
    }
    assert draws == expected


def test_a_crossed_step_range_in_a_node_config_is_named() -> None:
    with pytest.raises(ProfileError, match=r"min-local-steps \(9\) exceeds max-local-steps \(3\)"):
        profile_from_node_config({"min-local-steps": 9, "max-local-steps": 3})
    with pytest.raises(ProfileError, match="max-local-steps"):
        profile_from_node_config({"max-local-steps": 0})


@pytest.mark.parametrize("strategy", ["afa-cd", "afa-cs"])
def test_nodes_run_the_steps_their_profiles_allow(strategy: str) -> None:
    # Prepare: one node runs 1–2 steps, one 12–14, one the experiment's 5–8.
    configs: list[dict[str, Any]] = [
        {"max-local-steps": 2, "min-local-steps": 1},
        {"min-local-steps": 12, "max-local-steps": 14},
        {},
    ]

    # Execute
    _, recorder = run_local(spec(strategy, rounds=4), 3, node_configs=configs)

    # Assert: each node's recorded steps stay in its own range.
    steps: dict[int, set[int]] = {}
    for r in recorder.rounds(1):
        for u in r.updates:
            if u.status == "accepted" and u.local_steps is not None:
                steps.setdefault(u.node_id, set()).add(u.local_steps)
    assert steps[1000] <= {1, 2} and steps[1001] <= {12, 13, 14} and steps[1002] <= set(range(5, 9))


def spec(strategy: str, **overrides: Any) -> ExperimentSpec:
    body: dict[str, Any] = {
        "name": strategy,
        "strategy": {"name": strategy, "config": {"arrivals_per_update": 2, "max_local_steps": 8}},
        "workload": {"name": "digits", "config": {"partitioner": {"name": "iid"}}},
        "training": {"lr": 0.05, "batch_size": 16},
        "rounds": 8,
        "clock": "virtual",
        "clients": {"min": 3},
    }
    return ExperimentSpec.model_validate(body | overrides)


@pytest.mark.parametrize("strategy", ["afa-cd", "afa-cs"])
def test_afa_runs_on_nodes_of_different_speeds(strategy: str) -> None:
    configs: list[dict[str, Any]] = [{"seconds-per-step": s} for s in (0.5, 1.0, 3.0)]
    result, recorder = run_local(spec(strategy), 3, node_configs=configs)
    rounds = recorder.rounds(1)
    assert len(rounds) == 8
    steps = {u.local_steps for r in rounds for u in r.updates if u.status == "accepted"}
    assert steps <= set(range(5, 9)) and len(steps) > 1
    assert rounds[-1].metrics["accuracy"] > result.initial_metrics["accuracy"]
