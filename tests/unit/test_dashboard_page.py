"""The dashboard pages on a fake REST API: their routes and assets, then the pages in Chromium."""

import asyncio
import copy
import json
import re
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI, Query
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.testclient import TestClient
from playwright.sync_api import Browser, ConsoleMessage, Page, Request, expect, sync_playwright
from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request as ServerRequest
from torch import nn

from florist.client.task import WorkloadRef
from florist.client.workloads import ClientData, WorkloadConfig, WorkloadPlugin, WorkloadRegistry
from florist.datasets import XY
from florist.server.api.schemas import WorkloadPublic
from florist.server.dashboard import STATIC_DIR, mount_dashboard
from florist.server.spec import StrategySpecError, resolve_workload
from tests.chromium import CHROMIUM, CHROMIUM_ARGS, SCREENSHOTS

ACTIVE_STATUSES = {"pending", "submitted", "running", "cancelling"}
# The list polls every 2 s while something runs and the fake stream every 0.1 s; allow a few.
POLL_TIMEOUT_MS = 7_000
STREAM_POLL_S = 0.1

browser_test = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason=f"{CHROMIUM} is missing; install it with `apt-get install -y chromium chromium-driver`",
)


# ---------------------------------------------------------------- fake API


def _round(
    server_round: int,
    accuracy: float,
    loss: float,
    train_loss: float | None,
    *,
    extra: dict[str, float] | None = None,
    train_extra: dict[str, float] | None = None,
) -> dict[str, Any]:
    train_metrics = {} if train_loss is None else {"train-loss": train_loss, "train-accuracy": 0.5}
    return {
        "server_round": server_round,
        "started_at": f"2025-01-10T10:{server_round:02d}:00Z",
        "finished_at": f"2025-01-10T10:{server_round:02d}:30Z",
        "duration_s": 30.0,
        "metrics": {"accuracy": accuracy, "loss": loss, **(extra or {})},
        "train_metrics": {**train_metrics, **(train_extra or {})},
        "evaluate_metrics": {},
        "num_updates": 0 if server_round == 0 else 4,
        "num_rejected": 0,
        "num_failures": 0,
        "virtual_time_s": None,
    }


NODE_IDS = ("101", "202", "18446744073709551557")


def _update(
    server_round: int, node: int, status: str = "accepted", staleness: int = 0
) -> dict[str, Any]:
    """Node ``node``'s task in a round: it left at :00 and took 10 s per node index, plus 5."""
    took = 5 + 10 * node
    return {
        "server_round": server_round,
        "node_id": NODE_IDS[node],
        "status": status,
        "reason": "non-finite weights" if status == "rejected" else None,
        "num_examples": 100,
        "train_time_s": took - 1.0,
        "metrics": {},
        "bytes_up": 1000,
        "bytes_down": 1000,
        "staleness": staleness,
        "created_at": f"2025-01-10T10:{server_round:02d}:{took:02d}Z",
        "model_version": server_round - 1,
        "arrival_version": server_round - 1 + staleness,
        "local_steps": 12,
        "dispatched_at": f"2025-01-10T10:{server_round:02d}:00Z",
        "arrived_at": f"2025-01-10T10:{server_round:02d}:{took:02d}Z",
        "wall_duration_s": float(took),
        "virtual_duration_s": None,
    }


def _updates_of(server_round: int) -> list[dict[str, Any]]:
    if server_round == 0:
        return []
    if server_round == 2:
        return [_update(2, 0), _update(2, 1, "rejected"), _update(2, 2, "failed", staleness=1)]
    return [_update(server_round, i, staleness=i % 2) for i in range(3)]


def _experiment(
    experiment_id: int,
    name: str,
    status: str,
    *,
    current_round: int,
    num_rounds: int,
    best_accuracy: float | None,
    error: str | None = None,
    best: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "id": experiment_id,
        "name": name,
        "status": status,
        "strategy": {"name": "fedprox", "config": {"proximal_mu": 0.1}},
        "workload": {
            "name": "mnist",
            "config": {
                "name": "mnist",
                "partitioner": {"name": "dirichlet", "alpha": 0.5},
                "model": {"name": "mlp", "hidden": [64], "dropout": 0.0},
            },
        },
        "num_rounds": num_rounds,
        "current_round": current_round,
        "best_accuracy": best_accuracy,
        "best_round": None,
        "best_val_accuracy": None,
        "best_by": None,
        **(best or {}),
        "error": error,
        "created_at": "2025-01-10T09:59:00Z",
        "started_at": "2025-01-10T10:00:00Z",
        "finished_at": None if status in ACTIVE_STATUSES else "2025-01-10T10:20:00Z",
    }


FAILED_ERROR = "dataset 'cifar100' is not installed on client 2"


def _initial_experiments() -> dict[int, dict[str, Any]]:
    # Experiment 1's rounds predate validation splits: the API's best round is its last one.
    running = _experiment(
        1,
        "mnist-fedprox",
        "running",
        current_round=2,
        num_rounds=5,
        best_accuracy=0.81,
        best={"best_round": 2, "best_by": "last-round"},
    )
    # Experiment 2's best round on validation (round 2) is not its best on test (round 3).
    completed = _experiment(
        2,
        "mnist-baseline",
        "completed",
        current_round=3,
        num_rounds=3,
        best_accuracy=0.6,
        best={"best_round": 2, "best_val_accuracy": 0.7, "best_by": "validation"},
    )
    failed = _experiment(
        3,
        "cifar-broken",
        "failed",
        current_round=0,
        num_rounds=4,
        best_accuracy=None,
        error=FAILED_ERROR,
    )
    return {e["id"]: e for e in (running, completed, failed)}


def _initial_rounds() -> dict[int, list[dict[str, Any]]]:
    return {
        # Round 0 is the initial model's evaluation: no clients trained, so no train loss.
        1: [_round(0, 0.11, 2.30, None), _round(1, 0.62, 1.20, 1.50), _round(2, 0.81, 0.70, 0.90)],
        2: [
            _round(
                r,
                0.3 * r,
                2.0 - 0.5 * r,
                2.1 - 0.5 * r,
                extra={"robust-accuracy": 0.2 * r, "val-accuracy": [0.1, 0.5, 0.7, 0.65][r]},
                train_extra={"pacing-fraction": 0.25 * (r + 1)},
            )
            for r in range(4)
        ],
        3: [],
    }


def _initial_updates() -> dict[int, list[dict[str, Any]]]:
    return {
        1: [u for r in (1, 2) for u in _updates_of(r)],
        2: [u for r in (1, 2, 3) for u in _updates_of(r)],
        3: [],
    }


STRATEGIES: dict[str, Any] = {
    "data": [
        {
            "name": "fedavg",
            "summary": "Federated averaging.",
            "paper": "",
            "tags": [],
            "config_schema": {"properties": {}, "type": "object"},
        },
        {
            "name": "fedprox",
            "summary": "FedAvg with a proximal term.",
            "paper": "",
            "tags": [],
            "config_schema": {
                "properties": {
                    "proximal_mu": {
                        "default": 0.01,
                        "description": "Weight of the proximal term.",
                        "minimum": 0,
                        "title": "Proximal Mu",
                        "type": "number",
                    }
                },
                "type": "object",
            },
        },
        {
            "name": "fal",
            "summary": "Federated adversarial learning.",
            "paper": "",
            "tags": [],
            "config_schema": {
                "properties": {
                    "pgd_steps": {"default": 10, "title": "Pgd Steps", "type": "integer"},
                    "random_start": {"default": False, "title": "Random Start", "type": "boolean"},
                    "step_size": {
                        "anyOf": [{"type": "number"}, {"type": "null"}],
                        "default": None,
                        "title": "Step Size",
                    },
                    "ordering": {
                        "default": "anti",
                        "enum": ["curriculum", "anti", "random"],
                        "title": "Ordering",
                        "type": "string",
                    },
                },
                "type": "object",
            },
        },
    ],
    "count": 3,
    "errors": {},
}

# ---------------------------------------------------------------- workloads

# A workload whose schema shares nothing with the built-ins': a union tagged "kind" (not
# "name") with a default, a nested object, a Literal, bounded integers and lists. The form must
# render it with no change to the dashboard's code.


class Augment(BaseModel):
    """Input augmentation."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    flip: bool = False
    noise: float = Field(default=0.0, ge=0, le=1)


class UniformSampler(BaseModel):
    """Every sequence equally likely."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["uniform"] = "uniform"


