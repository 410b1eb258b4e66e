"""Simulation mode without Ray: the body's validation through the API, the virtual clients'
profiles, what a run is submitted with, and the simulation SuperLink's command."""

from __future__ import annotations

import copy
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from florist.client.simulation import (
    RUN_CONFIG_KEY,
    ProfileMixError,
    decode_mix,
    encode_mix,
    profile_position,
    virtual_node_mod,
    virtual_profile,
)
from florist.server.api.app import create_app
from florist.server.db import repository
from florist.server.settings import Settings
from florist.server.simulation import (
    DEFAULT_PROFILE_MIX,
    simulation_submission,
    superlink_simulation_command,
)
from florist.server.simulation_link import end_runs, runtime_address, simulation_processes
from florist.server.spec import ExperimentSpec, server_setup

BODY: dict[str, Any] = {
    "name": "virtual-fedavg",
    "mode": "simulation",
    "strategy": {"name": "fedavg", "config": {}},
    "workload": {"name": "synthetic", "config": {"num_devices": 1000}},
    "rounds": 3,
    "clients": {"virtual": 1000, "per_round": 20},
}
DEPLOYMENT: dict[str, Any] = {k: v for k, v in BODY.items() if k != "mode"} | {
    "clients": {"min": 3}
}


@pytest.fixture
def client(database_url: str, tmp_path: Path) -> Iterator[TestClient]:
    settings = Settings(
        home=tmp_path,
        database_url=database_url,
        simulation_control="127.0.0.1:1",  # never called: the follower is off
        simulation_max_virtual_clients=10_000,
    )
    with TestClient(create_app(settings, follow_runs=False)) as c:
        yield c


@pytest.fixture(scope="module")
def refusing_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """One app for the bodies that must be refused: nothing is ever stored in its database
    (each test checks), so the tests can share it; SQLite, as no row is written."""
    home = tmp_path_factory.mktemp("refusing")
    settings = Settings(
        home=home,
        database_url=f"sqlite:///{home / 'florist.db'}",
        simulation_control="127.0.0.1:1",
        simulation_max_virtual_clients=10_000,
    )
    with TestClient(create_app(settings, follow_runs=False)) as c:
        yield c


def count(client: TestClient) -> int:
    return int(client.get("/api/v1/experiments").json()["count"])


def body_with(**changes: Any) -> dict[str, Any]:
    body = copy.deepcopy(BODY)
    for path, value in changes.items():
        *parents, last = path.split("__")
        node = body
        for p in parents:
            node = node[p]
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value
    return body


def test_a_simulation_body_is_stored_with_its_mode_and_virtual_clients(
    client: TestClient, session_factory: Any
) -> None:
    response = client.post("/api/v1/experiments", json=BODY)
    assert response.status_code == 201, response.text
    exp = response.json()
    assert exp["mode"] == "simulation"
    assert exp["clients"]["virtual"] == 1000 and exp["clients"]["per_round"] == 20
    with session_factory() as session:
        stored = repository.get_experiment(session, experiment_id=exp["id"])
        assert stored is not None
        assert stored.spec["mode"] == "simulation"
        assert stored.spec["clients"]["virtual"] == 1000


def test_a_deployment_body_is_stored_as_before_simulation_mode_existed(
    client: TestClient, session_factory: Any
) -> None:
    exp = client.post("/api/v1/experiments", json=DEPLOYMENT).json()
    assert exp["mode"] == "deployment"
    with session_factory() as session:
        stored = repository.get_experiment(session, experiment_id=exp["id"])
        assert stored is not None
        # No new keys in a deployment spec: older readers and stored specs agree.
        assert "mode" not in stored.spec
        assert set(stored.spec["clients"]) == {"min", "fraction_train", "fraction_evaluate"}


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        (body_with(mode="sim"), ["body", "mode"]),
        (DEPLOYMENT | {"clients": {"virtual": 100}}, ["body", "clients", "virtual"]),
        (DEPLOYMENT | {"clients": {"per_round": 5}}, ["body", "clients", "per_round"]),
        (body_with(clients__virtual=None), ["body", "clients", "virtual"]),
        (body_with(clients__per_round=None), ["body", "clients", "per_round"]),
        (body_with(clients__virtual=0), ["body", "clients", "virtual"]),
        (body_with(clients__per_round=1001), ["body", "clients", "per_round"]),
        (body_with(clients__virtual=10_001, clients__per_round=5), ["body", "clients", "virtual"]),
        (body_with(clients__min=5), ["body", "clients", "min"]),
        (body_with(clients__fraction_train=0.5), ["body", "clients", "fraction_train"]),
        (body_with(clients__profiles={"turbo": 1.0}), ["body", "clients", "profiles", "turbo"]),
        (body_with(clients__profiles={"fast": 0.0}), ["body", "clients", "profiles"]),
        (body_with(clients__profiles={"fast": -1.0}), ["body", "clients", "profiles", "fast"]),
        (body_with(strategy={"name": "fedasync", "config": {}}), ["body", "strategy", "name"]),
    ],
)
def test_a_bad_simulation_body_is_422_naming_the_field_and_stores_nothing(
    refusing_client: TestClient, body: dict[str, Any], loc: list[str]
) -> None:
    response = refusing_client.post("/api/v1/experiments", json=body)
    assert response.status_code == 422, response.text
    locs = [err["loc"] for err in response.json()["detail"]]
    assert loc in locs, locs
    assert count(refusing_client) == 0


