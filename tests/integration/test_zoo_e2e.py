"""FedZO and FZooS through the REST API on real SuperNodes: each node queries its own black-box
quadratic, every query is counted per update and summed per round, and FZooS's surrogate weights
travel and are averaged with the model."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load as load_safetensors

from .conftest import Api, FlowerStack, start_stack

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

NODES = 3
STEPS = 3
WORKLOAD = {
    "name": "quadratic",
    "config": {"dimension": 12, "num_clients": NODES, "surrogate_features": 64, "seed": 1},
}


@pytest.fixture(scope="module")
def flower_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FlowerStack]:
    """One stack for both strategies: three SuperNodes, partitions 0-2 of 3."""
    with start_stack(tmp_path_factory.mktemp("flower"), [{} for _ in range(NODES)]) as stack:
        yield stack


def _run(api: Api, strategy: dict[str, Any], rounds: int) -> tuple[list[Any], list[Any], int]:
    exp = api.submit(
        {
            "name": f"e2e-{strategy['name']}",
            "strategy": strategy,
            "workload": WORKLOAD,
            "training": {"local_steps": STEPS, "lr": 0.05},
            "rounds": rounds,
            "clients": {"min": NODES},
        }
    )
    done = api.wait_finished(exp["id"])
    assert done["status"] == "completed", f"{done}\n{api.stack.logs()}"
    rounds_ = api.client.get(f"/api/v1/experiments/{exp['id']}/rounds").json()["data"]
    updates = api.client.get(f"/api/v1/experiments/{exp['id']}/updates").json()["data"]
    return rounds_, updates, exp["id"]


def test_fedzo_counts_queries_and_lowers_the_objective(api: Api) -> None:
    rounds, updates, _ = _run(api, {"name": "fedzo", "config": {"q": 4}}, rounds=2)
    assert [r["server_round"] for r in rounds] == [1, 2]
    for r in rounds:
        these = [u for u in updates if u["server_round"] == r["server_round"]]
        assert sorted(u["status"] for u in these) == ["accepted"] * NODES
        # K steps of q + 1 queries on every node, summed over the round.
        assert all(u["metrics"]["zoo-queries"] == STEPS * 5 for u in these)
        assert r["train_metrics"]["zoo-queries"] == NODES * STEPS * 5
        assert np.isfinite(r["metrics"]["objective"])
    # Round 2's clients saw round 1's model: their mean start objective is round 1's F.
    assert rounds[1]["train_metrics"]["zoo-objective"] == pytest.approx(
        rounds[0]["metrics"]["objective"], rel=1e-9
    )
    assert rounds[1]["metrics"]["objective"] < rounds[0]["train_metrics"]["zoo-objective"]
    totals = sorted(u["metrics"]["zoo-queries-total"] for u in updates if u["server_round"] == 2)
    assert totals == [2 * STEPS * 5] * NODES  # each node's running count for the run


def test_fzoos_sends_its_surrogate_with_the_model_and_counts_queries(api: Api) -> None:
    config = {"init_queries": 4, "explore": 2}
    rounds, updates, experiment_id = _run(api, {"name": "fzoos", "config": config}, rounds=2)
    first = [u["metrics"]["zoo-queries"] for u in updates if u["server_round"] == 1]
    second = [u["metrics"]["zoo-queries"] for u in updates if u["server_round"] == 2]
    # Round 1: x_0, 4 initial points, (1 + 2) per later step, the final point; round 2 starts
    # from the node's history, without the initial points.
    assert first == [1 + 4 + (STEPS - 1) * 3 + 1] * NODES
    assert second == [1 + (STEPS - 1) * 3 + 1] * NODES
    assert [r["train_metrics"]["zoo-queries"] for r in rounds] == [sum(first), sum(second)]
    assert all(u["metrics"]["fzoos-history"] > 0 for u in updates)
    # From round 2 on, each node corrects its step by the averaged surrogate minus its own.
    assert all(u["metrics"]["fzoos-correction-norm"] > 0 for u in updates if u["server_round"] == 2)
    model = api.client.get(f"/api/v1/experiments/{experiment_id}/model")
    assert model.status_code == 200
    arrays = load_safetensors(model.content)
    assert arrays["x"].shape == (12,) and arrays["surrogate"].shape == (64,)
    assert np.abs(arrays["surrogate"]).sum() > 0
