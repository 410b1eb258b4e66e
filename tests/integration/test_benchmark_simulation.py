"""Smoke run of benchmarks/simulation.py: one small case on a real simulation SuperLink and Ray,
its results file and plot written; no timing asserted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.simulation import main

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_the_simulation_benchmark_writes_its_results_and_plot(tmp_path: Path) -> None:
    main(["--quick", "--axis", "10", "--out", str(tmp_path)])
    results = json.loads((tmp_path / "simulation.json").read_text())
    assert results["benchmark"] == "simulation"
    assert {"platform", "cpus", "ray", "flwr"} <= set(results["machine"])
    (case,) = results["axis"]
    assert (case["virtual"], case["per_round"], case["rounds"]) == (10, 5, 2)
    assert case["status"] == "finished:completed", case
    assert case["rounds_recorded"] == 2 and len(case["round_s"]) == 2
    # Memory was sampled while the run lived, and the simulation process was among it.
    assert case["memory_samples"] > 0
    assert case["server_peak_rss_mib"] > 0 and "flwr-simulation" in case["pss_at_peak_mib"]
    assert case["peak_pss_mib"] <= case["peak_rss_mib"]
    assert (tmp_path / "simulation.png").stat().st_size > 0
