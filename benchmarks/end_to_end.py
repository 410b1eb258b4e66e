"""Florist against plain Flower and against the floor: one FedAvg job, end to end, side by side.

Run from the repository root (about 10 minutes on 2 CPU cores):

    .venv/bin/python benchmarks/end_to_end.py [--repeats 3] [--rounds 10] [--nodes 5]
    .venv/bin/python -m benchmarks.end_to_end --quick     # smoke: 1 repeat, 2 rounds, 2 nodes

The job is benchmarks/dispatch_overhead.py's: an MLP (64-64-10) trained with Flower's FedAvg on
scikit-learn's digits, every node one local epoch of SGD (lr 0.05, momentum 0.9, batch 32) per
round, all nodes every round. Each repetition runs it, in an order that rotates between
repetitions, as:

- **floor**: the same computation in this process with no transport and no platform: the nodes'
  local epochs one after another, then the weighted average;
- **florist-local**: Florist's own server loop and ClientApp in this process (runtime/localgrid.py:
  no processes, no gRPC, no database), i.e. the floor plus Florist's per-round work (central
  evaluation on the test split, reply checks, recording in memory);
- **florist**: a Florist experiment submitted through the REST API of a `florist up` stack
  (API, SuperLink, N warm SuperNodes of the neutral device profile over gRPC on loopback,
  SQLite), timed from the POST to the
  API saying it completed; the stack is started once, before the first repetition;
- **plain**: the plain Flower app of dispatch_overhead.py on stock `flower-supernode`s, timed
  from StartRun to the SuperLink saying the run finished (a fresh SuperLink and SuperNodes each
  repetition, started before the clock starts).

``--variants NAME …`` adds Florist sides with one setting changed (``VARIANTS``): the SuperLink's
state in memory instead of its SQLite file, Flower's SuperLink without Florist's transaction
queue (server/superlink.py), torch's default threads in every executor. With variants every
Florist side, the default one too, gets a fresh stack each repetition (started before the clock),
so that only one stack is up at a time and none of them is warmer than the others.

Florist's digits workload holds out validation and test splits, so its nodes train on fewer
examples than the plain app's strided slices of all 1,797 images (reported per side): the floor
is computed on the plain app's slices, which makes the Florist/floor ratio conservative.
Writes benchmarks/results/end_to_end.json and end_to_end.png: every repetition's seconds, the
median per side, and each side's ratio to the floor.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import httpx

try:
    from benchmarks import dispatch_overhead as plain_app
except ModuleNotFoundError:  # run as a script: benchmarks/ itself is on sys.path
    import dispatch_overhead as plain_app  # type: ignore[no-redef]

from florist.server.processes import flower_env, free_port, wait_for_port

RESULTS = Path(__file__).resolve().parent / "results"
SIDES = ("floor", "florist-local", "florist", "plain")
#: Florist with one setting changed (the environment of its `florist up`), as extra sides.
VARIANTS: dict[str, dict[str, str]] = {
    "memory-state": {"FLORIST_SUPERLINK_DATABASE": ":memory:"},
    "flower-sqlite": {"FLORIST_SUPERLINK_QUEUE": "0"},
    "torch-threads": {"FLORIST_EXECUTOR_THREADS": str(os.cpu_count() or 1)},
}


def variant_side(name: str) -> str:
    return f"florist:{name}"


def florist_body(rounds: int, nodes: int) -> dict[str, Any]:
    """The job as a Florist experiment: the same model, optimiser and local work."""
    return {
        "name": "end-to-end-fedavg",
        "strategy": {"name": "fedavg", "config": {}},
        "workload": {
            "name": "digits",
            "config": {
                "partitioner": {"name": "iid"},
                "seed": 0,
                "model": {"name": "mlp", "hidden": [64, 64]},
            },
        },
        "training": {"local_epochs": 1, "lr": 0.05, "momentum": 0.9, "batch_size": 32},
        "rounds": rounds,
        "clients": {"min": nodes, "fraction_evaluate": 0.0},
    }


def run_floor(rounds: int, nodes: int) -> dict[str, Any]:
    """The plain app's computation in this process: local epochs in turn, then FedAvg."""
    import torch
    from sklearn.datasets import load_digits

    # Imports are not the job: the other sides' processes have theirs done before the clock.
    started = time.perf_counter()
    x_all, y_all = load_digits(return_X_y=True)
    shards = [
        (
            torch.tensor(x_all[pid::nodes] / 16.0, dtype=torch.float32),
            torch.tensor(y_all[pid::nodes], dtype=torch.long),
        )
        for pid in range(nodes)
    ]

    def model() -> torch.nn.Module:
        return torch.nn.Sequential(
            torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10)
        )

    torch.manual_seed(0)
    global_state = model().state_dict()
    for server_round in range(1, rounds + 1):
        states, sizes = [], []
        for pid, (x, y) in enumerate(shards):
            net = model()
            net.load_state_dict(global_state)
            torch.manual_seed(server_round * 100 + pid)
            opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
            for idx in torch.randperm(len(x)).split(32):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
                opt.step()
            states.append(net.state_dict())
            sizes.append(len(x))
        total = sum(sizes)
        global_state = {
            k: sum(s[k] * (n / total) for s, n in zip(states, sizes, strict=True))
            for k in global_state
        }
    return {"seconds": time.perf_counter() - started, "examples_per_node": sizes}


