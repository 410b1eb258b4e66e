"""Per-client arrival weights (p_i, p_i / q_i): hand-computed sequences and the bias they undo."""

from __future__ import annotations

import numpy as np
import pytest

from florist.strategies.client_weights import ArrivalWeights
from florist.strategies.events import Arrival, EventStrategy, Weights
from florist.strategies.fedasync import FedAsync, FedAsyncConfig
from florist.strategies.fedbuff import FedBuff, FedBuffConfig


def weights(mode: str, arrivals: list[tuple[int, int]]) -> list[float]:
    tracker = ArrivalWeights(mode)  # type: ignore[arg-type]
    return [tracker.weigh(node, n) for node, n in arrivals]


def test_equal_clients_in_turn_get_weight_one_once_each_has_reported_equally() -> None:
    # Two clients of 20 examples, in turn A, B, A, B. data: M·p_i = 1 throughout.
    # frequency, p_i/q_i: A 1/(1/1) = 1; B 0.5/(1/2) = 1; A 0.5/(2/3) = 0.75; B 0.5/(2/4) = 1.
    seq = [(1, 20), (2, 20), (1, 20), (2, 20)]
    assert weights("none", seq) == [1.0, 1.0, 1.0, 1.0]
    assert weights("data", seq) == pytest.approx([1.0, 1.0, 1.0, 1.0])
    assert weights("frequency", seq) == pytest.approx([1.0, 1.0, 0.75, 1.0])


def test_a_fast_client_is_weighed_down_and_a_slow_one_up() -> None:
    # Equal data; A reports three times per B report: A, A, A, B.
    # frequency: A: p = 1 while alone → 1, 1, 1; B: p = 1/2, q = 1/4 → 2.
    # Then A again: p = 1/2, q = 4/5 → 0.625.
    seq = [(1, 5), (1, 5), (1, 5), (2, 5), (1, 5)]
    assert weights("frequency", seq) == pytest.approx([1.0, 1.0, 1.0, 2.0, 0.625])


def test_latest_example_count_is_used_and_no_data_weighs_nothing() -> None:
    # A reports 10 then 30 examples: the later count replaces the earlier one.
    # data, B with 10: M = 2, p = 10/(30 + 10) → 2·0.25 = 0.5.
    assert weights("data", [(1, 10), (1, 30), (2, 10)]) == pytest.approx([1.0, 1.0, 0.5])
    # A client without examples sends back the model it got: its update counts for nothing.
    assert weights("data", [(1, 0)]) == [0.0]
    assert weights("frequency", [(1, 0), (2, 10)]) == pytest.approx([0.0, 2.0])


# --- the claim: frequency weights undo the pull toward the fast client --------------------------
# Two clients with equally many examples and quadratic objectives f_i(x) = ½(x − c_i)², c_A = 0,
# c_B = 1: the federated optimum is their mean, 1/2. A reports three times for each B report
# (A, A, A, B, repeated), and one local step x_i = x + γ·(c_i − x) from the current model.


def local_step(node: int, x: Weights, gamma: float) -> Arrival:
    target = {1: 0.0, 2: 1.0}[node]
    trained = {"w": x["w"] + gamma * (target - x["w"])}
    return Arrival(node, trained, x, 0, 0, 10, 1, {}, 1.0)


def run_cycles(server: EventStrategy, gamma: float, cycles: int) -> float:
    x: Weights = {"w": np.array([0.5])}
    for _ in range(cycles):
        for node in (1, 1, 1, 2):
            decision = server.on_arrival(local_step(node, x, gamma), x)
            x = decision.weights if decision.weights is not None else x
    return float(x["w"][0])  # right after B's arrival


@pytest.mark.parametrize(
    ("weighting", "expected"),
    [
        # K = 4, η_g = 1, γ = 1/2: each buffer holds A, A, A, B from one model x.
        # none: x ← x + (γ/4)·(3·(0 − x) + (1 − x)) = x + (1 − 4x)/8: fixed point 1/4.
        ("none", 0.25),
        # frequency: q_A → 3/4, q_B → 1/4, p = 1/2, so w_A → 2/3 and w_B → 2:
        # x ← x + (γ/4)·(3·(2/3)·(0 − x) + 2·(1 − x)) = x + (2 − 4x)/8: fixed point 1/2.
        ("frequency", 0.5),
    ],
)
def test_fedbuff_frequency_weights_reach_the_federated_optimum(
    weighting: str, expected: float
) -> None:
    config = FedBuffConfig(
        buffer_size=4,
        staleness_scaling=False,
        client_weighting=weighting,  # type: ignore[arg-type]
    )
    # q_i is estimated from the counts so far; its error shrinks like 1/cycles.
    assert run_cycles(FedBuff(config), gamma=0.5, cycles=300) == pytest.approx(expected, abs=2e-3)


@pytest.mark.parametrize(
    ("weighting", "expected"),
    [
        # α = 0.4, γ = 0.1: each arrival is x ← x + α·w_i·γ·(c_i − x).
        # none: A's step is 0.04, thrice: x·0.96³ = 0.884736·x; then B: 0.96·x + 0.04. Right
        # after B, x* = 0.04/(1 − 0.96·0.884736) = 0.04/0.15065344 = 0.26551 (its highest point
        # in the cycle): the run sits near A's optimum, far from 1/2.
        ("none", 0.26551),
        # frequency, w_A → 2/3, w_B → 2: A's step 0.4·(2/3)·0.1 = 0.026667, (1 − 0.026667)³ =
        # 0.922115; B's step 0.08: x* = 0.08/(1 − 0.92·0.922115) = 0.08/0.151654 = 0.52751 right
        # after B (the cycle oscillates around 1/2).
        ("frequency", 0.52751),
    ],
)
def test_fedasync_frequency_weights_remove_the_pull_toward_the_fast_client(
    weighting: str, expected: float
) -> None:
    config = FedAsyncConfig(
        alpha=0.4,
        staleness="constant",
        client_weighting=weighting,  # type: ignore[arg-type]
    )
    assert run_cycles(FedAsync(config), gamma=0.1, cycles=300) == pytest.approx(expected, abs=2e-3)
