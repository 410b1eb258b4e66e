"""Aggregation as updates arrive: the running weighted sum by hand, order, rejection, memory."""

from __future__ import annotations

import gc
import itertools
import pickle
import random
import tracemalloc
from collections.abc import Callable

import numpy as np
import pytest
from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedProx, Krum
from flwr.supercore.task_identity import TaskIdentity

from florist.strategies import default_registry
from florist.strategies.base import ServerSetup
from florist.strategies.events import Arrival, EventStrategy, Weights
from florist.strategies.fedasync import FedAsync, FedAsyncConfig
from florist.strategies.fedbuff import FedBuff, FedBuffConfig
from florist.strategies.flower_adapter import as_scheduler
from florist.strategies.rounds import SyncRounds
from florist.strategies.streaming import RunningSum


@pytest.fixture(autouse=True)
def task_identity() -> None:
    # Flower's configure_train builds messages, which need a task identity outside a run.
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0


def f32(*values: float) -> Weights:
    return {"w": np.array(values, dtype=np.float32)}


def update(node: int, x: Weights, sent: Weights, n: float, metrics: dict[str, float] | None = None):
    return Arrival(
        node_id=node,
        weights=x,
        sent_weights=sent,
        sent_version=0,
        version=0,
        num_examples=n,
        local_steps=1,
        metrics=metrics or {"train-loss": float(node)},
        duration_s=1.0,
    )


def fedavg_rounds(nodes: int) -> SyncRounds:
    random.seed(0)
    rounds = as_scheduler(FedAvg(min_train_nodes=nodes, min_available_nodes=nodes))
    assert isinstance(rounds, SyncRounds)
    return rounds


# --- RunningSum by hand -------------------------------------------------------------------------


def test_running_sum_with_unequal_weights_by_hand() -> None:
    # Prepare: (1, 2) weighted 1 and (4, 8) weighted 3.
    running = RunningSum()

    # Execute
    running.add(f32(1.0, 2.0), 1.0)
    running.add(f32(4.0, 8.0), 3.0)
    mean = running.mean()

    # Assert: ((1 + 12)/4, (2 + 24)/4) = (3.25, 6.5), in the model's float32.
    np.testing.assert_array_equal(mean["w"], np.array([3.25, 6.5], np.float32))
    assert mean["w"].dtype == np.float32
    assert not running  # spent


def test_running_sum_of_deltas_moved_onto_the_current_model_by_hand() -> None:
    # w·(x − sent + current) = 2·((5, 1) − (1, 1) + (10, 10)) = (28, 20).
    running = RunningSum()
    running.add(f32(5.0, 1.0), 2.0, minus=f32(1.0, 1.0), plus=f32(10.0, 10.0))
    np.testing.assert_array_equal(running.sums["w"], [28.0, 20.0])
    np.testing.assert_array_equal(running.mean(divide_by=4)["w"], [7.0, 5.0])


def test_an_update_that_does_not_fit_never_enters_the_sum() -> None:
    # Prepare: one sound update in, two arrays.
    running = RunningSum()
    running.add({"a": np.ones(3, np.float32), "b": np.ones(2, np.float32)}, 2.0)
    before = {k: v.copy() for k, v in running.sums.items()}

    # Execute: the second array has the wrong shape (the first would fit), a key is missing,
    # the weight is NaN.
    for bad, weight in [
        ({"a": np.full(3, 9, np.float32), "b": np.full(5, 9, np.float32)}, 1.0),
        ({"a": np.full(3, 9, np.float32)}, 1.0),
        ({"a": np.full(3, 9, np.float32), "b": np.full(2, 9, np.float32)}, float("nan")),
    ]:
        with pytest.raises(ValueError):
            running.add(bad, weight)

    # Assert: not one element of them was folded in.
    for key, value in before.items():
        np.testing.assert_array_equal(running.sums[key], value)
    assert (running.count, running.total) == (1, 2.0)


def test_integer_arrays_are_averaged_in_float64_and_cast_back() -> None:
    running = RunningSum()
    running.add({"n": np.array([3], np.int64)}, 1.0)
    running.add({"n": np.array([6], np.int64)}, 2.0)
    assert running.sums["n"].dtype == np.float64
    assert running.mean({"n": np.dtype(np.int64)})["n"].tolist() == [5]  # (3 + 12)/3


# --- SyncRounds: folded as they arrive ----------------------------------------------------------


def run_round(rounds: SyncRounds, start: Weights, order: list[Arrival]) -> tuple[Weights, dict]:
    decision = rounds.begin(sorted(a.node_id for a in order), start)
    assert sorted(decision.dispatch) == sorted(a.node_id for a in order)
    for a in order[:-1]:
        assert rounds.on_arrival(a, start).weights is None
    last = rounds.on_arrival(order[-1], start)
    assert last.weights is not None
    return last.weights, dict(last.metrics)


