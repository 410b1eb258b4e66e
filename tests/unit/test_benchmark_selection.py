"""The FedSpeed benchmark chooses its best round and rounds-to-target on validation, not test."""

from __future__ import annotations

from typing import Any

import pytest

from benchmarks.fedspeed import paragraph, summarise


def _run(accuracy: list[float], val_accuracy: list[float]) -> dict[str, Any]:
    return {"accuracy": accuracy, "val_accuracy": val_accuracy, "seconds": 1.0}


def test_best_round_is_the_best_on_validation_and_reports_its_test_accuracy() -> None:
    # Prepare: test peaks at round 3, validation at round 2.
    runs = {
        "fedavg": [_run([0.5, 0.7, 0.9], [0.5, 0.8, 0.6])],
        "fedspeed": [_run([0.6, 0.8, 0.95], [0.6, 0.9, 0.7])],
    }

    # Execute
    summary = summarise(runs)

    # Assert
    assert summary["fedavg"]["best_round"] == 2
    assert summary["fedavg"]["best_val_mean"] == pytest.approx(0.8)
    assert summary["fedavg"]["test_at_best_round"] == pytest.approx(0.7)
    assert summary["fedspeed"]["test_at_best_round"] == pytest.approx(0.8)


def test_rounds_to_target_are_read_on_validation() -> None:
    # Prepare: FedAvg's best validation is 0.8, so the target is 0.72; on validation FedSpeed
    # reaches it at round 3, on test already at round 1.
    runs = {
        "fedavg": [_run([0.1, 0.2, 0.3], [0.7, 0.8, 0.75])],
        "fedspeed": [_run([0.9, 0.9, 0.9], [0.1, 0.2, 0.73])],
    }

    # Execute
    text = paragraph(summarise(runs), seeds=[0])

    # Assert
    assert "(0.720, on validation): FedSpeed 3, FedAvg 2" in text
