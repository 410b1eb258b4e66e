"""End to end over gRPC: REST call → SuperLink → three SuperNodes → rounds in the database."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from safetensors.numpy import load as st_load
from sqlalchemy.engine import make_url

from florist.client.task import WorkloadRef
from florist.client.training import evaluate
from florist.server.control import ControlClient
from florist.server.spec import resolve_workload

from .conftest import NUM_NODES, Api, FlowerStack, serve_api, start_stack

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture(scope="module")
def flower_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FlowerStack]:
    """The shared stack, its processes told to log JSON: the ServerApps the SuperLink starts
    inherit the setting, and their lines land in the SuperLink's log."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("FLORIST_LOG_FORMAT", "json")
        stack = start_stack(tmp_path_factory.mktemp("flower"), [{} for _ in range(NUM_NODES)])
        running = stack.__enter__()
    try:
        yield running
    finally:
        stack.__exit__(None, None, None)


# Local training that reaches the accuracy bar: the defaults (2 local epochs of SGD, lr 0.05,
# momentum 0.9, batch 32) on an MLP with one hidden layer of 64 units.
FEDAVG: dict[str, Any] = {
    "name": "e2e-digits-fedavg",
    "strategy": {"name": "fedavg", "config": {}},
    "dataset": {"name": "digits", "partitioner": {"name": "dirichlet", "alpha": 0.5}, "seed": 0},
    "model": {"name": "mlp"},
    "training": {"local_epochs": 2, "lr": 0.05, "momentum": 0.9, "batch_size": 32},
    "rounds": 5,
    "clients": {"min": 3},
}


def experiment_series(api: Api, experiment_id: int) -> dict[str, float]:
    """The experiment's samples in the API's /metrics, by name (and status, for updates)."""
    text = api.client.get("/metrics").text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.labels.get("experiment_id") == str(experiment_id) and "metric" not in s.labels:
                out[s.name + (f":{s.labels['status']}" if "status" in s.labels else "")] = s.value
    return out


def test_fedavg_digits_five_rounds(api: Api) -> None:
    exp = api.submit(FEDAVG)
    api.wait(exp["id"], lambda e: e["current_round"] >= 1)
    early = experiment_series(api, exp["id"])
    done = api.wait_finished(exp["id"])
    assert done["status"] == "completed", f"{done}\n{api.stack.logs()}"

    # /metrics, scraped while the run went on and after it: the experiment's series moved, and
    # the ServerApp's costs (aggregation time, traffic) came through the rounds it recorded.
    late = experiment_series(api, exp["id"])
    assert 1 <= early["florist_experiment_rounds_done"] < late["florist_experiment_rounds_done"]
    assert late["florist_experiment_rounds_done"] == 5
    assert early["florist_experiment_updates_total:accepted"] < 15
    assert late["florist_experiment_updates_total:accepted"] == 15
    assert late["florist_experiment_updates_total:failed"] == 0
    assert late["florist_experiment_round_duration_seconds_count"] == 5
    assert late["florist_experiment_aggregate_seconds_count"] == 5
    assert late["florist_experiment_aggregate_seconds_sum"] > 0
    assert late["florist_experiment_received_bytes_total"] > 0
    # Every task took the model out and brought an update of the same arrays back.
    assert (
        late["florist_experiment_sent_bytes_total"]
        == late["florist_experiment_received_bytes_total"]
    )
    assert late["florist_experiment_connected_nodes"] == 3

    # The ServerApp logged JSON lines naming the experiment and its Flower run. Flower keeps
    # a ServerApp's output off every console and hands it to the SuperLink (`flwr log`).
    control = ControlClient(api.stack.control)
    text = control.run_log(int(done["flwr_run_id"]))
    control.close()
    lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    recorded = [
        line
        for line in lines
        if line["experiment_id"] == exp["id"] and line["message"].startswith("round ")
    ]
    assert len(recorded) == 5, text[-3000:]
    assert {line["flwr_run_id"] for line in recorded} == {int(done["flwr_run_id"])}

    rounds = api.client.get(f"/api/v1/experiments/{exp['id']}/rounds").json()
    assert rounds["count"] == 5
    assert [r["server_round"] for r in rounds["data"]] == [1, 2, 3, 4, 5]
    assert all(r["num_updates"] == 3 for r in rounds["data"])
    assert rounds["data"][-1]["metrics"]["accuracy"] >= 0.80

    updates = api.client.get(f"/api/v1/experiments/{exp['id']}/updates").json()
    assert updates["count"] == 15
    assert {u["status"] for u in updates["data"]} == {"accepted"}
    assert len({u["node_id"] for u in updates["data"]}) == 3
    assert all(u["num_examples"] > 0 and u["bytes_up"] > 0 for u in updates["data"])
    assert done["current_round"] == 5 and done["best_accuracy"] >= 0.80
    assert done["flwr_run_id"] is not None and done["finished_at"] is not None

    # Each SuperNode's --node-config came back with its replies and is kept with the node.
    nodes = api.client.get("/api/v1/nodes").json()["data"]
    trained = {u["node_id"] for u in updates["data"]}
    configs = [n["node_config"] for n in nodes if n["node_id"] in trained]
    assert sorted(c["partition-id"] for c in configs) == [0, 1, 2], nodes
    assert all(c["num-partitions"] == 3 for c in configs), nodes

    # The final model downloads, and it is the model the last round evaluated: loaded into the
    # workload's model here, it scores the last round's recorded test accuracy.
    response = api.client.get(f"/api/v1/experiments/{exp['id']}/model")
    assert response.status_code == 200 and response.headers["x-florist-round"] == "5"
    workload, config = resolve_workload(WorkloadRef.model_validate(done["workload"]))
    model = workload.build_model(config)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in st_load(response.content).items()})
    test = workload.load_test(config)  # type: ignore[misc]
    result = evaluate(model, test)
    assert result.accuracy == pytest.approx(rounds["data"][-1]["metrics"]["accuracy"], abs=1e-9)


