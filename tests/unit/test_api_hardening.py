"""The API's edge: strict types, values JSON cannot carry, bounds, model size, errors, pages."""

from __future__ import annotations

import copy
import json
import resource
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import pytest
from fastapi import Body, FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.testclient import TestClient

from florist.server.api.app import create_app
from florist.server.api.errors import validation_exception_handler
from florist.server.db import repository
from florist.server.db.models import utcnow
from florist.server.recording import SqlRunRecorder
from florist.server.settings import Settings
from tests.unit.test_api_events import make_round

BODY: dict[str, Any] = {
    "name": "digits-fedavg",
    "strategy": {"name": "fedavg", "config": {}},
    "workload": {"name": "digits", "config": {"model": {"name": "mlp"}, "seed": 0}},
    "rounds": 5,
    "clients": {"min": 3},
}
EXPERIMENTS = "/api/v1/experiments"


@pytest.fixture
def client(database_url: str, tmp_path: Path) -> Iterator[TestClient]:
    settings = Settings(home=tmp_path, database_url=database_url)
    with TestClient(create_app(settings, follow_runs=False)) as c:
        yield c


def with_(path: str, value: Any, body: dict[str, Any] | None = None) -> dict[str, Any]:
    """BODY (or ``body``) with one dotted path set."""
    out = copy.deepcopy(body or BODY)
    *parents, last = path.split(".")
    node = out
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    return out


def post_raw(client: TestClient, text: str) -> Any:
    return client.post(EXPERIMENTS, content=text, headers={"Content-Type": "application/json"})


def refused_at(response: Any, *loc: str | int) -> dict[str, Any]:
    """The error at ``loc`` of a 422, which must name it."""
    assert response.status_code == 422, response.text
    errors = response.json()["detail"]
    found = [e for e in errors if tuple(e["loc"]) == ("body", *loc)]
    assert found, errors
    return dict(found[0])


def stored(client: TestClient) -> int:
    return int(client.get(EXPERIMENTS).json()["count"])


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("rounds", "5"),
        ("rounds", True),
        ("rounds", 5.0),
        ("clients.min", "3"),
        ("training.local_epochs", True),
        ("workload.config.seed", "1"),
        ("clients.fraction_train", "1.0"),
    ],
)
def test_types_are_strict_never_coerced(client: TestClient, path: str, value: Any) -> None:
    response = client.post(EXPERIMENTS, json=with_(path, value))
    refused_at(response, *path.split("."))
    assert stored(client) == 0


def test_plugin_configs_are_strict_too(client: TestClient) -> None:
    fedprox = with_("strategy", {"name": "fedprox", "config": {"proximal_mu": "0.1"}})
    refused_at(client.post(EXPERIMENTS, json=fedprox), "strategy", "config", "proximal_mu")
    accepted = with_("strategy", {"name": "fedprox", "config": {"proximal_mu": 0.1}})
    assert client.post(EXPERIMENTS, json=accepted).status_code == 201


@pytest.mark.parametrize(
    ("text", "loc"),
    [
        ('"time_budget_s": NaN', ("time_budget_s",)),
        ('"time_budget_s": Infinity', ("time_budget_s",)),
        ('"round_timeout_s": -Infinity', ("round_timeout_s",)),
        ('"training": {"lr": NaN}', ("training", "lr")),
        ('"name": "a\\ud800b"', ("name",)),
        ('"name": "a\\u0000b"', ("name",)),
        ('"strategy": {"name": "fedavg", "config": {"x\\u0000": 1}}', ("strategy", "config")),
        ('"strategy": {"name": "fedavg", "config": {"x": [1, NaN]}}', ("strategy", "config")),
    ],
)
def test_what_json_cannot_carry_is_a_422_naming_the_field(
    client: TestClient, text: str, loc: tuple[str, ...]
) -> None:
    fields = {k: v for k, v in BODY.items() if k not in ("name", "strategy")}
    body = json.dumps(fields)[:-1] + ", " + text
    if '"name"' not in text:
        body += ', "name": "n"'
    if '"strategy"' not in text:
        body += ', "strategy": {"name": "fedavg"}'
    response = post_raw(client, body + "}")

    assert response.status_code == 422, response.text
    assert any(tuple(e["loc"][1 : 1 + len(loc)]) == loc for e in response.json()["detail"])
    assert stored(client) == 0


