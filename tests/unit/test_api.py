"""The REST API on a real database (SQLite file and PostgreSQL), without a SuperLink."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from flwr.proto.node_pb2 import NodeInfo

from florist.server.api.app import create_app
from florist.server.api.routes.nodes import merge_nodes
from florist.server.control import ControlClient, SuperLinkNode, SuperLinkUnavailable
from florist.server.db import repository
from florist.server.db.models import Node, utcnow
from florist.server.db.status import ExperimentStatus
from florist.server.settings import Settings

BODY: dict[str, Any] = {
    "name": "digits-fedavg",
    "strategy": {"name": "fedavg", "config": {}},
    "dataset": {"name": "digits", "partitioner": {"name": "dirichlet", "alpha": 0.5}, "seed": 0},
    "model": {"name": "mlp"},
    "rounds": 5,
    "clients": {"min": 3},
}
# The same experiment as a workload body.
WORKLOAD_BODY: dict[str, Any] = {k: v for k, v in BODY.items() if k not in ("dataset", "model")} | {
    "workload": {
        "name": "digits",
        "config": {"partitioner": {"name": "dirichlet", "alpha": 0.5}, "model": {"name": "mlp"}},
    }
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


def test_workload_body_and_older_dataset_body_store_the_same_experiment(
    client: TestClient,
) -> None:
    older = client.post("/api/v1/experiments", json=BODY).json()
    newer = client.post("/api/v1/experiments", json=WORKLOAD_BODY).json()
    assert newer["workload"] == older["workload"]
    listing = client.get("/api/v1/workloads").json()
    names = {w["name"] for w in listing["data"]}
    assert {"digits", "synthetic"} <= names
    digits = next(w for w in listing["data"] if w["name"] == "digits")
    assert "partitioner" in digits["config_schema"]["properties"]


def count(client: TestClient) -> int:
    return int(client.get("/api/v1/experiments").json()["count"])


def test_create_then_read_back(client: TestClient) -> None:
    response = client.post("/api/v1/experiments", json=BODY)
    assert response.status_code == 201, response.text
    exp = response.json()
    assert exp["status"] == "pending" and exp["num_rounds"] == 5
    # The older dataset + model body is stored as the built-in workload of that name.
    assert exp["workload"]["name"] == "digits"
    assert exp["workload"]["config"]["model"] == {"name": "mlp", "hidden": [64], "dropout": 0.0}
    assert exp["workload"]["config"]["partitioner"] == {
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
            with_("dataset.validation_fraction", 1.0),
            ["body", "dataset", "digits", "validation_fraction"],
        ),
        (
            with_("model", {"name": "cnn"}) | {"dataset": {"name": "synthetic"}},
            ["body", "workload", "config", "model"],
        ),
        (WORKLOAD_BODY | {"workload": {"name": "imagenet"}}, ["body", "workload", "name"]),
        (
            WORKLOAD_BODY
            | {
                "workload": {
                    "name": "digits",
                    "config": {"partitioner": {"name": "dirichlet", "alpha": 0}},
                }
            },
            ["body", "workload", "config", "partitioner", "dirichlet", "alpha"],
        ),
        (
            WORKLOAD_BODY | {"workload": {"name": "digits", "config": {"model": {"name": "vit"}}}},
            ["body", "workload", "config", "model"],
        ),
        (
            WORKLOAD_BODY | {"workload": {"name": "digits", "config": {"colour": "red"}}},
            ["body", "workload", "config", "colour"],
        ),
        (WORKLOAD_BODY | {"dataset": {"name": "digits"}}, ["body"]),
        ({k: v for k, v in BODY.items() if k not in ("dataset", "model")}, ["body"]),
        (with_("rounds", 0), ["body", "rounds"]),
        (with_("clients.min", 0), ["body", "clients", "min"]),
        (with_("training", {"lr": -1}), ["body", "training", "lr"]),
        (BODY | {"surprise": 1}, ["body", "surprise"]),
        (BODY | {"runtime": "elsewhere"}, ["body", "runtime"]),
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


def test_resume_reopens_a_failed_experiment_only(client: TestClient) -> None:
    # Prepare: a failed experiment and a pending one.
    failed = client.post("/api/v1/experiments", json=BODY).json()
    pending = client.post("/api/v1/experiments", json=BODY).json()
    app = cast(FastAPI, client.app)
    with app.state.sessions.begin() as session:
        repository.update_experiment(
            session,
            experiment_id=failed["id"],
            status="failed",
            finished_at=utcnow(),
            error="run lost",
        )

    # Execute
    resumed = client.post(f"/api/v1/experiments/{failed['id']}/resume")
    again = client.post(f"/api/v1/experiments/{failed['id']}/resume")
    not_failed = client.post(f"/api/v1/experiments/{pending['id']}/resume")
    missing = client.post("/api/v1/experiments/999/resume")

    # Assert: pending again, error and end cleared, counted, recorded; anything else refused.
    assert resumed.status_code == 200, resumed.text
    body = resumed.json()
    assert (body["status"], body["error"], body["finished_at"]) == ("pending", None, None)
    assert body["resumes"] == 1
    assert again.status_code == 409 and "only a failed experiment" in again.json()["detail"]
    assert not_failed.status_code == 409
    assert missing.status_code == 404
    events = client.get(f"/api/v1/experiments/{failed['id']}/log").json()["data"]
    resume = [e for e in events if e["kind"] == "resume"]
    assert len(resume) == 1 and resume[0]["data"] == {"previous_error": "run lost"}


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


def test_log_lists_events_by_id_filtered_by_kind_and_after(client: TestClient) -> None:
    # Prepare: two experiments' events, one a policy decision on a node id above 2**63.
    first = client.post("/api/v1/experiments", json=BODY).json()["id"]
    other = client.post("/api/v1/experiments", json=BODY).json()["id"]
    big = 2**64 - 59
    sessions = cast(FastAPI, client.app).state.sessions
    with sessions() as session, session.begin():
        for kind, data in (
            ("dispatch", {"server_round": 1, "node_ids": ["11", str(big)], "model_version": 0}),
            ("policy", {"node_id": big, "action": "re-sent", "reason": "TTL", "lost": [big]}),
            ("dispatch", {"server_round": 2, "node_ids": ["11"], "model_version": 1}),
        ):
            repository.add_event(session, experiment_id=first, kind=kind, message=kind, data=data)
        repository.add_event(session, experiment_id=other, kind="dispatch", message="elsewhere")
    path = f"/api/v1/experiments/{first}/log"

    # Execute
    everything = client.get(path).json()
    dispatches = client.get(path, params={"kind": "dispatch"}).json()
    both = client.get(path, params=[("kind", "dispatch"), ("kind", "policy")]).json()
    ids = [e["id"] for e in everything["data"]]
    later = client.get(path, params={"after": ids[0]}).json()

    # Assert: in id order, this experiment's only; node ids as strings, all digits kept.
    kinds = [e["kind"] for e in everything["data"]]
    assert kinds == ["dispatch", "policy", "dispatch"] and everything["count"] == 3
    assert ids == sorted(ids)
    policy = everything["data"][1]
    assert policy["data"] == {
        "node_id": str(big),
        "action": "re-sent",
        "reason": "TTL",
        "lost": [str(big)],
    }
    assert policy["created_at"] is not None and policy["message"] == "policy"
    assert dispatches["count"] == 2
    assert [e["data"]["server_round"] for e in dispatches["data"]] == [1, 2]
    assert both["count"] == 3
    assert [e["id"] for e in later["data"]] == ids[1:]
    assert client.get(path, params={"kind": "nope"}).json() == {"data": [], "count": 0}


def test_log_of_unknown_experiment_is_404_and_documented(client: TestClient) -> None:
    response = client.get("/api/v1/experiments/999/log")
    assert response.status_code == 404
    assert response.json()["detail"] == "experiment 999 not found"
    assert client.get("/api/v1/experiments/999/log", params={"after": -1}).status_code == 422
    operation = client.get("/openapi.json").json()["paths"][
        "/api/v1/experiments/{experiment_id}/log"
    ]
    assert operation["get"]["summary"] and "dispatch" in operation["get"]["description"]


# ---------------------------------------------------------------- GET /nodes and the SuperLink

T0 = datetime(2025, 1, 10, 10, 0, tzinfo=UTC)


def superlink_node(node_id: int, status: str, **times: datetime | None) -> SuperLinkNode:
    fields: dict[str, Any] = {
        "registered_at": T0,
        "last_activated_at": T0 + timedelta(seconds=1),
        "last_deactivated_at": None,
        "unregistered_at": None,
        "online_until": T0 + timedelta(seconds=31),
    }
    fields.update(times)
    return SuperLinkNode(node_id=node_id, status=status, heartbeat_interval_s=30.0, **fields)


def recorded_node(node_id: int, last_seen: datetime, config: dict[str, Any] | None = None) -> Node:
    return Node(node_id=node_id, node_config=config or {}, first_seen=T0, last_seen=last_seen)


def test_merge_puts_the_superlink_status_on_florists_records() -> None:
    # Prepare: three nodes Florist recorded (one online, one that left, one the SuperLink
    # forgot), two only the SuperLink knows, and one that joined and left without a round.
    now = T0 + timedelta(minutes=10)
    recorded = [
        recorded_node(1, now - timedelta(seconds=5), {"profile": "phone"}),
        recorded_node(2, now - timedelta(minutes=9)),
        recorded_node(3, now - timedelta(minutes=8)),
    ]
    left_at = T0 + timedelta(minutes=1)
    listed = [
        superlink_node(2, "unregistered", last_deactivated_at=left_at, unregistered_at=left_at),
        superlink_node(1, "online"),
        superlink_node(2**64 - 1, "online", registered_at=T0 + timedelta(minutes=2)),
        superlink_node(5, "offline", last_deactivated_at=T0 + timedelta(minutes=3)),
        superlink_node(6, "unregistered", unregistered_at=left_at),
    ]

    # Execute
    rows = merge_nodes(recorded, listed, now=now, stale_after_s=120)

    # Assert: connected first, the forgotten one before the one that left; 6 is left out.
    by_id = {row.node_id: row for row in rows}
    assert [row.node_id for row in rows] == ["1", "18446744073709551615", "5", "3", "2"]
    assert [row.status for row in rows] == ["online", "online", "offline", None, "unregistered"]
    assert by_id["1"].node_config == {"profile": "phone"} and not by_id["1"].stale
    assert by_id["1"].connected_at == T0 + timedelta(seconds=1)
    assert by_id["2"].stale and by_id["2"].disconnected_at == left_at
    assert by_id["3"].stale and by_id["3"].registered_at is None
    # Known only to the SuperLink: never in a round, so not stale, and nothing recorded.
    only_live = by_id["18446744073709551615"]
    assert only_live.first_seen is None and only_live.last_seen is None
    assert only_live.seconds_since_seen is None and not only_live.stale
    assert only_live.node_config == {}
    assert by_id["5"].disconnected_at == T0 + timedelta(minutes=3)


def test_merge_without_the_superlink_keeps_florists_records() -> None:
    now = T0 + timedelta(minutes=10)
    rows = merge_nodes(
        [recorded_node(7, now), recorded_node(8, T0)], None, now=now, stale_after_s=60
    )
    assert [(r.node_id, r.status, r.stale) for r in rows] == [("7", None, False), ("8", None, True)]


def test_superlink_node_from_flowers_node_info() -> None:
    info = NodeInfo(
        node_id=2**64 - 5,
        status="offline",
        registered_at="2025-01-10T10:00:00+00:00",
        last_activated_at="2025-01-10T10:00:01.5+00:00",
        last_deactivated_at="2025-01-10T10:05:00+00:00",
        online_until=T0.timestamp() + 60,
        heartbeat_interval=30,
    )
    node = SuperLinkNode.from_proto(info)
    assert node.node_id == 2**64 - 5 and node.status == "offline" and not node.online
    assert node.registered_at == T0
    assert node.last_activated_at == T0 + timedelta(seconds=1.5)
    assert node.last_deactivated_at == T0 + timedelta(minutes=5)
    assert node.unregistered_at is None
    assert node.online_until == T0 + timedelta(seconds=60)
    assert SuperLinkNode.from_proto(NodeInfo(node_id=1, status="registered")).online_until is None


class NodesControl:
    """Plays the SuperLink's Control API for GET /nodes: its node list, or unreachable."""

    def __init__(self, nodes: list[SuperLinkNode]) -> None:
        self.nodes = nodes
        self.up = True

    def list_nodes(self) -> list[SuperLinkNode]:
        if not self.up:
            raise SuperLinkUnavailable("SuperLink at 127.0.0.1:1: connection refused")
        return list(self.nodes)

    def run_state(self, run_id: int) -> None:
        return None

    def list_runs(self) -> list[Any]:
        return []

    def close(self) -> None:
        pass