class WeightedSampler(BaseModel):
    """Sequences drawn by weight."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["weighted"] = "weighted"
    weights: list[Annotated[float, Field(gt=0)]] = [1.0, 1.0]
    temperature: float = Field(default=1.0, gt=0, le=10)


class TinyTextConfig(WorkloadConfig):
    """Next-character prediction on a toy corpus."""

    vocabulary: Literal["bytes", "words"] = "words"
    sequence_length: int = Field(default=80, ge=8, le=512)
    layers: list[Annotated[int, Field(ge=1)]] = [128, 128]
    augment: Augment = Augment()
    sampler: Annotated[UniformSampler | WeightedSampler, Field(discriminator="kind")] = (
        UniformSampler()
    )


def _tiny_text_data(config: Any, client: ClientData) -> XY:
    return XY(x=np.zeros((1, 1), dtype=np.float32), y=np.zeros(1, dtype=np.int64))


TINY_TEXT = WorkloadPlugin(
    name="tiny-text",
    summary="A toy next-character task (registered by the dashboard tests).",
    config_model=TinyTextConfig,
    build_model=lambda config: nn.Linear(1, 2),
    load_train=_tiny_text_data,
)


def _workload_registry() -> WorkloadRegistry:
    """The installed workloads (digits, synthetic, whatever else is installed) plus tiny-text."""
    registry = WorkloadRegistry()
    registry.register(TINY_TEXT)
    return registry


WORKLOAD_REGISTRY = _workload_registry()


def _workloads_payload() -> dict[str, Any]:
    """What GET /workloads answers, built as the real route builds it."""
    plugins, errors = WORKLOAD_REGISTRY.load_all()
    data = [
        WorkloadPublic(
            name=p.name,
            summary=p.summary,
            tags=list(p.tags),
            config_schema=p.config_schema(),
            server_evaluation=p.load_test is not None,
        ).model_dump(mode="json")
        for p in plugins
    ]
    return {"data": data, "count": len(data), "errors": errors}


NODES: dict[str, Any] = {
    # The SuperLink lists the first node online and the last offline; 202 is not connected.
    "data": [
        {
            "node_id": NODE_IDS[0],
            "node_config": {"partition-id": 0, "num-partitions": 3, "profile": "phone"},
            "first_seen": "2025-01-10T09:00:00Z",
            "last_seen": "2025-01-10T10:20:00Z",
            "seconds_since_seen": 4.0,
            "stale": False,
            "status": "online",
            "registered_at": "2025-01-10T08:59:00Z",
            "connected_at": "2025-01-10T08:59:01Z",
            "disconnected_at": None,
            "online_until": "2025-01-10T10:21:00Z",
        },
        {
            "node_id": NODE_IDS[2],
            # A Byzantine node (client/attacks.py): marked on the nodes and clients tables.
            "node_config": {"attack": "sign-flip", "attack-strength": 2},
            "first_seen": "2025-01-10T09:00:00Z",
            "last_seen": "2025-01-10T09:05:00Z",
            "seconds_since_seen": 900.0,
            "stale": True,
            "status": "offline",
            "registered_at": "2025-01-10T08:59:00Z",
            "connected_at": "2025-01-10T08:59:02Z",
            "disconnected_at": "2025-01-10T10:07:00Z",
            "online_until": "2025-01-10T10:07:00Z",
        },
    ],
    "count": 2,
    "stale_after_s": 120.0,
    "superlink": "ok",
}


@dataclass
class FakeApi:
    """What the fake REST API serves; tests mutate it to make the page see a change."""

    experiments: dict[int, dict[str, Any]] = field(default_factory=_initial_experiments)
    rounds: dict[int, list[dict[str, Any]]] = field(default_factory=_initial_rounds)
    updates: dict[int, list[dict[str, Any]]] = field(default_factory=_initial_updates)
    submitted: list[dict[str, Any]] = field(default_factory=list)
    nodes: dict[str, Any] = field(default_factory=lambda: copy.deepcopy(NODES))
    log: dict[int, list[dict[str, Any]]] = field(default_factory=dict)

    def reset(self) -> None:
        self.experiments = _initial_experiments()
        self.rounds = _initial_rounds()
        self.updates = _initial_updates()
        self.submitted = []
        self.nodes = copy.deepcopy(NODES)
        self.log = {}

    def add_event(
        self, experiment_id: int, kind: str, created_at: str, data: dict[str, Any]
    ) -> None:
        events = self.log.get(experiment_id, [])
        event_id = 1 + max(
            (e["id"] for events_of in self.log.values() for e in events_of), default=0
        )
        event = {
            "id": event_id,
            "run_id": 1,
            "kind": kind,
            "message": f"{kind} {event_id}",
            "data": data,
            "created_at": created_at,
        }
        self.log[experiment_id] = [*events, event]

    def add_round(self, experiment_id: int, new_round: dict[str, Any]) -> None:
        experiment = copy.deepcopy(self.experiments[experiment_id])
        experiment["current_round"] = new_round["server_round"]
        # These rounds carry no val-accuracy: the API's best round is then the last one.
        experiment["best_accuracy"] = new_round["metrics"]["accuracy"]
        experiment["best_round"] = new_round["server_round"]
        experiment["best_by"] = "last-round"
        # Replace, never mutate in place: the server thread may be serialising the old values.
        self.updates[experiment_id] = [
            *self.updates[experiment_id],
            *_updates_of(new_round["server_round"]),
        ]
        self.rounds[experiment_id] = [*self.rounds[experiment_id], new_round]
        self.experiments[experiment_id] = experiment

    def set_status(self, experiment_id: int, status: str) -> None:
        self.experiments[experiment_id] = {**self.experiments[experiment_id], "status": status}


def _not_found(experiment_id: int) -> JSONResponse:
    return JSONResponse({"detail": f"experiment {experiment_id} not found"}, status_code=404)


# The fake pages its listings as the real API does (``limit``, ``cursor``, ``next_cursor``),
# with pages this small, so that every page here draws only if the dashboard follows cursors.
FAKE_PAGE = 2


def _page(data: list[Any], cursor: int | None, **extra: Any) -> dict[str, Any]:
    start = cursor or 0
    page: dict[str, Any] = {**extra, "data": data[start : start + FAKE_PAGE], "count": len(data)}
    if start + FAKE_PAGE < len(data):
        page["next_cursor"] = start + FAKE_PAGE
    return page


def build_app(api: FakeApi) -> FastAPI:
    app = FastAPI()

    @app.get("/api/v1/experiments")
    def list_experiments() -> dict[str, Any]:
        data = list(api.experiments.values())
        return {"data": data, "count": len(data)}

    @app.get("/api/v1/experiments/{experiment_id}", response_model=None)
    def get_experiment(experiment_id: int) -> dict[str, Any] | JSONResponse:
        return api.experiments.get(experiment_id) or _not_found(experiment_id)

    @app.get("/api/v1/experiments/{experiment_id}/rounds", response_model=None)
    def list_rounds(experiment_id: int, cursor: int | None = None) -> dict[str, Any] | JSONResponse:
        if experiment_id not in api.experiments:
            return _not_found(experiment_id)
        return _page(api.rounds[experiment_id], cursor)

    @app.get("/api/v1/experiments/{experiment_id}/updates", response_model=None)
    def list_updates(
        experiment_id: int, cursor: int | None = None
    ) -> dict[str, Any] | JSONResponse:
        if experiment_id not in api.experiments:
            return _not_found(experiment_id)
        return _page(api.updates[experiment_id], cursor)

    @app.get("/api/v1/experiments/{experiment_id}/log", response_model=None)
    def list_log(
        experiment_id: int,
        kind: list[str] | None = Query(None),
        after: int = 0,
        cursor: int | None = None,
    ) -> dict[str, Any] | JSONResponse:
        if experiment_id not in api.experiments:
            return _not_found(experiment_id)
        data = [
            e
            for e in api.log.get(experiment_id, [])
            if e["id"] > after and (kind is None or e["kind"] in kind)
        ]
        return _page(data, cursor)

    @app.get("/api/v1/experiments/{experiment_id}/events", response_model=None)
    def events(experiment_id: int, request: ServerRequest) -> StreamingResponse | JSONResponse:
        """The real stream's protocol (status, update, round, end) over the fake's state."""
        if experiment_id not in api.experiments:
            return _not_found(experiment_id)

        async def stream() -> AsyncIterator[str]:
            sent_rounds = sent_updates = 0
            last_status = None
            while True:
                experiment = api.experiments[experiment_id]
                updates = api.updates[experiment_id]
                rounds = api.rounds[experiment_id]
                for update in updates[sent_updates:]:
                    yield f"event: update\ndata: {json.dumps(update)}\n\n"
                for new_round in rounds[sent_rounds:]:
                    yield f"event: round\ndata: {json.dumps(new_round)}\n\n"
                sent_updates, sent_rounds = len(updates), len(rounds)
                if experiment != last_status:
                    last_status = experiment
                    yield f"event: status\ndata: {json.dumps(experiment)}\n\n"
                if experiment["status"] not in ACTIVE_STATUSES:
                    yield f"event: end\ndata: {json.dumps({'status': experiment['status']})}\n\n"
                    return
                if await request.is_disconnected():
                    return
                await asyncio.sleep(STREAM_POLL_S)

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.get("/api/v1/strategies")
    def strategies() -> dict[str, Any]:
        return STRATEGIES

    @app.get("/api/v1/workloads")
    def workloads() -> dict[str, Any]:
        return _workloads_payload()

    @app.get("/api/v1/nodes")
    def nodes(cursor: int | None = None) -> dict[str, Any]:
        return _page(
            api.nodes["data"],
            cursor,
            **{k: v for k, v in api.nodes.items() if k not in ("data", "count")},
        )

    @app.get("/api/v1/session")
    def session() -> dict[str, Any]:
        # The dashboard asks who it is before it mounts a page: open mode, as `florist up`.
        return {"mode": "open", "authenticated": False, "name": None, "role": "admin"}

    @app.get("/api/v1/node-keys")
    def node_keys() -> dict[str, Any]:
        # The nodes page's registered keys (docs/tls-and-node-auth.md): none here.
        return {"data": [], "count": 0, "supernode_auth": False, "superlink": "ok"}

    @app.post("/api/v1/experiments", response_model=None)
    def create(body: dict[str, Any]) -> dict[str, Any] | JSONResponse:
        # The real API's 422 shape for the two mistakes the tests make.
        mu = body["strategy"]["config"].get("proximal_mu")
        errors = []
        if isinstance(mu, int | float) and mu < 0:
            errors.append(
                {
                    "loc": ["body", "strategy", "config", "proximal_mu"],
                    "msg": "Input should be greater than or equal to 0",
                    "type": "greater_than_equal",
                }
            )
        if body["rounds"] is None or body["rounds"] < 1:
            errors.append(
                {"loc": ["body", "rounds"], "msg": "Input should be greater than or equal to 1"}
            )
        # The workload's config through the real validation, so the locs are pydantic's own.
        stored_workload = None
        try:
            plugin, config = resolve_workload(
                WorkloadRef.model_validate(body["workload"]), WORKLOAD_REGISTRY
            )
            stored_workload = {"name": plugin.name, "config": config.model_dump(mode="json")}
        except StrategySpecError as exc:
            errors.extend({**e, "loc": ["body", *e["loc"]]} for e in exc.errors)
        if errors:
            return JSONResponse({"detail": errors}, status_code=422)
        api.submitted.append(body)
        new_id = max(api.experiments) + 1
        experiment = _experiment(
            new_id,
            body["name"],
            "pending",
            current_round=0,
            num_rounds=body["rounds"],
            best_accuracy=None,
        )
        experiment["workload"] = stored_workload
        api.experiments[new_id] = experiment
        api.rounds[new_id] = []
        api.updates[new_id] = []
        return JSONResponse(experiment, status_code=201)

    @app.post("/api/v1/experiments/{experiment_id}/cancel", response_model=None)
    def cancel(experiment_id: int) -> dict[str, Any] | JSONResponse:
        if experiment_id not in api.experiments:
            return _not_found(experiment_id)
        experiment = copy.deepcopy(api.experiments[experiment_id])
        if experiment["status"] not in ACTIVE_STATUSES:
            detail = f"experiment {experiment_id} already finished"
            return JSONResponse({"detail": detail}, status_code=409)
        experiment["status"] = "cancelling"
        api.experiments[experiment_id] = experiment
        return experiment

    @app.post("/api/v1/experiments/{experiment_id}/resume", response_model=None)
    def resume(experiment_id: int) -> dict[str, Any] | JSONResponse:
        if experiment_id not in api.experiments:
            return _not_found(experiment_id)
        experiment = copy.deepcopy(api.experiments[experiment_id])
        if experiment["status"] != "failed":
            detail = f"experiment {experiment_id} is {experiment['status']}"
            return JSONResponse({"detail": detail}, status_code=409)
        experiment |= {"status": "pending", "error": None, "finished_at": None}
        experiment["resumes"] = experiment.get("resumes", 0) + 1
        api.experiments[experiment_id] = experiment
        return experiment

    mount_dashboard(app)
    return app


# ---------------------------------------------------------------- fixtures


@dataclass
class LiveServer:
    url: str
    api: FakeApi


@pytest.fixture(scope="module")
def live_server() -> Iterator[LiveServer]:
    api = FakeApi()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))  # port 0: the OS picks a free one, and we keep it bound
    port = sock.getsockname()[1]
    config = uvicorn.Config(build_app(api), log_level="warning", lifespan="off", ws="none")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    yield LiveServer(url=f"http://127.0.0.1:{port}", api=api)
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@dataclass
class PageSession:
    """A fresh browser page plus what it asked for and what it complained about."""

    page: Page
    server: LiveServer
    requests: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def goto(self, path: str) -> None:
        self.page.goto(self.server.url + path)

    def script_errors(self) -> list[str]:
        """Console errors other than the browser's own note on an HTTP error status."""
        return [e for e in self.errors if not e.startswith("Failed to load resource")]

    def screenshot(self, name: str) -> None:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


