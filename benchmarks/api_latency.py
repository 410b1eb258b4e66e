"""The REST API on a long run: p50/p99 of its reads from a second process, on SQLite and PostgreSQL.

An experiment of 1,000 rounds × 100 client updates is written straight into a fresh database
through the SQL recorder (as the ServerApp writes it, no training) and analysed, as autovacuum
would have done during a run that long (:func:`settle`). The API then runs in its own
process under uvicorn on loopback (no SuperLink: it only reads), and this process times, as a
client would see them, one page of rounds and of updates (the default page, a 100-row page, a
100-row page from a cursor half-way through, one round's updates), the experiment itself, and the
first event of its SSE stream (time from the request to the first ``event:`` line). The requests
go round-robin over the endpoints, so load from other work on the machine hits them alike.
SQLite (a file) and PostgreSQL (a database of its own on 127.0.0.1:5432, dropped afterwards). Run:

    nice -n 19 .venv/bin/python -m benchmarks.api_latency                 # ~5 min
    .venv/bin/python -m benchmarks.api_latency --quick                    # smoke: results/quick/
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from florist.server.db.engine import (
    make_engine,
    make_session_factory,
    normalize_url,
    upgrade_database,
)
from florist.server.db.repository import create_experiment
from florist.server.processes import free_port
from florist.server.recording import RoundRecord, SqlRunRecorder, UpdateRecord
from florist.server.spec import ExperimentSpec, experiment_row

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parent.parent
POSTGRES_ADMIN_URL = os.environ.get(
    "FLORIST_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
GOAL_MS = 50.0
HANG_UP_SETTLE_S = 0.3


# --- the long run ---------------------------------------------------------------------------


def fill(url: str, rounds: int, clients: int) -> int:
    """An experiment of ``rounds`` rounds × ``clients`` updates, through the SQL recorder."""
    engine = make_engine(url)
    sessions = make_session_factory(engine)
    recorder = SqlRunRecorder(sessions)
    spec = ExperimentSpec.model_validate(
        {
            "name": "long run",
            "strategy": {"name": "fedavg", "config": {}},
            "dataset": {"name": "digits"},
            "model": {"name": "logreg"},
            "rounds": rounds,
            "clients": {"min": min(clients, 10)},
        }
    )
    with sessions.begin() as session:
        exp_id = create_experiment(session, **experiment_row(spec)).id
    run_id = recorder.start_run(experiment_id=exp_id, flwr_run_id=exp_id)
    begin = datetime.now(UTC) - timedelta(seconds=10 * rounds)
    for k in range(1, rounds + 1):
        started = begin + timedelta(seconds=10 * (k - 1))
        finished = started + timedelta(seconds=9)
        updates = tuple(
            UpdateRecord(
                # Flower's node ids are random uint64s.
                node_id=(0x9E3779B97F4A7C15 * (n + 1)) % 2**64,
                status="accepted" if (k + n) % 17 else "rejected",
                reason=None if (k + n) % 17 else "update norm above the bound",
                num_examples=50 + n,
                train_time_s=1.5,
                metrics={"train-loss": 0.5, "train-accuracy": 0.8},
                bytes_up=40_000,
                bytes_down=40_000,
                model_version=k - 1,
                arrival_version=k - 1,
                local_steps=10,
                dispatched_at=started,
                arrived_at=finished,
                wall_duration_s=8.0,
                node_config={"profile": "fast", "partition-id": n},
            )
            for n in range(clients)
        )
        recorder.record_round(
            run_id,
            RoundRecord(
                k, started, finished, {"accuracy": 0.5 + k / (4 * rounds), "loss": 1.0},
                {"train-loss": 0.5}, {}, updates, aggregate_s=0.01,
            ),
        )  # fmt: skip
    settle(engine)
    engine.dispose()
    return exp_id


def settle(engine: Any) -> None:
    """Planner statistics and visibility map, as a database has them some time into a run.

    The fill writes 100,000 rows in under a minute, before PostgreSQL's autovacuum (which
    wakes every minute by default) has analysed them. Without statistics its planner takes
    a 1,000-row page for a few hundred rows and sorts the whole experiment for it (29 ms
    instead of 0.3 ms, measured with EXPLAIN ANALYZE); a run of 1,000 rounds lasts hours and
    is analysed many times over. SQLite has no autovacuum; ANALYZE is what its users run.
    """
    if engine.dialect.name == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            connection.execute(text("VACUUM ANALYZE"))
    else:
        with engine.begin() as connection:
            connection.execute(text("ANALYZE"))


@contextmanager
def database(backend: str, home: Path) -> Iterator[str | None]:
    """A fresh, migrated database of ``backend`` (None: PostgreSQL is not reachable)."""
    if backend == "sqlite":
        yield f"sqlite:///{home / 'florist.db'}"
        return
    admin_url = normalize_url(POSTGRES_ADMIN_URL)
    admin = create_engine(
        admin_url, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 5}
    )
    name = f"florist_bench_{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
    except OperationalError as exc:
        print(f"PostgreSQL unreachable, skipped: {exc.orig}")
        admin.dispose()
        yield None
        return
    try:
        yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


# --- the API in its own process ---------------------------------------------------------------


def serve(url: str, port: int) -> None:
    """The API alone under uvicorn (run in the child process)."""
    import uvicorn

    from florist.server.api.app import create_app
    from florist.server.settings import Settings

    with tempfile.TemporaryDirectory() as home:
        settings = Settings(home=Path(home), database_url=url)
        app = create_app(settings, follow_runs=False, freeze_heap=True)  # as `florist api`
        uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


@contextmanager
def api(url: str) -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.api_latency", "--serve", url, str(port)], cwd=ROOT
    )
    base = f"http://127.0.0.1:{port}/api/v1"
    try:
        # Generous: importing the app and migrating a filled database on a loaded machine.
        deadline = time.monotonic() + 900
        while True:
            try:
                if httpx.get(f"{base}/experiments", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the API did not start (exit code {proc.poll()})")
            time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- the requests -----------------------------------------------------------------------------


def endpoints(
    client: httpx.Client, exp: int, rounds: int, clients: int
) -> dict[str, Callable[[], float]]:
    """What is timed, each a callable that makes one request, checks its answer and returns
    the request's milliseconds."""
    # A cursor half-way through the updates: the next_cursor of the pages before it.
    cursor, seen, half = None, 0, rounds * clients // 2
    while seen < half:
        params: dict[str, Any] = {"limit": min(10_000, half - seen)}
        if cursor is not None:
            params["cursor"] = cursor
        page = client.get(f"/experiments/{exp}/updates", params=params)
        page.raise_for_status()
        seen += len(page.json()["data"])
        cursor = page.json()["next_cursor"]

    # Each call returns its milliseconds: the request until the whole body is in, then the
    # answer is checked, untimed (parsing a 1,000-row page here is the client's cost, not the
    # API's).
    def get(path: str, **params: Any) -> Callable[[], float]:
        def call() -> float:
            began = time.perf_counter()
            response = client.get(path, params=params)
            ms = 1000 * (time.perf_counter() - began)
            response.raise_for_status()
            body = response.json()
            assert body.get("data", body)
            return ms

        return call

    def first_event() -> float:
        began = time.perf_counter()
        with client.stream("GET", f"/experiments/{exp}/events") as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if line.startswith("event:"):
                    ms = 1000 * (time.perf_counter() - began)
                    break
            else:
                raise AssertionError("the stream ended without an event")
        # Hanging up mid-history leaves the server one batch to finish (a thread cannot be
        # cancelled; the stream stops at its next await). Let it, so that this work is not
        # counted in the next endpoint's time.
        time.sleep(HANG_UP_SETTLE_S)
        return ms

    prefix = f"/experiments/{exp}"
    return {
        "experiment": get(prefix),
        "rounds (default page)": get(f"{prefix}/rounds"),
        "rounds ?limit=100": get(f"{prefix}/rounds", limit=100),
        "updates (default page)": get(f"{prefix}/updates"),
        "updates ?limit=100": get(f"{prefix}/updates", limit=100),
        "updates ?limit=100 mid cursor": get(f"{prefix}/updates", limit=100, cursor=cursor),
        "updates ?server_round": get(f"{prefix}/updates", server_round=rounds // 2),
        "events: first event": first_event,
    }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def measure(base: str, exp: int, rounds: int, clients: int, requests: int) -> dict[str, Any]:
    with httpx.Client(base_url=base, timeout=30) as client:
        calls = endpoints(client, exp, rounds, clients)
        for call in calls.values():  # warm: first connections, query plans, caches
            call()
        times: dict[str, list[float]] = {name: [] for name in calls}
        for _ in range(requests):
            for name, call in calls.items():
                times[name].append(call())
        sizes = {
            "rounds (default page)": len(client.get(f"/experiments/{exp}/rounds").json()["data"]),
            "updates (default page)": len(client.get(f"/experiments/{exp}/updates").json()["data"]),
        }
    return {
        name: {
            "p50_ms": round(statistics.median(ms), 2),
            "p99_ms": round(percentile(ms, 0.99), 2),
            "max_ms": round(max(ms), 2),
            "requests": len(ms),
            **({"rows": sizes[name]} if name in sizes else {}),
        }
        for name, ms in times.items()
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--requests", type=int, default=200, help="per endpoint")
    parser.add_argument("--backends", nargs="+", default=["sqlite", "postgres"])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to results/quick/")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--url", help="an existing database to use instead (filled first unless --experiment)"
    )
    parser.add_argument("--experiment", type=int, help="with --url: its filled experiment")
    parser.add_argument("--serve", nargs=2, metavar=("URL", "PORT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.serve[0], int(args.serve[1]))
        return 0
    if args.quick:
        args.rounds, args.clients, args.requests = 5, 3, 3
    out_dir = args.out or (RESULTS / "quick" if args.quick else RESULTS)
    out_dir.mkdir(parents=True, exist_ok=True)

    backends: dict[str, Any] = {}

    def run(backend: str, url: str, exp: int | None) -> None:
        fill_s = None
        if exp is None:
            upgrade_database(url)
            began = time.perf_counter()
            exp = fill(url, args.rounds, args.clients)
            fill_s = round(time.perf_counter() - began, 1)
            print(f"{backend}: filled in {fill_s} s")
        with api(url) as base:
            figures = measure(base, exp, args.rounds, args.clients, args.requests)
        for name, row in figures.items():
            print(f"{backend:8} {name:32} p50 {row['p50_ms']:7.2f} ms  p99 {row['p99_ms']:7.2f}")
        backends[backend] = {"fill_seconds": fill_s, "endpoints": figures}

    if args.url:
        run(make_url(args.url).get_backend_name(), args.url, args.experiment)
    for backend in [] if args.url else args.backends:
        with tempfile.TemporaryDirectory() as home, database(backend, Path(home)) as url:
            if url is not None:
                run(backend, url, None)
    result = {
        "benchmark": "api_latency",
        # As it was run, and at what niceness: the figures depend on both.
        "command": " ".join(
            [
                ".venv/bin/python -m benchmarks.api_latency",
                *(sys.argv[1:] if argv is None else argv),
            ]
        ),
        "niceness": os.nice(0),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "load_average": [round(x, 2) for x in os.getloadavg()],
        },
        "rounds": args.rounds,
        "clients": args.clients,
        "update_rows": args.rounds * args.clients,
        "requests_per_endpoint": args.requests,
        "goal_p99_ms": GOAL_MS,
        "backends": backends,
    }
    name = f"api_latency-{'-'.join(backends)}.json" if args.url else "api_latency.json"
    (out_dir / name).write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out_dir / name.replace(".json", ".png"))
    print(f"wrote {out_dir / name}")
    return 0


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    backends = result["backends"]
    if not backends:
        return
    names = list(next(iter(backends.values()))["endpoints"])
    fig, ax = plt.subplots(figsize=(11, 4.5))
    width = 0.8 / (2 * len(backends))
    for i, (backend, data) in enumerate(backends.items()):
        for j, stat in enumerate(("p50_ms", "p99_ms")):
            offset = (2 * i + j - len(backends) + 0.5) * width
            ax.bar(
                [x + offset for x in range(len(names))],
                [data["endpoints"][n][stat] for n in names],
                width,
                label=f"{backend} {stat[:3]}",
            )
    ax.axhline(result["goal_p99_ms"], color="black", linestyle="--", linewidth=1, label="goal")
    ax.set_xticks(range(len(names)), names, rotation=25, ha="right")
    ax.set_ylabel("ms")
    ax.set_title(
        f"API latency, {result['rounds']} rounds × {result['clients']} updates, "
        "uvicorn on loopback, from a second process"
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
