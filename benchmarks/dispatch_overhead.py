"""Flower's fixed per-dispatch overhead: plain Flower 1.39 vs Florist's warm path, side by side.

Run from the repository root (about 3 minutes on 2 CPU cores):

    .venv/bin/python benchmarks/dispatch_overhead.py [--rounds 4] [--nodes 1 3]

Both sides run the same minimal Flower app, written into a temporary folder: a ServerApp that
runs Flower's own FedAvg for a few rounds (no client evaluation) and a ClientApp that trains an
MLP (64-64-10) for one local epoch on its slice of scikit-learn's digits, and reports how long
its handler took (``handler-time``). On loopback with real processes (one flower-superlink, N
flower-supernodes) it compares:

- **plain**: stock Flower: ``flower-supernode`` (subprocess isolation: flower-superexec starts
  one ``flwr-clientapp`` per message), Flower's polls, the ServerApp on Flower's Grid (3 s
  reply poll);
- **florist**: ``python -m florist.client.supernode --isolation process`` (short idle/reply
  polls and object-pull back-off, client/flower_tuning.py) with one warm executor per node
  (client/executor.py), and the ServerApp polling for replies every 0.1 s as Florist's one
  loop does (``ShortPollGrid`` below), with the same pull back-off tuning.

Per dispatch overhead = a round's wall time (push of the train messages to the last reply, as
the strategy sees it) minus the slowest ClientApp handler of that round. Writes
``benchmarks/results/dispatch_overhead.json`` with every round, the medians, the ratio
florist/plain, the command and the machine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from flwr.cli.build import build_fab_from_disk
from flwr.common.serde import fab_to_proto, user_config_to_proto
from flwr.proto.control_pb2 import StartRunRequest
from flwr.supercore.fab import Fab

from florist.server.control import ControlClient
from florist.server.processes import (
    Managed,
    Supervisor,
    flower_env,
    free_port,
    superlink_command,
    supernode_command,
    supernode_processes,
    wait_for_port,
)

RESULTS = Path(__file__).resolve().parent / "results"

PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "dispatchbench"
version = "1.0.0"
license = "Apache-2.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["dispatchbench"]

[tool.flwr.app]
publisher = "bench"

[tool.flwr.app.components]
serverapp = "dispatchbench.server_app:app"
clientapp = "dispatchbench.client_app:app"

[tool.flwr.app.config]
num-server-rounds = 3
timings-file = ""
fast = false
"""

TASK = '''\
"""The benchmark's model and data: an MLP on this node's slice of scikit-learn's digits."""

import torch
from sklearn.datasets import load_digits


def model() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10)
    )


def shard(pid: int, num: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x[pid::num] / 16.0, dtype=torch.float32)
    return x, torch.tensor(y[pid::num], dtype=torch.long)
'''

CLIENT_APP = '''\
"""ClientApp: one local epoch of SGD, and the handler's own time in the reply."""

import time

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from dispatchbench.task import model, shard

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    started = time.perf_counter()
    pid = int(context.node_config["partition-id"])
    num = int(context.node_config["num-partitions"])
    x, y = shard(pid, num)
    net = model()
    net.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    torch.manual_seed(int(msg.content["config"]["server-round"]) * 100 + pid)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    for idx in torch.randperm(len(x)).split(32):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
        opt.step()
    metrics = {"num-examples": len(x), "handler-time": time.perf_counter() - started}
    arrays = ArrayRecord(net.state_dict())
    content = RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)
'''

SERVER_APP = '''\
"""ServerApp: Flower's FedAvg; every train dispatch timed on the Grid."""

import json
import time

import torch
from flwr.app import ArrayRecord, Context, MessageType
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from dispatchbench.task import model

app = ServerApp()


class TimedGrid:
    """Records each send_and_receive: wall time and the slowest handler among the replies."""

    def __init__(self, inner):
        self._inner = inner
        self.rounds = []

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        started = time.perf_counter()
        replies = list(self._inner.send_and_receive(messages, timeout=timeout))
        wall = time.perf_counter() - started
        if messages and messages[0].metadata.message_type == MessageType.TRAIN:
            handler = [
                float(r.content["metrics"]["handler-time"]) for r in replies if not r.has_error()
            ]
            self.rounds.append(
                {"wall": wall, "handler_max": max(handler, default=0.0), "replies": len(handler),
                 "errors": sum(r.has_error() for r in replies)}
            )
        return replies


class ShortPollGrid:
    """Pulls replies every 0.1 s, as Florist's one loop does (server/runtime/loop.py), instead of
    HttpGrid's 3 s; the rounds stay Flower's, so both sides run the same strategy code."""

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def send_and_receive(self, messages, *, timeout=None):
        ids = [i for i in self._inner.push_messages(list(messages)) if i is not None]
        deadline = time.monotonic() + (timeout or 3600)
        pending, replies = set(ids), []
        while pending and time.monotonic() < deadline:
            for reply in self._inner.pull_messages(list(pending)):
                pending.discard(reply.metadata.reply_to_message_id)
                replies.append(reply)
            if pending:
                time.sleep(0.1)
        return replies


@app.main()
def main(grid: Grid, context: Context) -> None:
    fast = bool(context.run_config["fast"])
    if fast:
        from florist.client.flower_tuning import tune_object_pulls

        tune_object_pulls()
        grid = ShortPollGrid(grid)
    timed = TimedGrid(grid)
    torch.manual_seed(0)
    n = len(list(grid.get_node_ids()))
    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=n,
                      min_available_nodes=n)
    strategy.start(
        grid=timed,
        initial_arrays=ArrayRecord(model().state_dict()),
        num_rounds=int(context.run_config["num-server-rounds"]),
        timeout=600,
    )
    with open(str(context.run_config["timings-file"]), "w") as f:
        json.dump({"nodes": n, "rounds": timed.rounds}, f)
'''