def test_fedavg_round_by_hand_with_unequal_weights() -> None:
    # Prepare: three nodes with 1, 2 and 5 examples.
    start = f32(0.0, 0.0)
    ups = [
        update(1, f32(8.0, 0.0), start, 1, {"train-loss": 1.0}),
        update(2, f32(0.0, 4.0), start, 2, {"train-loss": 2.0}),
        update(3, f32(1.6, 0.8), start, 5, {"train-loss": 4.0}),
    ]

    # Execute
    new, metrics = run_round(fedavg_rounds(3), start, ups)

    # Assert: ((8 + 8)/8, (8 + 4)/8) = (2, 1.5); loss (1 + 4 + 20)/8 = 3.125 by Flower's rule.
    np.testing.assert_allclose(new["w"], [2.0, 1.5], rtol=1e-6)
    assert metrics["train-loss"] == pytest.approx(3.125)


def test_arrivals_in_any_order_give_the_same_model_within_float32_rounding() -> None:
    # Prepare: five random models with unequal example counts.
    rng = np.random.default_rng(7)
    start = {"w": rng.standard_normal(1000).astype(np.float32)}
    ups = [
        update(n, {"w": rng.standard_normal(1000).astype(np.float32)}, start, float(n * 3 + 1))
        for n in range(1, 6)
    ]
    exact = sum(u.weights["w"].astype(np.float64) * u.num_examples for u in ups) / sum(
        u.num_examples for u in ups
    )

    # Execute: every one of the 120 orders.
    models = [
        run_round(fedavg_rounds(5), start, list(p))[0]["w"] for p in itertools.permutations(ups)
    ]

    # Assert: each within a few float32 rounding steps of the exact mean, and of each other.
    for model in models:
        np.testing.assert_allclose(model, exact, rtol=0, atol=4e-6 * np.abs(exact).max())
        np.testing.assert_allclose(model, models[0], rtol=0, atol=4e-6 * np.abs(exact).max())


def test_a_strategy_that_cannot_use_an_update_leaves_the_round_untouched() -> None:
    # Prepare: two of three updates in.
    start = f32(0.0, 0.0)
    rounds = fedavg_rounds(3)
    rounds.begin([1, 2, 3], start)
    rounds.on_arrival(update(1, f32(2.0, 2.0), start, 1), start)
    sums_before = rounds.fresh_sum.sums["w"].copy()

    # Execute: node 2's update has arrays the model does not have (the loop rejects it).
    with pytest.raises(ValueError):
        rounds.on_arrival(update(2, f32(1.0, 1.0, 1.0), start, 100), start)

    # Assert: nothing of it is in the sum, and the round waits for node 2 still; a failure
    # then counts it as lost, and the mean is node 1's and node 3's.
    np.testing.assert_array_equal(rounds.fresh_sum.sums["w"], sums_before)
    assert rounds.fresh_sum.count == 1 and 2 in rounds.outstanding
    rounds.on_failure(2, "rejected", start)
    decision = rounds.on_arrival(update(3, f32(5.0, 8.0), start, 3), start)
    assert decision.weights is not None
    np.testing.assert_allclose(decision.weights["w"], [(2 + 15) / 4, (2 + 24) / 4])


def test_the_round_keeps_no_arrays_of_the_updates_it_folded() -> None:
    start = f32(0.0, 0.0)
    rounds = fedavg_rounds(3)
    rounds.begin([1, 2, 3], start)
    rounds.on_arrival(update(1, f32(2.0, 2.0), start, 1), start)
    rounds.on_arrival(update(2, f32(2.0, 2.0), start, 1), start)
    assert all(a.weights == {} and a.sent_weights == {} for a in rounds.arrived.values())


def test_a_pickled_round_half_way_goes_on_to_the_same_model() -> None:
    # Prepare: a round with one of three updates folded in, saved as a resume point saves it.
    start = f32(1.0, -1.0)
    ups = [update(n, f32(n * 1.5, -n * 0.5), start, n) for n in (1, 2, 3)]
    straight = fedavg_rounds(3)
    straight.begin([1, 2, 3], start)
    straight.on_arrival(ups[0], start)
    saved = pickle.dumps(straight)

    # Execute: the uninterrupted one and the restored one take the same two updates.
    restored = pickle.loads(saved)
    results = []
    for rounds in (straight, restored):
        rounds.on_arrival(ups[1], start)
        results.append(rounds.on_arrival(ups[2], start).weights)

    # Assert: bit for bit, and the sum was part of the state (x = (1.5 + 6 + 13.5)/6 = 3.5).
    assert results[0] is not None and results[1] is not None
    np.testing.assert_array_equal(results[0]["w"], results[1]["w"])
    np.testing.assert_allclose(results[0]["w"], [3.5, -7 / 6], rtol=1e-6)


