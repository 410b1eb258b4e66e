"""The heterogeneous-clients benchmark reads its curves on virtual time and measures the time to
a target on the validation split, never on test."""

from __future__ import annotations

import json
from typing import Any

import pytest

from benchmarks import heterogeneous as het
from benchmarks.tuning import grid, label


def test_value_at_holds_the_latest_aggregation_and_the_initial_model_before_the_first() -> None:
    times, values = [2.0, 5.0, 9.0], [0.3, 0.6, 0.8]

    assert het.value_at(times, values, 0.0, initial=0.1) == 0.1
    assert het.value_at(times, values, 1.999, initial=0.1) == 0.1
    assert het.value_at(times, values, 2.0, initial=0.1) == 0.3  # at the aggregation itself
    assert het.value_at(times, values, 8.9, initial=0.1) == 0.6
    assert het.value_at(times, values, 100.0, initial=0.1) == 0.8


def test_time_to_target_is_the_first_time_the_curve_reaches_it() -> None:
    # Reached at 5, dips below after, reached again at 9: the first time counts.
    times, values = [2.0, 5.0, 7.0, 9.0], [0.3, 0.9, 0.7, 0.95]

    assert het.time_to_target(times, values, 0.9) == 5.0
    assert het.time_to_target(times, values, 0.95) == 9.0
    assert het.time_to_target(times, values, 0.96) is None
    assert het.time_to_target(times, values, 0.2, initial=0.25) == 0.0


def test_on_time_grid_samples_both_splits_as_step_functions() -> None:
    run = {
        "virtual_time_s": [3.0, 6.0],
        "accuracy": [0.5, 0.7],
        "val_accuracy": [0.4, 0.9],
        "initial": {"accuracy": 0.1, "val_accuracy": 0.2},
    }

    sampled = het.on_time_grid(run, [0.0, 2.5, 5.0, 7.5])

    assert sampled == {"accuracy": [0.1, 0.1, 0.5, 0.7], "val_accuracy": [0.2, 0.2, 0.4, 0.9]}


def _run(times: list[float], test: list[float], val: list[float]) -> dict[str, Any]:
    return {
        "virtual_time_s": times,
        "accuracy": test,
        "val_accuracy": val,
        "initial": {"accuracy": 0.0, "val_accuracy": 0.0},
        "seconds": 1.0,
    }


def test_summary_measures_time_to_target_on_validation_for_the_setting_chosen_on_validation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare: target 0.9. lr 0.1 ends better on validation, lr 0.3 on test, so selection must
    # pick lr 0.1. Under lr 0.1 test accuracy reaches 0.9 at t = 2 but validation only at t = 4
    # (seed 0) and t = 6 (seed 1): a time-to-target read on test would say 2.
    monkeypatch.setattr(het, "TARGET", 0.9)
    settings = grid([0.1, 0.3], [0.0])
    low, high = (label(s) for s in settings)
    raw = {
        low: [
            _run([2.0, 4.0, 6.0], [0.9, 0.9, 0.9], [0.5, 0.9, 0.95]),
            _run([2.0, 4.0, 6.0], [0.95, 0.9, 0.9], [0.5, 0.8, 0.93]),
        ],
        high: [
            _run([2.0, 4.0, 6.0], [0.99, 0.99, 0.99], [0.5, 0.6, 0.7]),
            _run([2.0, 4.0, 6.0], [0.99, 0.99, 0.99], [0.5, 0.6, 0.7]),
        ],
    }

    # Execute
    summary = het.summarise(raw, settings, [0.0, 2.0, 4.0, 6.0], tail=1)

    # Assert
    assert summary["chosen"] == settings[0]
    ttt = summary["time_to_target_s"]
    assert (ttt["reached"], ttt["of"], ttt["per_seed"]) == (2, 2, [4.0, 6.0])
    assert ttt["mean"] == pytest.approx(5.0)
    # Test accuracy at half the budget (t = 3): both seeds' models from t = 2.
    assert summary["test_at"]["0.5"]["per_seed"] == [0.9, 0.95]
    assert summary["mean_test_curve"] == pytest.approx([0.0, 0.925, 0.9, 0.9])


def test_a_seed_that_never_reaches_the_target_is_counted_not_averaged() -> None:
    stats = het.seed_stats([4.0, None, 8.0])

    assert (stats["reached"], stats["of"]) == (2, 3)
    assert stats["mean"] == pytest.approx(6.0)
    assert "mean" not in het.seed_stats([None, None])


@pytest.mark.parametrize("name", sorted(het.SCENARIOS))
def test_every_scenario_makes_valid_specs_for_every_method(name: str) -> None:
    scenario = het.SCENARIOS[name]
    fleet = het.speeds(name)

    specs = [
        het.factory(m, 100.0, het.STEPS * max(fleet), scenario)({"lr": 0.1, "momentum": 0.0}, 1)
        for m in het.METHODS
    ]

    assert len(fleet) == scenario.nodes
    assert min(fleet) >= scenario.fastest
    assert max(fleet) <= scenario.fastest * scenario.spread + 1e-9
    assert {s.clients.min for s in specs} == {scenario.nodes}
    assert {s.workload.name for s in specs} == {scenario.dataset}
    slow = specs[het.METHODS.index("async-fedavg-slow")]
    assert slow.strategy.config["server_lr"] == pytest.approx(1 / scenario.nodes, abs=1e-6)


def test_the_skewed_and_synthetic_scenarios_differ_from_the_first_as_named() -> None:
    skewed = het.SCENARIOS["exponential, 10x, 20 nodes, Dir(0.1)"].dataset_spec(3)
    synthetic = het.SCENARIOS["exponential, 10x, synthetic"].dataset_spec(3)

    assert skewed == {
        "name": "digits",
        "partitioner": {"name": "dirichlet", "alpha": 0.1},
        "seed": 3,
    }
    assert synthetic == {"name": "synthetic", "num_devices": 30, "seed": 3}


def test_a_run_of_one_scenario_keeps_the_others_only_if_they_ran_the_same_grid(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(het.tuning, "RESULTS", tmp_path)
    earlier = {
        "grid": {"lr": [0.03, 0.1, 0.3]},
        "seeds": [0, 1, 2],
        "tail": 4,
        "config": {"budget_rounds": 15},
        "scenarios": {"exponential, 10x spread": {"methods": {}}, "gone": {}},
        "runs": {"exponential, 10x spread": {"fedavg": {}}, "gone": {}},
    }
    (tmp_path / "heterogeneous.json").write_text(json.dumps(earlier))

    kept = het.earlier_scenarios(False, [0.03, 0.1, 0.3], [0, 1, 2], 4, 15)
    other_seeds = het.earlier_scenarios(False, [0.03, 0.1, 0.3], [0, 1], 4, 15)

    assert list(kept) == ["exponential, 10x spread"]  # a scenario no longer defined is dropped
    assert kept["exponential, 10x spread"]["summary"]["nodes"] == het.NODES
    assert kept["exponential, 10x spread"]["runs"] == {"fedavg": {}}
    assert other_seeds == {}