def test_a_server_without_a_simulation_superlink_refuses_simulation_mode(
    database_url: str, tmp_path: Path
) -> None:
    settings = Settings(home=tmp_path, database_url=database_url, simulation_control="")
    with TestClient(create_app(settings, follow_runs=False)) as c:
        response = c.post("/api/v1/experiments", json=BODY)
        assert response.status_code == 422, response.text
        assert ["body", "mode"] in [err["loc"] for err in response.json()["detail"]]
        assert c.post("/api/v1/experiments", json=DEPLOYMENT).status_code == 201


def test_the_served_schema_declares_mode_and_the_virtual_clients(
    refusing_client: TestClient,
) -> None:
    schemas = refusing_client.get("/openapi.json").json()["components"]["schemas"]
    mode = schemas["ExperimentCreate"]["properties"]["mode"]
    assert mode["enum"] == ["deployment", "simulation"] and mode["default"] == "deployment"
    clients = schemas["ClientsConfig"]["properties"]
    assert {"virtual", "per_round", "profiles"} <= set(clients)


def test_per_round_of_the_virtual_clients_take_part_in_each_round() -> None:
    setup = server_setup(
        ExperimentSpec.model_validate(body_with(clients__virtual=10_000, clients__per_round=100))
    )
    assert setup.min_clients == 100
    assert setup.fraction_train == pytest.approx(0.01)
    deployment = server_setup(ExperimentSpec.model_validate(DEPLOYMENT))
    assert (deployment.min_clients, deployment.fraction_train) == (3, 1.0)


def test_a_simulation_run_carries_its_mix_and_its_virtual_clients() -> None:
    spec = ExperimentSpec.model_validate(BODY).model_dump(mode="json")
    submission = simulation_submission(spec)
    assert submission is not None
    run_config, federation = submission
    assert run_config == {RUN_CONFIG_KEY: "fast:1.0,normal:1.0,slow:1.0"}
    assert federation.num_supernodes == 1000
    assert simulation_submission(ExperimentSpec.model_validate(DEPLOYMENT).model_dump()) is None
    # A stored spec from before simulation mode has no `mode`: a deployment.
    assert simulation_submission({"name": "old", "clients": {"min": 2}}) is None


def test_the_simulation_superlink_drops_the_fleet_api_and_adds_simulation() -> None:
    link = ["flower-superlink", "--host", "h", "--port", "1"]
    fleet = ["--fleet-api-type", "grpc-rere", "--fleet-api-address", "h:2"]
    cmd = superlink_simulation_command([*link, *fleet, "--insecure"])
    guard = [sys.executable, "-m", "florist.server.simulation_link"]
    assert cmd == [*guard, *link, "--insecure", "--simulation"]
    assert runtime_address(cmd) == "h:1"


def test_the_guard_finds_the_simulations_of_its_own_superlink_only(tmp_path: Path) -> None:
    # Two stand-ins named flwr-simulation, attached to two runtime addresses.
    fake = tmp_path / "flwr-simulation"
    fake.write_text("import time\ntime.sleep(60)\n")
    procs = [
        subprocess.Popen([sys.executable, str(fake), "--runtime-api-address", address])
        for address in ("127.0.0.1:7001", "127.0.0.1:7002")
    ]
    try:
        assert simulation_processes("127.0.0.1:7001") == [procs[0].pid]
        assert end_runs("127.0.0.1:7001", grace_s=5) == [procs[0].pid]
        assert procs[0].wait(timeout=5) == -signal.SIGTERM
        assert procs[1].poll() is None  # another SuperLink's run goes on
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


