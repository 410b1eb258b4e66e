"""benchmarks/end_to_end.py's smoke run: every side runs the job on real processes (no timing
assertions: speed is measured in benchmarks/, not asserted here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import end_to_end

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_every_side_runs_the_job_and_the_results_are_written(tmp_path: Path) -> None:
    # Execute: 1 repetition, 2 rounds on 2 nodes: floor, Florist in-process, Florist through
    # its REST API on a `florist up` stack, plain Flower on stock SuperNodes.
    out = tmp_path / "end_to_end.json"
    end_to_end.main(["--quick", "--out", str(out)])

    # Assert: each side ran the job (every round recorded where the side records rounds),
    # ratios are against the floor, and the plot was drawn.
    results = json.loads(out.read_text())
    sides = results["sides"]
    assert set(sides) == set(end_to_end.SIDES)
    for side in ("florist-local", "florist", "plain"):
        assert [r["rounds_recorded"] for r in sides[side]["runs"]] == [2], side
    assert results["ratio_to_floor"]["floor"] == 1.0
    assert all(s["median_s"] > 0 for s in sides.values())
    # Florist's nodes train on the examples the workload leaves them, in either runtime.
    assert sides["florist"]["runs"][0]["examples_per_node"]
    assert out.with_suffix(".png").stat().st_size > 0