def test_the_422_handler_echoes_what_json_cannot_carry() -> None:
    # A NaN or a lone surrogate that reaches FastAPI's own validation is echoed in the error
    # as its input: FastAPI's default handler then fails to encode it (a 500).
    app = FastAPI()
    app.add_exception_handler(RequestValidationError, validation_exception_handler)

    @app.post("/positive")
    def positive(x: Annotated[float, Body(gt=0)]) -> float:
        return x

    @app.post("/short")
    def short(x: Annotated[str, Body(max_length=1)]) -> str:
        return x

    with TestClient(app) as c:
        nan = c.post("/positive", content="NaN", headers={"Content-Type": "application/json"})
        lone = c.post(
            "/short", content='"\\ud800\\ud800"', headers={"Content-Type": "application/json"}
        )

    assert nan.status_code == 422 and nan.json()["detail"][0]["input"] == "NaN"
    assert lone.status_code == 422 and lone.json()["detail"][0]["input"] == "\\ud800\\ud800"


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("strategy.config.server_learning_rate", 2**64),
        ("workload.config.seed", 2**32),
        ("seed", 2**32),
        ("workload.config.seed", -1),
    ],
)
def test_integers_beyond_what_is_stored_and_seeds_beyond_32_bits_are_refused(
    client: TestClient, path: str, value: int
) -> None:
    response = client.post(EXPERIMENTS, json=with_(path, value))
    assert response.status_code == 422, response.text
    assert any(
        e["loc"][1:] == path.split(".") or e["loc"][1:-1] == path.split(".")
        for e in response.json()["detail"]
    )


def test_the_largest_seed_is_accepted_and_loads_its_data(client: TestClient) -> None:
    from florist.client.workloads import default_workloads
    from florist.server.spec import ExperimentSpec

    body = with_("workload.config.seed", 2**32 - 1, with_("seed", 2**32 - 1))
    response = client.post(EXPERIMENTS, json=body)
    assert response.status_code == 201, response.text
    # What the run does at its start with these seeds: split and partition the data.
    spec = ExperimentSpec.model_validate(body)
    workload = default_workloads().get(spec.workload_ref.name)
    config = workload.parse_config(spec.workload_ref.config)
    assert workload.load_test is not None
    assert len(workload.load_test(config).y) > 0


def test_a_huge_model_is_refused_without_taking_its_memory(client: TestClient) -> None:
    body = with_("workload.config.model", {"name": "mlp", "hidden": [12000, 12000]})
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux

    response = client.post(EXPERIMENTS, json=body)

    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    error = refused_at(response, "workload", "config", "model")
    # 64·12000 + 12000·12000 + 12000·10 weights and their biases: 144.9M, ~580 MB as float32.
    assert "144,912,010 parameters" in error["msg"] and error["type"] == "model_too_large"
    assert grown_mib < 100
    assert stored(client) == 0


def test_the_model_size_cap_is_a_setting(database_url: str, tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, database_url=database_url, max_model_parameters=1000)
    with TestClient(create_app(settings, follow_runs=False)) as small:
        refused = small.post(EXPERIMENTS, json=BODY)
    assert (
        "more than this server takes (1,000"
        in refused_at(refused, "workload", "config", "model")["msg"]
    )


@pytest.mark.parametrize(
    "path",
    [
        "/api/v1/experiments?cursor=99999999999",
        "/api/v1/experiments/1/rounds?limit=0",
        "/api/v1/experiments/1/rounds?limit=10001",
        "/api/v1/experiments/1/updates?cursor=-1",
        "/api/v1/nodes?stale_after_s=inf",
        "/api/v1/nodes?cursor=99999999999",
    ],
)
def test_paging_parameters_are_bounded(client: TestClient, path: str) -> None:
    assert client.get(path).status_code == 422


def test_a_kind_with_a_nul_byte_is_refused(client: TestClient) -> None:
    created = client.post(EXPERIMENTS, json=BODY).json()
    response = client.get(f"{EXPERIMENTS}/{created['id']}/log", params={"kind": "a\x00"})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["query", "kind", 0]


def read_all(client: TestClient, path: str, limit: int) -> tuple[list[Any], list[dict[str, Any]]]:
    """Every row of a listing, page by page, and the pages."""
    pages: list[dict[str, Any]] = []
    params: dict[str, Any] = {"limit": limit}
    while True:
        page = client.get(path, params=params).json()
        pages.append(page)
        if "next_cursor" not in page:
            return [row for p in pages for row in p["data"]], pages
        params["cursor"] = page["next_cursor"]


