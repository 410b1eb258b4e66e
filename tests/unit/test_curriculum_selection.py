"""Curriculum client selection: one common scorer, a pool that keeps changing, run-long pacing."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from flwr.supercore.task_identity import TaskIdentity
from torch import nn

from florist.client.training import TrainingConfig, TrainTask, get_weights
from florist.datasets import XY
from florist.server.runtime.localgrid import run_local
from florist.server.spec import ExperimentSpec
from florist.strategies.base import ServerSetup
from florist.strategies.curriculum import (
    COMMON_METRIC,
    DIFFICULTY_METRIC,
    PACING_ROUNDS_KEY,
    CurriculumConfig,
    CurriculumFedAvg,
    build_server,
    plugin,
    pool_size,
    train,
)
from florist.strategies.events import Arrival, Weights
from florist.strategies.flower_adapter import FlowerAggregator


@pytest.fixture(autouse=True)
def task_identity() -> None:
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0


def arrival(node: int, weights: Weights, metrics: dict[str, float], n: int = 4) -> Arrival:
    return Arrival(
        node_id=node,
        weights=weights,
        sent_weights=weights,
        sent_version=0,
        version=0,
        num_examples=n,
        local_steps=1,
        metrics=metrics,
        duration_s=1.0,
    )


# --- (a) one common scorer ------------------------------------------------------------------


def common_model() -> nn.Module:
    """Constant logits [0, ln 3]: CE is ln 4 for label 0 and ln(4/3) for label 1, any x."""
    model = nn.Linear(1, 2)
    with torch.no_grad():
        model.weight.zero_()
        model.bias.copy_(torch.tensor([0.0, math.log(3.0)]))
    return model


def client_half(labels: list[int], seed: int) -> tuple[dict[str, float], Weights]:
    """One node's training reply: its metrics and weights, starting from the common model."""
    n = len(labels)
    data = XY(x=np.linspace(-1, 1, n, dtype=np.float32)[:, None], y=np.array(labels))
    model = common_model()
    task = TrainTask(
        model=model,
        data=data,
        training=TrainingConfig(local_epochs=1, batch_size=4, lr=0.5, momentum=0.0),
        config=CurriculumConfig(
            client_selection="easy_first", pacing="none", scorer_epochs=20, warmup_rounds=1
        ),
        server_round=1,
        seed=seed,
    )
    result = train(task)
    return result.metrics, get_weights(model)


def test_nodes_are_ranked_by_the_common_model_not_by_their_own_scorers() -> None:
    # Prepare: node 1 holds only label 0 (extreme label skew), node 2 both labels half-half,
    # and x carries no label information on either. Under the common model (the global model
    # both received) node 1's mean loss is ln 4 ≈ 1.386 and node 2's (ln 4 + ln(4/3))/2 ≈ 0.837,
    # so node 2 is easier. A scorer trained on node 1's own data just learns "always 0" and calls
    # node 1 easy; node 2's own scorer can do no better than chance.
    skewed, skewed_weights = client_half([0] * 8, seed=1)
    balanced, balanced_weights = client_half([0, 1] * 4, seed=2)

    # The per-client scores rank the skewed node easier: the confound the common scorer removes.
    assert skewed[DIFFICULTY_METRIC] < balanced[DIFFICULTY_METRIC]
    np.testing.assert_allclose(skewed[COMMON_METRIC], math.log(4.0), rtol=1e-6)
    np.testing.assert_allclose(
        balanced[COMMON_METRIC], (math.log(4.0) + math.log(4.0 / 3.0)) / 2, rtol=1e-6
    )

    strategy = CurriculumFedAvg(
        client_selection="easy_first", clients_per_round=1, warmup_rounds=1, seed=0
    )
    rounds = FlowerAggregator(strategy)
    weights = get_weights(common_model())

    # Execute: round 1 (the warm-up) trains both; its replies carry the scores; round 2 selects.
    assert sorted(rounds.select(1, weights, [1, 2])) == [1, 2]
    rounds.aggregate(
        1, weights, [arrival(1, skewed_weights, skewed), arrival(2, balanced_weights, balanced)]
    )
    rounds.select(2, weights, [1, 2])

    # Assert: the server ranks by the common model's loss, the balanced node first.
    assert strategy.difficulty == pytest.approx({1: math.log(4.0), 2: 0.8369882})
    assert strategy.ranking[2] == [2, 1]


def test_only_the_warm_up_rounds_scores_rank_nodes() -> None:
    # Scores reported after the warm-up come from other global models: they must not mix in.
    strategy = CurriculumFedAvg(
        client_selection="easy_first", clients_per_round=1, warmup_rounds=2, seed=0
    )
    rounds = FlowerAggregator(strategy)
    weights = {"w": np.zeros(1, dtype=np.float32)}
    for r, scores in [(1, {1: 0.1, 2: 0.9}), (2, {1: 0.8, 2: 0.2}), (3, {1: 0.0, 2: 5.0})]:
        nodes = sorted(rounds.select(r, weights, [1, 2]))
        rounds.aggregate(
            r, weights, [arrival(n, weights, {COMMON_METRIC: scores[n]}) for n in nodes]
        )
    assert strategy.difficulty == {1: 0.8, 2: 0.2}
    assert strategy.ranking[3] == [2, 1]
    assert [len(strategy.selected[r]) for r in (1, 2, 3)] == [2, 2, 1]


