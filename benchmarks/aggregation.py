"""Aggregation speed and memory: Florist's running sums against a plain copy and Flower's own.

100 clients × 1 M float32 parameters (400 MB of updates) by default. Each repetition runs, one
after the other on the same replies: a plain numpy copy of every update's bytes (the floor),
Florist's FedAvg round (SyncRounds over Flower's FedAvg, each reply decoded and folded into the
running sum as it arrives), RunningSum.add alone on the decoded arrays, Flower's
``FedAvg.aggregate_train`` on all the replies, and the two medians (Florist's robust-median,
Flower's FedMedian), which need every update at once. Throughput is update bytes per second, and
each method's ratio to the copy of the same repetition is what to quote. Peak memory is measured
in a separate pass under tracemalloc (it slows what it traces), the replies made one at a time as
they would arrive, above a baseline that makes and drops them unaggregated; it is given in
models (P × 4 bytes). Run:

    nice -n 19 .venv/bin/python benchmarks/aggregation.py            # ~3 min
    .venv/bin/python benchmarks/aggregation.py --quick               # smoke: tiny, results/quick/
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg, FedMedian
from flwr.supercore.task_identity import TaskIdentity

from florist.strategies.base import ServerSetup
from florist.strategies.events import Arrival, EventStrategy, Weights
from florist.strategies.flower_adapter import as_scheduler, to_record
from florist.strategies.robust import MedianConfig, MedianRule, RobustRounds
from florist.strategies.rounds import SyncRounds
from florist.strategies.streaming import RunningSum
from florist.strategies.validation import ARRAYS_KEY, METRICS_KEY, WEIGHT_KEY

RESULTS = Path(__file__).parent / "results"
KEY = "w"


def reply(node: int, update: np.ndarray, n: int) -> Message:
    """A training reply as a SuperNode sends it: its model and its example count."""
    content = RecordDict(
        {
            ARRAYS_KEY: to_record({KEY: update}),
            METRICS_KEY: MetricRecord({WEIGHT_KEY: n, "train-loss": 0.5}),
        }
    )
    request = Message(content=RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
    return Message(content, reply_to=request)


def decoded(message: Message) -> Weights:
    # As the loop's reply check decodes it (strategies/validation.py check_arrays).
    return {k: v.numpy() for k, v in message.content.array_records[ARRAYS_KEY].items()}


def arrival(node: int, message: Message, start: Weights) -> Arrival:
    n = message.content.metric_records[METRICS_KEY][WEIGHT_KEY]
    assert isinstance(n, int)
    return Arrival(node, decoded(message), start, 0, 0, n, 1, {"train-loss": 0.5}, 1.0)


def sync_rounds(kind: str, clients: int) -> EventStrategy:
    random.seed(0)
    if kind == "fedavg":
        return as_scheduler(FedAvg(min_train_nodes=clients, min_available_nodes=clients))
    rule = MedianRule(MedianConfig())
    return SyncRounds(RobustRounds(rule, ServerSetup(num_rounds=1, min_clients=clients)))


# --- the methods: each takes the replies (an iterator: made as they arrive) ---------------------


def florist_round(kind: str) -> Callable[[Iterator[Message], Weights, int], Any]:
    def run(replies: Iterator[Message], start: Weights, clients: int) -> Any:
        server = sync_rounds(kind, clients)
        server.begin(list(range(1, clients + 1)), start)
        decision = None
        for node, message in enumerate(replies, start=1):
            decision = server.on_arrival(arrival(node, message, start), start)
        assert decision is not None and decision.weights is not None
        return decision.weights

    return run


def flower(kind: str) -> Callable[[Iterator[Message], Weights, int], Any]:
    def run(replies: Iterator[Message], start: Weights, clients: int) -> Any:
        strategy = FedAvg() if kind == "fedavg" else FedMedian()
        arrays, _ = strategy.aggregate_train(1, list(replies))  # Flower needs them all
        assert arrays is not None
        return arrays

    return run


def decode_copy(replies: Iterator[Message], start: Weights, clients: int) -> Any:
    out = np.empty_like(start[KEY])
    for message in replies:
        np.copyto(out, decoded(message)[KEY])
    return out


# --- on arrays already decoded: the maths alone against memory bandwidth ----------------------


def copy(arrays: Iterator[Weights], start: Weights, clients: int) -> Any:
    out = np.empty_like(start[KEY])
    for weights in arrays:
        np.copyto(out, weights[KEY])
    return out


def florist_fold(arrays: Iterator[Weights], start: Weights, clients: int) -> Any:
    running = RunningSum()
    for node, weights in enumerate(arrays, start=1):
        running.add(weights, 10 + node)
    return running.mean()


def florist_fold_float64(arrays: Iterator[Weights], start: Weights, clients: int) -> Any:
    # The alternative not taken (strategies/streaming.py): the same fold into float64 sums.
    running = RunningSum()
    for node, weights in enumerate(arrays, start=1):
        if not running:
            running.sums = {KEY: np.zeros(weights[KEY].shape, np.float64)}
        running.add(weights, 10 + node)
    return running.mean({KEY: np.dtype(np.float32)})


Method = Callable[[Iterator[Any], Weights, int], Any]
# name -> (what it takes, the method): decoded arrays, or replies as they come off the wire.
METHODS: dict[str, tuple[str, Method]] = {
    "copy": ("arrays", copy),
    "florist-fold": ("arrays", florist_fold),
    "florist-fold-float64": ("arrays", florist_fold_float64),
    "decode+copy": ("replies", decode_copy),
    "florist-fedavg": ("replies", florist_round("fedavg")),
    "flower-fedavg": ("replies", flower("fedavg")),
    "florist-median": ("replies", florist_round("median")),
    "flower-fedmedian": ("replies", flower("median")),
}
NEEDS_ALL = {"florist-median": True, "flower-fedmedian": True, "flower-fedavg": True}


def make_arrays(clients: int, params: int, seed: int = 0) -> Iterator[Weights]:
    rng = np.random.default_rng(seed)
    for _ in range(clients):
        yield {KEY: rng.standard_normal(params, dtype=np.float32)}


def make_replies(
    clients: int, params: int, seed: int = 0, *, collect: bool = False
) -> Iterator[Message]:
    for node, weights in enumerate(make_arrays(clients, params, seed), start=1):
        if collect:
            # A Message and its request refer to each other: a reply let go is freed only by
            # the cycle collector, whose timing would otherwise decide the measured peak.
            gc.collect()
        yield reply(node, weights[KEY], 10 + node)


def make(source: str, clients: int, params: int, *, collect: bool = False) -> Iterator[Any]:
    if source == "arrays":
        return make_arrays(clients, params)
    return make_replies(clients, params, collect=collect)


def peak_models(source: str, method: Method, clients: int, params: int) -> float:
    """Peak traced bytes while the method takes replies made one at a time, in models (the
    lower of two runs: the first may include one-time allocations, e.g. lazy imports)."""
    return min(_peak_models(source, method, clients, params) for _ in range(2))


def _peak_models(source: str, method: Method, clients: int, params: int) -> float:
    start = {KEY: np.zeros(params, np.float32)}
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        result = method(make(source, clients, params, collect=True), start, clients)
        del result
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    return peak / (params * 4)


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "cpus": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--params", type=int, default=1_000_000)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument(
        "--robust-reps", type=int, default=1, help="repetitions of the medians (slow)"
    )
    parser.add_argument(
        "--memory-params", type=int, default=200_000, help="model size of the memory pass"
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to results/quick/")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--memory-only",
        action="store_true",
        help="redo only the memory pass of the results file there (the timings kept)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.clients, args.params, args.reps, args.memory_params = 5, 1000, 1, 1000
    out_dir = args.out or (RESULTS / "quick" if args.quick else RESULTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0

    if args.memory_only:
        path = out_dir / "aggregation.json"
        result = json.loads(path.read_text())
        memory_pass(result["methods"], result["clients"], args.memory_params)
        result["memory_pass_params"] = args.memory_params
        path.write_text(json.dumps(result, indent=2) + "\n")
        plot(result, out_dir / "aggregation.png")
        return 0

    clients, params = args.clients, args.params
    update_bytes = clients * params * 4
    start = {KEY: np.zeros(params, np.float32)}
    seconds: dict[str, list[float]] = {name: [] for name in METHODS}
    check: dict[str, np.ndarray] = {}
    for rep in range(args.reps):
        # Alternated: every method once per repetition, in a rotated order, so that a burst of
        # load from other work on the machine hits them alike.
        names = list(METHODS)
        names = names[rep % len(names) :] + names[: rep % len(names)]
        if rep >= args.robust_reps:
            names = [n for n in names if not n.endswith("median")]
        for name in names:
            # Made afresh for each method (not timed): Flower's FedMedian empties the replies
            # it aggregates.
            source, method = METHODS[name]
            inputs = list(make(source, clients, params))
            gc.collect()
            began = time.perf_counter()
            result = method(iter(inputs), start, clients)
            seconds[name].append(time.perf_counter() - began)
            if name not in ("copy", "decode+copy"):
                check[name] = (
                    result[KEY] if isinstance(result, dict) else result[KEY].numpy()
                ).copy()
            del result, inputs
        print(f"rep {rep + 1}: " + ", ".join(f"{n} {seconds[n][-1]:.3f}s" for n in names))
    gc.collect()

    figures: dict[str, Any] = {}
    for name, times in seconds.items():
        # Each against the copy of its own repetition.
        ratios = [c / t for c, t in zip(seconds["copy"], times, strict=False)]
        decode = [c / t for c, t in zip(seconds["decode+copy"], times, strict=False)]
        figures[name] = {
            "input": METHODS[name][0],
            "seconds": [round(t, 4) for t in times],
            # Best of the repetitions over best of the copies: the figure least moved by other
            # work preempting a run (the machine is shared).
            "ratio_to_copy_best": round(min(seconds["copy"]) / min(times), 3),
            "ratio_to_decode_copy_best": round(min(seconds["decode+copy"]) / min(times), 3),
            "gb_per_s_best": round(update_bytes / min(times) / 1e9, 3),
            "gb_per_s_median": round(update_bytes / statistics.median(times) / 1e9, 3),
            "ratio_to_copy": [round(r, 3) for r in ratios],
            "ratio_to_copy_median": round(statistics.median(ratios), 3),
            "ratio_to_decode_copy_median": round(statistics.median(decode), 3),
            "needs_all_updates": NEEDS_ALL.get(name, False),
        }
    small = args.memory_params
    memory_pass(figures, clients, small)
    # The two means agree (float32 sums in different orders); the two medians are the same rule.
    mean_gap = float(np.max(np.abs(check["florist-fedavg"] - check["flower-fedavg"])))
    median_gap = float(np.max(np.abs(check["florist-median"] - check["flower-fedmedian"])))
    result = {
        "benchmark": "aggregation",
        "command": "nice -n 19 .venv/bin/python benchmarks/aggregation.py"
        + (" --quick" if args.quick else ""),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "clients": clients,
        "params": params,
        "update_bytes": update_bytes,
        "repetitions": args.reps,
        "robust_repetitions": args.robust_reps,
        "memory_pass_params": small,
        "accumulator": "the model's dtype (float32), chunks of 65,536 elements",
        "methods": figures,
        "max_abs_difference": {"fedavg": mean_gap, "median": median_gap},
    }
    (out_dir / "aggregation.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out_dir / "aggregation.png")
    print(f"wrote {out_dir / 'aggregation.json'}")
    return 0


def memory_pass(figures: dict[str, Any], clients: int, params: int) -> None:
    # What exists now (modules, caches) is never garbage: frozen, the collections between
    # replies only scan what the pass itself makes.
    gc.collect()
    gc.freeze()
    baselines = {src: peak_models(src, _baseline, clients, params) for src in ("arrays", "replies")}
    for name, (source, method) in METHODS.items():
        figures[name]["peak_models_above_baseline"] = round(
            peak_models(source, method, clients, params) - baselines[source], 2
        )
        print(name, figures[name])


def _baseline(inputs: Iterator[Any], start: Weights, clients: int) -> None:
    for item in inputs:
        if isinstance(item, Message):
            decoded(item)  # arrives, is decoded, is dropped


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = result["methods"]
    names = list(methods)
    colours = ["#888888" if "copy" in n else "#c0504d" if methods[n]["needs_all_updates"] else
               "#4f81bd" for n in names]  # fmt: skip
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.bar(names, [methods[n]["ratio_to_copy_best"] for n in names], color=colours)
    left.axhline(0.5, color="black", linestyle="--", linewidth=1, label="goal 0.5")
    left.set_ylabel("bytes/s ÷ numpy copy (same run, best of reps)")
    left.set_yscale("log")
    left.legend()
    right.bar(names, [methods[n]["peak_models_above_baseline"] for n in names], color=colours)
    right.set_ylabel("peak memory above baseline (models)")
    for ax in (left, right):
        ax.tick_params(axis="x", rotation=35)
    fig.suptitle(
        f"{result['clients']} clients × {result['params']:,} float32 parameters; "
        "red: needs all updates"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