def write_app(folder: Path) -> Path:
    pkg = folder / "dispatchbench"
    pkg.mkdir(parents=True)
    (folder / "pyproject.toml").write_text(PYPROJECT)
    (pkg / "__init__.py").write_text('"""Dispatch-overhead benchmark app."""\n')
    (pkg / "task.py").write_text(TASK)
    (pkg / "client_app.py").write_text(CLIENT_APP)
    (pkg / "server_app.py").write_text(SERVER_APP)
    return folder


def run_side(side: str, nodes: int, rounds: int, app: Path, work: Path) -> dict[str, Any]:
    """Start a SuperLink and ``nodes`` SuperNodes for ``side``, run the app, return its timings."""
    home = work / f"{side}-{nodes}"
    control, fleet = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    # The app is imported from its FAB folder; flwr-serverapp/-clientapp find it there.
    env = flower_env(home, {"PYTHONPATH": os.environ.get("PYTHONPATH", "")})
    for name in ("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "FLORIST_EXECUTOR_POLL"):
        env.pop(name, None)
    sup = Supervisor()
    timings = home / "timings.json"
    started = time.perf_counter()
    try:
        sup.add(
            Managed(
                "superlink",
                superlink_command(control=control, fleet=fleet),
                env,
                home / "superlink.log",
                restart=False,
            )
        )
        wait_for_port(control)
        wait_for_port(fleet)
        for i in range(nodes):
            clientappio = f"127.0.0.1:{free_port()}"
            node_config: dict[str, int | float | str] = {"partition-id": i, "num-partitions": nodes}
            if side == "plain":
                cmd = supernode_command(
                    superlink=fleet, clientappio=clientappio, node_config=node_config
                )
                sup.add(Managed(f"supernode-{i}", cmd, env, home / f"supernode-{i}.log"))
            else:
                for m in supernode_processes(
                    f"supernode-{i}",
                    superlink=fleet,
                    clientappio=clientappio,
                    node_config=node_config,
                    env=env,
                    log_dir=home,
                    executors_on_host=nodes,
                ):
                    sup.add(m)
        time.sleep(3)  # let the SuperNodes register (and executors import torch)
        fab_bytes = build_fab_from_disk(app)
        fab = Fab(hashlib.sha256(fab_bytes).hexdigest(), fab_bytes, {})
        client = ControlClient(control)
        config: dict[str, int | float | str | bool] = {
            "num-server-rounds": rounds,
            "timings-file": str(timings),
            "fast": side == "florist",
        }
        res = client._call(
            "StartRun",
            StartRunRequest(fab=fab_to_proto(fab), override_config=user_config_to_proto(config)),
        )
        run_id = int(res.run_id)
        run_started = time.perf_counter()
        deadline = time.monotonic() + 120 + 30 * rounds
        while True:
            state = client.run_state(run_id)
            if state is not None and state.finished:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{side} N={nodes}: run {run_id} did not finish")
            sup.check()
            time.sleep(0.05)
        run_s = time.perf_counter() - run_started
        client.close()
        if state.sub_status != "completed" or not timings.exists():
            raise RuntimeError(f"{side} N={nodes}: run ended {state}; logs in {home}")
        data = json.loads(timings.read_text())
    finally:
        sup.stop_all()
    per_round = [{**r, "overhead": r["wall"] - r["handler_max"]} for r in data["rounds"]]
    overheads = [r["overhead"] for r in per_round]
    return {
        "side": side,
        "nodes": nodes,
        "rounds": per_round,
        "median_overhead_s": statistics.median(overheads),
        "median_round_s": statistics.median(r["wall"] for r in per_round),
        "median_handler_s": statistics.median(r["handler_max"] for r in per_round),
        "all_replies_ok": all(r["replies"] == nodes and r["errors"] == 0 for r in per_round),
        "total_s": time.perf_counter() - started,
        "run_s": run_s,  # StartRun to the SuperLink saying the run finished
    }


def machine() -> dict[str, Any]:
    import flwr
    import torch

    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "flwr": flwr.__version__,
        "torch": torch.__version__,
        # Other work on the machine inflates both sides (plain more: it spawns processes).
        "loadavg_1_5_15": list(os.getloadavg()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--nodes", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--out", type=Path, default=RESULTS / "dispatch_overhead.json")
    args = parser.parse_args()
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="dispatch-bench-") as tmp:
        work = Path(tmp)
        app = write_app(work / "app")
        for nodes in args.nodes:
            for side in ("plain", "florist"):
                res = run_side(side, nodes, args.rounds, app, work)
                results.append(res)
                print(
                    f"{side:8s} N={nodes}: overhead per dispatch "
                    f"{res['median_overhead_s']:.2f} s (round {res['median_round_s']:.2f} s, "
                    f"ClientApp {res['median_handler_s']:.2f} s)"
                )
    ratios = {}
    for nodes in args.nodes:
        plain = next(r for r in results if r["side"] == "plain" and r["nodes"] == nodes)
        ours = next(r for r in results if r["side"] == "florist" and r["nodes"] == nodes)
        ratios[str(nodes)] = ours["median_overhead_s"] / plain["median_overhead_s"]
        print(f"N={nodes}: florist/plain overhead = {ratios[str(nodes)]:.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "benchmark": "dispatch_overhead",
                "definition": "overhead = round wall time (strategy's send_and_receive of the "
                "train messages) - slowest ClientApp handler time of that round; median over "
                "rounds",
                "command": shlex.join([sys.executable, *sys.argv]),
                "machine": machine(),
                "rounds": args.rounds,
                "ratio_florist_over_plain": ratios,
                "results": results,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