def test_nodes_lists_connected_supernodes_from_the_superlink(
    database_url: str, tmp_path: Path
) -> None:
    # Prepare: Florist saw node 11 in a round; the SuperLink has 11 and 12 online.
    control = NodesControl([superlink_node(11, "online"), superlink_node(12, "online")])
    settings = Settings(home=tmp_path, database_url=database_url)
    app = create_app(settings, control_factory=lambda: cast(ControlClient, control))
    with TestClient(app) as client:
        with app.state.sessions() as session, session.begin():
            repository.touch_nodes(session, node_ids=[11], seen_at=utcnow())

        # Execute
        live = client.get("/api/v1/nodes").json()
        control.up = False
        down = client.get("/api/v1/nodes").json()

    # Assert
    assert live["superlink"] == "ok" and live["count"] == 2
    assert [(n["node_id"], n["status"]) for n in live["data"]] == [
        ("11", "online"),
        ("12", "online"),
    ]
    assert live["data"][0]["last_seen"] is not None and live["data"][1]["last_seen"] is None
    assert down["superlink"].startswith("unreachable: ") and down["count"] == 1
    assert down["data"][0]["node_id"] == "11" and down["data"][0]["status"] is None


def test_nodes_without_a_superlink_say_so(client: TestClient) -> None:
    nodes = client.get("/api/v1/nodes").json()
    assert nodes == {"data": [], "count": 0, "stale_after_s": 120.0, "superlink": "not configured"}