@pytest.fixture
def session(live_server: LiveServer, browser: Browser) -> Iterator[PageSession]:
    live_server.api.reset()
    context = browser.new_context(viewport={"width": 1366, "height": 900})
    page = context.new_page()
    page.set_default_timeout(POLL_TIMEOUT_MS)
    result = PageSession(page=page, server=live_server)

    def on_console(message: ConsoleMessage) -> None:
        if message.type == "error":
            result.errors.append(message.text)

    def on_request(request: Request) -> None:
        result.requests.append(request.url)

    page.on("request", on_request)
    page.on("console", on_console)
    page.on("pageerror", lambda exc: result.errors.append(str(exc)))
    yield result
    context.close()


# ---------------------------------------------------------------- routes and assets


def test_page_and_assets_are_served_with_their_content_types() -> None:
    # Prepare
    client = TestClient(build_app(FakeApi()))
    script_names = [p.relative_to(STATIC_DIR).as_posix() for p in STATIC_DIR.rglob("*.js")]

    # Execute
    index = client.get("/")
    pages = [client.get(path) for path in ("/experiments/3", "/compare?ids=1,2", "/nodes")]
    scripts = [client.get(f"/static/{name}") for name in script_names]
    css = client.get("/static/style.css")
    missing = client.get("/static/nope.js")

    # Assert
    assert {"app.js", "chart.js", "api.js", "pages/experiment.js"} <= set(script_names)
    for page in (index, *pages):
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert '<script type="module" src="/static/app.js">' in page.text
        assert page.text == index.text
    for script in scripts:
        assert script.status_code == 200
        # Browsers run module scripts only when served with a JavaScript MIME type.
        assert script.headers["content-type"].split(";")[0] in {
            "text/javascript",
            "application/javascript",
        }
    assert css.status_code == 200
    assert css.headers["content-type"].startswith("text/css")
    assert missing.status_code == 404


def test_assets_reference_nothing_outside_the_app() -> None:
    # The SVG namespace is an identifier, not a fetch.
    allowed = {"http://www.w3.org/2000/svg"}
    for asset in (path for path in STATIC_DIR.rglob("*") if path.is_file()):
        urls = set(re.findall(r"(?:https?:)?//[\w.-]+\.[a-z]{2,}[^\s\"')]*", asset.read_text()))
        assert urls <= allowed, f"{asset.name} refers to {urls - allowed}"


# ---------------------------------------------------------------- the page in a browser