# --- (b) the pool does not collapse to the same k nodes -------------------------------------


def test_paced_pool_keeps_changing_the_chosen_nodes() -> None:
    # Prepare: 10 nodes of known common difficulty (node i: i/10), k = 5, warm-up 1, linear
    # pacing over 20 rounds (a = 0.8, b = 0.2): in round r, t = r − 2 of T = 19, g = 0.2 + t/19.
    # A pool of ⌈g·10⌉ nodes would be ≤ 5 = k, a forced choice of the 5 easiest, for rounds 2–7.
    nodes = list(range(10))
    strategy = CurriculumFedAvg(
        client_selection="easy_first",
        clients_per_round=5,
        warmup_rounds=1,
        pacing_rounds=20,
        a=0.8,
        b=0.2,
        seed=0,
    )
    rounds = FlowerAggregator(strategy)
    weights = {"w": np.zeros(1, dtype=np.float32)}

    # Execute: 20 rounds.
    chosen: dict[int, set[int]] = {}
    for r in range(1, 21):
        chosen[r] = set(rounds.select(r, weights, nodes))
        replies = [arrival(n, weights, {COMMON_METRIC: n / 10}) for n in sorted(chosen[r])]
        rounds.aggregate(r, weights, replies)

    # Assert: pools by hand, 5 + ⌈g·5⌉: 6, 7, 7, 7, 8, 8 for rounds 2–7, all 10 from round 18.
    hand_pools = {2: 6, 3: 7, 4: 7, 5: 7, 6: 8, 7: 8, 18: 10}
    for r, size in hand_pools.items():
        assert pool_size(strategy.selection_fraction(r), 10, 5) == size
    assert chosen[1] == set(nodes)  # the warm-up trains all
    for r in range(2, 21):
        size = pool_size(strategy.selection_fraction(r), 10, 5)
        assert len(chosen[r]) == 5 and chosen[r] <= set(range(size))
    early = [frozenset(chosen[r]) for r in range(2, 8)]
    assert len(set(early)) > 1  # not the same 5 nodes while ⌈g·N⌉ ≤ k
    late = set().union(*(chosen[r] for r in range(18, 21)))
    assert len({frozenset(chosen[r]) for r in range(2, 21)}) > 10
    assert late > set(range(5))  # hard nodes join once the pool is everyone


# --- (c) pacing_rounds follows the run ------------------------------------------------------


def test_pacing_rounds_defaults_to_the_runs_rounds_and_reaches_the_clients() -> None:
    setup = ServerSetup(num_rounds=7, min_clients=2)
    default = build_server(CurriculumConfig(), setup)
    assert default.pacing_rounds == 7
    assert build_server(CurriculumConfig(pacing_rounds=3), setup).pacing_rounds == 3
    # The value travels with every task as the client half's own config field.
    sent = FlowerAggregator(default).select(1, {"w": np.zeros(1)}, [5, 6])
    assert {node: config[PACING_ROUNDS_KEY] for node, config in sent.items()} == {5: 7, 6: 7}


def test_client_pacing_spans_the_run_when_pacing_rounds_is_unset() -> None:
    # Step pacing with a = 0.5 over T = 4 rounds × K steps: g = b = 0.2 until t = 2K, then 1,
    # so the last step of round 2 (t = 2K − 1) is still paced and all of round 3 is not. With
    # the former fixed default of 10 rounds every round here would report 0.2.
    config = {"ordering": "curriculum", "pacing": "step", "a": 0.5, "b": 0.2}
    spec = ExperimentSpec.model_validate(
        {
            "name": "curriculum-pacing-rounds",
            "strategy": {"name": "curriculum", "config": config},
            "dataset": {"name": "digits", "partitioner": {"name": "iid"}},
            "model": {"name": "logreg"},
            "training": {"local_epochs": 1},
            "rounds": 4,
            "clients": {"min": 2},
        }
    )
    _, recorder = run_local(spec, 2)
    fractions = [{u.metrics["pacing-fraction"] for u in r.updates} for r in recorder.rounds(1)]
    assert fractions == [{0.2}, {0.2}, {1.0}, {1.0}]


def test_client_half_refuses_pacing_without_a_span() -> None:
    data = XY(x=np.zeros((4, 1), dtype=np.float32), y=np.zeros(4, dtype=np.int64))
    task: TrainTask[Any] = TrainTask(
        model=nn.Linear(1, 2),
        data=data,
        training=TrainingConfig(local_epochs=1),
        config=plugin.parse_config({"pacing": "linear"}),
        server_round=1,
        seed=0,
    )
    with pytest.raises(ValueError, match="pacing_rounds is unknown"):
        train(task)
