"""Model artefacts: the retention policy, a run's kept models, and downloading them."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from flwr.supercore.task_identity import TaskIdentity
from safetensors.numpy import load as st_load
from typer.testing import CliRunner

from florist.server import cli
from florist.server.api.app import create_app
from florist.server.recording import SqlRunRecorder
from florist.server.recording.artifacts import CheckpointPolicy, rounds_to_drop
from florist.server.runtime.localgrid import LocalGrid, run_local
from florist.server.serverapp import run_experiment
from florist.server.settings import Settings
from florist.server.spec import ExperimentSpec

BODY: dict[str, Any] = {
    "name": "checkpoints",
    "strategy": {"name": "fedavg", "config": {}},
    "workload": {"name": "digits", "config": {"partitioner": {"name": "iid"}}},
    "rounds": 5,
    "clients": {"min": 2},
    "training": {"local_steps": 2},
}


def kept_after(rounds: int, policy: CheckpointPolicy) -> list[int]:
    kept: list[int] = []
    for r in range(1, rounds + 1):
        drop = rounds_to_drop(kept, r, policy)
        kept = sorted({*kept, r} - set(drop))
    return kept


@pytest.mark.parametrize(
    ("every", "keep_last", "expected"),
    [
        (1, None, [1, 2, 3, 4, 5, 6, 7]),  # every round
        (1, 2, [6, 7]),  # the last two
        (3, None, [3, 6, 7]),  # every third, and the latest (final) besides
        (3, 1, [6, 7]),
        (2, 2, [4, 6, 7]),
        (7, 1, [7]),  # the latest is on the grid: kept once
    ],
)
def test_retention_keeps_the_grid_the_last_n_and_always_the_latest(
    every: int, keep_last: int | None, expected: list[int]
) -> None:
    assert kept_after(7, CheckpointPolicy(every=every, keep_last=keep_last)) == expected


def test_a_run_keeps_what_its_policy_says_and_the_latest_is_the_final_model() -> None:
    spec = ExperimentSpec.model_validate(BODY | {"checkpoints": {"every": 2, "keep_last": 1}})
    result, recorder = run_local(spec, 2)
    kept = recorder.checkpoints(1)
    assert sorted(kept) == [4, 5]
    assert result.final_arrays is not None
    final = st_load(kept[5])
    for key, array in result.final_arrays.items():
        np.testing.assert_array_equal(final[key], array.numpy())
    # Round 4's model is an earlier one, not a copy of the final.
    assert any(not np.array_equal(st_load(kept[4])[k], final[k]) for k in final)
    # The run's history in memory holds no model bytes.
    assert all(r.checkpoint is None for r in result.history)


@pytest.fixture
def client(migrated_url: str, tmp_path: Path) -> TestClient:
    settings = Settings(home=tmp_path, database_url=migrated_url)
    return TestClient(create_app(settings, follow_runs=False))


def run_stored(client: TestClient, migrated_url: str, **overrides: Any) -> tuple[int, Any]:
    """Submit through the API, then run it in-process on the same database."""
    exp = client.post("/api/v1/experiments", json=BODY | overrides).json()
    spec = ExperimentSpec.model_validate(BODY | overrides)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    recorder = SqlRunRecorder.from_url(migrated_url)
    result = run_experiment(
        LocalGrid(2), spec, recorder, experiment_id=exp["id"], flwr_run_id=7, poll_interval=0.0
    )
    return exp["id"], result


def test_the_final_model_downloads_as_safetensors_and_as_pt(
    client: TestClient, migrated_url: str, tmp_path: Path
) -> None:
    # Prepare
    with client:
        experiment_id, result = run_stored(client, migrated_url, checkpoints={"keep_last": 2})

        # Execute
        latest = client.get(f"/api/v1/experiments/{experiment_id}/model")
        as_pt = client.get(f"/api/v1/experiments/{experiment_id}/model?format=pt")
        round_4 = client.get(f"/api/v1/experiments/{experiment_id}/model?round=4")
        gone = client.get(f"/api/v1/experiments/{experiment_id}/model?round=2")
        listing = client.get(f"/api/v1/experiments/{experiment_id}/checkpoints").json()
        missing = client.get("/api/v1/experiments/999/model")

    # Assert: the latest is round 5's model, the final weights, byte for byte in both formats.
    assert latest.status_code == 200 and latest.headers["x-florist-round"] == "5"
    final = {k: v.numpy() for k, v in result.final_arrays.items()}
    downloaded = st_load(latest.content)
    state = torch.load(io.BytesIO(as_pt.content), weights_only=True)
    for key, array in final.items():
        np.testing.assert_array_equal(downloaded[key], array)
        np.testing.assert_array_equal(state[key].numpy(), array)
    assert round_4.status_code == 200 and round_4.headers["x-florist-round"] == "4"
    assert gone.status_code == 404 and "kept rounds: [4, 5]" in gone.json()["detail"]
    assert [c["server_round"] for c in listing["data"]] == [4, 5]
    assert listing["data"][1]["num_bytes"] == len(latest.content)
    assert missing.status_code == 404


def test_an_experiment_without_rounds_has_no_model_yet(client: TestClient) -> None:
    with client:
        exp = client.post("/api/v1/experiments", json=BODY).json()
        response = client.get(f"/api/v1/experiments/{exp['id']}/model")
        bad = client.get(f"/api/v1/experiments/{exp['id']}/model?format=onnx")
    assert response.status_code == 404 and "no model yet" in response.json()["detail"]
    assert bad.status_code == 422


def test_bad_retention_is_422_naming_the_field(client: TestClient) -> None:
    with client:
        response = client.post("/api/v1/experiments", json=BODY | {"checkpoints": {"every": 0}})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "checkpoints", "every"]


def test_florist_export_writes_the_model(
    client: TestClient, migrated_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with client:
        experiment_id, result = run_stored(client, migrated_url)
        # The CLI's HTTP client goes through the in-process app.
        monkeypatch.setattr(cli.httpx, "Client", lambda base_url, timeout: client)
        out = tmp_path / "model.safetensors"
        run = CliRunner().invoke(cli.app, ["export", str(experiment_id), "-o", str(out)])
    assert run.exit_code == 0, run.output
    saved = st_load(out.read_bytes())
    for key, array in result.final_arrays.items():
        np.testing.assert_array_equal(saved[key], array.numpy())
