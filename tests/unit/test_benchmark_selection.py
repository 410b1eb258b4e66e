"""The benchmarks' tuning harness chooses each method's setting on validation, never on test."""

from __future__ import annotations

from typing import Any

import pytest

from benchmarks.tuning import grid, label, select, summarise

SETTINGS = grid([0.1, 0.3], [0.0])
LOW, HIGH = (label(s) for s in SETTINGS)


def _run(accuracy: list[float], val_accuracy: list[float]) -> dict[str, Any]:
    return {"accuracy": accuracy, "val_accuracy": val_accuracy, "seconds": 1.0}


def test_grid_crosses_every_learning_rate_with_every_momentum() -> None:
    assert grid([0.1, 0.3], [0.0, 0.9]) == [
        {"lr": 0.1, "momentum": 0.0},
        {"lr": 0.3, "momentum": 0.0},
        {"lr": 0.1, "momentum": 0.9},
        {"lr": 0.3, "momentum": 0.9},
    ]


def test_the_setting_best_on_validation_is_chosen_though_another_is_best_on_test() -> None:
    # Prepare: lr 0.1 is better on validation in both seeds, lr 0.3 on test in both seeds; a
    # selection that read test accuracy would pick lr 0.3.
    by_setting = {
        LOW: [_run([0.5, 0.6], [0.8, 0.9]), _run([0.5, 0.5], [0.7, 0.9])],
        HIGH: [_run([0.9, 0.9], [0.6, 0.6]), _run([0.8, 0.9], [0.6, 0.7])],
    }

    # Execute
    chosen = select(by_setting, tail=2)
    summary = summarise(by_setting, SETTINGS, tail=2)

    # Assert: chosen on validation, and the test figures reported are the chosen setting's.
    assert chosen == LOW
    assert summary["chosen"] == {"lr": 0.1, "momentum": 0.0}
    assert summary["val"]["mean"] == pytest.approx((0.85 + 0.8) / 2)
    # Per-seed test means of the last 2 rounds: 0.55 and 0.5; sample sd of two values = |a−b|/√2.
    assert summary["test"]["per_seed"] == pytest.approx([0.55, 0.5])
    assert summary["test"]["mean"] == pytest.approx(0.525)
    assert summary["test"]["sd"] == pytest.approx(0.05 / 2**0.5)
    # Every setting's figures are kept for the record.
    assert [g["test"] for g in summary["grid"]] == pytest.approx([0.525, 0.875])


def test_selection_averages_the_last_rounds_not_the_best_round() -> None:
    # Prepare: lr 0.3 peaks highest on validation (0.95 at round 1) but ends lower; over the last
    # two rounds lr 0.1 is ahead (0.85 vs 0.65). Best-round selection would pick lr 0.3.
    by_setting = {
        LOW: [_run([0.1, 0.1, 0.1], [0.5, 0.8, 0.9])],
        HIGH: [_run([0.1, 0.1, 0.1], [0.95, 0.7, 0.6])],
    }

    # Execute / Assert
    assert select(by_setting, tail=2) == LOW
    assert select(by_setting, tail=3) == HIGH  # means 0.733 vs 0.75: the window matters


def test_a_tie_on_validation_keeps_the_first_setting_of_the_grid() -> None:
    # Prepare: equal validation, the second setting better on test.
    by_setting = {LOW: [_run([0.1], [0.7])], HIGH: [_run([0.9], [0.7])]}

    # Execute / Assert
    assert select(by_setting, tail=1) == LOW


def test_extra_metrics_are_reported_for_the_chosen_setting() -> None:
    # Prepare: the robust figure of the setting chosen on validation is 0.2, the other's 0.9.
    by_setting = {
        LOW: [{**_run([0.5], [0.9]), "robust-accuracy": [0.2]}],
        HIGH: [{**_run([0.9], [0.5]), "robust-accuracy": [0.9]}],
    }

    # Execute
    summary = summarise(by_setting, SETTINGS, tail=1, extra_keys=["robust-accuracy"])

    # Assert
    assert summary["metrics"]["robust-accuracy"]["mean"] == pytest.approx(0.2)
