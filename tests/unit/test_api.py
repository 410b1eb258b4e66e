"""The REST API on a real database (SQLite file and PostgreSQL), without a SuperLink."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from florist.server.api.app import create_app
from florist.server.settings import Settings

BODY: dict[str, Any] = {
    "name": "digits-fedavg",
    "strategy": {"name": "fedavg", "config": {}},
    "dataset": {"name": "digits", "partitioner": {"name": "dirichlet", "alpha": 0.5}, "seed": 0},
    "model": {"name": "mlp"},
    "rounds": 5,
    "clients": {"min": 3},
}


@pytest.fixture
def client(database_url: str, tmp_path: Path) -> Iterator[TestClient]:
    settings = Settings(home=tmp_path, database_url=database_url)
    with TestClient(create_app(settings, follow_runs=False)) as c:
        yield c


def with_(path: str, value: Any) -> dict[str, Any]:
    """BODY with one dotted path replaced."""
    import copy

    body = copy.deepcopy(BODY)
    *parents, last = path.split(".")
    node = body
    for p in parents:
        node = node[p]
    node[last] = value
    return body


def count(client: TestClient) -> int:
    return int(client.get("/api/v1/experiments").json()["count"])


def test_create_then_read_back(client: TestClient) -> None:
    response = client.post("/api/v1/experiments", json=BODY)
    assert response.status_code == 201, response.text
    exp = response.json()
    assert exp["status"] == "pending" and exp["num_rounds"] == 5
    assert exp["dataset"]["partitioner"] == {
        "name": "dirichlet",
        "alpha": 0.5,
        "min_partition_size": 10,
    }
    assert client.get(f"/api/v1/experiments/{exp['id']}").json()["name"] == "digits-fedavg"
    listing = client.get("/api/v1/experiments").json()
    assert listing["count"] == 1 and listing["data"][0]["id"] == exp["id"]
    assert client.get(f"/api/v1/experiments/{exp['id']}/rounds").json() == {"data": [], "count": 0}
    assert client.get(f"/api/v1/experiments/{exp['id']}/updates").json()["count"] == 0


@pytest.mark.parametrize(
    ("strategy", "asynchronous"), [("fedavg", False), ("fedasync", True), ("fedbuff", True)]
)
def test_asynchronous_strategies_are_marked(
    client: TestClient, strategy: str, asynchronous: bool
) -> None:
    body = BODY | {"strategy": {"name": strategy, "config": {}}}
    created = client.post("/api/v1/experiments", json=body).json()
    listed = client.get("/api/v1/experiments").json()["data"][0]
    assert created["asynchronous"] is listed["asynchronous"] is asynchronous
    assert created["accepted_updates"] == listed["accepted_updates"] == 0


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        (with_("strategy.name", "fedavgg"), ["body", "strategy", "name"]),
        (
            with_("strategy", {"name": "fedprox", "config": {"proximal_mu": -1}}),
            ["body", "strategy", "config", "proximal_mu"],
        ),
        (
            with_("strategy", {"name": "fedprox", "config": {"mu": 0.1}}),
            ["body", "strategy", "config", "mu"],
        ),
        (with_("dataset.name", "imagenet"), ["body", "dataset"]),
        (with_("dataset.partitioner.alpha", 0), ["body", "dataset", "digits", "partitioner"]),
        (
            with_("model", {"name": "cnn"}) | {"dataset": {"name": "synthetic"}},
            ["body", "model", "name"],
        ),
        (with_("rounds", 0), ["body", "rounds"]),
        (with_("clients.min", 0), ["body", "clients", "min"]),
        (with_("training", {"lr": -1}), ["body", "training", "lr"]),
        (BODY | {"surprise": 1}, ["body", "surprise"]),
        (
            BODY | {"strategy": {"name": "fedasync", "config": {}}, "runtime": "flower"},
            ["body", "runtime"],
        ),
        (
            BODY | {"strategy": {"name": "fedasync", "config": {}}, "dropout": {"quorum": 0.5}},
            ["body", "dropout"],
        ),
        (BODY | {"dropout": {"quorum": 1.5}}, ["body", "dropout", "quorum"]),
        (BODY | {"clock": "sundial"}, ["body", "clock"]),
    ],
)
def test_bad_body_is_422_naming_the_field_and_stores_nothing(
    client: TestClient, body: dict[str, Any], loc: list[str]
) -> None:
    response = client.post("/api/v1/experiments", json=body)
    assert response.status_code == 422, response.text
    locs = [err["loc"] for err in response.json()["detail"]]
    assert any(got[: len(loc)] == loc for got in locs), locs
    assert count(client) == 0


def test_unknown_experiment_is_404(client: TestClient) -> None:
    for path in ("", "/rounds", "/updates"):
        response = client.get(f"/api/v1/experiments/999{path}")
        assert response.status_code == 404
        assert response.json()["detail"] == "experiment 999 not found"
    assert client.post("/api/v1/experiments/999/cancel").status_code == 404


def test_cancel_pending_experiment(client: TestClient) -> None:
    exp = client.post("/api/v1/experiments", json=BODY).json()
    response = client.post(f"/api/v1/experiments/{exp['id']}/cancel")
    assert response.status_code == 200
    assert response.json()["status"] == "cancelled"
    assert response.json()["finished_at"] is not None
    again = client.post(f"/api/v1/experiments/{exp['id']}/cancel")
    assert again.status_code == 409


def test_strategies_with_config_schemas(client: TestClient) -> None:
    data = client.get("/api/v1/strategies").json()
    by_name = {s["name"]: s for s in data["data"]}
    assert {"fedavg", "fedprox", "fedadam", "krum"} <= set(by_name)
    prox = by_name["fedprox"]["config_schema"]
    assert prox["properties"]["proximal_mu"]["default"] == 0.01
    assert prox["additionalProperties"] is False
    assert data["errors"] == {}


def test_health_and_openapi(client: TestClient) -> None:
    health = client.get("/api/v1/healthz").json()
    assert health["database"] == "ok" and health["superlink"] == "not configured"
    paths = client.get("/openapi.json").json()["paths"]
    for path in (
        "/api/v1/experiments",
        "/api/v1/experiments/{experiment_id}/rounds",
        "/api/v1/experiments/{experiment_id}/cancel",
        "/api/v1/strategies",
    ):
        assert path in paths