# --- profiles of virtual clients ---------------------------------------------------------


def test_a_mix_of_one_profile_gives_every_virtual_client_that_profile() -> None:
    assert {virtual_profile({"slow": 2.0}, 7, p) for p in range(500)} == {"slow"}
    # A zero weight is never drawn.
    assert {virtual_profile({"fast": 0.0, "slow": 1.0}, 7, p) for p in range(500)} == {"slow"}


def test_any_run_of_consecutive_virtual_clients_holds_the_mix_in_its_shares() -> None:
    mix = {"fast": 1.0, "normal": 2.0, "slow": 1.0}
    for start in (0, 3_333):
        counts = Counter(virtual_profile(mix, 0, p) for p in range(start, start + 1_000))
        # Exact shares are 250 / 500 / 250; an independent draw per node would stray by ~15.
        assert abs(counts["fast"] - 250) <= 3, counts
        assert abs(counts["normal"] - 500) <= 3, counts
        assert abs(counts["slow"] - 250) <= 3, counts


def test_the_profile_follows_the_position_bins_in_mix_order() -> None:
    mix = {"fast": 1.0, "slow": 3.0}  # fast on [0, 0.25), slow on [0.25, 1)
    for p in range(200):
        expected = "fast" if profile_position(5, p) < 0.25 else "slow"
        assert virtual_profile(mix, 5, p) == expected
    # Consecutive ids step by (√5 − 1)/2 around the unit circle.
    step = (profile_position(5, 1) - profile_position(5, 0)) % 1.0
    assert step == pytest.approx(0.6180339887, abs=1e-9)


def test_the_same_seed_gives_each_virtual_client_the_same_profile_another_seed_not() -> None:
    same = [virtual_profile(DEFAULT_PROFILE_MIX, 3, p) for p in range(100)]
    assert same == [virtual_profile(DEFAULT_PROFILE_MIX, 3, p) for p in range(100)]
    assert same != [virtual_profile(DEFAULT_PROFILE_MIX, 4, p) for p in range(100)]


def test_a_mix_goes_through_the_run_config_and_back() -> None:
    mix = {"fast": 0.5, "flaky": 2.0}
    assert decode_mix(encode_mix(mix)) == mix
    assert decode_mix("") == {}
    with pytest.raises(ProfileMixError, match="unknown profile 'turbo'"):
        decode_mix("turbo:1")
    with pytest.raises(ProfileMixError, match="not 'name:weight'"):
        decode_mix("fast")


def _train(partition: int, run_config: dict[str, Any], **node: Any) -> dict[str, Any]:
    """The node-config the rest of the ClientApp sees after the mod, for one train message."""
    seen: dict[str, Any] = {}

    def rest(msg: Message, context: Context) -> Message:
        seen.update(context.node_config)
        return msg

    # Flower stamps every Message with the process's run id; the engine sets it for real.
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    context = Context(
        run_id=1,
        node_id=99,
        node_config={"partition-id": partition, "num-partitions": 10, **node},
        state=RecordDict(),
        run_config=run_config,
    )
    content = RecordDict({"config": ConfigRecord({"florist.seed": 3})})
    msg = Message(content=content, dst_node_id=99, message_type="train")
    before = dict(context.node_config)
    virtual_node_mod(msg, context, rest)
    assert context.node_config == before  # the node's own context is left as it was
    return seen


def test_the_mod_gives_a_virtual_client_its_profile_and_leaves_real_nodes_alone() -> None:
    mix = {"fast": 1.0, "slow": 1.0}
    seen = _train(4, {RUN_CONFIG_KEY: encode_mix(mix)})
    assert seen["profile"] == virtual_profile(mix, 3, 4)
    assert seen["partition-id"] == 4
    # A deployment run (empty mix) and a node with its own profile pass unchanged.
    assert "profile" not in _train(4, {RUN_CONFIG_KEY: ""})
    assert _train(4, {RUN_CONFIG_KEY: encode_mix(mix)}, profile="normal")["profile"] == "normal"


def test_the_example_simulation_experiment_is_a_valid_body() -> None:
    import tomllib

    from florist.server.simulation import simulation_errors

    path = Path(__file__).parents[2] / "examples" / "simulation-10k.toml"
    spec = ExperimentSpec.model_validate(tomllib.loads(path.read_text()))
    assert simulation_errors(spec, max_virtual=100_000) == []
    assert (spec.clients.virtual, spec.clients.per_round) == (10_000, 100)