def test_listings_page_with_cursors_and_the_first_page_is_what_it_was(
    client: TestClient,
) -> None:
    # Prepare: 5 experiments; the first with 3 rounds of 2 updates, and 7 log events.
    ids = [client.post(EXPERIMENTS, json=BODY).json()["id"] for _ in range(5)]
    recorder = SqlRunRecorder.from_url(client.app.state.settings.resolved_database_url())  # type: ignore[attr-defined]
    try:
        run_id = recorder.start_run(experiment_id=ids[0], flwr_run_id=5)
        for server_round in (1, 2, 3):
            recorder.record_round(run_id, make_round(server_round, 0.1))
    finally:
        recorder.close()
    with client.app.state.sessions() as session:  # type: ignore[attr-defined]
        for index in range(5):
            repository.add_event(session, experiment_id=ids[0], kind="x", message=str(index))
        session.commit()
    base = f"{EXPERIMENTS}/{ids[0]}"

    # Execute and Assert: page by 2 and read everything, each row once and in order.
    experiments, pages = read_all(client, EXPERIMENTS, 2)
    assert [e["id"] for e in experiments] == ids[::-1]
    assert [len(p["data"]) for p in pages] == [2, 2, 1] and {p["count"] for p in pages} == {5}
    rounds, pages = read_all(client, f"{base}/rounds", 2)
    assert [r["server_round"] for r in rounds] == [1, 2, 3] and pages[0]["count"] == 3
    updates, _ = read_all(client, f"{base}/updates", 4)
    assert [u["server_round"] for u in updates] == [1, 1, 2, 2, 3, 3]
    events, _ = read_all(client, f"{base}/log", 2)
    assert [e["message"] for e in events if e["kind"] == "x"] == ["0", "1", "2", "3", "4"]
    # One page (the defaults): exactly today's shape, everything in it.
    whole = client.get(f"{base}/rounds").json()
    assert set(whole) == {"data", "count"} and len(whole["data"]) == 3
    # A cursor names a row of its own listing only.
    first_page = client.get(f"{base}/rounds", params={"limit": 1}).json()
    foreign = client.get(
        f"{EXPERIMENTS}/{ids[1]}/rounds", params={"cursor": first_page["next_cursor"]}
    )
    assert foreign.status_code == 422 and foreign.json()["detail"][0]["loc"] == ["query", "cursor"]


def test_nodes_page_by_position(client: TestClient) -> None:
    with client.app.state.sessions() as session:  # type: ignore[attr-defined]
        repository.touch_nodes(session, node_ids=[11, 12, 13], seen_at=utcnow())
        session.commit()

    nodes, pages = read_all(client, "/api/v1/nodes", 2)

    assert [n["node_id"] for n in nodes] == ["11", "12", "13"]
    assert [len(p["data"]) for p in pages] == [2, 1]


def test_errors_are_documented_with_one_format(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    one = paths["/api/v1/experiments/{experiment_id}"]["get"]["responses"]
    cancel = paths["/api/v1/experiments/{experiment_id}/cancel"]["post"]["responses"]
    events = paths["/api/v1/experiments/{experiment_id}/events"]["get"]["responses"]
    error = {"$ref": "#/components/schemas/ErrorPublic"}
    assert one["404"]["content"]["application/json"]["schema"] == error
    assert cancel["409"]["content"]["application/json"]["schema"] == error
    assert events["503"]["content"]["application/json"]["schema"] == error
    assert "422" in one and "422" in events
    for path in ("/api/v1/experiments/{experiment_id}/rounds", "/api/v1/experiments"):
        assert "limit" in {p["name"] for p in paths[path]["get"]["parameters"]}


def test_a_wrong_method_names_every_method_of_the_path(client: TestClient) -> None:
    response = client.request("OPTIONS", EXPERIMENTS)
    assert response.status_code == 405
    assert response.headers["Allow"] == "GET, POST"
    assert response.json() == {"detail": "Method Not Allowed"}


@pytest.mark.parametrize("freeze", [False, True])
def test_a_serving_api_leaves_its_start_up_out_of_full_collections(
    freeze: bool, tmp_path: Path
) -> None:
    import gc

    gc.unfreeze()
    settings = Settings(home=tmp_path, database_url=f"sqlite:///{tmp_path / 'f.db'}")
    try:
        with TestClient(create_app(settings, follow_runs=False, freeze_heap=freeze)) as c:
            assert c.get("/api/v1/experiments").status_code == 200
            # Everything alive after start-up sits in the permanent generation, or nothing.
            assert (gc.get_freeze_count() > 10_000) is freeze
    finally:
        gc.unfreeze()
