"""What a /metrics scrape costs as the database grows: wall time of GET /metrics, median of N.

Each size fills a fresh SQLite database through the SQL recorder (as the ServerApp writes it):
E experiments of R rounds with U updates each, all unfinished, so every one is a candidate and
at most FLORIST_METRICS_MAX_EXPERIMENTS (50) are read. Run:

    .venv/bin/python -m benchmarks.metrics_scrape
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from datetime import timedelta
from pathlib import Path

from fastapi.testclient import TestClient

from florist.server.api.app import create_app
from florist.server.db.engine import make_engine, make_session_factory, upgrade_database
from florist.server.db.models import utcnow
from florist.server.db.repository import create_experiment
from florist.server.recording import RoundRecord, SqlRunRecorder, UpdateRecord
from florist.server.settings import Settings

SIZES = [(10, 20, 10), (50, 20, 10), (200, 20, 10), (50, 200, 10)]  # experiments, rounds, updates
SCRAPES = 15
OUT = Path(__file__).parent / "results" / "metrics_scrape.json"


def fill(url: str, experiments: int, rounds: int, updates: int) -> None:
    sessions = make_session_factory(make_engine(url))
    recorder = SqlRunRecorder(sessions)
    for _ in range(experiments):
        with sessions.begin() as session:
            exp_id = create_experiment(
                session, name="bench", strategy="fedavg", dataset="digits", num_rounds=rounds,
                spec={},
            ).id  # fmt: skip
        run_id = recorder.start_run(experiment_id=exp_id, flwr_run_id=exp_id)
        for k in range(1, rounds + 1):
            end = utcnow()
            recorder.record_round(
                run_id,
                RoundRecord(
                    k, end - timedelta(seconds=1), end, {"accuracy": 0.5}, {}, {},
                    tuple(
                        UpdateRecord(node_id=n, status="accepted", bytes_up=10, bytes_down=10,
                                     arrived_at=end)
                        for n in range(updates)
                    ),
                    aggregate_s=0.01,
                ),
            )  # fmt: skip


def main() -> None:
    results = []
    for experiments, rounds, updates in SIZES:
        with tempfile.TemporaryDirectory() as home:
            url = f"sqlite:///{home}/bench.db"
            upgrade_database(url)
            fill(url, experiments, rounds, updates)
            settings = Settings(home=Path(home), database_url=url)
            with TestClient(create_app(settings, follow_runs=False)) as client:
                client.get("/metrics")  # warm
                times = []
                for _ in range(SCRAPES):
                    start = time.perf_counter()
                    assert client.get("/metrics").status_code == 200
                    times.append(time.perf_counter() - start)
        row = {
            "experiments": experiments,
            "rounds_each": rounds,
            "updates_each_round": updates,
            "update_rows": experiments * rounds * updates,
            "scrape_ms_median": round(1000 * statistics.median(times), 1),
            "scrape_ms_max": round(1000 * max(times), 1),
        }
        print(row)
        results.append(row)
    OUT.write_text(json.dumps({"sqlite": results, "scrapes_per_size": SCRAPES}, indent=2) + "\n")


if __name__ == "__main__":
    main()
