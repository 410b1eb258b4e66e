"""The best-round rule: chosen on validation accuracy, with the last round for old rounds."""

from __future__ import annotations

from typing import Any

import pytest

from florist.server.metrics import best_round, metric


def test_best_round_is_chosen_on_validation_not_on_test() -> None:
    rounds = [
        {"accuracy": 0.9, "val-accuracy": 0.6},
        {"accuracy": 0.7, "val-accuracy": 0.8},
        {"accuracy": 0.95, "val-accuracy": 0.75},
    ]

    assert best_round(rounds) == (1, "validation")


def test_a_tie_goes_to_the_earliest_round() -> None:
    rounds = [{"val-accuracy": 0.5}, {"val-accuracy": 0.8}, {"val-accuracy": 0.8}]

    assert best_round(rounds) == (1, "validation")


def test_rounds_without_validation_are_skipped_when_others_have_it() -> None:
    # An experiment whose first rounds predate the validation split.
    rounds: list[dict[str, Any] | None] = [
        {"accuracy": 0.99},
        {"accuracy": 0.5, "val-accuracy": 0.4},
        None,
        {"accuracy": 0.6, "val-accuracy": 0.45},
        {"accuracy": 0.7},
    ]

    assert best_round(rounds) == (3, "validation")


def test_without_validation_the_last_round_with_accuracy_stands_in() -> None:
    rounds: list[dict[str, Any] | None] = [
        {"accuracy": 0.9},
        {"accuracy": 0.6},
        {"loss": 0.3},
        None,
    ]

    assert best_round(rounds) == (1, "last-round")
    assert best_round([{"loss": 1.0}]) is None
    assert best_round([]) is None


@pytest.mark.parametrize("value", [None, True, "0.9", float("nan"), float("inf")])
def test_values_that_are_not_finite_numbers_are_ignored(value: object) -> None:
    rounds = [{"val-accuracy": 0.2}, {"val-accuracy": value}]

    assert metric(rounds[1], "val-accuracy") is None
    assert best_round(rounds) == (0, "validation")