@pytest.mark.browser
@browser_test
def test_asynchronous_runs_count_updates(session: PageSession) -> None:
    # Prepare: experiment 2 as a FedBuff run: 3 aggregations so far, of 9 accepted updates.
    api = session.server.api
    api.experiments[2] = {**api.experiments[2], "asynchronous": True, "accepted_updates": 9}

    # Execute
    session.goto("/")

    # Assert: updates in the list, aggregations and updates on the page; sync runs unchanged.
    asynchronous = session.page.locator('#experiments-table tr[data-experiment-id="2"]')
    expect(asynchronous.get_by_test_id("progress")).to_have_text("9 updates")
    synchronous = session.page.locator('#experiments-table tr[data-experiment-id="1"]')
    expect(synchronous.get_by_test_id("progress")).to_have_text("round 2 / 5")
    session.goto("/experiments/2")
    expect(session.page.locator("#round-counter")).to_have_text("Aggregation 3 / 3 · 9 updates")
    assert session.errors == []


@pytest.mark.browser
@browser_test
def test_external_experiments_are_marked_and_open(session: PageSession) -> None:
    # Prepare: experiment 2 as a Flower app run with `flwr run`: no Florist spec behind it.
    api = session.server.api
    api.experiments[2] = {
        **api.experiments[2],
        "source": "external",
        "app": "team/app 1.0.0",
        "strategy": {"name": "FedAvg", "config": {"fraction_train": 1.0}},
        "dataset": {},
        "model": {},
        "training": {},
        "clients": None,
    }

    # Execute
    session.goto("/")

    # Assert: marked in the list, its page opens with its rounds.
    external = session.page.locator('#experiments-table tr[data-experiment-id="2"]')
    expect(external.get_by_test_id("external-badge")).to_have_text("external")
    expect(external).to_contain_text("FedAvg")
    own = session.page.locator('#experiments-table tr[data-experiment-id="1"]')
    expect(own.get_by_test_id("external-badge")).to_have_count(0)
    session.goto("/experiments/2")
    expect(session.page.locator("#round-counter")).to_have_text("Round 3 / 3")
    assert session.errors == []


@pytest.mark.browser
@browser_test
def test_table_lists_experiments(session: PageSession) -> None:
    # Execute
    session.goto("/")

    # Assert
    rows = session.page.get_by_test_id("experiment-row")
    expect(rows).to_have_count(3)
    running = session.page.locator('#experiments-table tr[data-experiment-id="1"]')
    expect(running).to_contain_text("mnist-fedprox")
    expect(running.get_by_test_id("status-badge")).to_have_text("running")
    expect(running.get_by_test_id("progress")).to_have_text("round 2 / 5")
    expect(running.get_by_test_id("best-accuracy")).to_have_text("81.0%")
    expect(running.get_by_test_id("best-accuracy")).to_have_attribute(
        "title", "round 2, the last round: no validation metrics recorded"
    )
    expect(session.page.locator("#experiments-table thead")).to_contain_text(
        "best round (by validation)"
    )
    expect(running).to_contain_text("fedprox")
    expect(running).to_contain_text("mnist")
    failed = session.page.locator('#experiments-table tr[data-experiment-id="3"]')
    expect(failed.get_by_test_id("status-badge")).to_have_text("failed")
    expect(failed.get_by_test_id("best-accuracy")).to_have_text("—")
    expect(session.page.locator("#experiment-detail")).to_be_hidden()
    session.screenshot("experiments-table")
    assert session.errors == []


@pytest.mark.browser
@browser_test
def test_clicking_a_row_shows_charts_with_one_point_per_round(session: PageSession) -> None:
    # Prepare
    session.goto("/")

    # Execute
    session.page.locator('#experiments-table tr[data-experiment-id="2"]').click()

    # Assert
    expect(session.page).to_have_url(f"{session.server.url}/experiments/2")
    expect(session.page.locator("#detail-title")).to_have_text("#2 · mnist-baseline")
    expect(session.page.locator("#round-counter")).to_have_text("Round 3 / 3")
    # The trained model is one click away.
    download = session.page.locator("#download-model")
    expect(download).to_have_attribute("href", "/api/v1/experiments/2/model")
    accuracy_chart = session.page.locator("#accuracy-chart")
    expect(accuracy_chart.locator('circle[data-series="accuracy"]')).to_have_count(4)
    expect(accuracy_chart.locator('circle[data-series="val-accuracy"]')).to_have_count(4)
    expect(accuracy_chart.get_by_test_id("chart-legend")).to_contain_text("Validation accuracy")
    # The best round is chosen on validation and the figure shown is its test accuracy.
    expect(session.page.get_by_test_id("detail-best-round")).to_have_text(
        "round 2, best validation accuracy (70.0%)"
    )
    expect(session.page.get_by_test_id("detail-best-accuracy")).to_have_text("60.0%")
    expect(session.page.locator("#experiment-detail")).to_contain_text("Best round (by validation)")
    # Validation is on the main charts, not among the strategy's own metrics.
    expect(
        session.page.locator('[data-testid=strategy-chart][data-metric="val-accuracy"]')
    ).to_have_count(0)
    loss_chart = session.page.locator("#loss-chart")
    expect(loss_chart.locator('circle[data-series="loss"]')).to_have_count(4)
    expect(loss_chart.locator('circle[data-series="train-loss"]')).to_have_count(4)
    expect(loss_chart.get_by_test_id("chart-legend")).to_contain_text("Train loss")
    expect(session.page.get_by_test_id("round-row")).to_have_count(4)
    # A completed experiment cannot be cancelled.
    expect(session.page.locator("#cancel-button")).to_have_count(0)
    session.screenshot("experiment-completed")
    assert session.errors == []


@pytest.mark.browser
@browser_test
def test_a_new_round_updates_counter_and_chart_without_reload(session: PageSession) -> None:
    # Prepare
    session.goto("/experiments/1")
    page = session.page
    expect(page.locator("#round-counter")).to_have_text("Round 2 / 5")
    expect(page.locator("#accuracy-chart circle")).to_have_count(3)
    # Round 0 has no train loss, so only rounds 1 and 2 are on the train-loss series.
    expect(page.locator('#loss-chart circle[data-series="train-loss"]')).to_have_count(2)
    page.evaluate("window.__sameDocument = true")

    # Execute
    session.server.api.add_round(1, _round(3, 0.88, 0.5, 0.6))

    # Assert
    expect(page.locator("#round-counter")).to_have_text("Round 3 / 5", timeout=POLL_TIMEOUT_MS)
    expect(page.locator("#accuracy-chart circle")).to_have_count(4)
    expect(page.locator('#accuracy-chart circle[data-round="3"]')).to_have_count(1)
    expect(page.get_by_test_id("round-row")).to_have_count(4)
    # The round's client tasks reach the timeline and the clients table too.
    expect(page.locator("#client-timeline [data-testid=task-bar]")).to_have_count(9)
    expect(page.get_by_test_id("client-row").first.locator("td").nth(1)).to_have_text("3")
    expect(page.get_by_test_id("detail-best-accuracy")).to_have_text("88.0%")
    expect(page.get_by_test_id("detail-best-round")).to_have_text(
        "round 3, the last round: no validation metrics recorded"
    )
    # Absent values (finished_at, round 0's train loss) read as a dash, never "null".
    expect(page.locator("#experiment-detail")).not_to_contain_text("null")
    assert page.evaluate("window.__sameDocument") is True
    session.screenshot("experiment-running")
    assert session.errors == []


@pytest.mark.browser
@browser_test
def test_cancel_button_cancels_a_running_experiment(session: PageSession) -> None:
    # Prepare
    session.goto("/experiments/1")
    button = session.page.locator("#cancel-button")

    # Execute
    button.click()

    # Assert
    expect(session.page.locator("#detail-status")).to_have_text("cancelling")
    expect(button).to_have_count(0)
    expect(session.page.locator("#action-message")).to_contain_text("Cancellation")
    assert session.server.api.experiments[1]["status"] == "cancelling"
    assert session.errors == []


@pytest.mark.browser
@browser_test
def test_resume_button_reopens_a_failed_experiment(session: PageSession) -> None:
    # Prepare: the failed experiment offers Resume; a running one does not.
    session.goto("/experiments/1")
    expect(session.page.locator("#detail-status")).not_to_have_text("failed")
    expect(session.page.locator("#resume-button")).to_have_count(0)
    session.goto("/experiments/3")
    button = session.page.locator("#resume-button")

    # Execute
    button.click()

    # Assert: the page follows the experiment again, pending, its error gone, the resume counted.
    expect(session.page.locator("#detail-status")).to_have_text("pending")
    expect(session.page.locator("#error-message")).to_have_count(0)
    expect(session.page.locator("#resume-button")).to_have_count(0)
    expect(session.page.locator("[data-testid=detail-resumes]")).to_have_text("1 time")
    assert session.server.api.experiments[3]["status"] == "pending"
    assert session.errors == []