def test_statuses_are_an_enum_in_the_schema_and_a_filter(client: TestClient) -> None:
    # Prepare: one pending experiment, one failed.
    pending = client.post("/api/v1/experiments", json=BODY).json()
    failed = client.post("/api/v1/experiments", json=BODY).json()
    app = cast(FastAPI, client.app)
    with app.state.sessions.begin() as session:
        repository.update_experiment(
            session, experiment_id=failed["id"], status="failed", finished_at=utcnow()
        )

    # Execute
    only_failed = client.get("/api/v1/experiments", params={"status": "failed"}).json()
    both = client.get("/api/v1/experiments", params=[("status", "failed"), ("status", "pending")])
    bad = client.get("/api/v1/experiments", params={"status": "done"})
    schema = client.get("/openapi.json").json()

    # Assert
    assert [e["id"] for e in only_failed["data"]] == [failed["id"]] and only_failed["count"] == 1
    assert {e["id"] for e in both.json()["data"]} == {pending["id"], failed["id"]}
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["query", "status", 0]
    enum = schema["components"]["schemas"]["ExperimentStatus"]["enum"]
    assert enum == [s.value for s in ExperimentStatus]
    status_field = schema["components"]["schemas"]["ExperimentPublic"]["properties"]["status"]
    assert status_field == {"$ref": "#/components/schemas/ExperimentStatus"}
    # A cancel of an ended experiment is a conflict, and changes nothing.
    refused = client.post(f"/api/v1/experiments/{failed['id']}/cancel")
    assert refused.status_code == 409 and "already failed" in refused.json()["detail"]
    assert client.get(f"/api/v1/experiments/{failed['id']}").json()["status"] == "failed"


@pytest.mark.parametrize(
    "path",
    [
        "/api/v1/experiments/99999999999999999999999",
        "/api/v1/experiments/3000000000/rounds",
        "/api/v1/experiments/-5",
        "/api/v1/experiments/1/updates?server_round=99999999999999999999",
        "/api/v1/experiments/1/log?after=99999999999999999999",
        "/api/v1/experiments?offset=99999999999999999999999",
        "/api/v1/experiments/3000000000/events",
    ],
)
def test_a_number_no_row_can_have_is_a_422_not_a_500(client: TestClient, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 422, response.text
