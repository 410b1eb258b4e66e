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
from florist.server.runtime.localgrid import run_local
from florist.server.spec import ExperimentSpec
from florist.strategies.curriculum import (
    SCORES_KEY,
    CurriculumConfig,
    fold_ids,
    order_indices,
    out_of_fold_scores,
    pacing_fraction,
    plugin,
    pool_size,
    prefix_size,
    rank_nodes,
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


def test_rank_nodes_and_pool_size_by_hand() -> None:
    difficulty = {1: 0.5, 2: 0.1, 3: 0.9, 4: 0.3}
    ties = {1: 0.4, 2: 0.3, 3: 0.2, 4: 0.1, 5: 0.0}
    nodes = [1, 2, 3, 4, 5]  # node 5 has no score: last in every order
    assert rank_nodes(difficulty, nodes, "easy_first", ties) == [2, 4, 1, 3, 5]
    assert rank_nodes(difficulty, nodes, "hard_first", ties) == [3, 1, 4, 2, 5]
    assert rank_nodes(difficulty, nodes, "random", ties) == [4, 3, 2, 1, 5]
    # Equal difficulty: the random tie rank decides, not the node id.
    assert rank_nodes({1: 0.2, 2: 0.2}, [1, 2], "easy_first", {1: 0.9, 2: 0.1}) == [2, 1]
    # Pool = k + ⌈g·(N − k)⌉: with N = 10, k = 5, b = 0.2 it starts at 5 + 1 = 6 (⌈g·N⌉ = 2
    # would force the same 5 nodes), is 5 + ⌈0.6·5⌉ = 8 at g = 0.6 and all 10 at g = 1.
    assert pool_size(0.2, 10, 5) == 6
    assert pool_size(0.6, 10, 5) == 8
    assert pool_size(1.0, 10, 5) == 10
    assert pool_size(0.2, 4, 4) == 4
    assert pool_size(0.2, 3, 5) == 3


def test_select_clients_draws_k_from_the_pool() -> None:
    ranked = [7, 3, 9, 1, 5, 2]
    rng = random.Random(0)
    for _ in range(50):
        chosen = select_clients(ranked, 2, 0.2, rng)  # pool 2 + ⌈0.2·4⌉ = 3
        assert len(chosen) == 2 and set(chosen) <= {7, 3, 9}
    assert select_clients(ranked, 6, 0.2, rng) == sorted(ranked)
    assert select_clients(ranked, 9, 0.2, rng) == sorted(ranked)


def test_out_of_fold_scores_never_score_with_a_model_that_saw_the_example() -> None:
    # Prepare: the "model" fitted on a subset is that subset's set of x values; scoring gives
    # 1 to an example the model saw, 0 otherwise. Out-of-fold, every score must be 0.
    data = XY(x=np.arange(9, dtype=np.float32)[:, None], y=np.zeros(9, dtype=np.int64))
    folds = fold_ids(9, 3, np.random.default_rng(0))
    fitted: list[set[float]] = []

    def fit(train: XY) -> Any:
        fitted.append(set(train.x[:, 0].tolist()))
        return fitted[-1]

    def score(model: Any, held_out: XY) -> np.ndarray:
        return np.array([float(v in model) for v in held_out.x[:, 0]])

    # Execute
    scores = out_of_fold_scores(data, folds, fit, score)

    # Assert: three folds of three, each scorer trained on the six others.
    assert sorted(np.bincount(folds).tolist()) == [3, 3, 3]
    assert [len(f) for f in fitted] == [6, 6, 6]
    np.testing.assert_array_equal(scores, np.zeros(9))


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
    # FedAvg folds updates into a running float32 sum as they arrive (strategies/streaming.py),
    # curriculum averages all of them at once: equal up to float32 rounding, not bit for bit.
    for key, value in final_weights(avg).items():
        np.testing.assert_allclose(value, final_weights(cur)[key], rtol=1e-5, atol=1e-6)
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


def test_easy_first_selects_from_the_easiest_under_the_common_model() -> None:
    # 4 nodes, k = 2, warm-up 2 rounds, step pacing with a = 1 keeps g = b = 0.5 after it, so
    # the pool is 2 + ⌈0.5·2⌉ = 3 nodes: the hardest node under the common model never trains.
    config = {
        "client_selection": "easy_first",
        "clients_per_round": 2,
        "warmup_rounds": 2,
        "selection_pacing": "step",
        "a": 1.0,
        "b": 0.5,
    }
    strategy, recorder = run_local(make_spec({"name": "curriculum", "config": config}, rounds=6), 4)
    rounds = recorder.rounds(1)
    assert [len(r.updates) for r in rounds] == [4, 4, 2, 2, 2, 2]
    # The scores are those of round 2, measured under its global model by every node.
    common = {u.node_id: u.metrics["common-difficulty"] for u in rounds[1].updates}
    assert set(common) == {1000, 1001, 1002, 1003}
    server = strategy.server.aggregator.strategy  # type: ignore[attr-defined]
    assert server.difficulty == common
    hardest = max(common, key=common.__getitem__)
    for r in rounds[2:]:
        assert hardest not in {u.node_id for u in r.updates}
        assert r.train_metrics["selected-clients"] == 2
    assert rounds[0].train_metrics["selected-clients"] == 4
    assert server.ranking[3] == sorted(common, key=common.__getitem__)
