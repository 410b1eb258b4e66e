"""Memory of real clients as `florist up` starts them: one executor process per SuperNode against
one shared pool of forked executors, with N SuperNodes training in one experiment.

Run from the repository root (about 15 minutes on 2 CPU cores):

    .venv/bin/python benchmarks/client_memory.py [--nodes 10 50] [--modes per-node shared]
    .venv/bin/python -m benchmarks.client_memory --quick     # smoke: 2 nodes, shared only

For each mode and N it starts `florist up --fleet F --no-demo` (API, SuperLink, N SuperNodes
with warm executors, neutral device profile, SQLite) in a fresh home on free ports, waits for
the N nodes, submits a 2-round FedAvg experiment on digits that every node takes part in, and
samples memory every 0.5 s until it completes. Memory is the proportional set size (PSS,
/proc/PID/smaps_rollup) of every process in `florist up`'s tree: pages shared between processes
(the libraries, and the pool's copy-on-write imports) are split between them, so the sum is what
the machine really holds; RSS would count each shared page once per process. Reported: the peak
total, the peak per role (SuperNodes, executors, server side), per node, and what 50 nodes would
need at that per-node figure.
Writes benchmarks/results/client_memory.json and client_memory.png.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

try:
    from benchmarks import dispatch_overhead, end_to_end
except ModuleNotFoundError:  # run as a script: benchmarks/ itself is on sys.path
    import dispatch_overhead  # type: ignore[no-redef]
    import end_to_end  # type: ignore[no-redef]

from florist.server.processes import wait_for_port

RESULTS = Path(__file__).resolve().parent / "results"
MODES = ("per-node", "shared")
GIB = 1024**3


def body(nodes: int) -> dict[str, Any]:
    return {
        "name": f"memory-{nodes}",
        "strategy": {"name": "fedavg", "config": {}},
        "workload": {"name": "digits", "config": {"partitioner": {"name": "iid"}, "seed": 0}},
        "training": {"local_epochs": 1, "batch_size": 32},
        "rounds": 2,
        "clients": {"min": nodes},
        "round_timeout_s": 300,
    }


def tree(root: int) -> list[int]:
    """``root`` and every process below it."""
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        path = Path(f"/proc/{pid}/task/{pid}/children")
        try:
            todo += [int(c) for c in path.read_text().split()]
        except OSError:
            continue
    return found


def role(pid: int) -> str:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return "gone"
    if "florist.client.executor" in cmd:
        return "executors"
    if "florist.client.supernode" in cmd or "flower-supernode" in cmd:
        return "supernodes"
    return "server"


def proc_bytes(pid: int, file: str, field: str) -> int:
    """A ``field: N kB`` line of /proc/PID/``file``, in bytes (0 if the process is gone)."""
    try:
        for line in Path(f"/proc/{pid}/{file}").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def pss(pid: int) -> int:
    return proc_bytes(pid, "smaps_rollup", "Pss")


def sample(root: int) -> dict[str, int]:
    by_role: dict[str, int] = {"supernodes": 0, "executors": 0, "server": 0}
    for pid in tree(root):
        kind = role(pid)
        if kind != "gone":
            by_role[kind] += pss(pid)
    return by_role


def measure(mode: str, nodes: int, work: Path) -> dict[str, Any]:
    home = work / f"{mode}-{nodes}"
    flag = "--shared-executors" if mode == "shared" else "--no-shared-executors"
    # Neutral nodes (the measure is memory, and a slow profile only makes the run longer).
    api, proc, log = end_to_end.start_florist_up(home, nodes, flag, env={"OMP_NUM_THREADS": "1"})
    client = httpx.Client(base_url=f"http://{api}", timeout=30)
    peak: dict[str, int] = {"supernodes": 0, "executors": 0, "server": 0, "total": 0}
    started = time.monotonic()

    def watch() -> None:
        now = sample(proc.pid)
        total = sum(now.values())
        if total > peak["total"]:
            peak.update(now, total=total)

    try:
        wait_for_port(api, timeout=300)
        while sum(n["status"] == "online" for n in client.get("/api/v1/nodes").json()["data"]) < (
            nodes
        ):
            watch()
            if time.monotonic() - started > 900:
                raise TimeoutError(f"{nodes} SuperNodes not online; see {home}/logs")
            time.sleep(0.5)
        up_s = time.monotonic() - started
        idle = sample(proc.pid)
        experiment = client.post("/api/v1/experiments", json=body(nodes)).json()
        submitted = time.monotonic()
        while True:
            watch()
            state = client.get(f"/api/v1/experiments/{experiment['id']}").json()
            if state["status"] in ("completed", "failed", "cancelled"):
                break
            time.sleep(0.5)
        experiment_s = time.monotonic() - submitted
        if state["status"] != "completed":
            raise RuntimeError(f"{mode} N={nodes}: {state['status']} {state.get('error')}")
        rounds = client.get(f"/api/v1/experiments/{experiment['id']}/rounds").json()["data"]
    finally:
        client.close()
        proc.terminate()
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    per_node = (peak["supernodes"] + peak["executors"]) / nodes
    return {
        "mode": mode,
        "nodes": nodes,
        "up_s": up_s,
        "idle_bytes": idle,
        "peak_bytes": peak,
        "per_node_bytes": per_node,
        "updates_per_round": [r["num_updates"] for r in rounds],
        "round_seconds": [r["duration_s"] for r in rounds],
        "experiment_seconds": experiment_s,
        "projected_50_nodes_gib": (peak["server"] + 50 * per_node) / GIB,
    }


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    labels = [f"{r['mode']}\nN={r['nodes']}" for r in results]
    bottom = [0.0] * len(results)
    for part, color in (("server", "#94a3b8"), ("supernodes", "#93c5fd"), ("executors", "#2563eb")):
        values = [r["peak_bytes"][part] / GIB for r in results]
        ax.bar(labels, values, bottom=bottom, label=part, color=color)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.axhline(16, color="#dc2626", linestyle="--", linewidth=1, label="16 GiB goal (50 nodes)")
    ax.set_ylabel("peak PSS, GiB")
    ax.set_title("florist up: memory while every node trains", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[10, 50])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--quick", action="store_true", help="2 nodes, shared executors only")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.nodes, args.modes = [2], ["shared"]
    out = args.out or (RESULTS / ("quick" if args.quick else "") / "client_memory.json")
    results = []
    with tempfile.TemporaryDirectory(prefix="memory-bench-") as tmp:
        for nodes in args.nodes:
            for mode in args.modes:
                res = measure(mode, nodes, Path(tmp))
                results.append(res)
                print(
                    f"{mode:9s} N={nodes:3d}: peak {res['peak_bytes']['total'] / GIB:5.2f} GiB, "
                    f"{res['per_node_bytes'] / 2**20:5.0f} MiB per node, 50 nodes would need "
                    f"{res['projected_50_nodes_gib']:.1f} GiB (up in {res['up_s']:.0f} s)",
                    flush=True,
                )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "benchmark": "client_memory",
                "date": time.strftime("%Y-%m-%d"),
                "command": shlex.join([sys.executable, *(sys.argv if argv is None else argv)]),
                "machine": dispatch_overhead.machine(),
                "definition": "sum of PSS over `florist up`'s process tree, peak while a "
                "2-round FedAvg experiment with every node runs",
                "results": results,
            },
            indent=2,
        )
        + "\n"
    )
    plot(results, out.with_suffix(".png"))
    print(f"wrote {out}")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
