"""Smoke runs of benchmarks/aggregation.py and benchmarks/api_latency.py at tiny sizes (no timing
is asserted: only that each writes its results file and plot with every figure in them)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from flwr.supercore.task_identity import TaskIdentity

from benchmarks import aggregation, api_latency


@pytest.fixture(autouse=True)
def task_identity() -> None:
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0


def test_aggregation_smoke(tmp_path: Path) -> None:
    assert aggregation.main(["--quick", "--out", str(tmp_path)]) == 0

    result = json.loads((tmp_path / "aggregation.json").read_text())
    assert (tmp_path / "aggregation.png").stat().st_size > 0
    assert set(result["methods"]) == set(aggregation.METHODS)
    for name, figures in result["methods"].items():
        # Ratios are rounded to 3 places: a tiny run's median can round to 0.
        assert all(t > 0 for t in figures["seconds"]) and figures["ratio_to_copy_best"] >= 0, name
        assert "peak_models_above_baseline" in figures
    assert result["methods"]["florist-fedavg"]["needs_all_updates"] is False
    assert result["methods"]["flower-fedmedian"]["needs_all_updates"] is True
    # The streamed mean is Flower's mean up to float32 rounding; the medians are one rule.
    assert result["max_abs_difference"]["fedavg"] < 1e-5
    assert result["max_abs_difference"]["median"] < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def test_api_latency_smoke(tmp_path: Path, backend: str) -> None:
    assert api_latency.main(["--quick", "--backends", backend, "--out", str(tmp_path)]) == 0

    result = json.loads((tmp_path / "api_latency.json").read_text())
    if backend not in result["backends"]:
        pytest.skip(f"{backend} unreachable")
    assert (tmp_path / "api_latency.png").stat().st_size > 0
    endpoints = result["backends"][backend]["endpoints"]
    assert "events: first event" in endpoints and "updates ?limit=100 mid cursor" in endpoints
    assert all(e["requests"] == 3 and e["p99_ms"] >= e["p50_ms"] > 0 for e in endpoints.values())
    # The default pages hold every row of the tiny run: 5 rounds, 5 × 3 updates.
    assert endpoints["rounds (default page)"]["rows"] == 5
    assert endpoints["updates (default page)"]["rows"] == 15
