"""Simulation mode at scale: round time and memory against the number of virtual clients.

Run from the repository root (about 10 minutes on 2 CPU cores):

    nice -n 19 .venv/bin/python benchmarks/simulation.py [--quick]

One simulation SuperLink (``flower-superlink --simulation``, Ray bounded as ``florist up``
bounds it: every core, one CPU per virtual client's ClientApp, a 256 MiB object store) on
loopback and a SQLite database. Each case is one experiment, stored as the API stores it and
submitted as the API's follower submits it (Florist's app, ``SimulationConfig`` with the
virtual clients): FedAvg on LEAF's synthetic task (one device per virtual client, 10–20
samples of 10 features each, 3 classes, logistic regression, one local epoch), virtual clock,
device profiles drawn from ``florist up``'s mix.

- **headline**: 10,000 virtual clients, 100 per round (the issue's goal);
- **virtual-clients axis**: 10, 100, 1,000 and 10,000 virtual clients, 10 per round, so that
  only the population grows.

For each case: the round time (the loop's ``rounds.duration_s``: tasks out to the round
committed; median of the rounds after the first, and the first apart, which also starts the
Ray actors and generates their data) and memory, sampled every 0.25 s over every process under
the simulation SuperLink: the ``flwr-simulation`` process (ServerApp thread, Flower's in-memory
LinkState of the virtual nodes, the Ray driver) and Ray's processes (GCS, raylet, the
ClientApp actors). Both the RSS sum and the PSS sum (shared pages, e.g. the object store and
torch's libraries, counted once) are kept; the peak of each and the breakdown at the PSS peak.
Writes ``benchmarks/results/simulation.json`` and ``simulation.png`` (``--quick``: a smoke run
of two small cases into ``results/quick/``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from sqlalchemy import select

from florist.server.control import ControlClient
from florist.server.db.engine import make_engine, make_session_factory, upgrade_database
from florist.server.db.models import Round, Run
from florist.server.db.repository import create_experiment
from florist.server.processes import (
    Managed,
    Supervisor,
    flower_env,
    free_port,
    superlink_command,
    wait_for_port,
)
from florist.server.settings import Settings
from florist.server.simulation import (
    ray_environment,
    ray_limits,
    simulation_submission,
    superlink_simulation_command,
)
from florist.server.spec import ExperimentSpec, experiment_row

RESULTS = Path(__file__).resolve().parent / "results"
PAGE = os.sysconf("SC_PAGE_SIZE")


def experiment_body(virtual: int, per_round: int, rounds: int) -> dict[str, Any]:
    """The experiment of one case (as a user would POST it)."""
    return {
        "name": f"simulation-{virtual}-{per_round}",
        "mode": "simulation",
        "strategy": {"name": "fedavg", "config": {}},
        "workload": {
            "name": "synthetic",
            "config": {
                "num_devices": virtual,
                "num_features": 10,
                "num_classes": 3,
                "min_samples": 10,
                "max_samples": 20,
                "model": {"name": "logreg"},
            },
        },
        "rounds": rounds,
        "clock": "virtual",
        "clients": {"virtual": virtual, "per_round": per_round},
        "round_timeout_s": 1800,
    }


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: the fields follow the last ')'.
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def descendants(root: int) -> list[int]:
    """Every process under ``root`` (not ``root`` itself)."""
    tree, out, todo = _children(), [], [root]
    while todo:
        for child in tree.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _kind(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "gone"
    if "flwr-simulation" in cmd:
        return "flwr-simulation"
    if "flower-superexec" in cmd:
        return "superexec"
    if cmd.startswith("ray::") or "default_worker.py" in cmd:
        return "ray-worker"
    if "raylet" in cmd:
        return "raylet"
    if "gcs_server" in cmd:
        return "gcs"
    return "ray-other" if "ray" in cmd else "other"


def _memory(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of one process in bytes; (0, 0) once it is gone."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if "kB" in line}
        return fields.get("Rss", 0), fields.get("Pss", 0)
    except (OSError, ValueError, IndexError):
        return 0, 0


class MemorySampler(threading.Thread):
    """Samples the memory of every process under ``root`` until stopped; keeps the peaks."""

    def __init__(self, root: int, interval: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.root, self.interval = root, interval
        self.peak_rss = self.peak_pss = 0
        self.server_peak_rss = 0  # the flwr-simulation process alone
        self.at_peak: dict[str, int] = {}
        self.samples = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            by_kind: dict[str, int] = {}
            rss_sum = pss_sum = 0
            for pid in descendants(self.root):
                kind = _kind(pid)
                if kind == "superexec":
                    continue  # the SuperLink's long-lived executor, not the run's
                rss, pss = _memory(pid)
                rss_sum, pss_sum = rss_sum + rss, pss_sum + pss
                by_kind[kind] = by_kind.get(kind, 0) + pss
                if kind == "flwr-simulation":
                    self.server_peak_rss = max(self.server_peak_rss, rss)
            self.samples += 1
            self.peak_rss = max(self.peak_rss, rss_sum)
            if pss_sum > self.peak_pss:
                self.peak_pss, self.at_peak = pss_sum, by_kind
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5)


def run_case(
    control: ControlClient,
    sessions: Any,
    settings: Settings,
    superlink_pid: int,
    virtual: int,
    per_round: int,
    rounds: int,
    timeout: float,
) -> dict[str, Any]:
    """One experiment: submitted, followed until its last round or failure, measured."""
    spec = ExperimentSpec.model_validate(experiment_body(virtual, per_round, rounds))
    with sessions() as session, session.begin():
        experiment_id = create_experiment(session, **experiment_row(spec)).id
    extra, federation = simulation_submission(spec.model_dump(mode="json")) or ({}, None)
    assert federation is not None
    full = ray_limits(settings)
    full.MergeFrom(federation)
    sampler = MemorySampler(superlink_pid)
    sampler.start()
    started = time.perf_counter()
    run_id = control.start_run(
        {"experiment-id": experiment_id, "database-url": settings.database_url, **extra}, full
    )
    status = "timeout"
    while time.perf_counter() - started < timeout:
        state = control.run_state(run_id)
        if state is not None and state.finished:
            status = f"{state.status}:{state.sub_status}"
            break
        time.sleep(0.5)
    total = time.perf_counter() - started
    sampler.stop()
    with sessions() as session:
        durations = list(
            session.scalars(
                select(Round.duration_s)
                .where(Round.experiment_id == experiment_id)
                .order_by(Round.server_round)
            )
        )
        run_error = session.scalar(select(Run.error).where(Run.experiment_id == experiment_id))
    if status != "finished:completed":
        control.stop_run(run_id)
    later = durations[1:]
    return {
        "virtual": virtual,
        "per_round": per_round,
        "rounds": rounds,
        "status": status,
        "error": run_error,
        "rounds_recorded": len(durations),
        "round_s": durations,
        "first_round_s": durations[0] if durations else None,
        "round_s_median": statistics.median(later) if later else None,
        "run_wall_s": total,
        "peak_rss_mib": sampler.peak_rss / 2**20,
        "peak_pss_mib": sampler.peak_pss / 2**20,
        "server_peak_rss_mib": sampler.server_peak_rss / 2**20,
        "pss_at_peak_mib": {k: v / 2**20 for k, v in sorted(sampler.at_peak.items())},
        "memory_samples": sampler.samples,
    }


def machine() -> dict[str, Any]:
    import flwr
    import ray
    import torch

    with open("/proc/meminfo") as f:
        total_kib = int(f.readline().split()[1])
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "memory_gib": round(total_kib / 2**20, 1),
        "flwr": flwr.__version__,
        "ray": ray.__version__,
        "torch": torch.__version__,
        "loadavg_1_5_15": list(os.getloadavg()),
        "nice": os.nice(0),
    }


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axis = [c for c in results["axis"] if c["round_s_median"] is not None]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    xs = [c["virtual"] for c in axis]
    left.plot(xs, [c["round_s_median"] for c in axis], "o-", label="round (median, after 1st)")
    left.plot(xs, [c["first_round_s"] for c in axis], "s--", label="first round")
    left.set(xscale="log", yscale="log", xlabel="virtual clients", ylabel="seconds")
    left.set_title(f"round time, {axis[0]['per_round'] if axis else '?'} clients a round")
    left.legend()
    right.plot(xs, [c["peak_pss_mib"] for c in axis], "o-", label="all (PSS)")
    right.plot(xs, [c["server_peak_rss_mib"] for c in axis], "s--", label="flwr-simulation (RSS)")
    right.set(xscale="log", xlabel="virtual clients", ylabel="MiB")
    right.set_title("peak memory")
    right.legend()
    head = results.get("headline")
    if head and head["round_s_median"] is not None:
        fig.suptitle(
            f"headline {head['virtual']:,} virtual / {head['per_round']} a round: "
            f"{head['round_s_median']:.1f} s a round, peak {head['peak_pss_mib']:.0f} MiB PSS"
        )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: two small cases")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="results folder")
    parser.add_argument(
        "--axis", type=int, nargs="+", default=None, help="virtual-client counts of the axis"
    )
    parser.add_argument("--no-headline", action="store_true", help="skip the 10,000/100 case")
    args = parser.parse_args(argv)
    out = args.out or (RESULTS / "quick" if args.quick else RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    if args.quick:
        axis, headline, rounds = [10, 50], None, 2
    else:
        axis, headline, rounds = [10, 100, 1_000, 10_000], (10_000, 100), args.rounds
    per_round_axis = 5 if args.quick else 10
    axis = args.axis or axis
    headline = None if args.no_headline else headline

    started = time.time()
    with tempfile.TemporaryDirectory(prefix="florist-simbench-") as tmp:
        home = Path(tmp)
        url = f"sqlite:///{home / 'florist.db'}"
        upgrade_database(url)
        engine = make_engine(url)
        sessions = make_session_factory(engine)
        control_address = f"127.0.0.1:{free_port()}"
        settings = Settings(home=home, database_url=url, simulation_control=control_address)
        sup = Supervisor()
        cmd = superlink_simulation_command(
            superlink_command(control=control_address, fleet=f"127.0.0.1:{free_port()}")
        )
        env = {**flower_env(home), **ray_environment(settings)}
        managed = Managed("superlink-simulation", cmd, env, home / "superlink.log", restart=False)
        control = None
        try:
            sup.add(managed)
            wait_for_port(control_address)
            assert managed.proc is not None
            control = ControlClient(control_address)
            cases: list[dict[str, Any]] = []
            for virtual in axis:
                print(f"axis: {virtual} virtual, {per_round_axis} a round", flush=True)
                cases.append(
                    run_case(
                        control,
                        sessions,
                        settings,
                        managed.proc.pid,
                        virtual,
                        per_round_axis,
                        rounds,
                        timeout=1800,
                    )
                )
                print(json.dumps(cases[-1]), flush=True)
            head = None
            if headline is not None:
                print(f"headline: {headline[0]} virtual, {headline[1]} a round", flush=True)
                head = run_case(
                    control,
                    sessions,
                    settings,
                    managed.proc.pid,
                    *headline,
                    rounds,
                    timeout=3600,
                )
                print(json.dumps(head), flush=True)
        finally:
            if control is not None:
                control.close()
            sup.stop_all()
            engine.dispose()
    limits = ray_limits(settings)
    results = {
        "benchmark": "simulation",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "command": shlex.join([os.path.relpath(sys.executable), "benchmarks/simulation.py"])
        + (" --quick" if args.quick else ""),
        "machine": machine(),
        "ray": {
            "num_cpus": limits.init_args_num_cpus,
            "cpus_per_client": limits.client_resources_num_cpus,
            "object_store_mib": settings.simulation_object_store_mb,
        },
        "workload": experiment_body(0, 0, rounds)["workload"] | {"num_devices": "= virtual"},
        "headline": head,
        "axis": cases,
        "total_s": time.time() - started,
    }
    (out / "simulation.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, out / "simulation.png")
    print(f"wrote {out / 'simulation.json'} and {out / 'simulation.png'}")
    return results


if __name__ == "__main__":
    main()
