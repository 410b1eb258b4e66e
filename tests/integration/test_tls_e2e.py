"""TLS and SuperNode authentication on real processes: who the SuperLink lets in, and a run.

One SuperLink with TLS and `--enable-supernode-auth`, the API (its Control client over HTTPS)
and four SuperNodes: two whose keys were registered through ``POST /api/v1/node-keys``, one
with a key nobody registered, one in plain text. Only the first two may train.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from florist.server.api.app import create_app
from florist.server.certs import make_certs, make_node_key, parse_hosts, parse_node_public_key
from florist.server.control import ControlClient
from florist.server.processes import (
    Managed,
    ServerTls,
    Supervisor,
    flower_env,
    free_port,
    superlink_command,
    supernode_processes,
    wait_for_port,
)
from florist.server.settings import Settings
from tests.chromium import CHROMIUM, CHROMIUM_ARGS, SCREENSHOTS

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

EXPERIMENT: dict[str, Any] = {
    "name": "tls-digits-fedavg",
    "strategy": {"name": "fedavg", "config": {}},
    "workload": {
        "name": "digits",
        "config": {"partitioner": {"name": "iid"}, "seed": 0, "model": {"name": "mlp"}},
    },
    "rounds": 2,
    "clients": {"min": 2},
}


@dataclass
class SecureStack:
    home: Path
    tls: ServerTls
    control: str
    fleet: str
    supervisor: Supervisor
    keys: dict[str, Path]  # node name → private key

    def log(self, name: str) -> str:
        return (self.home / "logs" / f"{name}.log").read_text(errors="replace")

    def logs(self, lines: int = 25) -> str:
        out = []
        for m in self.supervisor.processes:
            assert m.log_path is not None
            text = m.log_path.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {m.name}\n" + "\n".join(text))
        return "\n".join(out)

    def control_client(self) -> ControlClient:
        return ControlClient(
            self.control, insecure=False, root_certificates=self.tls.ca_cert.read_bytes()
        )

    def add_supernode(
        self, name: str, index: int, *, tls: bool = True, key: Path | None = None
    ) -> None:
        for managed in supernode_processes(
            name,
            superlink=self.fleet,
            clientappio=f"127.0.0.1:{free_port()}",
            node_config={"partition-id": index, "num-partitions": 2},
            env=flower_env(self.home),
            log_dir=self.home / "logs",
            root_certificates=self.tls.ca_cert if tls else None,
            auth_key=key,
            restart=False,
        ):
            self.supervisor.add(managed)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureStack]:
    home = tmp_path_factory.mktemp("secure")
    paths = make_certs(home / "certs", parse_hosts("florist.test"))
    tls = ServerTls(paths.ca_cert, paths.server_cert, paths.server_key)
    keys = {}
    for name in ("site-a", "site-b", "stranger"):
        make_node_key(home / "keys" / name)
        keys[name] = home / "keys" / name
    control, fleet = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    sup = Supervisor()
    try:
        cmd = superlink_command(control=control, fleet=fleet, tls=tls, supernode_auth=True)
        sup.add(Managed("superlink", cmd, flower_env(home), home / "logs" / "superlink.log"))
        wait_for_port(control)
        wait_for_port(fleet)
        yield SecureStack(home, tls, control, fleet, sup, keys)
    finally:
        sup.stop_all()


@dataclass
class SecureApi:
    base: str
    client: httpx.Client
    stack: SecureStack

    def wait(self, what: str, until: Any, timeout: float = 120) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = until()
            if value:
                return value
            if time.monotonic() > deadline:
                pytest.fail(f"timed out waiting for {what}\n{self.stack.logs()}")
            time.sleep(0.5)


@pytest.fixture(scope="module")
def api(stack: SecureStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureApi]:
    """The real API on loopback; its run follower and node-key routes reach the SuperLink
    over HTTPS with the stack's CA, as `florist server --secure` configures them."""
    home = tmp_path_factory.mktemp("api")
    port = free_port()
    settings = Settings(
        home=home,
        database_url=f"sqlite:///{home / 'florist.db'}",
        api_port=port,
        superlink_control=stack.control,
        superlink_fleet=stack.fleet,
        tls_dir=stack.tls.ca_cert.parent,
        supernode_auth=True,
        status_poll_s=0.5,
    )
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for_port(f"127.0.0.1:{port}")
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=base, timeout=30) as client:
            yield SecureApi(base, client, stack)
    finally:
        server.should_exit = True
        thread.join(timeout=15)