def run_florist_local(rounds: int, nodes: int) -> dict[str, Any]:
    """Florist's server loop and ClientApp in this process: the floor plus the platform's work."""
    from florist.server.runtime.localgrid import run_local
    from florist.server.spec import ExperimentSpec

    spec = ExperimentSpec.model_validate(florist_body(rounds, nodes))
    started = time.perf_counter()
    _, recorder = run_local(spec, nodes)
    seconds = time.perf_counter() - started
    last = recorder.rounds(1)[-1]
    return {
        "seconds": seconds,
        "rounds_recorded": len(recorder.rounds(1)),
        "accuracy": last.metrics.get("accuracy"),
        "examples_per_node": sorted({u.num_examples for u in last.updates}),
    }


def start_florist_up(
    home: Path, nodes: int, *extra: str, env: dict[str, str] | None = None
) -> tuple[str, subprocess.Popen[bytes], IO[str]]:
    """`florist up --no-demo --no-simulation` with ``nodes`` neutral SuperNodes on free ports in
    ``home`` (``extra``: more options); its API's host:port, its process and its open log."""
    api = f"127.0.0.1:{free_port()}"
    up_env = flower_env(
        home,
        {
            "FLORIST_HOME": str(home),
            "FLORIST_API_PORT": api.rsplit(":", 1)[1],
            "FLORIST_SUPERLINK_CONTROL": f"127.0.0.1:{free_port()}",
            "FLORIST_SUPERLINK_FLEET": f"127.0.0.1:{free_port()}",
            "FLORIST_SUPERNODE_PORT": str(free_port()),
            **(env or {}),
        },
    )
    home.mkdir(parents=True, exist_ok=True)
    # Neutral device profiles: the nodes take the machine's time, as plain Flower's do.
    fleet = home / "fleet.toml"
    fleet.write_text('[[node]]\nprofile = "neutral"\n\n' * nodes)
    cmd = [sys.executable, "-m", "florist.server.cli", "up", "--fleet", str(fleet), "--no-demo"]
    log = (home / "up.log").open("w")
    proc = subprocess.Popen(
        [*cmd, "--no-simulation", *extra], env=up_env, stdout=log, stderr=subprocess.STDOUT
    )
    return api, proc, log


class FloristStack:
    """`florist up --no-demo` with N warm, neutral SuperNodes on free ports, in its own home."""

    def __init__(self, home: Path, nodes: int, env: dict[str, str] | None = None) -> None:
        self.api, self.proc, self.log = start_florist_up(home, nodes, env=env)
        self.client = httpx.Client(base_url=f"http://{self.api}", timeout=30)
        self.nodes = nodes
        self.home = home

    def wait_ready(self, timeout: float = 180) -> None:
        wait_for_port(self.api, timeout=timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            nodes = self.client.get("/api/v1/nodes").json()
            if sum(n["status"] == "online" for n in nodes["data"]) >= self.nodes:
                # The executors import torch after their SuperNodes connect: let them.
                time.sleep(5)
                return
            time.sleep(0.5)
        raise TimeoutError(f"{self.nodes} SuperNodes not connected; see {self.home}/logs")

    def run(self, body: dict[str, Any], timeout: float = 900) -> dict[str, Any]:
        started = time.perf_counter()
        created = self.client.post("/api/v1/experiments", json=body)
        created.raise_for_status()
        experiment_id = created.json()["id"]
        deadline = time.monotonic() + timeout
        while True:
            state = self.client.get(f"/api/v1/experiments/{experiment_id}").json()
            if state["status"] in ("completed", "failed", "cancelled"):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"experiment {experiment_id} still {state['status']}")
            time.sleep(0.05)
        seconds = time.perf_counter() - started
        if state["status"] != "completed":
            raise RuntimeError(
                f"experiment {experiment_id} {state['status']}: {state.get('error')}"
            )
        updates = self.client.get(
            f"/api/v1/experiments/{experiment_id}/updates", params={"limit": 1000}
        ).json()["data"]
        return {
            "seconds": seconds,
            "rounds_recorded": state["current_round"],
            "accuracy": state.get("best_accuracy"),
            "examples_per_node": sorted({u["num_examples"] for u in updates}),
        }

    def stop(self) -> None:
        self.client.close()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def run_plain(rounds: int, nodes: int, app: Path, work: Path, repeat: int) -> dict[str, Any]:
    res = plain_app.run_side("plain", nodes, rounds, app, work / f"r{repeat}")
    return {"seconds": res["run_s"], "rounds_recorded": len(res["rounds"])}


