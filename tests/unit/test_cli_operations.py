"""`florist ls`, `status`, `logs`, `cancel`, `resume` against the real API and database."""

from __future__ import annotations

import io
import json
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
from typer.testing import CliRunner

from florist.server import cli
from florist.server.api.app import create_app
from florist.server.api.routes import events as events_route
from florist.server.db.models import utcnow
from florist.server.logs import configure_logging
from florist.server.processes import free_port, wait_for_port
from florist.server.recording import RoundRecord, SqlRunRecorder, UpdateRecord
from florist.server.settings import Settings

from .test_api import BODY
from .test_observability import logs_restored  # noqa: F401  (a fixture)


@dataclass
class Served:
    base: str
    url: str
    http: httpx.Client

    def submit(self, name: str) -> dict[str, Any]:
        response = self.http.post("/api/v1/experiments", json=BODY | {"name": name})
        assert response.status_code == 201, response.text
        return dict(response.json())


@pytest.fixture
def served(migrated_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Served]:
    """The API on a free port (no SuperLink: nothing runs, the test writes what a run would),
    with uvicorn's loggers left to Florist's handler, as `florist api` runs it."""
    monkeypatch.setattr(events_route, "POLL_INTERVAL_S", 0.05)
    port = free_port()
    settings = Settings(home=tmp_path, database_url=migrated_url, api_port=port)
    config = uvicorn.Config(
        create_app(settings, follow_runs=False),
        host="127.0.0.1",
        port=port,
        log_level="info",
        log_config=None,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for_port(f"127.0.0.1:{port}")
    base = f"http://127.0.0.1:{port}"
    with httpx.Client(base_url=base, timeout=30) as http:
        yield Served(base, migrated_url, http)
    server.should_exit = True
    thread.join(timeout=15)


def florist(*args: str) -> Any:
    return CliRunner().invoke(cli.app, list(args))


def record_rounds(url: str, experiment_id: int, rounds: int, *, finish: bool = False) -> int:
    """What the ServerApp writes: a run, its rounds, its end; returns the run's id."""
    recorder = SqlRunRecorder.from_url(url)
    run_id = recorder.start_run(experiment_id=experiment_id, flwr_run_id=77)
    for k in range(1, rounds + 1):
        end = utcnow()
        recorder.record_round(
            run_id,
            RoundRecord(
                server_round=k,
                started_at=end - timedelta(seconds=2),
                finished_at=end,
                metrics={"accuracy": 0.5 + k / 10, "loss": 1.0 / k},
                train_metrics={},
                evaluate_metrics={},
                updates=(UpdateRecord(node_id=5, status="accepted", arrived_at=end),),
            ),
        )
    if finish:
        recorder.finish_run(run_id, status="completed")
    recorder.close()
    return run_id


def test_ls_lists_the_newest_first_and_filters_by_status(served: Served) -> None:
    first = served.submit("first")
    second = served.submit("second")
    record_rounds(served.url, second["id"], 2)

    table = florist("ls", "--api", served.base)
    running = florist("ls", "--api", served.base, "--status", "running", "--json")
    newest = florist("ls", "--api", served.base, "--limit", "1", "--json")

    assert table.exit_code == 0, table.output
    assert table.output.index("second") < table.output.index("first")
    assert "2/5" in table.output and "0/5" in table.output
    assert [json.loads(line)["id"] for line in running.output.splitlines()] == [second["id"]]
    assert [json.loads(line)["id"] for line in newest.output.splitlines()] == [second["id"]]
    assert first["id"] != second["id"]


def test_status_shows_progress_and_an_unknown_id_is_a_clear_error(served: Served) -> None:
    exp = served.submit("watched")
    record_rounds(served.url, exp["id"], 3)

    shown = florist("status", str(exp["id"]), "--api", served.base)
    unknown = florist("status", "4242", "--api", served.base)

    assert shown.exit_code == 0, shown.output
    assert "running" in shown.output and "3 of 5" in shown.output
    assert "Flower run" in shown.output and "77" in shown.output
    assert unknown.exit_code == 1
    assert "experiment 4242 not found" in unknown.output and "Traceback" not in unknown.output


def test_an_api_that_is_not_there_is_named_not_a_traceback() -> None:
    base = f"http://127.0.0.1:{free_port()}"
    for args in (["ls"], ["status", "1"], ["logs", "1"], ["logs", "1", "-f"], ["cancel", "1"]):
        result = florist(*args, "--api", base)
        assert result.exit_code == 1, (args, result.output)
        assert f"cannot reach the Florist API at {base}" in result.output, args
        assert result.exception is None or isinstance(result.exception, SystemExit)


def test_a_bad_log_setting_is_named_before_anything_runs(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    env = {**os.environ, "FLORIST_LOG_FORMAT": "xml", "FLORIST_HOME": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-m", "florist.server.cli", "ls"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert "FLORIST_LOG_FORMAT" in out.stderr and "Traceback" not in out.stderr
    assert Settings(log_level="debug").log_level == "DEBUG"  # type: ignore[arg-type]


def test_cancel_a_pending_and_a_running_experiment_and_refuse_an_ended_one(
    served: Served,
) -> None:
    pending = served.submit("pending")
    running = served.submit("running")
    record_rounds(served.url, running["id"], 1)

    first = florist("cancel", str(pending["id"]), "--api", served.base)
    second = florist("cancel", str(running["id"]), "--api", served.base)
    again = florist("cancel", str(pending["id"]), "--api", served.base)

    assert first.exit_code == 0 and "cancelled" in first.output, first.output
    assert second.exit_code == 0 and "cancelling" in second.output, second.output
    assert again.exit_code == 1 and "already cancelled" in again.output and "409" in again.output
    state = served.http.get(f"/api/v1/experiments/{running['id']}").json()
    assert state["status"] == "cancelling"


def test_resume_reopens_a_failed_experiment_and_refuses_a_running_one(served: Served) -> None:
    failed = served.submit("failed")
    running = served.submit("running")
    record_rounds(served.url, running["id"], 1)
    recorder = SqlRunRecorder.from_url(served.url)
    run_id = recorder.start_run(experiment_id=failed["id"], flwr_run_id=78)
    recorder.finish_run(run_id, status="failed", error="the run was lost")
    recorder.close()

    resumed = florist("resume", str(failed["id"]), "--api", served.base)
    refused = florist("resume", str(running["id"]), "--api", served.base)

    assert resumed.exit_code == 0, resumed.output
    assert "pending" in resumed.output and "resumed 1 time" in resumed.output
    assert refused.exit_code == 1 and "409" in refused.output
    assert "only a failed experiment resumes" in refused.output
    state = served.http.get(f"/api/v1/experiments/{failed['id']}").json()
    assert (state["status"], state["error"]) == ("pending", None)


def test_logs_print_events_and_rounds_in_order(served: Served) -> None:
    exp = served.submit("logged")
    record_rounds(served.url, exp["id"], 2, finish=True)

    result = florist("logs", str(exp["id"]), "--api", served.base)
    only_rounds = florist("logs", str(exp["id"]), "--api", served.base, "--kind", "none")

    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert [line.split()[2] for line in lines] == ["round", "round"]
    assert "round 1: accuracy 0.6, loss 1; 1 accepted, 0 rejected, 0 failed" in lines[0]
    assert only_rounds.output == result.output


def test_logs_follow_prints_what_is_recorded_until_the_experiment_ends(served: Served) -> None:
    # Prepare: the experiment has a round; two more and its end come while the CLI follows
    exp = served.submit("followed")
    run_id = record_rounds(served.url, exp["id"], 1)

    def later() -> None:
        time.sleep(1.0)
        recorder = SqlRunRecorder.from_url(served.url)
        recorder.record_event(run_id=run_id, kind="policy", message="a decision mid-run")
        end = utcnow()
        recorder.record_round(
            run_id,
            RoundRecord(2, end - timedelta(seconds=1), end, {"accuracy": 0.9}, {}, {}, ()),
        )
        recorder.finish_run(run_id, status="completed")
        recorder.close()

    writer = threading.Thread(target=later)
    writer.start()

    # Execute
    started = time.monotonic()
    result = florist("logs", str(exp["id"]), "--follow", "--api", served.base)
    writer.join()

    # Assert: the old round, the event and the round that came later, then the end
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "round 1:" in lines[0]
    assert "policy" in lines[1] and "a decision mid-run" in lines[1]
    assert "round 2: accuracy 0.9" in lines[2]
    assert lines[-1] == f"experiment {exp['id']} completed"
    assert time.monotonic() - started < 60


@pytest.mark.usefixtures("logs_restored")
def test_api_access_lines_in_json_name_the_experiment_of_the_path(served: Served) -> None:
    # Prepare: Florist's handler, as `florist api` installs it with FLORIST_LOG_FORMAT=json
    stream = io.StringIO()
    configure_logging("json", stream=stream)
    exp = served.submit("access")

    # Execute
    served.http.get(f"/api/v1/experiments/{exp['id']}/rounds")
    served.http.get("/api/v1/strategies")

    # Assert
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    access = [line for line in lines if line["logger"] == "uvicorn.access"]
    (rounds,) = [line for line in access if "/rounds" in line["message"]]
    (strategies,) = [line for line in access if "/strategies" in line["message"]]
    assert rounds["experiment_id"] == exp["id"]
    assert strategies["experiment_id"] is None
