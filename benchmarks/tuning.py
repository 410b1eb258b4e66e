"""Shared tuning harness: every method on one grid, chosen on validation, reported on test.

Each benchmark names its methods (a function from a grid setting and a seed to an
``ExperimentSpec``), a grid of local learning rates × client momentum, and seeds. Every method runs
every setting with every seed (``run_grid``); for each method the setting with the highest
validation score is chosen (``select``): the mean over seeds of the mean ``val-accuracy`` of the
last ``tail`` rounds, the first setting in grid order on a tie. The test split is then reported
for that setting only, mean ± sample standard deviation over the seeds of the same last-rounds
mean (``summarise``). Test accuracy never takes part in the choice.

The results file of a benchmark (``write_results``) carries the grid, the seeds, each setting's
validation and test figures, the chosen setting and its test figures under ``scenarios``, which
``benchmarks/report.py`` renders into benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from florist.server.metrics import ACCURACY, VAL_ACCURACY
from florist.server.runtime.localgrid import run_local
from florist.server.spec import ExperimentSpec

RESULTS = Path(__file__).resolve().parent / "results"
QUICK_RESULTS = RESULTS / "quick"

Setting = dict[str, float]
# (grid setting, seed) -> the experiment to run
SpecFactory = Callable[[Setting, int], ExperimentSpec]
# One run's curves: "accuracy", "val_accuracy" and any extra metric, one value per round.
Run = dict[str, Any]
SELECTION = (
    "the grid setting with the highest mean over seeds of the mean val-accuracy of the last "
    "{tail} rounds (validation split, carved from the training side); first in grid order on a "
    "tie. Test figures: the same last-{tail}-round mean on the test split, for the chosen "
    "setting, mean ± sample sd over seeds."
)


def grid(lrs: Sequence[float], momenta: Sequence[float]) -> list[Setting]:
    """The settings every method runs: each local learning rate with each client momentum."""
    return [{"lr": lr, "momentum": m} for m in momenta for lr in lrs]


def label(setting: Setting) -> str:
    return f"lr={setting['lr']:g} momentum={setting['momentum']:g}"


def quiet() -> None:
    """Flower logs every round at INFO; one thread is faster than two on these tiny models."""
    logging.getLogger("flwr").setLevel(logging.ERROR)
    torch.set_num_threads(1)


def run_once(
    spec: ExperimentSpec,
    nodes: int,
    extra_keys: Sequence[str] = (),
    cache: Path | None = None,
    node_configs: list[dict[str, Any]] | None = None,
) -> Run:
    """One run's curves; with ``cache``, a run already done with the same spec, nodes, keys and
    node configs is read back instead (so an interrupted or sharded benchmark resumes).

    ``node_configs[i]`` is node i's node-config (a device profile). On the virtual clock a run
    also carries each round's ``virtual_time_s`` and the metrics of the initial model
    (``initial``), which time-based curves start from.
    """
    parts: list[Any] = [spec.model_dump(mode="json"), nodes, list(extra_keys)]
    if node_configs is not None:  # absent otherwise, so that earlier cached runs still match
        parts.append(node_configs)
    key = json.dumps(parts, sort_keys=True)
    path = None
    if cache is not None:
        path = cache / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"
        if path.exists():
            return dict(json.loads(path.read_text()))
    started = time.perf_counter()
    if node_configs is None:
        result, recorder = run_local(spec, nodes)
    else:
        result, recorder = run_local(spec, nodes, node_configs=node_configs)
    rounds = recorder.rounds(1)
    out: Run = {
        "accuracy": [r.metrics[ACCURACY] for r in rounds],
        "val_accuracy": [r.metrics[VAL_ACCURACY] for r in rounds],
    }
    if spec.clock == "virtual":
        out["virtual_time_s"] = [r.virtual_time_s for r in rounds]
        out["initial"] = {
            "accuracy": result.initial_metrics[ACCURACY],
            "val_accuracy": result.initial_metrics[VAL_ACCURACY],
        }
    for extra in extra_keys:
        out[extra] = [r.metrics[extra] for r in rounds]
    out["seconds"] = round(time.perf_counter() - started, 2)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out))
    return out


def run_grid(
    methods: dict[str, SpecFactory],
    settings: Sequence[Setting],
    seeds: Sequence[int],
    nodes: int,
    tail: int,
    extra_keys: Sequence[str] = (),
    prefix: str = "",
    cache: Path | None = None,
    shard: tuple[int, int] | None = None,
    node_configs: list[dict[str, Any]] | None = None,
) -> dict[str, dict[str, list[Run]]]:
    """runs[method][setting label] = one run per seed, in ``seeds`` order.

    ``shard = (i, n)`` runs only every n-th run (method, setting, seed) from the i-th into the
    ``cache``, for n worker processes sharing it, and answers nothing.
    """
    runs: dict[str, dict[str, list[Run]]] = {m: {} for m in methods}
    pairs = [(m, s) for m in methods for s in settings]
    for index, (method, setting) in enumerate(pairs):
        factory = methods[method]
        if shard is not None:
            # Runs, not pairs, are shared out, so that cached runs do not unbalance the workers.
            for k, seed in enumerate(seeds):
                if (index * len(seeds) + k) % shard[1] == shard[0]:
                    run_once(factory(setting, seed), nodes, extra_keys, cache, node_configs)
            continue
        per_seed = [
            run_once(factory(setting, seed), nodes, extra_keys, cache, node_configs)
            for seed in seeds
        ]
        runs[method][label(setting)] = per_seed
        val = np.mean([tail_mean(r["val_accuracy"], tail) for r in per_seed])
        secs = sum(r["seconds"] for r in per_seed)
        print(
            f"{prefix}{method:12s} {label(setting):24s} val(last {tail}) {val:.3f}  ({secs:.0f} s)",
            flush=True,
        )
    return runs


def add_worker_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--shard",
        type=lambda text: tuple(int(x) for x in text.split("/")),
        help="I/N: run only this worker's share into the cache, write no results",
    )


def cache_dir(name: str, quick: bool) -> Path:
    return (QUICK_RESULTS if quick else RESULTS) / "cache" / name


def runs_seconds(runs: Any) -> float:
    """The summed wall time of every run in a nested dict/list of runs (workers run in parallel,
    so this is the sequential equivalent, not the elapsed time)."""
    if isinstance(runs, dict) and "seconds" in runs and "accuracy" in runs:
        return float(runs["seconds"])
    items = runs.values() if isinstance(runs, dict) else runs
    return float(sum(runs_seconds(r) for r in items))


def tail_mean(curve: Sequence[float], tail: int) -> float:
    return float(np.mean(curve[-tail:]))


def mean_sd(values: Sequence[float]) -> dict[str, Any]:
    vals = [float(v) for v in values]
    return {
        "mean": float(np.mean(vals)),
        "sd": statistics.stdev(vals) if len(vals) > 1 else 0.0,
        "per_seed": vals,
    }


def select(by_setting: dict[str, list[Run]], tail: int) -> str:
    """The label of the setting with the best validation score; test accuracy is not read."""
    scores = {
        name: float(np.mean([tail_mean(r["val_accuracy"], tail) for r in per_seed]))
        for name, per_seed in by_setting.items()
    }
    return max(scores, key=lambda name: scores[name])  # max keeps the first on a tie


def summarise(
    by_setting: dict[str, list[Run]],
    settings: Sequence[Setting],
    tail: int,
    extra_keys: Sequence[str] = (),
) -> dict[str, Any]:
    """The chosen setting, its test figures and every setting's figures, for one method."""
    chosen = select(by_setting, tail)
    table = []
    for setting in settings:
        per_seed = by_setting[label(setting)]
        table.append(
            {
                "setting": setting,
                "val": mean_sd([tail_mean(r["val_accuracy"], tail) for r in per_seed])["mean"],
                "test": mean_sd([tail_mean(r["accuracy"], tail) for r in per_seed])["mean"],
            }
        )
    runs = by_setting[chosen]
    return {
        "chosen": next(s for s in settings if label(s) == chosen),
        "val": mean_sd([tail_mean(r["val_accuracy"], tail) for r in runs]),
        "test": mean_sd([tail_mean(r["accuracy"], tail) for r in runs]),
        "metrics": {k: mean_sd([tail_mean(r[k], tail) for r in runs]) for k in extra_keys},
        "grid": table,
        "mean_test_curve": np.mean([r["accuracy"] for r in runs], axis=0).tolist(),
        "mean_metric_curves": {
            k: np.mean([r[k] for r in runs], axis=0).tolist() for k in extra_keys
        },
    }


