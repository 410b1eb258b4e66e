"""The live endpoints on a real database: the SSE stream of an experiment, and GET /nodes."""

from __future__ import annotations

import json
import queue
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from florist.server.api.app import create_app
from florist.server.api.routes import events as events_route
from florist.server.db.models import utcnow
from florist.server.recording import RoundRecord, SqlRunRecorder, UpdateRecord
from florist.server.settings import Settings

BODY: dict[str, Any] = {
    "name": "sse",
    "strategy": {"name": "fedavg", "config": {}},
    "dataset": {"name": "digits", "partitioner": {"name": "iid"}},
    "model": {"name": "mlp"},
    "rounds": 3,
    "clients": {"min": 2},
}
NODES = (11, 2**64 - 5)  # the second one is past BIGINT's range, as Flower's node ids can be
WAIT_S = 10.0


@dataclass(frozen=True)
class Sse:
    event: str
    id: str | None
    data: dict[str, Any]


def parse_sse(lines: Iterator[str]) -> Iterator[Sse]:
    """Events from an event-stream's lines; comments and retry fields are skipped."""
    fields: dict[str, str] = {}
    for line in lines:
        if line == "":
            if "data" in fields:
                yield Sse(
                    fields.get("event", "message"), fields.get("id"), json.loads(fields["data"])
                )
            fields = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")


class Reader:
    """Reads one stream in a thread, so the test can write to the database meanwhile."""

    def __init__(self, client: httpx.Client, path: str, headers: dict[str, str] | None = None):
        self.events: queue.Queue[Sse] = queue.Queue()
        self.status_code: int | None = None
        self.content_type = ""
        self.done = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(client, path, headers or {}), daemon=True
        )
        self._thread.start()

    def _run(self, client: httpx.Client, path: str, headers: dict[str, str]) -> None:
        try:
            with client.stream("GET", path, headers=headers) as response:
                self.status_code = response.status_code
                self.content_type = response.headers.get("content-type", "")
                for event in parse_sse(response.iter_lines()):
                    self.events.put(event)
        finally:
            self.done.set()

    def next(self, event: str) -> Sse:
        """The next event of this kind, skipping others."""
        deadline = time.monotonic() + WAIT_S
        while True:
            got = self.events.get(timeout=max(0.01, deadline - time.monotonic()))
            if got.event == event:
                return got

    def rest(self) -> list[Sse]:
        assert self.done.wait(WAIT_S), "the stream did not end"
        return list(self.events.queue)


@dataclass
class Server:
    client: httpx.Client
    url: str


@pytest.fixture
def server(migrated_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Server]:
    yield from serve(Settings(home=tmp_path, database_url=migrated_url), monkeypatch)


