"""The per-client arrival weights (p_i and p_i / q_i) on hand-computed sequences."""

from __future__ import annotations

import pytest

from florist.strategies.client_weights import ArrivalWeights


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