@pytest.mark.browser
@browser_test
def test_failed_experiment_shows_its_error_and_no_stack_trace(session: PageSession) -> None:
    # Execute
    session.goto("/experiments/3")

    # Assert
    error = session.page.locator("#error-message")
    expect(error).to_contain_text(FAILED_ERROR)
    expect(session.page.locator("#detail-status")).to_have_text("failed")
    expect(session.page.locator("#accuracy-chart")).to_contain_text("No evaluated rounds yet")
    session.screenshot("experiment-failed")

    # Prepare: should a traceback reach the page anyway, only its last line is shown.
    experiment = copy.deepcopy(session.server.api.experiments[3])
    experiment["error"] = (
        "Traceback (most recent call last):\n"
        '  File "/srv/florist/run.py", line 12, in main\n'
        f"ValueError: {FAILED_ERROR}\n"
    )
    session.server.api.experiments[3] = experiment

    # Execute
    session.page.reload()

    # Assert
    expect(error).to_contain_text(f"ValueError: {FAILED_ERROR}")
    expect(error).not_to_contain_text("Traceback")
    expect(error).not_to_contain_text("run.py")
    assert session.errors == []


@pytest.mark.browser
@browser_test
@pytest.mark.parametrize("experiment_id", ["42", "abc"])
def test_unknown_experiment_shows_not_found(session: PageSession, experiment_id: str) -> None:
    # Execute
    session.goto(f"/experiments/{experiment_id}")

    # Assert
    expect(session.page.locator("#not-found")).to_have_text(f"Experiment {experiment_id} not found")
    expect(session.page.get_by_test_id("back-link")).to_be_visible()
    expect(session.page.locator("#experiments-section")).to_be_hidden()
    assert session.script_errors() == []
    if experiment_id == "42":
        session.screenshot("experiment-not-found")


@pytest.mark.browser
@browser_test
def test_every_request_stays_on_the_app(session: PageSession) -> None:
    # Execute: the list, a detail with its live stream, the compare and nodes pages.
    session.goto("/")
    expect(session.page.get_by_test_id("experiment-row")).to_have_count(3)
    session.page.locator('#experiments-table tr[data-experiment-id="1"]').click()
    expect(session.page.locator("#accuracy-chart circle")).to_have_count(3)
    session.page.get_by_test_id("back-link").click()
    expect(session.page.locator("#experiments-section")).to_be_visible()
    session.goto("/compare?ids=1,2")
    expect(session.page.get_by_test_id("compare-row")).to_have_count(2)
    session.goto("/nodes")
    expect(session.page.get_by_test_id("node-row")).to_have_count(2)

    # Assert
    assert any(url.endswith("/static/chart.js") for url in session.requests)
    assert any(url.endswith("/api/v1/experiments/1/events") for url in session.requests)
    outside = [url for url in session.requests if not url.startswith(session.server.url + "/")]
    assert outside == []
    assert session.errors == []


@pytest.mark.browser
@browser_test
def test_clients_table_shows_how_the_scheduler_treated_each_node(session: PageSession) -> None:
    # Prepare: node 0 ran 5, 12 and 9 local steps (as FedCompass assigns or AFA draws them);
    # node 1's aggregated updates were each 1 version stale, its rejected one 0.
    updates = session.server.api.updates[2]
    node0 = [u for u in updates if u["node_id"] == NODE_IDS[0]]
    node0[0]["local_steps"], node0[2]["local_steps"] = 5, 9

    # Execute
    session.goto("/experiments/2")

    # Assert: the range of steps and the mean staleness of what was aggregated.
    first = session.page.locator(f'#clients-table tr[data-node="{NODE_IDS[0]}"]')
    second = session.page.locator(f'#clients-table tr[data-node="{NODE_IDS[1]}"]')
    expect(first.get_by_test_id("client-steps")).to_have_text("5–12")
    expect(first.get_by_test_id("client-staleness")).to_have_text("0")
    expect(second.get_by_test_id("client-steps")).to_have_text("12")
    expect(second.get_by_test_id("client-staleness")).to_have_text("1")
    assert session.errors == []


@pytest.mark.browser
@browser_test
def test_fedcompass_arrival_groups_are_shown_from_its_events(session: PageSession) -> None:
    # Prepare: FedCompass's log for experiment 2. All three start in group 0 (no speed known);
    # it aggregates at 40 s with nodes 101 and 202 back; the third is still out. 101 and 202
    # are sent work again: 101 opens group 1 (16 steps, expected at 56, latest at 64), 202
    # joins it with 7 steps; the third comes back late at 50 and founds group 2 (still open).
    api = session.server.api
    a, b, c = NODE_IDS
    unmeasured = {"group": 0, "expected_at": None, "latest_at": None}
    api.add_event(
        2,
        "fedcompass-assign",
        "2025-01-10T10:00:00Z",
        {
            "time_s": 0.0,
            "assignments": [{"node_id": n, "group": 0, "local_steps": 16} for n in (a, b, c)],
            "groups": [unmeasured],
        },
    )
    api.add_event(
        2,
        "fedcompass-aggregate",
        "2025-01-10T10:00:40Z",
        {"time_s": 40.0, "groups": [0], "nodes": [a, b], "staleness": [0, 0], "late": []},
    )
    api.add_event(
        2,
        "fedcompass-assign",
        "2025-01-10T10:00:40Z",
        {
            "time_s": 40.0,
            "assignments": [
                {"node_id": a, "group": 1, "local_steps": 16},
                {"node_id": b, "group": 1, "local_steps": 7},
            ],
            "groups": [{"group": 1, "expected_at": 56.0, "latest_at": 64.0}],
        },
    )
    api.add_event(
        2,
        "fedcompass-assign",
        "2025-01-10T10:00:50Z",
        {
            "time_s": 50.0,
            "assignments": [{"node_id": c, "group": 2, "local_steps": 16}],
            "groups": [{"group": 2, "expected_at": 98.0, "latest_at": 122.0}],
        },
    )

    # Execute
    session.goto("/experiments/2")

    # Assert: newest group first; each with its times, members and steps; the first group's
    # expected time was not known; the member that missed group 0 is marked.
    rows = session.page.get_by_test_id("group-row")
    expect(rows).to_have_count(3)
    expect(rows.nth(0)).to_have_attribute("data-group", "2")
    expect(rows.nth(0)).to_have_attribute("data-state", "open")
    expect(rows.nth(1).get_by_test_id("group-expected")).to_have_text("56.0 s")
    expect(rows.nth(1).get_by_test_id("group-latest")).to_have_text("1:04")
    expect(rows.nth(1).get_by_test_id("group-member")).to_have_text([f"{a} × 16", f"{b} × 7"])
    first = rows.nth(2)
    expect(first.get_by_test_id("group-expected")).to_have_text("when all are back")
    expect(first.get_by_test_id("group-aggregated")).to_have_text("40.0 s")
    expect(first.locator("td").nth(6)).to_have_text("2")
    expect(first.locator(".chip-missed")).to_have_text(f"{c} × 16")
    session.screenshot("experiment-arrival-groups")
    assert session.errors == []


