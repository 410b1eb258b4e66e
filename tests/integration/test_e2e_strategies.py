"""Each seed strategy through the REST API on real SuperNodes, for a few rounds."""

from __future__ import annotations

from typing import Any

import pytest

from .conftest import Api

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slow,
    pytest.mark.parametrize("database_url", ["sqlite"], indirect=True),
]

BASE: dict[str, Any] = {
    "dataset": {"name": "digits", "partitioner": {"name": "dirichlet", "alpha": 0.5}, "seed": 0},
    "model": {"name": "mlp"},
    "training": {"local_epochs": 1},
    "rounds": 2,
    "clients": {"min": 3},
}


@pytest.mark.parametrize(
    ("strategy", "round_key", "train_key"),
    [
        ({"name": "fedspeed", "config": {"rho": 0.1, "inv_lambda": 0.1}}, None, None),
        ({"name": "fal", "config": {"epsilon": 0.1, "pgd_steps": 3}}, "robust-accuracy", None),
        (
            {"name": "curriculum", "config": {"ordering": "curriculum", "pacing": "linear"}},
            None,
            "pacing-fraction",
        ),
        # Robust aggregation (docs/robustness.md): the clients' Polyak momentum, the server's
        # nearest-neighbour average over real SuperNodes.
        ({"name": "monna", "config": {"num_byzantine": 1}}, None, "monna-momentum-norm"),
    ],
    ids=["fedspeed", "fal", "curriculum", "monna"],
)
def test_strategy_runs_over_grpc(
    api: Api, strategy: dict[str, Any], round_key: str | None, train_key: str | None
) -> None:
    exp = api.submit(BASE | {"name": f"e2e-{strategy['name']}", "strategy": strategy})
    done = api.wait_finished(exp["id"])
    assert done["status"] == "completed", f"{done}\n{api.stack.logs()}"
    rounds = api.client.get(f"/api/v1/experiments/{exp['id']}/rounds").json()["data"]
    assert [r["server_round"] for r in rounds] == [1, 2]
    assert all(r["num_updates"] == 3 for r in rounds)
    if round_key:
        assert all(round_key in r["metrics"] for r in rounds)
    if train_key:
        assert all(train_key in r["train_metrics"] for r in rounds)
    updates = api.client.get(f"/api/v1/experiments/{exp['id']}/updates").json()
    assert updates["count"] == 6


def test_fedspeed_correction_lives_across_rounds_and_resets_per_experiment(api: Api) -> None:
    """ĝ_i stays on each SuperNode between rounds (Flower's per-run Context.state, carried by the
    warm executor) and starts again from zero in the next experiment."""
    strategy = {"name": "fedspeed", "config": {"rho": 0.1, "inv_lambda": 0.1}}
    for attempt in range(2):
        # Execute
        exp = api.submit(BASE | {"name": f"e2e-fedspeed-state-{attempt}", "strategy": strategy})
        done = api.wait_finished(exp["id"])
        assert done["status"] == "completed", f"{done}\n{api.stack.logs()}"

        # Assert: every node starts round 1 at ĝ = 0 and round 2 at the ĝ it ended round 1 with.
        updates = api.client.get(f"/api/v1/experiments/{exp['id']}/updates").json()["data"]
        by_round: dict[int, dict[str, dict[str, float]]] = {}
        for u in updates:
            by_round.setdefault(u["server_round"], {})[u["node_id"]] = u["metrics"]
        assert sorted(by_round) == [1, 2] and len(by_round[1]) == 3, updates
        assert all(m["fedspeed-ghat-norm-start"] == 0.0 for m in by_round[1].values())
        for node, metrics in by_round[2].items():
            end_of_round_1 = by_round[1][node]["fedspeed-ghat-norm"]
            assert end_of_round_1 > 0
            assert metrics["fedspeed-ghat-norm-start"] == pytest.approx(end_of_round_1, rel=1e-5)


@pytest.mark.parametrize(
    "strategy",
    [{"name": "fedprox", "config": {"proximal_mu": 0.1}}, {"name": "fedadam", "config": {}}],
    ids=["fedprox", "fedadam"],
)
def test_flowers_strategies_run_on_the_one_loop_deterministically(
    api: Api, strategy: dict[str, Any]
) -> None:
    """Flower's own strategies get the dropout policy and the virtual clock: 3 nodes dispatched
    for k = 2 (over-commitment), the first 2 in virtual time aggregated, the third dropped as
    late; twice, with the same outcome to the last bit."""
    body = BASE | {
        "strategy": strategy,
        "clock": "virtual",
        "clients": {"min": 2, "fraction_train": 0.5},
        "dropout": {"over_commit": 0.5, "late_updates": "drop"},
    }
    runs = []
    for attempt in range(2):
        exp = api.submit(body | {"name": f"e2e-{strategy['name']}-virtual-{attempt}"})
        done = api.wait_finished(exp["id"])
        assert done["status"] == "completed", f"{done}\n{api.stack.logs()}"
        rounds = api.client.get(f"/api/v1/experiments/{exp['id']}/rounds").json()["data"]
        updates = api.client.get(f"/api/v1/experiments/{exp['id']}/updates").json()["data"]
        runs.append((rounds, updates))
    for rounds, updates in runs:
        assert [r["server_round"] for r in rounds] == [1, 2]
        assert all(r["num_updates"] == 2 for r in rounds)
        late = [u for u in updates if (u["reason"] or "").startswith("late")]
        assert late and all(u["status"] == "rejected" for u in late)
    (first_rounds, first_updates), (second_rounds, second_updates) = runs

    def outcome(u: dict[str, Any]) -> tuple[Any, ...]:
        return (u["server_round"], u["node_id"], u["status"], u["model_version"])

    # In the order they were handled: virtual time, ties broken by node id.
    assert list(map(outcome, first_updates)) == list(map(outcome, second_updates))
    # The same global model each round: its centralized loss, to the last bit.
    assert [r["metrics"] for r in first_rounds] == [r["metrics"] for r in second_rounds]