def serve(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[Server]:
    monkeypatch.setattr(events_route, "POLL_INTERVAL_S", 0.05)
    monkeypatch.setattr(events_route, "HEARTBEAT_S", 0.2)
    app = create_app(settings, follow_runs=False)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    uv = uvicorn.Server(uvicorn.Config(app, log_level="warning", ws="none"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not uv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the API did not start"
        time.sleep(0.02)
    url = f"http://127.0.0.1:{port}"
    with httpx.Client(base_url=url, timeout=WAIT_S) as client:
        yield Server(client=client, url=url)
    uv.should_exit = True
    thread.join(timeout=10)
    sock.close()


@pytest.fixture
def recorder(migrated_url: str) -> Iterator[SqlRunRecorder]:
    rec = SqlRunRecorder.from_url(migrated_url)
    yield rec
    rec.close()


def make_round(
    server_round: int, accuracy: float, val_accuracy: float | None = None
) -> RoundRecord:
    now = utcnow()
    updates = tuple(
        UpdateRecord(
            node_id=node,
            status="accepted",
            num_examples=100,
            train_time_s=0.5,
            metrics={"train-loss": 1.0},
            dispatched_at=now - timedelta(seconds=1),
            arrived_at=now,
            model_version=server_round - 1,
            arrival_version=server_round - 1,
            local_steps=7,
        )
        for node in NODES
    )
    return RoundRecord(
        server_round=server_round,
        started_at=now - timedelta(seconds=1),
        finished_at=now,
        metrics={"accuracy": accuracy, "loss": 1 - accuracy, "robust-accuracy": accuracy / 2}
        | ({} if val_accuracy is None else {"val-accuracy": val_accuracy}),
        train_metrics={"train-loss": 1.0},
        evaluate_metrics={},
        updates=updates,
    )


def submit(server: Server) -> int:
    response = server.client.post("/api/v1/experiments", json=BODY)
    assert response.status_code == 201, response.text
    return int(response.json()["id"])


def test_rounds_arrive_live_and_the_stream_ends_with_the_experiment(
    server: Server, recorder: SqlRunRecorder
) -> None:
    # Prepare
    experiment_id = submit(server)
    reader = Reader(server.client, f"/api/v1/experiments/{experiment_id}/events")
    first = reader.next("status")
    assert first.data["status"] == "pending" and first.data["current_round"] == 0
    assert reader.status_code == 200 and reader.content_type.startswith("text/event-stream")
    run_id = recorder.start_run(experiment_id=experiment_id, flwr_run_id=2**63 + 1)

    # Execute / Assert: each round shows up while the stream is open.
    assert reader.next("status").data["status"] == "running"
    # Round 1 is the best on validation, round 2 on test: the test figure reported is round 1's.
    recorder.record_round(run_id, make_round(1, 0.5, val_accuracy=0.9))
    updates = [reader.next("update"), reader.next("update")]
    round_1 = reader.next("round")
    recorder.record_round(run_id, make_round(2, 0.7, val_accuracy=0.6))
    round_2 = reader.next("round")
    assert not reader.done.is_set()
    recorder.finish_run(run_id, status="completed")

    # Assert
    assert {u.data["node_id"] for u in updates} == {str(n) for n in NODES}
    assert updates[0].data["local_steps"] == 7 and updates[0].data["dispatched_at"] is not None
    assert round_1.data["server_round"] == 1 and round_2.data["server_round"] == 2
    assert round_2.data["metrics"]["robust-accuracy"] == pytest.approx(0.35)
    rest = reader.rest()
    statuses = [e for e in rest if e.event == "status"]
    assert statuses[-1].data["status"] == "completed"
    assert statuses[-1].data["current_round"] == 2
    assert statuses[-1].data["best_accuracy"] == pytest.approx(0.5)
    assert statuses[-1].data["best_round"] == 1
    assert statuses[-1].data["best_val_accuracy"] == pytest.approx(0.9)
    assert statuses[-1].data["best_by"] == "validation"
    assert rest[-1].event == "end" and rest[-1].data["status"] == "completed"
    assert [e.event for e in rest].count("round") == 0  # nothing sent twice


def test_resume_with_last_event_id_or_since(server: Server, recorder: SqlRunRecorder) -> None:
    # Prepare: a finished run of three rounds, and the id of round 1's event.
    experiment_id = submit(server)
    run_id = recorder.start_run(experiment_id=experiment_id, flwr_run_id=5)
    for server_round in (1, 2, 3):
        recorder.record_round(run_id, make_round(server_round, 0.2 * server_round))
    recorder.finish_run(run_id, status="completed")
    path = f"/api/v1/experiments/{experiment_id}/events"
    everything = Reader(server.client, path).rest()
    (round_1,) = [e for e in everything if e.event == "round" and e.data["server_round"] == 1]
    assert round_1.id is not None

    # Execute
    by_header = Reader(server.client, path, headers={"Last-Event-ID": round_1.id}).rest()
    by_cursor = Reader(server.client, f"{path}?since={round_1.id}").rest()
    by_round = Reader(server.client, f"{path}?since=2").rest()

    # Assert
    def rounds(events: list[Sse]) -> list[int]:
        return [e.data["server_round"] for e in events if e.event == "round"]

    assert rounds(everything) == [1, 2, 3]
    assert len([e for e in everything if e.event == "update"]) == 6
    assert rounds(by_header) == [2, 3] and rounds(by_cursor) == [2, 3]
    assert rounds(by_round) == [3]
    assert [e.data["server_round"] for e in by_round if e.event == "update"] == [3, 3]
    # A cursor past every row (larger than the database's integers) resumes after all of them.
    huge = "9" * 30
    for since in (huge, f"{huge}-{huge}"):
        past = Reader(server.client, f"{path}?since={since}").rest()
        assert rounds(past) == [] and past[-1].event == "end"
    for events in (everything, by_header, by_round):
        assert events[-1].event == "end"


def test_failed_run_ends_the_stream_with_its_error(
    server: Server, recorder: SqlRunRecorder
) -> None:
    experiment_id = submit(server)
    run_id = recorder.start_run(experiment_id=experiment_id, flwr_run_id=9)
    recorder.finish_run(run_id, status="failed", error="ValueError: no clients")
    events = Reader(server.client, f"/api/v1/experiments/{experiment_id}/events").rest()
    assert events[-1].event == "end"
    assert events[-1].data == {"status": "failed", "error": "ValueError: no clients"}


def test_heartbeat_keeps_an_idle_stream_alive(server: Server) -> None:
    experiment_id = submit(server)
    lines: list[str] = []
    with server.client.stream("GET", f"/api/v1/experiments/{experiment_id}/events") as response:
        for line in response.iter_lines():
            lines.append(line)
            if line.startswith(":"):
                break
    assert lines[0] == "retry: 2000"
    assert lines[-1].startswith(":")


def test_unknown_experiment_and_bad_cursor(server: Server) -> None:
    missing = server.client.get("/api/v1/experiments/999/events")
    assert missing.status_code == 404
    assert missing.json()["detail"] == "experiment 999 not found"
    experiment_id = submit(server)
    bad = server.client.get(f"/api/v1/experiments/{experiment_id}/events?since=x")
    assert bad.status_code == 422
    bad_header = server.client.get(
        f"/api/v1/experiments/{experiment_id}/events", headers={"Last-Event-ID": "nope"}
    )
    assert bad_header.status_code == 422


def test_nodes_lists_the_nodes_seen_with_their_health(
    server: Server, recorder: SqlRunRecorder
) -> None:
    assert server.client.get("/api/v1/nodes").json()["count"] == 0
    experiment_id = submit(server)
    run_id = recorder.start_run(experiment_id=experiment_id, flwr_run_id=3)
    recorder.record_round(run_id, make_round(1, 0.5))

    fresh = server.client.get("/api/v1/nodes").json()
    time.sleep(0.05)
    stale = server.client.get("/api/v1/nodes", params={"stale_after_s": 0.01}).json()

    assert fresh["count"] == 2
    assert {n["node_id"] for n in fresh["data"]} == {str(n) for n in NODES}
    assert all(not n["stale"] and n["node_config"] == {} for n in fresh["data"])
    assert all(n["stale"] for n in stale["data"])
    assert server.client.get("/api/v1/nodes", params={"stale_after_s": 0}).status_code == 422


def test_openapi_documents_the_new_endpoints(server: Server) -> None:
    paths = server.client.get("/openapi.json").json()["paths"]
    events = paths["/api/v1/experiments/{experiment_id}/events"]["get"]
    assert "text/event-stream" in events["responses"]["200"]["content"]
    assert "404" in events["responses"]
    nodes = paths["/api/v1/nodes"]["get"]["responses"]["200"]["content"]["application/json"]
    assert nodes["schema"]["$ref"].endswith("/NodesPublic")


@pytest.fixture
def limited_server(
    migrated_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Server]:
    settings = Settings(
        home=tmp_path, database_url=migrated_url, sse_max_streams=1, sse_max_lifetime_s=1.0
    )
    yield from serve(settings, monkeypatch)


def test_streams_beyond_the_cap_are_refused_with_retry_after(limited_server: Server) -> None:
    # Prepare: one stream open, of an experiment that does not finish.
    experiment_id = submit(limited_server)
    path = f"/api/v1/experiments/{experiment_id}/events"
    first = Reader(limited_server.client, path)
    first.next("status")

    # Execute
    refused = limited_server.client.get(path)

    # Assert: refused while the first is open, served again once it has ended.
    assert refused.status_code == 503, refused.text
    assert refused.headers["Retry-After"] == str(events_route.STREAMS_RETRY_AFTER_S)
    assert "1 event streams are open" in refused.json()["detail"]
    first.rest()
    again = Reader(limited_server.client, path)
    again.next("status")
    assert again.status_code == 200
    assert again.rest()[-1].event == "reconnect"


def test_a_stream_ends_at_its_lifetime_and_resumes_without_resending(
    limited_server: Server, recorder: SqlRunRecorder
) -> None:
    # Prepare: a running experiment with one round.
    experiment_id = submit(limited_server)
    run_id = recorder.start_run(experiment_id=experiment_id, flwr_run_id=5)
    recorder.record_round(run_id, make_round(1, 0.5))
    path = f"/api/v1/experiments/{experiment_id}/events"

    # Execute: the stream outlives its second.
    started = time.monotonic()
    first = Reader(limited_server.client, path).rest()
    lived = time.monotonic() - started
    recorder.record_round(run_id, make_round(2, 0.6))
    assert first[-1].id is not None
    second = Reader(limited_server.client, path, headers={"Last-Event-ID": first[-1].id}).rest()

    # Assert: a final reconnect event, and a resume that sends only what is new.
    assert first[-1].event == "reconnect" and first[-1].data["after_s"] >= 1.0
    assert 1.0 <= lived < WAIT_S
    assert [e.data["server_round"] for e in first if e.event == "round"] == [1]
    assert [e.data["server_round"] for e in second if e.event == "round"] == [2]
    assert [e.event for e in second].count("update") == len(NODES)


def test_a_long_history_arrives_in_batches_with_updates_before_their_round(
    server: Server, recorder: SqlRunRecorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(events_route, "FIRST_BATCH", 2)
    monkeypatch.setattr(events_route, "POLL_BATCH", 3)
    experiment_id = submit(server)
    run_id = recorder.start_run(experiment_id=experiment_id, flwr_run_id=5)
    for server_round in (1, 2, 3, 4):
        recorder.record_round(run_id, make_round(server_round, 0.1 * server_round))
    recorder.finish_run(run_id, status="completed")

    events = Reader(server.client, f"/api/v1/experiments/{experiment_id}/events").rest()

    rows = [(e.event, e.data["server_round"]) for e in events if e.event in ("round", "update")]
    assert [r for r in rows if r[0] == "round"] == [("round", k) for k in (1, 2, 3, 4)]
    assert len(rows) == 4 * (len(NODES) + 1)  # every row once
    for index, (event, server_round) in enumerate(rows):
        if event == "round":  # all of its updates came before it
            assert [u for u in rows[:index] if u == ("update", server_round)] == [
                ("update", server_round)
            ] * len(NODES)
    # The first, smaller batch comes before anything else; the status once, right after it.
    assert [e.event for e in events[:3]] == ["update", "update", "status"]
    assert [e.event for e in events].count("status") == 1
    assert events[-2].event == "round" and events[-1].event == "end"


def test_a_bad_cursor_is_a_422_in_the_one_error_format(server: Server) -> None:
    experiment_id = submit(server)
    bad = server.client.get(
        f"/api/v1/experiments/{experiment_id}/events", headers={"Last-Event-ID": "nope"}
    )
    assert bad.status_code == 422
    (error,) = bad.json()["detail"]
    assert error["loc"] == ["header", "Last-Event-ID"] and "nope" in error["msg"]