def _public(stack: SecureStack, name: str) -> str:
    return (stack.keys[name].parent / f"{name}.pub").read_text()


def _private(stack: SecureStack, name: str) -> str:
    return stack.keys[name].read_text()


@pytest.fixture(scope="module")
def nodes(api: SecureApi) -> dict[str, str]:
    """Two keys registered through the REST API and four SuperNodes started: the two keys'
    over TLS, a stranger's key nobody registered, and one in plain text. Returns the
    registered names' Flower node ids once both are online."""
    stack = api.stack
    registered = {}
    for name in ("site-a", "site-b"):
        response = api.client.post(
            "/api/v1/node-keys", json={"name": name, "public_key": _public(stack, name)}
        )
        assert response.status_code == 201, response.text
        registered[name] = response.json()["node_id"]
    stack.add_supernode("site-a", 0, key=stack.keys["site-a"])
    stack.add_supernode("site-b", 1, key=stack.keys["site-b"])
    stack.add_supernode("stranger", 0, key=stack.keys["stranger"])
    stack.add_supernode("plain", 1, tls=False)

    def online() -> set[str]:
        data = api.client.get("/api/v1/node-keys").json()["data"]
        return {k["node_id"] for k in data if (k["node"] or {}).get("status") == "online"}

    api.wait("the registered nodes to connect", lambda: online() == set(registered.values()))
    return registered


def test_key_registration_refuses_bad_and_duplicate_keys(
    api: SecureApi, nodes: dict[str, str]
) -> None:
    stack = api.stack
    before = api.client.get("/api/v1/node-keys").json()
    for body, field in [
        ({"name": "x", "public_key": "ssh-rsa AAAA"}, "public_key"),
        ({"name": "x", "public_key": _private(stack, "stranger")}, "public_key"),
        ({"name": "", "public_key": _public(stack, "stranger")}, "name"),
        ({"name": "x", "public_key": _public(stack, "stranger"), "admin": True}, "admin"),
    ]:
        bad = api.client.post("/api/v1/node-keys", json=body)
        assert bad.status_code == 422, bad.text
        assert [e["loc"] for e in bad.json()["detail"]] == [["body", field]], bad.text
    # A key Florist has already: 409 before the SuperLink is asked.
    again = api.client.post(
        "/api/v1/node-keys", json={"name": "again", "public_key": _public(stack, "site-a")}
    )
    assert again.status_code == 409, again.text
    # A key the SuperLink has but Florist does not (registered with `flwr supernode register`):
    # the SuperLink refuses it, and Florist stores nothing.
    elsewhere = make_node_key(stack.home / "keys" / "elsewhere")
    key = parse_node_public_key(elsewhere.read_text())
    with _closing(stack.control_client()) as cc:
        cc.register_node(key.pem, name="elsewhere")
        known = len(cc.list_nodes())
    refused = api.client.post(
        "/api/v1/node-keys", json={"name": "elsewhere", "public_key": key.openssh}
    )
    assert refused.status_code == 409 and "already in use" in refused.json()["detail"]
    assert api.client.get("/api/v1/node-keys").json()["data"] == before["data"]
    with _closing(stack.control_client()) as cc:
        assert len(cc.list_nodes()) == known