def machine() -> dict[str, Any]:
    return plain_app.machine()


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sides = [s for s in SIDES if s in results["sides"]]
    sides += [s for s in results["sides"] if s not in SIDES]
    fig, ax = plt.subplots(figsize=(7 + 1.2 * max(0, len(sides) - 4), 3.6))
    for i, side in enumerate(sides):
        runs = results["sides"][side]["seconds"]
        ax.scatter([i] * len(runs), runs, color="#64748b", zorder=3, s=18)
        ax.bar(i, results["sides"][side]["median_s"], color="#93c5fd", zorder=2)
        ax.text(
            i,
            results["sides"][side]["median_s"],
            f"×{results['ratio_to_floor'][side]:.1f}",
            ha="center",
            va="bottom",
        )
    ax.set_xticks(range(len(sides)), sides)
    ax.set_yscale("log")
    ax.set_ylabel("seconds, end to end (log)")
    ax.set_title(
        f"FedAvg, digits MLP, {results['nodes']} nodes, {results['rounds']} rounds: "
        "median and every repetition",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--nodes", type=int, default=5)
    parser.add_argument("--sides", nargs="+", default=list(SIDES), choices=SIDES)
    parser.add_argument("--quick", action="store_true", help="1 repeat, 2 rounds, 2 nodes")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--variants",
        nargs="+",
        default=[],
        choices=list(VARIANTS),
        help="extra Florist sides with one setting changed (a fresh stack per repetition)",
    )
    args = parser.parse_args(argv)
    # Imported once, before any clock starts; one thread per process on every side.
    import sklearn.datasets  # noqa: F401
    import torch

    torch.set_num_threads(1)
    logging.getLogger("flwr").setLevel(logging.ERROR)
    if args.quick:
        args.repeats, args.rounds, args.nodes = 1, 2, 2
    out = args.out or (RESULTS / ("quick" if args.quick else "") / "end_to_end.json")
    names = list(args.sides) + [variant_side(v) for v in args.variants]
    runs: dict[str, list[dict[str, Any]]] = {side: [] for side in names}
    with tempfile.TemporaryDirectory(prefix="e2e-bench-") as tmp:
        work = Path(tmp)
        app = plain_app.write_app(work / "app")
        stack: FloristStack | None = None
        body = florist_body(args.rounds, args.nodes)

        def fresh(env: dict[str, str]) -> Callable[[int], dict[str, Any]]:
            def side(repeat: int) -> dict[str, Any]:
                one = FloristStack(Path(tempfile.mkdtemp(dir=work)), args.nodes, env)
                try:
                    one.wait_ready()
                    return one.run(body)
                finally:
                    one.stop()

            return side

        try:
            if "florist" in args.sides and not args.variants:
                stack = FloristStack(work / "florist", args.nodes)
                stack.wait_ready()
            sides: dict[str, Callable[[int], dict[str, Any]]] = {
                "floor": lambda r: run_floor(args.rounds, args.nodes),
                "florist-local": lambda r: run_florist_local(args.rounds, args.nodes),
                "florist": fresh({})
                if args.variants
                else lambda r: stack.run(body) if stack else {},
                "plain": lambda r: run_plain(args.rounds, args.nodes, app, work, r),
            }
            for variant in args.variants:
                sides[variant_side(variant)] = fresh(VARIANTS[variant])
            for repeat in range(args.repeats):
                # Rotate the order so no side always runs first (or after the slowest).
                order = names[repeat % len(names) :] + names[: repeat % len(names)]
                for side in order:
                    res = sides[side](repeat)
                    runs[side].append(res)
                    print(f"repeat {repeat} {side:14s} {res['seconds']:7.2f} s", flush=True)
        finally:
            if stack is not None:
                stack.stop()
    summary = {
        side: {
            "seconds": [r["seconds"] for r in rs],
            "median_s": statistics.median(r["seconds"] for r in rs),
            "runs": rs,
        }
        for side, rs in runs.items()
    }
    floor = summary["floor"]["median_s"] if "floor" in summary else None
    ratios = {side: (s["median_s"] / floor if floor else None) for side, s in summary.items()}
    results = {
        "benchmark": "end_to_end",
        "date": time.strftime("%Y-%m-%d"),
        "command": shlex.join([sys.executable, *(sys.argv if argv is None else argv)]),
        "machine": machine(),
        "job": "FedAvg, digits MLP 64-64-10, 1 local epoch SGD lr 0.05 momentum 0.9 batch 32",
        "nodes": args.nodes,
        "rounds": args.rounds,
        "repeats": args.repeats,
        "variants": {variant_side(v): VARIANTS[v] for v in args.variants},
        "sides": summary,
        "ratio_to_floor": ratios,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    if floor:
        plot(results, out.with_suffix(".png"))
    for side, ratio in ratios.items():
        times = f" ×{ratio:.2f} the floor" if ratio else ""
        print(f"{side:26s} median {summary[side]['median_s']:7.2f} s {times}")
    print(f"wrote {out}")


if __name__ == "__main__":
    # No OMP_NUM_THREADS here: the stacks run with the threads their users' would (Florist's
    # executors share the cores out themselves); the in-process sides set one thread above.
    main()
