"""How a real deployment's cost grows with the model: round time and ServerApp memory from 10 k
to 10 M parameters, on a `florist up` stack.

Run from the repository root (about 10 minutes on 2 CPU cores):

    .venv/bin/python benchmarks/cost_growth.py [--sizes 1e4 1e5 1e6 1e7] [--nodes 5]
    .venv/bin/python -m benchmarks.cost_growth --quick     # smoke: 2 nodes, 2 small models

One `florist up` stack (API, SuperLink, N warm SuperNodes of the neutral device profile,
SQLite) runs, one after another, a 3-round FedAvg experiment on digits per model size: an MLP
with two hidden layers of width h, h chosen so that the model has about the asked number of
parameters, every node 2 local steps of batch 32 per round (so that training time grows with
the model, not with the data). Per size it reports the median round time and, from the API, the
time the ServerApp spent aggregating and the bytes each round moved; and the ServerApp's peak
memory (PSS of the `flwr-serverapp` process, sampled every 0.2 s). The clients axis of the cost
(10 to 10,000 virtual clients) is benchmarks/simulation.py's. Writes
benchmarks/results/cost_growth.json and cost_growth.png.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

try:
    from benchmarks import client_memory, dispatch_overhead, end_to_end
except ModuleNotFoundError:  # run as a script: benchmarks/ itself is on sys.path
    import client_memory  # type: ignore[no-redef]
    import dispatch_overhead  # type: ignore[no-redef]
    import end_to_end  # type: ignore[no-redef]

RESULTS = Path(__file__).resolve().parent / "results"
ROUNDS = 3
MIB = 2**20


def width(parameters: float) -> int:
    """h with h² + 76·h + 10 ≈ ``parameters`` (64 → h → h → 10, with biases)."""
    return max(1, round((-76 + math.sqrt(76**2 + 4 * (parameters - 10))) / 2))


def count(h: int) -> int:
    return 64 * h + h + h * h + h + 10 * h + 10


def body(h: int) -> dict[str, Any]:
    return {
        "name": f"cost-h{h}",
        "strategy": {"name": "fedavg", "config": {}},
        "workload": {
            "name": "digits",
            "config": {
                "partitioner": {"name": "iid"},
                "seed": 0,
                "model": {"name": "mlp", "hidden": [h, h]},
            },
        },
        "training": {"local_steps": 2, "batch_size": 32, "lr": 0.01},
        "rounds": ROUNDS,
        "round_timeout_s": 600,
    }


def high_water_mark(pid: int) -> int:
    """The peak resident set size of process ``pid`` so far, in bytes (0 if it is gone)."""
    return client_memory.proc_bytes(pid, "status", "VmHWM")


class ServerAppWatch:
    """Samples the PSS of every flwr-serverapp process under ``root`` until stopped."""

    def __init__(self, root: int) -> None:
        self.root = root
        self.peak = 0
        # The kernel's high-water mark of the process's RSS (VmHWM): exact, where the sampled
        # PSS can miss a peak shorter than the sampling interval. RSS counts shared pages
        # (libraries) in full, so it reads higher than the PSS.
        self.hwm = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            total = 0
            for pid in client_memory.tree(self.root):
                try:
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
                except OSError:
                    continue
                if b"flwr-serverapp" in cmd:
                    total += client_memory.pss(pid)
                    self.hwm = max(self.hwm, high_water_mark(pid))
            self.peak = max(self.peak, total)

    def __enter__(self) -> ServerAppWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def measure(stack: end_to_end.FloristStack, parameters: float) -> dict[str, Any]:
    h = width(parameters)
    spec = body(h)
    spec["clients"] = {"min": stack.nodes}
    with ServerAppWatch(stack.proc.pid) as watch:
        run = stack.run(spec)
    experiments = stack.client.get("/api/v1/experiments", params={"limit": 1}).json()["data"]
    rounds = stack.client.get(f"/api/v1/experiments/{experiments[0]['id']}/rounds").json()
    rows = rounds["data"]
    return {
        "parameters": count(h),
        "hidden": h,
        "seconds": run["seconds"],
        "round_s": statistics.median(r["duration_s"] for r in rows),
        "aggregate_s": statistics.median(r["aggregate_s"] or 0.0 for r in rows),
        "bytes_per_round": statistics.median(
            (r["bytes_in"] or 0) + (r["bytes_out"] or 0) for r in rows
        ),
        "serverapp_peak_mib": watch.peak / MIB,
        "serverapp_hwm_mib": watch.hwm / MIB,
        "rounds_recorded": len(rows),
    }


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["parameters"] for r in results]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    left.plot(x, [r["round_s"] for r in results], "o-", label="round")
    left.plot(x, [r["aggregate_s"] for r in results], "s--", label="aggregation")
    left.set(xscale="log", yscale="log", xlabel="model parameters", ylabel="seconds (median)")
    left.legend(fontsize=8)
    right.plot(x, [r["serverapp_peak_mib"] for r in results], "o-", color="#dc2626")
    right.plot(
        x,
        [r["parameters"] * 4 / MIB for r in results],
        ":",
        color="#64748b",
        label="one float32 model",
    )
    right.set(xscale="log", xlabel="model parameters", ylabel="ServerApp peak PSS, MiB")
    right.legend(fontsize=8)
    fig.suptitle("Cost against model size (florist up, FedAvg)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[1e4, 1e5, 1e6, 1e7])
    parser.add_argument("--nodes", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="2 nodes, 10 k and 100 k only")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.nodes = [1e4, 1e5], 2
    out = args.out or (RESULTS / ("quick" if args.quick else "") / "cost_growth.json")
    results = []
    with tempfile.TemporaryDirectory(prefix="cost-bench-") as tmp:
        stack = end_to_end.FloristStack(Path(tmp), args.nodes)
        try:
            stack.wait_ready()
            for size in args.sizes:
                res = measure(stack, size)
                results.append(res)
                print(
                    f"{res['parameters']:>10,d} parameters: round {res['round_s']:6.2f} s, "
                    f"aggregation {res['aggregate_s']:.3f} s, ServerApp peak "
                    f"{res['serverapp_peak_mib']:.0f} MiB PSS, "
                    f"{res['serverapp_hwm_mib']:.0f} MiB RSS",
                    flush=True,
                )
        finally:
            stack.stop()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "benchmark": "cost_growth",
                "date": time.strftime("%Y-%m-%d"),
                "command": shlex.join([sys.executable, *(sys.argv if argv is None else argv)]),
                "machine": dispatch_overhead.machine(),
                "nodes": args.nodes,
                "rounds": ROUNDS,
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
