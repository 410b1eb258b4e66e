"""Robust aggregation rules (strategies/robust.py, strategies/monna.py) on hand-computed values."""

from __future__ import annotations

import random

import numpy as np
import pydantic
import pytest
import torch

from florist.client.training import TrainingConfig, TrainTask
from florist.datasets import XY
from florist.server.metrics import ACCURACY
from florist.server.runtime.localgrid import run_local
from florist.server.spec import ExperimentSpec
from florist.strategies import default_registry
from florist.strategies.base import ServerSetup
from florist.strategies.events import Decision
from florist.strategies.monna import MOMENTUM_KEY, MonnaConfig, NearestNeighbourRule, train
from florist.strategies.robust import (
    CenteredClippingConfig,
    CenteredClippingRule,
    KrumConfig,
    MedianConfig,
    MedianRule,
    RobustBuffer,
    RobustRounds,
    TooFewUpdates,
    TrimmedMeanConfig,
    TrimmedMeanRule,
    centered_clip,
    coordinate_median,
    krum_scores,
    multi_krum,
    nearest_neighbour_average,
    trimmed_mean,
)
from florist.strategies.rounds import SyncRounds

from .updates import arrival, vec


def rows(*values: list[float]) -> np.ndarray:
    return np.array(values, dtype=np.float64)


def test_median_of_an_even_count_is_the_mean_of_the_middle_two() -> None:
    np.testing.assert_allclose(coordinate_median(rows([1], [2], [3], [10])), [2.5])


def test_trimmed_mean_cuts_f_at_each_end_of_each_coordinate() -> None:
    # Prepare: unequal outliers, in different rows per coordinate.
    updates = rows([0, 7], [1, -40], [5, 8], [100, 9], [-50, 1000])
    # Execute / Assert: coordinate 0 keeps {0, 1, 5}; coordinate 1 keeps {7, 8, 9}. A median (1, 8),
    # a mean (11.2, 196.8) or a one-sided cut (−16.3, −8.3 for dropping the 2 largest) differ.
    np.testing.assert_allclose(trimmed_mean(updates, 1), [2.0, 8.0])
    np.testing.assert_allclose(trimmed_mean(updates, 0), updates.mean(axis=0))
    with pytest.raises(TooFewUpdates):
        trimmed_mean(updates, 3)


def test_krum_scores_sum_the_n_minus_f_minus_2_closest_neighbours() -> None:
    updates = rows([0], [1], [3], [7], [20])
    # f = 1: two neighbours each. 0 → 1+9; 1 → 1+4; 3 → 4+9; 7 → 16+36; 20 → 169+289.
    np.testing.assert_allclose(krum_scores(updates, 1), [10, 5, 13, 52, 458])
    # n − f − 1 = 3 neighbours would score 3 best (29 < 41): Krum must pick 1.
    chosen, which = multi_krum(updates, 1, 1)
    assert which == [1]
    np.testing.assert_allclose(chosen, [1.0])
    mean2, which2 = multi_krum(updates, 1, 2)
    assert which2 == [1, 0]
    np.testing.assert_allclose(mean2, [0.5])
    with pytest.raises(TooFewUpdates):
        krum_scores(updates, 3)


def test_centered_clipping_iterates_from_the_centre() -> None:
    updates = rows([3, 4], [0, 1], [0, 0])
    # L = 1 from 0, τ = 2: (3,4) is clipped to (1.2, 1.6); the mean is (0.4, 2.6/3).
    v1, tau = centered_clip(updates, np.zeros(2), 2.0, 1)
    assert tau == 2.0
    np.testing.assert_allclose(v1, [0.4, 2.6 / 3])
    # L = 2: from v1, only (3,4) − v1 (norm 4.0716) is clipped again.
    v2, _ = centered_clip(updates, np.zeros(2), 2.0, 2)
    d = np.array([3, 4]) - v1
    clipped = d * 2.0 / np.linalg.norm(d)
    expected = v1 + (clipped + (np.array([0, 1]) - v1) + (np.zeros(2) - v1)) / 3
    np.testing.assert_allclose(v2, expected)
    np.testing.assert_allclose(v2, [0.559048, 1.135263], atol=1e-6)
    # No radius: τ is the median distance from the centre (5, 1, 0 → 1).
    _, tau_auto = centered_clip(updates, np.zeros(2), None, 1)
    assert tau_auto == 1.0