def test_fedbuff_buffer_is_a_running_sum_by_hand() -> None:
    # K = 3, η_g = 1, no staleness scaling: x ← x + (Δ_1 + Δ_2 + Δ_3)/3.
    server = FedBuff(FedBuffConfig(buffer_size=3, server_lr=1.0, staleness_scaling=False))
    x0 = f32(1.0, 1.0)
    server.on_arrival(update(1, f32(4.0, 1.0), x0, 1), x0)  # Δ = (3, 0)
    server.on_arrival(update(2, f32(1.0, 7.0), x0, 1), x0)  # Δ = (0, 6)
    assert server.buffer.count == 2 and server.buffer.nbytes() == 8
    decision = server.on_arrival(update(3, f32(4.0, 4.0), x0, 1), x0)  # Δ = (3, 3)
    assert decision.weights is not None
    np.testing.assert_allclose(decision.weights["w"], [1 + 2.0, 1 + 3.0])
    assert not server.buffer


# --- what each aggregator declares ----------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "needs_all"),
    [
        (lambda: as_scheduler(FedAvg()), False),
        (lambda: as_scheduler(FedProx()), False),
        (lambda: as_scheduler(FedAdam()), False),
        (lambda: as_scheduler(FedAvg(weighted_by_key="other")), True),
        (lambda: as_scheduler(Krum()), True),
        (lambda: as_scheduler(FedMedian()), True),
        (lambda: FedBuff(FedBuffConfig()), False),
        (lambda: FedAsync(FedAsyncConfig()), False),
    ],
    ids=[
        "fedavg",
        "fedprox",
        "fedadam",
        "fedavg-other-key",
        "krum",
        "median",
        "fedbuff",
        "fedasync",
    ],
)
def test_aggregators_declare_whether_they_need_all_updates(
    make: Callable[[], EventStrategy], needs_all: bool
) -> None:
    assert make().needs_all_updates is needs_all


@pytest.mark.parametrize(
    "name", ["robust-median", "robust-krum", "robust-trimmed-mean", "fedmedian", "multikrum"]
)
def test_robust_plugins_say_they_need_all_updates(name: str) -> None:
    plugin = default_registry().get(name)
    server = plugin.build_server(plugin.parse_config({}), ServerSetup(num_rounds=1, min_clients=3))
    assert as_scheduler(server).needs_all_updates


def test_fedadam_streamed_equals_fedadam_on_all_replies() -> None:
    # The FedOpt family gets one reply, the mean: its server step must be the one it takes on
    # every reply (to float32 rounding of the mean).
    rng = np.random.default_rng(3)
    start = {"w": rng.standard_normal(50).astype(np.float32)}
    ups = [
        update(n, {"w": rng.standard_normal(50).astype(np.float32)}, start, float(n))
        for n in (1, 2, 3)
    ]
    random.seed(0)
    streamed = run_round(
        as_scheduler(FedAdam(min_train_nodes=3, min_available_nodes=3)), start, ups
    )
    random.seed(0)
    rounds = as_scheduler(FedAdam(min_train_nodes=3, min_available_nodes=3))
    assert isinstance(rounds, SyncRounds)
    rounds.begin([1, 2, 3], start)  # FedAdam keeps the arrays its configure_train was given
    whole, metrics = rounds.aggregator.aggregate(1, start, ups)
    assert whole is not None
    # FedAdam steps about η·sign(mean − x) first: a wrong mean shows.
    np.testing.assert_allclose(streamed[0]["w"], whole["w"], rtol=1e-5, atol=1e-6)
    assert streamed[1] == pytest.approx(metrics)


# --- memory: one model, not one per client -----------------------------------------------------


def _peak_over(feed: Callable[[Callable[[int], Weights]], None], size: int) -> int:
    """Peak traced bytes of ``feed`` above the bytes traced when it starts; the update arrays
    are made one at a time inside (as replies are decoded), so a fold that keeps none of them
    peaks at about its sums plus the one update in hand."""
    rng = np.random.default_rng(0)

    def make(_: int) -> Weights:
        return {"w": rng.standard_normal(size, dtype=np.float32)}

    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        feed(make)
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("strategy", ["fedavg", "fedbuff"])
def test_aggregating_n_updates_peaks_at_about_one_model_not_n(strategy: str) -> None:
    # Prepare: 30 updates of 64 k float32 parameters (256 KiB each).
    size, n = 1 << 16, 30
    model_bytes = size * 4
    start = {"w": np.zeros(size, np.float32)}

    def baseline(make: Callable[[int], Weights]) -> None:
        for node in range(1, n + 1):
            make(node)  # decoded, then dropped unaggregated

    def aggregate(make: Callable[[int], Weights]) -> None:
        server: EventStrategy
        if strategy == "fedavg":
            server = fedavg_rounds(n)
            server.begin(list(range(1, n + 1)), start)
        else:
            server = FedBuff(FedBuffConfig(buffer_size=n, staleness_scaling=False))
        for node in range(1, n + 1):
            decision = server.on_arrival(update(node, make(node), start, node), start)
        assert decision.weights is not None

    # Execute
    base = _peak_over(baseline, size)
    peak = _peak_over(aggregate, size)

    # Assert: above the baseline (one update in hand) the fold takes its sum, and closing the
    # round a model-sized copy or two (the new model handed on); never one per update.
    assert base < 2 * model_bytes
    assert peak - base < 3.5 * model_bytes, (peak - base) / model_bytes