@pytest.mark.browser
@browser_test
def test_experiment_page_shows_timeline_clients_and_strategy_panels(session: PageSession) -> None:
    # Execute
    session.goto("/experiments/2")
    page = session.page

    # Assert: a bar per task, failed and rejected ones marked.
    bars = page.locator("#client-timeline [data-testid=task-bar]")
    expect(bars).to_have_count(9)
    expect(page.locator('#client-timeline rect[data-status="failed"]')).to_have_count(1)
    expect(page.locator('#client-timeline rect[data-status="rejected"]')).to_have_count(1)
    expect(page.locator("#client-timeline .task-mark-failed")).to_have_count(1)
    # Clients: one row per node, with its counts, last status and the profile from /nodes.
    rows = page.get_by_test_id("client-row")
    expect(rows).to_have_count(3)
    first = page.locator(f'#clients-table tr[data-node="{NODE_IDS[0]}"]')
    expect(first.locator("td").nth(1)).to_have_text("3")
    expect(first).to_contain_text("phone")
    failing = page.locator(f'#clients-table tr[data-node="{NODE_IDS[2]}"]')
    expect(failing.get_by_test_id("last-update-status")).to_have_text("accepted")
    expect(failing.get_by_test_id("node-attack")).to_have_text("attacker: sign-flip ×2")
    expect(first.get_by_test_id("node-attack")).to_have_count(0)
    # Now: the experiment has finished, so a connected node is idle; the others are not
    # connected and say when they were last seen.
    expect(first.get_by_test_id("client-status")).to_have_text("idle")
    expect(failing.get_by_test_id("client-status")).to_have_text(
        re.compile(r"^offline \(last seen .+\)$")
    )
    unlisted = page.locator(f'#clients-table tr[data-node="{NODE_IDS[1]}"]')
    expect(unlisted.get_by_test_id("client-status")).to_have_attribute("data-state", "offline")
    # Strategy panels: the extra server metric and the extra client metric.
    expect(page.locator("#metric-chart-robust-accuracy circle")).to_have_count(4)
    expect(page.locator("#metric-chart-pacing-fraction circle")).to_have_count(4)
    expect(page.get_by_test_id("strategy-chart")).to_have_count(2)

    # Execute: plot against wall time instead of rounds.
    page.locator('#x-axis-toggle button[data-x="time"]').click()

    # Assert
    expect(page.locator('#x-axis-toggle button[data-x="time"]')).to_have_attribute(
        "aria-pressed", "true"
    )
    expect(page.locator("#accuracy-chart")).to_contain_text("wall time")
    expect(page.locator('#accuracy-chart circle[data-series="accuracy"]')).to_have_count(4)
    expect(page.locator('#accuracy-chart circle[data-series="val-accuracy"]')).to_have_count(4)
    session.screenshot("experiment-timeline")
    assert session.errors == []


@pytest.mark.browser
@browser_test
def test_stream_end_stops_the_live_view(session: PageSession) -> None:
    # Prepare
    session.goto("/experiments/1")
    expect(session.page.locator("#stream-state")).to_have_text("● live")

    # Execute
    session.server.api.set_status(1, "completed")

    # Assert
    expect(session.page.locator("#detail-status")).to_have_text("completed")
    expect(session.page.locator("#stream-state")).to_have_text("finished")
    expect(session.page.locator("#cancel-button")).to_have_count(0)
    assert session.errors == []


@pytest.mark.browser
@browser_test
def test_form_is_built_from_the_strategy_schema(session: PageSession) -> None:
    # Execute
    session.goto("/")
    page = session.page
    page.locator("#f-strategy").select_option("fal")

    # Assert: integer, boolean, nullable number and enum fields with their defaults.
    expect(page.locator("#f-config-pgd_steps")).to_have_value("10")
    expect(page.locator("#f-config-random_start")).not_to_be_checked()
    expect(page.locator("#f-config-step_size")).to_have_value("")
    expect(page.locator("#f-config-ordering")).to_have_value("anti")

    # Execute
    page.locator("#f-strategy").select_option("fedprox")

    # Assert
    expect(page.locator("#f-config-proximal_mu")).to_have_value("0.01")
    expect(page.locator('[data-field="strategy.config.proximal_mu"]')).to_contain_text(
        "Weight of the proximal term"
    )
    expect(page.locator("#f-config-pgd_steps")).to_have_count(0)
    assert session.errors == []


@pytest.mark.browser
@browser_test
def test_form_shows_each_422_error_next_to_its_field(session: PageSession) -> None:
    # Prepare
    session.goto("/")
    page = session.page
    page.locator("#f-strategy").select_option("fedprox")
    page.locator("#f-config-proximal_mu").fill("-1")
    page.locator("#f-rounds").fill("0")

    # Execute
    page.locator("#submit-button").click()

    # Assert
    mu_error = page.locator('[data-error-for="strategy.config.proximal_mu"]')
    expect(mu_error).to_have_text("Input should be greater than or equal to 0")
    expect(page.locator('[data-error-for="rounds"]')).to_contain_text("greater than or equal to 1")
    expect(page.locator("#form-message")).to_contain_text("not submitted")
    assert session.server.api.submitted == []
    session.screenshot("experiments-form-errors")

    # Execute: fix both and submit again.
    page.locator("#f-config-proximal_mu").fill("0.1")
    page.locator("#f-rounds").fill("4")
    page.locator("#f-name").fill("from-the-form")
    page.locator("#f-workload-config-partitioner").select_option("shards")
    page.locator("#submit-button").click()

    # Assert: the experiment page of the new experiment.
    expect(page).to_have_url(f"{session.server.url}/experiments/4")
    expect(page.locator("#detail-title")).to_have_text("#4 · from-the-form")
    (sent,) = session.server.api.submitted
    assert sent["strategy"] == {"name": "fedprox", "config": {"proximal_mu": 0.1}}
    assert sent["workload"]["config"]["partitioner"] == {
        "name": "shards",
        "classes_per_partition": 2,
    }
    assert sent["rounds"] == 4 and sent["clients"] == {"min": 2}
    assert session.script_errors() == []


def _options(page: Page, selector: str) -> list[str]:
    return page.locator(f"{selector} option").evaluate_all("(os) => os.map((o) => o.value)")


@pytest.mark.browser
@browser_test
def test_form_is_built_from_the_workload_schemas(session: PageSession) -> None:
    # Execute
    session.goto("/")
    page = session.page

    # Assert: every listed workload, the first one's summary and its top-level fields.
    expect(page.locator("#f-workload-config")).to_be_visible()
    listed = [w["name"] for w in _workloads_payload()["data"]]
    assert _options(page, "#f-workload") == listed
    assert {"digits", "synthetic", "tiny-text"} <= set(listed)
    # digits, the demo's workload, is preselected wherever it sorts.
    expect(page.locator("#f-workload")).to_have_value("digits")
    expect(page.locator("#f-workload-summary")).to_contain_text("8x8 handwritten digits")
    seed = page.locator("#f-workload-config-seed")
    expect(seed).to_have_value("0")
    expect(seed).to_have_attribute("min", "0")
    test_fraction = page.locator("#f-workload-config-test_fraction")
    expect(test_fraction).to_have_value("0.2")
    expect(test_fraction).to_have_attribute("max", "1")
    # The workload's own name is fixed (a Literal): nothing to fill in.
    expect(page.locator("#f-workload-config-name")).to_have_count(0)

    # Assert: the partitioner union is a select of its variants, its default (iid) chosen.
    partitioner = page.locator("#f-workload-config-partitioner")
    assert _options(page, "#f-workload-config-partitioner") == [
        "iid",
        "dirichlet",
        "shards",
        "quantity_skew",
        "natural",
    ]
    expect(partitioner).to_have_value("iid")
    expect(page.locator("#f-workload-config-partitioner-alpha")).to_have_count(0)

    # Execute / Assert: a variant's choice swaps its own fields in, with their defaults.
    partitioner.select_option("dirichlet")
    expect(page.locator("#f-workload-config-partitioner-alpha")).to_have_value("0.5")
    expect(page.locator("#f-workload-config-partitioner-min_partition_size")).to_have_value("10")
    expect(page.locator('[data-field="workload.config.partitioner"]')).to_contain_text("Label skew")
    partitioner.select_option("shards")
    expect(page.locator("#f-workload-config-partitioner-alpha")).to_have_count(0)
    expect(page.locator("#f-workload-config-partitioner-classes_per_partition")).to_have_value("2")
    model = page.locator("#f-workload-config-model")
    assert _options(page, "#f-workload-config-model") == ["logreg", "mlp", "cnn"]
    # The default model (mlp, hidden [64]) is preselected with its widths.
    expect(model).to_have_value("mlp")
    hidden = page.locator("#f-workload-config-model-hidden")
    expect(hidden).to_have_value("64")
    expect(page.locator('[data-field="workload.config.model.hidden"]')).to_contain_text(
        "comma-separated integers"
    )
    expect(page.locator("#f-workload-config-model-dropout")).to_have_attribute("max", "1")
    model.select_option("cnn")
    expect(page.locator("#f-workload-config-model-channels")).to_have_value("16")
    # cnn's `hidden` is one width, not mlp's list: the variant's own field replaced it.
    expect(hidden).to_have_attribute("type", "number")
    expect(hidden).to_have_value("64")

    # Execute: the workload registered by this test, whose schema shares nothing with digits'.
    page.locator("#f-workload").select_option("tiny-text")

    # Assert: Literal as a select, bounds, an integer list, a nested object and a union tagged
    # "kind" whose default (in the schema this time) is preselected.
    expect(page.locator("#f-workload-summary")).to_contain_text("toy next-character task")
    expect(page.locator("#f-workload-summary")).to_contain_text("does not evaluate")
    expect(page.locator("#f-workload-config-seed")).to_have_count(0)
    expect(page.locator("#f-workload-config-partitioner")).to_have_count(0)
    assert _options(page, "#f-workload-config-vocabulary") == ["bytes", "words"]
    expect(page.locator("#f-workload-config-vocabulary")).to_have_value("words")
    length = page.locator("#f-workload-config-sequence_length")
    expect(length).to_have_value("80")
    expect(length).to_have_attribute("min", "8")
    expect(length).to_have_attribute("max", "512")
    expect(page.locator("#f-workload-config-layers")).to_have_value("128, 128")
    expect(page.locator("#f-workload-config-augment-flip")).not_to_be_checked()
    expect(page.locator("#f-workload-config-augment-noise")).to_have_value("0")
    sampler = page.locator("#f-workload-config-sampler")
    assert _options(page, "#f-workload-config-sampler") == ["uniform", "weighted"]
    expect(sampler).to_have_value("uniform")
    sampler.select_option("weighted")
    expect(page.locator("#f-workload-config-sampler-weights")).to_have_value("1, 1")
    expect(page.locator("#f-workload-config-sampler-temperature")).to_have_attribute("max", "10")
    session.screenshot("experiments-form-workload")
    assert session.errors == []