def test_centered_clipping_learns_from_the_previous_aggregate() -> None:
    rule = CenteredClippingRule(CenteredClippingConfig(radius=1.0, num_byzantine=0))
    first, _ = rule([vec(4.0), vec(4.0), vec(4.0)])
    # From 0, every update is clipped to 1.
    np.testing.assert_allclose(first["w"], [1.0])
    second, _ = rule([vec(4.0), vec(4.0), vec(4.0)])
    # From 1 (not 0): each moves the centre by 1 more.
    np.testing.assert_allclose(second["w"], [2.0])


def test_nearest_neighbour_average_uses_the_median_as_pivot() -> None:
    updates = rows([0], [1], [2], [10], [30])
    # Pivot 2 (the median): the 3 nearest are 0, 1, 2. A mean pivot (8.6) would take 1, 2, 10.
    mean, chosen = nearest_neighbour_average(updates, 2, coordinate_median(updates))
    assert chosen == [0, 1, 2]
    np.testing.assert_allclose(mean, [1.0])
    rule = NearestNeighbourRule(MonnaConfig(num_byzantine=2))
    out, metrics = rule([vec(v) for v in (0, 1, 2, 10, 30)])
    np.testing.assert_allclose(out["w"], [1.0])
    assert metrics == {"robust-selected": 3.0}


def test_rules_keep_shapes_and_dtypes_and_need_enough_updates() -> None:
    a = {"w": np.ones((2, 2), dtype=np.float32), "b": np.zeros(3, dtype=np.float32)}
    b = {"w": 3 * np.ones((2, 2), dtype=np.float32), "b": np.ones(3, dtype=np.float32)}
    out, _ = MedianRule(MedianConfig(num_byzantine=1))([a, b])
    assert out["w"].shape == (2, 2) and out["w"].dtype == np.float32
    np.testing.assert_allclose(out["w"], 2.0)
    np.testing.assert_allclose(out["b"], 0.5)
    with pytest.raises(TooFewUpdates, match="needs 3 updates"):
        TrimmedMeanRule(TrimmedMeanConfig(num_byzantine=1))([a, b])


def test_rounds_aggregate_deltas_with_the_server_rate() -> None:
    setup = ServerSetup(num_rounds=3, min_clients=3)
    rule = TrimmedMeanRule(TrimmedMeanConfig(num_byzantine=1, server_lr=0.5))
    agg = RobustRounds(rule, setup)
    current = vec(10.0)
    updates = [arrival(n, vec(10.0 + d), current, 0, 0) for n, d in enumerate((1.0, 3.0, -90.0))]
    new, _ = agg.aggregate(1, current, updates)
    assert new is not None
    # Trimmed mean of deltas (1, 3, −90) with f = 1 is 1; half a step: 10.5.
    np.testing.assert_allclose(new["w"], [10.5])


def test_rounds_sample_like_flower() -> None:
    random.seed(0)
    agg = RobustRounds(
        MedianRule(MedianConfig()), ServerSetup(num_rounds=1, min_clients=2, fraction_train=0.5)
    )
    assert len(agg.select(1, vec(0.0), list(range(10)))) == 5
    agg_all = RobustRounds(MedianRule(MedianConfig()), ServerSetup(num_rounds=1, min_clients=2))
    assert sorted(agg_all.select(1, vec(0.0), [3, 1, 2])) == [1, 2, 3]


def test_buffered_takes_each_delta_against_the_model_its_node_was_sent() -> None:
    strategy = RobustBuffer(MedianRule(MedianConfig(scheduler="buffered", buffer_size=3)))
    current = vec(10.0)
    first = strategy.on_arrival(arrival(1, vec(1.0), vec(0.0), 0, 2), current)
    assert first == Decision(dispatch=(1,))
    strategy.on_arrival(arrival(2, vec(7.0), vec(4.0), 1, 2), current)
    last = strategy.on_arrival(arrival(3, vec(100.0), vec(0.0), 0, 2), current)
    # Deltas 1/√3, 3/√2, 100/√3 (staleness 2, 1, 2): median 3/√2. Against the current model the
    # deltas would be −9, −3, 90 → median −3.
    assert last.weights is not None and last.dispatch == (3,)
    np.testing.assert_allclose(last.weights["w"], [10.0 + 3.0 / np.sqrt(2.0)])
    assert strategy.buffer == []


def test_buffered_runs_on_sync_free_loop_and_config_checks_the_buffer() -> None:
    with pytest.raises(pydantic.ValidationError, match="buffer_size"):
        KrumConfig(scheduler="buffered", buffer_size=4, num_byzantine=2)
    plugin = default_registry().get("robust-krum")
    setup = ServerSetup(num_rounds=1, min_clients=1)
    assert isinstance(plugin.build_server(plugin.parse_config({}), setup), SyncRounds)
    buffered = plugin.parse_config({"scheduler": "buffered", "buffer_size": 5})
    assert isinstance(plugin.build_server(buffered, setup), RobustBuffer)


