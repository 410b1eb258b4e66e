"""FAL through the REST API: an explicit clip range that cuts off the dataset's inputs is a 422."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from florist.server.api.app import create_app
from florist.server.settings import Settings


@pytest.fixture
def client(database_url: str, tmp_path: Path) -> Iterator[TestClient]:
    settings = Settings(home=tmp_path, database_url=database_url)
    with TestClient(create_app(settings, follow_runs=False)) as c:
        yield c


def body(dataset: str, config: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": f"fal-{dataset}",
        "strategy": {"name": "fal", "config": config},
        "dataset": {"name": dataset},
        "model": {"name": "logreg"},
        "rounds": 2,
        "clients": {"min": 2},
    }


def count(client: TestClient) -> int:
    return int(client.get("/api/v1/experiments").json()["count"])


@pytest.mark.parametrize(
    ("dataset", "config", "field"),
    [
        # synthetic's Gaussian features go far below 0 and above 1.
        ("synthetic", {"clip_min": 0.0, "clip_max": 1.0}, "clip_min"),
        ("synthetic", {"clip_max": 1.0}, "clip_max"),
        # digits' pixels fill [0, 1]: a narrower box cuts them off.
        ("digits", {"clip_max": 0.5}, "clip_max"),
        ("digits", {"clip_min": 0.1, "clip_max": 1.0}, "clip_min"),
    ],
)
def test_clip_range_the_data_violates_is_422_naming_the_field_and_stores_nothing(
    client: TestClient, dataset: str, config: dict[str, Any], field: str
) -> None:
    response = client.post("/api/v1/experiments", json=body(dataset, config))
    assert response.status_code == 422, response.text
    (error,) = [e for e in response.json()["detail"] if e["loc"][-1] == field]
    assert error["loc"] == ["body", "strategy", "config", field]
    assert error["type"] == "clip_range_excludes_data" and dataset in error["msg"]
    assert count(client) == 0


@pytest.mark.parametrize(
    ("dataset", "config"),
    [
        ("synthetic", {}),  # the dataset's range: none, so only the ε-ball
        ("digits", {}),
        ("digits", {"clip_min": 0.0, "clip_max": 1.0}),
        ("digits", {"clip_min": -1.0, "clip_max": 2.0}),  # wider than the data: harmless
        ("synthetic", {"clip_min": -100.0, "clip_max": 100.0}),
    ],
)
def test_clip_range_that_holds_every_input_is_accepted(
    client: TestClient, dataset: str, config: dict[str, Any]
) -> None:
    response = client.post("/api/v1/experiments", json=body(dataset, config))
    assert response.status_code == 201, response.text
    assert response.json()["strategy"]["config"] == config
    assert count(client) == 1
