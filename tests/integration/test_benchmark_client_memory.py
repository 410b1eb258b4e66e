"""benchmarks/client_memory.py's smoke run on a real `florist up` stack (no memory assertions:
memory is measured in benchmarks/, not asserted here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import client_memory

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_memory_is_sampled_over_florist_ups_process_tree_while_every_node_trains(
    tmp_path: Path,
) -> None:
    # Execute: 2 SuperNodes from one executor pool, a 2-round experiment.
    out = tmp_path / "client_memory.json"
    client_memory.main(["--quick", "--out", str(out)])

    # Assert: both nodes took part in both rounds; every role was found in the tree.
    (result,) = json.loads(out.read_text())["results"]
    assert result["mode"] == "shared" and result["updates_per_round"] == [2, 2]
    peak = result["peak_bytes"]
    assert min(peak["server"], peak["supernodes"], peak["executors"]) > 0, peak
    assert peak["total"] == peak["server"] + peak["supernodes"] + peak["executors"]
    assert out.with_suffix(".png").stat().st_size > 0
