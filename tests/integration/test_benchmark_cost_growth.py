"""benchmarks/cost_growth.py's smoke run on a real `florist up` stack (no timing or memory
assertions: those are measured in benchmarks/, not asserted here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import cost_growth

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_widths_give_the_asked_model_sizes() -> None:
    # 64 → h → h → 10 with biases: h² + 76·h + 10 parameters.
    assert cost_growth.count(69) == 69 * 69 + 76 * 69 + 10
    for size in (1e4, 1e5, 1e6, 1e7):
        assert abs(cost_growth.count(cost_growth.width(size)) - size) / size < 0.01


def test_each_model_size_runs_and_its_serverapp_is_measured(tmp_path: Path) -> None:
    # Execute: 2 nodes, models of about 10 k and 100 k parameters, 3 rounds each.
    out = tmp_path / "cost_growth.json"
    cost_growth.main(["--quick", "--out", str(out)])

    # Assert: every round recorded, the ServerApp found and sampled, bytes grow with the model.
    results = json.loads(out.read_text())["results"]
    assert [r["rounds_recorded"] for r in results] == [cost_growth.ROUNDS] * 2
    assert all(r["serverapp_peak_mib"] > 0 for r in results), results
    assert results[1]["bytes_per_round"] > results[0]["bytes_per_round"] > 0
    assert out.with_suffix(".png").stat().st_size > 0
