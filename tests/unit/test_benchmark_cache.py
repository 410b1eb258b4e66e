"""Benchmark workers (--shard) share the runs out once each, and the assembling run reads them all
back from the per-run cache instead of running them again."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from benchmarks import tuning
from florist.server.spec import ExperimentSpec


def _spec(setting: tuning.Setting, seed: int) -> ExperimentSpec:
    return ExperimentSpec.model_validate(
        {
            "name": f"cache-s{seed}",
            "strategy": {"name": "fedavg", "config": {}},
            "dataset": {"name": "digits"},
            "model": {"name": "mlp", "hidden": [8]},
            "training": {"lr": setting["lr"], "momentum": setting["momentum"]},
            "rounds": 1,
            "seed": seed,
        }
    )


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[float, int]]:
    """Replace the in-process run by a record of which (lr, seed) ran; accuracy encodes both."""
    done: list[tuple[float, int]] = []

    def fake_run_local(spec: ExperimentSpec, nodes: int) -> tuple[None, Any]:
        done.append((spec.training.lr, spec.seed))
        metrics = {"accuracy": spec.training.lr + spec.seed, "val-accuracy": spec.training.lr}
        return None, SimpleNamespace(rounds=lambda _first: [SimpleNamespace(metrics=metrics)])

    monkeypatch.setattr(tuning, "run_local", fake_run_local)
    return done


def test_shards_run_each_run_once_and_the_assembling_run_reads_them_back(
    tmp_path: Path, calls: list[tuple[float, int]]
) -> None:
    # Prepare: 2 methods × 2 settings × 3 seeds = 12 runs, shared by 3 workers.
    methods = {"a": _spec, "b": _spec}
    settings = tuning.grid([0.1, 0.3], [0.0])
    seeds = [0, 1, 2]

    # Execute: the workers, then the assembling run.
    per_worker = []
    for i in range(3):
        assert tuning.run_grid(methods, settings, seeds, 2, 1, cache=tmp_path, shard=(i, 3)) == {
            "a": {},
            "b": {},
        }
        per_worker.append(len(calls) - sum(per_worker))
    after_workers = len(calls)
    runs = tuning.run_grid(methods, settings, seeds, 2, 1, cache=tmp_path)

    # Assert: the two methods' specs are the same here, so the cache holds 6 distinct runs and
    # the workers ran exactly those; the assembling run ran nothing and got every seed's curve.
    assert after_workers == len(calls) == 6
    assert per_worker == [2, 2, 2]  # each worker its third: seed i of each setting
    assert sorted(calls) == sorted((lr, s) for lr in (0.1, 0.3) for s in seeds)
    assert [r["accuracy"] for r in runs["b"]["lr=0.3 momentum=0"]] == [[0.3], [1.3], [2.3]]


def test_runs_seconds_sums_every_run_in_a_nested_result() -> None:
    run = {"accuracy": [0.5], "val_accuracy": [0.5], "seconds": 2.0}
    assert tuning.runs_seconds({"full": {"a": {"x": [run, run]}}, "partial": [run]}) == 6.0