def write_results(name: str, result: dict[str, Any], quick: bool) -> Path:
    """benchmarks/results/NAME.json, or results/quick/ for ``--quick`` runs (not committed)."""
    out_dir = QUICK_RESULTS if quick else RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def plot(result: dict[str, Any], path: Path, title: str) -> None:
    """Per scenario: the chosen settings' mean test curves, and every setting's validation score
    (the score selection maximises) per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = result["scenarios"]
    fig, axes = plt.subplots(len(scenarios), 2, figsize=(12, 3.8 * len(scenarios)), squeeze=False)
    for row, (scenario, body) in zip(axes, scenarios.items(), strict=True):
        curves_ax, grid_ax = row
        for method, summary in body["methods"].items():
            curve = summary["mean_test_curve"]
            (line,) = curves_ax.plot(
                range(1, len(curve) + 1),
                curve,
                label=f"{method} ({label(summary['chosen'])})",
            )
            # Extra test metrics (robust accuracy) in the method's colour, dashed then dotted.
            for key, style in zip(summary.get("mean_metric_curves", {}), ("--", ":"), strict=False):
                extra = summary["mean_metric_curves"][key]
                curves_ax.plot(
                    range(1, len(extra) + 1),
                    extra,
                    style,
                    color=line.get_color(),
                    label=f"{method}: {key}",
                )
            grid_ax.plot(
                [label(g["setting"]).replace(" momentum", "\nm") for g in summary["grid"]],
                [g["val"] for g in summary["grid"]],
                marker="o",
                label=method,
            )
        curves_ax.set_title(
            f"{scenario}\ntest accuracy at the chosen setting (mean over seeds)", fontsize=9
        )
        curves_ax.set_xlabel("round")
        curves_ax.grid(alpha=0.3)
        curves_ax.legend(fontsize=8)
        grid_ax.set_title(
            f"{scenario}\nvalidation score (selection's) per grid setting", fontsize=9
        )
        grid_ax.tick_params(axis="x", labelsize=7)
        grid_ax.grid(alpha=0.3)
        grid_ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