def test_only_registered_keys_over_tls_train(api: SecureApi, nodes: dict[str, str]) -> None:
    stack = api.stack
    expected = set(nodes.values())
    listed = api.client.get("/api/v1/node-keys").json()
    assert listed["supernode_auth"] is True and listed["superlink"] == "ok"
    # The stranger is refused at activation; the plain-text node never gets through TLS.
    api.wait(
        "the stranger's refusal", lambda: "Failed to activate SuperNode" in stack.log("stranger")
    )
    api.wait("the plain node's failures", lambda: "Connection attempt failed" in stack.log("plain"))
    stranger = parse_node_public_key(_public(stack, "stranger")).pem
    with _closing(stack.control_client()) as cc:
        listed_nodes = cc.list_nodes()
    online = {str(n.node_id) for n in listed_nodes if n.status == "online"}
    assert online == expected, listed_nodes
    assert all(n.public_key != stranger for n in listed_nodes)

    # An experiment submitted through the REST API trains on exactly the registered nodes.
    response = api.client.post("/api/v1/experiments", json=EXPERIMENT)
    assert response.status_code == 201, response.text
    exp_id = response.json()["id"]

    def finished() -> dict[str, Any] | None:
        exp = api.client.get(f"/api/v1/experiments/{exp_id}").json()
        return exp if exp["status"] in ("completed", "failed", "cancelled") else None

    done = api.wait("the experiment", finished, timeout=300)
    assert done["status"] == "completed", f"{done}\n{stack.logs()}"
    assert done["current_round"] == 2
    updates = api.client.get(f"/api/v1/experiments/{exp_id}/updates").json()["data"]
    assert len(updates) == 4 and {u["status"] for u in updates} == {"accepted"}
    assert {u["node_id"] for u in updates} == expected


def test_a_removed_key_is_unregistered_at_the_superlink(
    api: SecureApi, nodes: dict[str, str]
) -> None:
    keys = api.client.get("/api/v1/node-keys").json()["data"]
    site_b = next(k for k in keys if k["name"] == "site-b")
    removed = api.client.delete(f"/api/v1/node-keys/{site_b['id']}")
    assert removed.status_code == 200, removed.text
    assert removed.json()["fingerprint"] == site_b["fingerprint"]
    assert [k["name"] for k in api.client.get("/api/v1/node-keys").json()["data"]] == ["site-a"]
    with _closing(api.stack.control_client()) as cc:
        status = {str(n.node_id): n.status for n in cc.list_nodes()}
    assert status.get(site_b["node_id"], "unregistered") == "unregistered", status
    assert api.client.delete(f"/api/v1/node-keys/{site_b['id']}").status_code == 404


class _closing:
    def __init__(self, client: ControlClient) -> None:
        self.client = client

    def __enter__(self) -> ControlClient:
        return self.client

    def __exit__(self, *exc: object) -> None:
        self.client.close()


@pytest.mark.browser
@pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} is missing")
def test_nodes_page_shows_the_keys_and_their_nodes(api: SecureApi, nodes: dict[str, str]) -> None:
    from playwright.sync_api import expect, sync_playwright

    keys = api.client.get("/api/v1/node-keys").json()["data"]
    site_a = next(k for k in keys if k["name"] == "site-a")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1366, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(api.base + "/nodes")
            rows = page.get_by_test_id("node-key-row")
            expect(rows).to_have_count(len(keys), timeout=15_000)
            row = page.locator(f'[data-testid="node-key-row"][data-key="{site_a["id"]}"]')
            expect(row.get_by_test_id("node-key-name")).to_have_text("site-a")
            expect(row.get_by_test_id("node-key-fingerprint")).to_have_text(site_a["fingerprint"])
            expect(row.get_by_test_id("node-key-node")).to_have_text(nodes["site-a"])
            expect(row.get_by_test_id("node-key-status")).to_have_text("online")
            # The SuperNode with that key is the node row of the same id, marked with its key.
            node_row = page.locator(f'[data-testid="node-row"][data-node="{nodes["site-a"]}"]')
            expect(node_row.get_by_test_id("node-key-badge")).to_have_text("key: site-a")
            expect(page.get_by_test_id("node-keys-auth")).to_contain_text("only registered keys")
            SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SCREENSHOTS / "dashboard-node-keys.png"), full_page=True)
            assert errors == [], errors
        finally:
            browser.close()