@pytest.mark.browser
@browser_test
def test_form_submits_the_workload_and_its_nested_config(session: PageSession) -> None:
    # Prepare
    session.goto("/")
    page = session.page
    page.locator("#f-name").fill("digits-dirichlet-mlp")
    page.locator("#f-workload").select_option("digits")
    page.locator("#f-workload-config-seed").fill("7")
    page.locator("#f-workload-config-partitioner").select_option("dirichlet")
    page.locator("#f-workload-config-partitioner-alpha").fill("0.3")
    page.locator("#f-workload-config-model").select_option("mlp")
    page.locator("#f-workload-config-model-hidden").fill("32, 16")

    # Execute
    page.locator("#submit-button").click()

    # Assert: the body is a workload body, its nested config as filled in (defaults included).
    expect(page).to_have_url(f"{session.server.url}/experiments/4")
    (sent,) = session.server.api.submitted
    assert "dataset" not in sent and "model" not in sent
    assert sent["workload"] == {
        "name": "digits",
        "config": {
            "seed": 7,
            "test_fraction": 0.2,
            "validation_fraction": 0.1,
            "partitioner": {"name": "dirichlet", "alpha": 0.3, "min_partition_size": 10},
            "model": {"name": "mlp", "hidden": [32, 16], "dropout": 0},
        },
    }
    # The experiment page reads the stored workload (ExperimentPublic.workload).
    facts = page.locator("#experiment-detail dl.facts")
    expect(facts).to_contain_text("digits")
    expect(facts).to_contain_text("partitioner=dirichlet(alpha=0.3, min_partition_size=10)")
    expect(facts).to_contain_text("model=mlp(hidden=[32,16], dropout=0)")

    # Execute: the registered workload, its union on "kind" and its nested object.
    session.goto("/")
    page.locator("#f-workload").select_option("tiny-text")
    page.locator("#f-workload-config-vocabulary").select_option("bytes")
    page.locator("#f-workload-config-layers").fill("64")
    page.locator("#f-workload-config-augment-flip").check()
    page.locator("#f-workload-config-sampler").select_option("weighted")
    page.locator("#f-workload-config-sampler-weights").fill("0.5, 2")
    page.locator("#submit-button").click()

    # Assert
    expect(page).to_have_url(f"{session.server.url}/experiments/5")
    assert session.server.api.submitted[1]["workload"] == {
        "name": "tiny-text",
        "config": {
            "vocabulary": "bytes",
            "sequence_length": 80,
            "layers": [64],
            "augment": {"flip": True, "noise": 0},
            "sampler": {"kind": "weighted", "weights": [0.5, 2], "temperature": 1},
        },
    }
    assert session.script_errors() == []


@pytest.mark.browser
@browser_test
def test_form_shows_workload_errors_next_to_their_fields(session: PageSession) -> None:
    # Prepare: a bad value inside a union's variant, a bad list item, a bad top-level field.
    session.goto("/")
    page = session.page
    page.locator("#f-workload").select_option("digits")
    page.locator("#f-workload-config-partitioner").select_option("dirichlet")
    page.locator("#f-workload-config-partitioner-alpha").fill("0")
    page.locator("#f-workload-config-model").select_option("mlp")
    page.locator("#f-workload-config-model-hidden").fill("32, wide")
    page.locator("#f-workload-config-test_fraction").fill("1.5")

    # Execute
    page.locator("#submit-button").click()

    # Assert: pydantic's locs name the union's tag ([..., "partitioner", "dirichlet", "alpha"]);
    # each error still lands next to the field it is about.
    expect(page.locator('[data-error-for="workload.config.partitioner.alpha"]')).to_have_text(
        "Input should be greater than 0"
    )
    expect(page.locator('[data-error-for="workload.config.model.hidden"]')).to_contain_text(
        "valid integer"
    )
    expect(page.locator('[data-error-for="workload.config.test_fraction"]')).to_contain_text(
        "less than 1"
    )
    expect(page.locator('[data-field="workload.config.partitioner.alpha"]')).to_have_class(
        re.compile(r"\binvalid\b")
    )
    expect(page.locator('[data-error-for="workload.config.seed"]')).to_be_hidden()
    expect(page.locator("#form-message")).to_contain_text("fix the fields marked in red")
    assert session.server.api.submitted == []
    session.screenshot("experiments-form-workload-errors")

    # Execute: a rule over the whole config (digits has no per-device split for "natural").
    page.locator("#f-workload-config-partitioner").select_option("natural")
    page.locator("#f-workload-config-model-hidden").fill("32")
    page.locator("#f-workload-config-test_fraction").fill("0.2")
    page.locator("#submit-button").click()

    # Assert: it shows at the top of the workload's settings; the fixed fields' errors are gone.
    expect(page.locator('[data-error-for="workload.config"]')).to_contain_text(
        "partitioner 'natural' needs a dataset with a per-device split"
    )
    expect(page.locator('[data-error-for="workload.config.model.hidden"]')).to_be_hidden()
    assert session.server.api.submitted == []
    assert session.script_errors() == []


@pytest.mark.browser
@browser_test
def test_compare_from_the_list(session: PageSession) -> None:
    # Prepare
    session.goto("/")
    page = session.page
    expect(page.locator("#compare-button")).to_be_disabled()

    # Execute
    for experiment_id in (1, 2):
        row = page.locator(f'#experiments-table tr[data-experiment-id="{experiment_id}"]')
        row.get_by_test_id("compare-pick").check()
    page.locator("#compare-button").click()

    # Assert
    expect(page).to_have_url(f"{session.server.url}/compare?ids=1,2")
    expect(page.get_by_test_id("compare-row")).to_have_count(2)
    expect(page.locator("#compare-chart g.chart-series")).to_have_count(2)
    expect(page.locator("#compare-chart circle")).to_have_count(7)
    expect(page.locator("#compare-chart")).to_contain_text("mnist-baseline")
    page.locator('#compare-x-toggle button[data-x="time"]').click()
    expect(page.locator("#compare-chart")).to_contain_text("wall time")
    session.screenshot("compare")
    # Only experiment 1 ran on the virtual clock: its points alone plot against virtual time.
    api = session.server.api
    api.rounds[1] = [r | {"virtual_time_s": 12.5 * r["server_round"]} for r in api.rounds[1]]
    page.reload()
    page.locator('#compare-x-toggle button[data-x="virtual"]').click()
    expect(page.locator("#compare-chart")).to_contain_text("virtual time")
    expect(page.locator("#compare-chart circle")).to_have_count(len(api.rounds[1]))
    assert session.errors == []


@pytest.mark.browser
@browser_test
def test_compare_names_unknown_ids(session: PageSession) -> None:
    session.goto("/compare?ids=2,99,x")
    expect(session.page.locator("#compare-missing")).to_have_text(
        "Not found: experiment x, experiment 99"
    )
    expect(session.page.get_by_test_id("compare-row")).to_have_count(1)
    assert session.script_errors() == []


