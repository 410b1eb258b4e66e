"""Curriculum learning: pacing, ordering, the paced client half and difficulty-based selection."""

from __future__ import annotations

import math
import random
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from pydantic import ValidationError
from torch import nn

from florist.client.training import TrainingConfig, TrainTask
from florist.datasets import XY
from florist.server.localgrid import run_local
from florist.server.spec import ExperimentSpec
from florist.strategies.curriculum import (
    SCORES_KEY,
    CurriculumConfig,
    order_indices,
    pacing_fraction,
    plugin,
    prefix_size,
    sample_prefix_batch,
    select_clients,
    train,
)

FAMILIES = ["linear", "quad", "root", "step", "exp", "log"]


@pytest.fixture(autouse=True)
def task_identity() -> None:
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0


@pytest.mark.parametrize("kind", FAMILIES)
@pytest.mark.parametrize(("a", "b"), [(0.8, 0.2), (0.5, 0.1), (1.0, 0.6), (0.3, 1.0)])
def test_pacing_starts_at_b_grows_and_reaches_one(kind: Any, a: float, b: float) -> None:
    T = 200
    values = np.array([pacing_fraction(kind, t, T, a, b) for t in range(T + 1)])
    assert values[0] == pytest.approx(b)
    assert np.all(np.diff(values) >= -1e-12)
    assert np.all((values >= b - 1e-12) & (values <= 1.0))
    assert np.all(values[np.arange(T + 1) >= a * T] == 1.0)


def test_pacing_hand_values() -> None:
    assert pacing_fraction("linear", 40, 100, 0.8, 0.2) == pytest.approx(0.2 + 0.8 * 0.5)
    assert pacing_fraction("quad", 40, 100, 0.8, 0.2) == pytest.approx(0.2 + 0.8 * 0.25)
    assert pacing_fraction("root", 40, 100, 0.8, 0.2) == pytest.approx(0.2 + 0.8 * math.sqrt(0.5))
    assert pacing_fraction("step", 79, 100, 0.8, 0.2) == 0.2
    assert pacing_fraction("step", 80, 100, 0.8, 0.2) == 1.0
    assert pacing_fraction("none", 0, 100, 0.8, 0.2) == 1.0


def test_orderings() -> None:
    scores = np.array([0.5, 0.1, 2.0, 0.3, 0.3])
    rng = np.random.default_rng(0)
    np.testing.assert_array_equal(order_indices(scores, "curriculum", rng), [1, 3, 4, 0, 2])
    np.testing.assert_array_equal(order_indices(scores, "anti", rng), [2, 0, 3, 4, 1])
    perm = order_indices(scores, "random", rng)
    np.testing.assert_array_equal(np.sort(perm), np.arange(5))


def test_config_is_validated() -> None:
    with pytest.raises(ValidationError):
        plugin.parse_config({"a": 0.0})
    with pytest.raises(ValidationError):
        plugin.parse_config({"ordering": "sideways"})
    with pytest.raises(ValidationError):
        plugin.parse_config({"typo": 1})
    assert isinstance(plugin.parse_config({}), CurriculumConfig)


def test_prefix_batch_stays_in_prefix() -> None:
    order = np.array([9, 3, 7, 1, 0, 2, 4, 5, 6, 8])
    generator = torch.Generator().manual_seed(0)
    for fraction, allowed in [(0.25, {9, 3, 7}), (0.1, {9}), (1.0, set(range(10)))]:
        for _ in range(20):
            batch = sample_prefix_batch(order, fraction, 4, generator)
            assert set(batch.tolist()) <= allowed
            assert len(set(batch.tolist())) == len(batch) == min(4, prefix_size(fraction, 10))


