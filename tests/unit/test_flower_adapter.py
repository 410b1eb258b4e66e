"""Flower's strategies on the one loop: their hooks pick, aggregate, evaluate; errors are named."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from flwr.serverapp.strategy import FedAvg, FedMedian
from flwr.supercore.task_identity import TaskIdentity

from florist.server.recording import InMemoryRunRecorder
from florist.server.runtime.localgrid import LocalGrid, run_local
from florist.server.serverapp import run_experiment
from florist.server.spec import ExperimentSpec
from florist.strategies.events import Arrival, DropoutPolicyError, Evaluation
from florist.strategies.flower_adapter import FlowerAggregator, as_scheduler
from florist.strategies.rounds import AggregationError, SyncRounds


@pytest.fixture(autouse=True)
def task_identity() -> None:
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0


def spec(**overrides: Any) -> ExperimentSpec:
    body: dict[str, Any] = {
        "name": "adapter",
        "strategy": {"name": "fedavg", "config": {}},
        "dataset": {"name": "digits", "partitioner": {"name": "iid"}},
        "model": {"name": "logreg"},
        "training": {"local_epochs": 1},
        "rounds": 3,
        "clients": {"min": 3},
    }
    return ExperimentSpec.model_validate(body | overrides)


def arrival(node: int, w: list[float], n: float) -> Arrival:
    x = {"w": np.array(w, np.float32)}
    return Arrival(node, x, x, 0, 0, n, 1, {"num-examples": n, "train-loss": 1.0}, 0.0)


def test_aggregate_is_flowers_weighted_mean_and_keeps_the_dtype() -> None:
    # (1·[1, 2] + 3·[5, 6]) / 4 = [4, 5]
    agg = FlowerAggregator(FedAvg())
    current = {"w": np.zeros(2, np.float32)}
    new, metrics = agg.aggregate(1, current, [arrival(7, [1, 2], 1), arrival(8, [5, 6], 3)])
    assert new is not None
    np.testing.assert_allclose(new["w"], [4.0, 5.0])
    assert new["w"].dtype == np.float32
    # Flower's metric rule: example-weighted, (1·1 + 3·1) / 4.
    assert metrics["train-loss"] == pytest.approx(1.0)


def test_a_robust_strategy_aggregates_with_its_own_rule() -> None:
    # Coordinate-wise median of [0, 0], [1, 10], [100, 11]: [1, 10], whatever the weights.
    agg = FlowerAggregator(FedMedian())
    ups = [arrival(1, [0, 0], 5), arrival(2, [1, 10], 1), arrival(3, [100, 11], 1)]
    new, _ = agg.aggregate(1, {"w": np.zeros(2, np.float32)}, ups)
    assert new is not None
    np.testing.assert_allclose(new["w"], [1.0, 10.0])


def test_select_takes_flowers_sample_and_its_task_config() -> None:
    from flwr.serverapp.strategy import FedProx

    agg = FlowerAggregator(FedProx(proximal_mu=0.5, fraction_train=0.5, min_train_nodes=2))
    chosen = agg.select(1, {"w": np.zeros(1, np.float32)}, [10, 11, 12, 13])
    assert len(chosen) == 2 and set(chosen) <= {10, 11, 12, 13}
    # The round number is the loop's to set; the strategy's own entries pass through.
    assert all(cfg == {"proximal-mu": 0.5} for cfg in chosen.values())


def test_a_strategy_needing_more_nodes_than_take_part_is_a_named_error_not_a_hang() -> None:
    agg = FlowerAggregator(FedAvg(min_available_nodes=5, min_train_nodes=5))
    with pytest.raises(AggregationError, match="needs 5 nodes, 3 take part"):
        agg.select(1, {"w": np.zeros(1, np.float32)}, [1, 2, 3])


def test_a_strategy_that_samples_nobody_fails_the_round_with_a_named_error() -> None:
    rounds = SyncRounds(FlowerAggregator(FedAvg(fraction_train=0.0)))
    with pytest.raises(AggregationError, match="sampled no node"):
        rounds.begin([1, 2, 3], {"w": np.zeros(1, np.float32)})


def test_federated_evaluation_aggregates_with_flowers_rule() -> None:
    agg = FlowerAggregator(FedAvg(fraction_evaluate=1.0, min_evaluate_nodes=2))
    assert set(agg.select_evaluate(2, {"w": np.zeros(1, np.float32)}, [4, 5])) == {4, 5}
    # (10·0.5 + 30·0.9) / 40 = 0.8
    metrics = agg.aggregate_evaluate(
        2,
        [
            Evaluation(4, 10, {"num-examples": 10, "eval-accuracy": 0.5}),
            Evaluation(5, 30, {"num-examples": 30, "eval-accuracy": 0.9}),
        ],
    )
    assert metrics["eval-accuracy"] == pytest.approx(0.8)


def test_anything_else_is_refused_as_a_server_half() -> None:
    with pytest.raises(TypeError, match="EventStrategy or a Flower Strategy"):
        as_scheduler(object())  # type: ignore[arg-type]


def test_fedadam_trains_in_float32_end_to_end() -> None:
    # Flower's FedOpt computes in float64; the global model must stay float32, or every reply
    # after the first round would be rejected as a dtype mismatch.
    result, recorder = run_local(spec(strategy={"name": "fedadam", "config": {}}), 3)
    rounds = recorder.rounds(1)
    assert [r.num_updates for r in rounds] == [3, 3, 3]
    assert all(r.num_rejected == 0 for r in rounds)
    assert result.final_arrays is not None
    assert all(v.numpy().dtype == np.float32 for v in result.final_arrays.values())
    assert rounds[-1].metrics["accuracy"] > result.initial_metrics["accuracy"]


def test_a_round_without_any_sound_update_is_retried_then_fails_the_run() -> None:
    # Every node's reply has no example count: rejected, so no round can ever aggregate.
    def tamper(node: int, request: Any, reply: Any) -> Any:
        del reply.content.metric_records["metrics"]["num-examples"]
        return reply

    grid = LocalGrid(3, tamper)
    recorder = InMemoryRunRecorder()
    s = spec(dropout={"max_skips": 2})
    with pytest.raises(DropoutPolicyError, match="skipped 3 times in a row"):
        run_experiment(grid, s, recorder, experiment_id=1, flwr_run_id=1, poll_interval=0)
    assert recorder.experiments[1].status == "failed"
    updates = [u for _, u in recorder.updates(1)]
    assert len(updates) == grid.pushed == 9
    assert all(u.status == "rejected" for u in updates)


@pytest.mark.slow  # Flower's sampling sleeps a second between looks
def test_a_strategy_waiting_for_nodes_it_is_not_offered_gets_a_named_error() -> None:
    # Flower's own sampling waits a second at a time for nodes; a third party's strategy that
    # needs more than are offered (its minimum not declared where the pre-check looks) must not
    # hang the run. FedAvg asked for 4 training nodes, offered 3, waits; the look limit ends it.
    strategy = FedAvg(min_train_nodes=4)
    strategy.min_available_nodes = 0  # hide the minimum from the pre-check
    with pytest.raises(AggregationError, match="waits for more nodes"):
        FlowerAggregator(strategy).select(1, {"w": np.zeros(1, np.float32)}, [1, 2, 3])