@pytest.mark.browser
@browser_test
def test_nodes_page_shows_health_and_config(session: PageSession) -> None:
    session.goto("/nodes")
    rows = session.page.get_by_test_id("node-row")
    expect(rows).to_have_count(2)
    expect(rows.nth(0).get_by_test_id("node-health")).to_have_text("online")
    expect(rows.nth(0)).to_contain_text("profile=phone")
    expect(rows.nth(1).get_by_test_id("node-health")).to_have_text("offline")
    expect(rows.nth(1)).to_contain_text(NODE_IDS[2])
    expect(rows.nth(1).get_by_test_id("node-attack")).to_have_text("attacker: sign-flip ×2")
    expect(rows.nth(0).get_by_test_id("node-attack")).to_have_count(0)
    expect(session.page.locator("#nodes-note")).to_contain_text("SuperLink's live view")
    session.screenshot("nodes")
    assert session.errors == []


@pytest.mark.browser
@browser_test
def test_nodes_page_lists_connected_nodes_that_never_took_part(session: PageSession) -> None:
    # Prepare: a SuperNode that has just connected: the SuperLink knows it, no round has it.
    api = session.server.api
    fresh = {
        **NODES["data"][0],
        "node_id": "303",
        "node_config": {},
        "first_seen": None,
        "last_seen": None,
        "seconds_since_seen": None,
    }
    api.nodes = {**api.nodes, "data": [*api.nodes["data"], fresh], "count": 3}

    # Execute
    session.goto("/nodes")

    # Assert
    row = session.page.locator('#nodes-body tr[data-node="303"]')
    expect(row.get_by_test_id("node-health")).to_have_text("online")
    expect(row.get_by_test_id("node-last-seen")).to_have_text("never")
    assert session.errors == []


@pytest.mark.browser
@browser_test
def test_without_the_superlink_pages_fall_back_to_the_rounds(session: PageSession) -> None:
    # Prepare: the API could not ask the SuperLink; only Florist's records are there.
    api = session.server.api
    recorded = [
        {k: v for k, v in n.items() if k not in ("status", "disconnected_at")}
        for n in NODES["data"]
    ]
    api.nodes = {**api.nodes, "data": recorded, "superlink": "unreachable: connection refused"}

    # Execute
    session.goto("/nodes")

    # Assert: health from the rounds alone, and the page says why.
    rows = session.page.get_by_test_id("node-row")
    expect(rows.nth(0).get_by_test_id("node-health")).to_have_text("seen recently")
    expect(rows.nth(1).get_by_test_id("node-health")).to_have_text("stale")
    expect(session.page.locator("#nodes-note")).to_contain_text("unreachable: connection refused")

    # Execute: a running experiment's clients.
    session.goto("/experiments/1")

    # Assert: no live connection to show, only when each was last seen.
    first = session.page.locator(f'#clients-table tr[data-node="{NODE_IDS[0]}"]')
    expect(first.get_by_test_id("client-status")).to_have_text(re.compile(r"^last seen .+"))
    assert session.errors == []


@pytest.mark.browser
@browser_test
def test_a_running_experiments_connected_clients_are_online(session: PageSession) -> None:
    session.goto("/experiments/1")
    first = session.page.locator(f'#clients-table tr[data-node="{NODE_IDS[0]}"]')
    expect(first.get_by_test_id("client-status")).to_have_text("online")
    assert session.errors == []


@pytest.mark.browser
@browser_test
def test_dispatched_nodes_are_training_and_decisions_are_listed(session: PageSession) -> None:
    # Prepare: round 3 of the running experiment 1 went out after round 2's replies; 303 is a
    # connected node sent its first task; the offline node was sent work too.
    api = session.server.api
    online_303 = {**NODES["data"][0], "node_id": "303", "node_config": {}}
    api.nodes = {**api.nodes, "data": [*api.nodes["data"], online_303]}
    sent = {"server_round": 3, "model_version": 2}
    node_ids = [NODE_IDS[0], NODE_IDS[2], "303"]
    api.add_event(1, "dispatch", "2025-01-10T10:03:00Z", {**sent, "node_ids": node_ids})
    api.add_event(1, "submitted", "2025-01-10T09:59:30Z", {})
    resent = {"node_id": NODE_IDS[2], "action": "re-sent", "reason": "no reply before the TTL"}
    api.add_event(1, "policy", "2025-01-10T10:02:40Z", resent)
    api.add_event(1, "policy", "2025-01-10T10:02:50Z", {"round": 2, "arrived": 2})

    # Execute
    session.goto("/experiments/1")
    page = session.page

    # Assert: work out and no reply since is "training", unless the node is gone.
    first = page.locator(f'#clients-table tr[data-node="{NODE_IDS[0]}"]')
    expect(first.get_by_test_id("client-status")).to_have_text("training")
    newcomer = page.locator('#clients-table tr[data-node="303"]')
    expect(newcomer.get_by_test_id("client-status")).to_have_text("training")
    expect(newcomer.locator("td").nth(1)).to_have_text("0")
    offline = page.locator(f'#clients-table tr[data-node="{NODE_IDS[2]}"]')
    expect(offline.get_by_test_id("client-status")).to_have_attribute("data-state", "offline")
    # Decisions: the policy events only, newest first, a round's decision by its message.
    rows = page.get_by_test_id("decision-row")
    expect(rows).to_have_count(2)
    expect(rows.nth(0)).to_contain_text("policy 4")
    expect(rows.nth(1).locator("td").nth(1)).to_have_text(NODE_IDS[2])
    expect(rows.nth(1).locator("td").nth(2)).to_have_text("re-sent")
    expect(rows.nth(1).locator("td").nth(3)).to_have_text("no reply before the TTL")
    log_requests = [url for url in session.requests if "/api/v1/experiments/1/log" in url]
    assert log_requests and "kind=dispatch&kind=policy" in log_requests[0]
    session.screenshot("experiment-training-decisions")

    # Execute: round 3's replies arrive (at 10:03:05 and later).
    api.add_round(1, _round(3, 0.85, 0.6, 0.8))

    # Assert: the reply ends the task, live, without a new look at the log.
    expect(first.get_by_test_id("client-status")).to_have_text("online")
    expect(newcomer.get_by_test_id("client-status")).to_have_text("training")

    # Execute: a last decision, then the experiment ends.
    api.add_event(1, "policy", "2025-01-10T10:04:00Z", {**resent, "action": "given-up"})
    api.set_status(1, "completed")

    # Assert: the log is read once more when the stream ends; nobody is training any more.
    expect(rows).to_have_count(3)
    expect(rows.nth(0).locator("td").nth(2)).to_have_text("given-up")
    expect(newcomer.get_by_test_id("client-status")).to_have_text("idle")
    assert session.errors == []


@pytest.mark.browser
@browser_test
def test_zeroth_order_run_plots_its_objective_against_cumulative_queries(
    session: PageSession,
) -> None:
    # Prepare: experiment 2 as a FedZO run spending 100, 200 and 300 queries in rounds 1-3.
    api = session.server.api
    api.rounds[2] = [
        r
        | {
            "metrics": {**r["metrics"], "objective": 10.0 - 2 * r["server_round"]},
            "train_metrics": {
                **r["train_metrics"],
                **(
                    {
                        "zoo-queries": 100.0 * r["server_round"],
                        "zoo-objective": 12.0 - 2 * r["server_round"],
                    }
                    if r["server_round"] > 0
                    else {}
                ),
            },
        }
        for r in api.rounds[2]
    ]

    # Execute
    session.goto("/experiments/2")
    page = session.page

    # Assert: F after each round at the queries spent up to it (0, 100, 300, 600); the clients'
    # mean objective of the model they were sent at the queries spent before their round.
    chart = page.locator("#queries-chart")
    expect(chart.locator('circle[data-series="objective"]')).to_have_count(4)
    expect(chart.locator('circle[data-series="zoo-objective"]')).to_have_count(3)
    expect(page.locator("#queries-panel figcaption")).to_have_text("600 queries so far")
    last = chart.locator('circle[data-series="objective"][data-round="3"] title')
    expect(last).to_contain_text("Round 3 after 600 queries")
    first_client = chart.locator('circle[data-series="zoo-objective"][data-round="1"] title')
    expect(first_client).to_contain_text("Round 1 after 0 queries")
    # A run that counts no queries has no such panel.
    session.goto("/experiments/1")
    expect(page.locator("#accuracy-chart")).to_be_visible()
    expect(page.locator("#queries-panel")).to_have_count(0)
    assert session.script_errors() == []
