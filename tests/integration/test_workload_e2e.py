"""A third-party workload on real SuperNodes: each node trains on the CSV folder it holds, and a
node started without its data fails its tasks, saying why, while the run goes on."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.workload_data import csv_workload, write_node_csv

from .conftest import Api, FlowerStack, start_stack

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SIZES = (31, 47)


@pytest.fixture(scope="module")
def flower_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FlowerStack]:
    """Two nodes with their own data folders (different sizes), one started without any."""
    data = tmp_path_factory.mktemp("sites")
    folders = [write_node_csv(data / f"site-{i}", n, 12, seed=i) for i, n in enumerate(SIZES)]
    configs: list[dict[str, int | float | str]] = [{"data-path": str(f)} for f in folders]
    with start_stack(tmp_path_factory.mktemp("flower"), [*configs, {}]) as stack:
        yield stack


def test_csv_workload_trains_on_each_nodes_own_folder(api: Api) -> None:
    # Execute: the plugin is installed by entry point only; florist has no code for it.
    exp = api.submit(
        {
            "name": "e2e-csv-workload",
            "strategy": {"name": "fedavg", "config": {}},
            "workload": csv_workload(hidden=8),
            "training": {"local_steps": 4, "batch_size": 8, "lr": 0.01},
            "rounds": 2,
            "clients": {"min": 3, "fraction_evaluate": 1.0},
        }
    )
    done = api.wait_finished(exp["id"])

    # Assert: the run completed; per round, each node with data contributed exactly its CSV's
    # rows, and the node without data failed with the reason, not aggregated.
    assert done["status"] == "completed", f"{done}\n{api.stack.logs()}"
    assert done["workload"]["name"] == "csv-tabular"
    updates = api.client.get(f"/api/v1/experiments/{exp['id']}/updates").json()["data"]
    for server_round in (1, 2):
        these = [u for u in updates if u["server_round"] == server_round]
        accepted = sorted(u["num_examples"] for u in these if u["status"] == "accepted")
        failed = [u for u in these if u["status"] == "failed"]
        assert accepted == sorted(SIZES), these
        assert len(failed) == 1 and "data-path" in failed[0]["reason"], these
    rounds = api.client.get(f"/api/v1/experiments/{exp['id']}/rounds").json()["data"]
    assert [r["server_round"] for r in rounds] == [1, 2]
    assert all(0.0 <= r["evaluate_metrics"]["eval-accuracy"] <= 1.0 for r in rounds)


def test_builtin_workload_on_the_same_nodes_uses_their_partitions(api: Api) -> None:
    # The same SuperNodes also carry partition ids: a built-in workload slices digits by them,
    # the data-path notwithstanding, so all three take part.
    exp = api.submit(
        {
            "name": "e2e-digits-workload",
            "strategy": {"name": "fedavg", "config": {}},
            "workload": {"name": "digits", "config": {"partitioner": {"name": "iid"}}},
            "training": {"local_steps": 2},
            "rounds": 1,
            "clients": {"min": 3},
        }
    )
    done = api.wait_finished(exp["id"])
    assert done["status"] == "completed", f"{done}\n{api.stack.logs()}"
    updates = api.client.get(f"/api/v1/experiments/{exp['id']}/updates").json()["data"]
    assert sorted(u["status"] for u in updates) == ["accepted"] * 3