class Recording(nn.Module):
    """A linear model that remembers the inputs of every forward pass (x[:, 0] is the index)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(1, 2)
        self.seen: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.extend(int(v) for v in x[:, 0])
        return self.linear(x)


def test_client_draws_only_from_the_easiest_prefix() -> None:
    # Prepare: 20 examples whose feature is their index, difficulty scores cached in the state.
    n = 20
    data = XY(x=np.arange(n, dtype=np.float32)[:, None], y=(np.arange(n) % 2).astype(np.int64))
    scores = np.random.default_rng(3).permutation(n).astype(np.float64)
    state = RecordDict({SCORES_KEY: ArrayRecord({"scores": Array(scores)})})
    # step pacing with a = 1 keeps g = b = 0.3 during all of round 1 (of 5 paced rounds).
    config = CurriculumConfig(ordering="curriculum", pacing="step", a=1.0, b=0.3, pacing_rounds=5)
    model = Recording()
    task = TrainTask(
        model=model,
        data=data,
        training=TrainingConfig(local_epochs=3, batch_size=4, momentum=0.0),
        config=config,
        server_round=1,
        seed=7,
        state=state,
    )

    # Execute
    result = train(task)

    # Assert: ⌈0.3·20⌉ = 6 easiest examples by hand: the indices of scores 0..5.
    easiest = {int(i) for i in np.flatnonzero(scores < 6)}
    assert len(easiest) == 6
    assert result.steps == 15 and len(model.seen) == 15 * 4
    assert set(model.seen) <= easiest
    assert result.metrics["pacing-fraction"] == pytest.approx(0.3)
    assert result.metrics["mean-difficulty"] == pytest.approx(scores.mean())


def test_scores_are_computed_once_per_run_from_local_data() -> None:
    n = 30
    rng = np.random.default_rng(0)
    data = XY(x=rng.normal(size=(n, 4)).astype(np.float32), y=rng.integers(0, 3, n))
    state = RecordDict()

    def task(server_round: int) -> TrainTask:
        return TrainTask(
            model=nn.Linear(4, 3),
            data=data,
            training=TrainingConfig(local_epochs=1, batch_size=8),
            config=CurriculumConfig(pacing_rounds=3),
            server_round=server_round,
            seed=1,
            state=state,
        )

    train(task(1))
    first = state.array_records[SCORES_KEY]["scores"].numpy().copy()
    assert first.shape == (n,) and np.all(first >= 0)
    train(task(2))
    np.testing.assert_array_equal(state.array_records[SCORES_KEY]["scores"].numpy(), first)


def test_select_clients_easy_hard_and_pool() -> None:
    difficulty = {1: 0.5, 2: 0.1, 3: 0.9, 4: 0.3}
    rng = random.Random(0)
    nodes = [1, 2, 3, 4]
    assert select_clients(difficulty, nodes, "easy_first", 2, 0.5, rng) == [2, 4]
    assert select_clients(difficulty, nodes, "hard_first", 2, 0.5, rng) == [1, 3]
    # The pool is never smaller than k, and grows with the fraction.
    assert select_clients(difficulty, nodes, "easy_first", 3, 0.1, rng) == [1, 2, 4]
    assert select_clients(difficulty, nodes, "easy_first", 4, 1.0, rng) == nodes


def make_spec(strategy: dict[str, Any], **overrides: Any) -> ExperimentSpec:
    body: dict[str, Any] = {
        "name": "curriculum-unit",
        "strategy": strategy,
        "dataset": {"name": "digits", "partitioner": {"name": "dirichlet", "alpha": 0.5}},
        "model": {"name": "logreg"},
        "training": {"local_epochs": 1},
        "rounds": 2,
        "clients": {"min": 2},
    }
    body.update(overrides)
    return ExperimentSpec.model_validate(body)


def final_weights(strategy: Any) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in strategy.final_arrays.items()}


@pytest.mark.parametrize("ordering", ["random", "curriculum"])
def test_full_pacing_gives_fedavg_weights(ordering: str) -> None:
    # Paper's degenerate case: g ≡ 1 and random order is FedAvg's data use, so FedAvg's weights.
    config = {"ordering": ordering, "pacing": "none", "client_selection": "all"}
    avg, _ = run_local(make_spec({"name": "fedavg", "config": {}}), 3)
    cur, recorder = run_local(make_spec({"name": "curriculum", "config": config}), 3)
    for key, value in final_weights(avg).items():
        np.testing.assert_array_equal(value, final_weights(cur)[key])
    # Difficulty is still measured and reported by every node.
    for update in recorder.rounds(1)[0].updates:
        assert update.metrics["mean-difficulty"] > 0
        assert update.metrics["pacing-fraction"] == 1.0


def test_paced_curriculum_differs_from_fedavg_and_learns() -> None:
    config = {"ordering": "curriculum", "pacing": "linear", "pacing_rounds": 2}
    avg, _ = run_local(make_spec({"name": "fedavg", "config": {}}), 3)
    cur, recorder = run_local(make_spec({"name": "curriculum", "config": config}), 3)
    assert any(not np.allclose(v, final_weights(cur)[k]) for k, v in final_weights(avg).items())
    assert recorder.rounds(1)[-1].metrics["accuracy"] > 0.5


def test_easy_first_selects_the_lowest_difficulty_nodes() -> None:
    # Step pacing with a = 1 over 10 rounds keeps the pool at ⌈0.5·4⌉ = 2 nodes for rounds 2-3.
    config = {
        "client_selection": "easy_first",
        "clients_per_round": 2,
        "selection_pacing": "step",
        "a": 1.0,
        "b": 0.5,
    }
    strategy, recorder = run_local(make_spec({"name": "curriculum", "config": config}, rounds=3), 4)
    rounds = recorder.rounds(1)
    first = {u.node_id: u.metrics["mean-difficulty"] for u in rounds[0].updates}
    assert set(first) == {1000, 1001, 1002, 1003}
    easiest = set(sorted(first, key=first.__getitem__)[:2])
    for r in rounds[1:]:
        assert {u.node_id for u in r.updates} == easiest
        assert r.train_metrics["selected-clients"] == 2
    assert rounds[0].train_metrics["selected-clients"] == 4
    # The curriculum strategy, a Flower Strategy, runs as the aggregator of synchronous rounds.
    assert strategy.server.aggregator.strategy.selected[2] == sorted(easiest)  # type: ignore[attr-defined]