@pytest.mark.parametrize(
    "name",
    [
        "robust-median",
        "robust-trimmed-mean",
        "robust-krum",
        "robust-multi-krum",
        "centered-clipping",
        "monna",
    ],
)
def test_registered_with_a_strict_config(name: str) -> None:
    plugin = default_registry().get(name)
    assert plugin.paper.startswith("https://")
    with pytest.raises(pydantic.ValidationError, match="num_byzantine"):
        plugin.parse_config({"num_byzantine": -1})
    with pytest.raises(pydantic.ValidationError):
        plugin.parse_config({"unknown": 1})


class _Linear(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.w


def test_monna_client_steps_on_polyak_momentum_carried_across_rounds() -> None:
    # Prepare: loss (w·x − y)²/1 through a squared loss on one example (x=1, y=1): g = 2(w − 1).
    data = XY(x=np.ones((1, 1), dtype=np.float32), y=np.ones((1, 1), dtype=np.float32))
    training = TrainingConfig(local_steps=2, batch_size=1, lr=0.5, momentum=0.9)
    config = MonnaConfig(beta=0.5)

    def mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return ((out - y) ** 2).mean()

    model = _Linear()
    task = TrainTask(
        model=model, data=data, training=training, config=config, server_round=1, seed=0, loss=mse
    )
    # Execute: round 1. Step 1: g = −2, m = 0.5·0 + 0.5·(−2) = −1, w = 0.5.
    # Step 2: g = −1, m = 0.5·(−1) + 0.5·(−1) = −1, w = 1.0. (torch's momentum 0.9 is not used.)
    train(task)
    np.testing.assert_allclose(model.w.detach().numpy(), [1.0])
    stored = task.state.array_records[MOMENTUM_KEY].to_torch_state_dict()["w"]
    np.testing.assert_allclose(stored.numpy(), [-1.0])
    # Round 2 from w = 0 again: g = −2, m = 0.5·(−1) + 0.5·(−2) = −1.5, w = 0.75; then
    # g = −0.5, m = −1.0, w = 1.25. A momentum reset each round would give w = 1.0 again.
    model2 = _Linear()
    task2 = TrainTask(
        model=model2,
        data=data,
        training=training,
        config=config,
        server_round=2,
        seed=0,
        state=task.state,
        loss=mse,
    )
    train(task2)
    np.testing.assert_allclose(model2.w.detach().numpy(), [1.25])


def test_a_round_with_too_few_updates_for_f_is_skipped_not_crashed() -> None:
    # Prepare: trimmed mean with f = 2 needs 5 updates; the round has 3 nodes.
    rule = TrimmedMeanRule(TrimmedMeanConfig(num_byzantine=2))
    rounds = SyncRounds(RobustRounds(rule, ServerSetup(num_rounds=2, min_clients=3)))
    current = vec(0.0)
    assert rounds.begin([1, 2, 3], current).dispatch == (1, 2, 3)
    # Execute
    decisions = [rounds.on_arrival(arrival(n, vec(1.0), current, 0, 0), current) for n in (1, 2, 3)]
    # Assert: no new model; every update refused with the reason, the round sampled again.
    last = decisions[-1]
    assert last.weights is None
    assert set(last.refused) == {1, 2, 3}
    assert "needs 5 updates, got 3" in last.refused[1]
    assert last.dispatch == (1, 2, 3)


def test_buffered_robust_plugin_runs_on_the_async_loop_with_an_attacker() -> None:
    config = {"num_byzantine": 1, "scheduler": "buffered", "buffer_size": 5}
    spec = ExperimentSpec.model_validate(
        {
            "name": "buffered-robust",
            "strategy": {"name": "robust-trimmed-mean", "config": config},
            "dataset": {"name": "digits", "partitioner": {"name": "iid"}, "seed": 0},
            "model": {"name": "logreg"},
            "training": {"lr": 0.1, "batch_size": 32, "local_epochs": 1, "momentum": 0.0},
            "rounds": 8,
            "clients": {"min": 5},
            "seed": 0,
            "reply_checks": {"norm_bound": {"kind": "none"}},
        }
    )
    attacker = [{"attack": "sign-flip", "attack-strength": 20.0}] + [{}] * 4
    _, recorder = run_local(spec, 5, node_configs=attacker)
    rounds = recorder.rounds(1)
    assert len(rounds) == 8
    assert rounds[-1].metrics[ACCURACY] > 0.5