# The acceptance run goes on both backends; the other paths do not depend on the database.
sqlite_only = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


@sqlite_only
def test_cancel_a_running_experiment(api: Api) -> None:
    exp = api.submit(FEDAVG | {"name": "e2e-cancel", "rounds": 40})
    api.wait(exp["id"], lambda e: e["current_round"] >= 1)
    response = api.client.post(f"/api/v1/experiments/{exp['id']}/cancel")
    assert response.status_code == 200
    assert response.json()["status"] in ("cancelling", "cancelled")
    done = api.wait_finished(exp["id"], timeout=60)
    assert done["status"] == "cancelled"

    control = ControlClient(api.stack.control)
    state = control.run_state(int(done["flwr_run_id"]))
    control.close()
    assert state is not None and (state.status, state.sub_status) == ("finished", "stopped")
    # The rounds committed before the cancel are all still there.
    rounds = api.client.get(f"/api/v1/experiments/{exp['id']}/rounds").json()
    assert 1 <= rounds["count"] < 40
    assert [r["server_round"] for r in rounds["data"]] == list(range(1, rounds["count"] + 1))


@sqlite_only
def test_third_party_plugin_runs_without_touching_florist(api: Api) -> None:
    body = FEDAVG | {
        "name": "e2e-thirdparty",
        "strategy": {"name": "fedavg_marked", "config": {"marker": 2.5}},
        "rounds": 2,
    }
    exp = api.submit(body)
    done = api.wait_finished(exp["id"])
    assert done["status"] == "completed", f"{done}\n{api.stack.logs()}"
    updates = api.client.get(f"/api/v1/experiments/{exp['id']}/updates").json()["data"]
    assert len(updates) == 6
    assert all(u["metrics"]["marker"] == 2.5 for u in updates)


@sqlite_only
def test_cli_submit_follows_the_run_to_the_end(api: Api, tmp_path: Path) -> None:
    spec = tmp_path / "experiment.toml"
    spec.write_text(
        'name = "e2e-cli"\nrounds = 2\n[strategy]\nname = "fedprox"\n'
        "[strategy.config]\nproximal_mu = 0.01\n"
        '[dataset]\nname = "digits"\n[dataset.partitioner]\nname = "iid"\n'
        "[clients]\nmin = 3\n"
    )
    out = subprocess.run(
        [sys.executable, "-m", "florist.server.cli", "submit", str(spec), "--api", api.base],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "completed" in out.stdout
    # Off a terminal Rich draws the bar once, when it stops: every round done.
    assert re.search(r"rounds .*2/2", out.stdout), out.stdout
    listing = api.client.get("/api/v1/experiments").json()["data"]
    (exp,) = [e for e in listing if e["name"] == "e2e-cli"]
    assert exp["status"] == "completed" and exp["current_round"] == 2


SECRET = "florist-e2e-s3cret"


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
def test_the_database_password_appears_in_no_log_response_or_run_config(
    flower_stack: FlowerStack,
    migrated_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare: the API's database URL carries a password (PostgreSQL here trusts loopback, so
    # any password connects: the test is about where it travels, not about authentication).
    url = make_url(migrated_url).set(password=SECRET).render_as_string(hide_password=False)
    assert SECRET in url
    with serve_api(flower_stack, url, tmp_path, monkeypatch) as api:
        exp = api.submit(FEDAVG | {"name": "e2e-secret", "rounds": 2})
        done = api.wait_finished(exp["id"])
        eid = exp["id"]
        texts = [
            api.client.get(path, params={"limit": 500}).text
            for path in (
                "/api/v1/experiments",
                f"/api/v1/experiments/{eid}",
                f"/api/v1/experiments/{eid}/rounds",
                f"/api/v1/experiments/{eid}/updates",
                f"/api/v1/experiments/{eid}/log",
                "/api/v1/nodes",
                "/api/v1/healthz",
                "/metrics",
            )
        ]
        texts.append(api.client.get(f"/api/v1/experiments/{eid}/events").text)

    # Assert: the run completed (the ServerApp reached the database), and the password is in no
    # response, in no log file of the stack, and not in the Flower run's config.
    assert done["status"] == "completed", f"{done}\n{api.stack.logs()}"
    control = ControlClient(flower_stack.control)
    try:
        (run,) = [r for r in control.list_runs() if r.run_id == int(done["flwr_run_id"])]
        run_log = control.run_log(run.run_id)
    finally:
        control.close()
    assert SECRET not in json.dumps(run.override_config)
    assert "database-url" in run.override_config  # the run still names its database
    for text in [*texts, str(run_log)]:
        assert SECRET not in text
    for log_file in flower_stack.home.rglob("*.log"):
        assert SECRET not in log_file.read_text(errors="replace"), log_file
