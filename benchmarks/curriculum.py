"""Benchmark: curriculum vs anti-curriculum vs random ordering vs FedAvg (Vahidian et al., 2023).

Runs every variant in-process (``run_local``) on the same digits partitions and seeds, in a
non-IID (Dirichlet α = 0.1) and an IID setting. Easy-first client selection (nodes ranked by
their loss under the global model after the warm-up) is compared with a random selection of the
same size, so that a gain of the selection is not just one of training fewer nodes per round.
Writes ``benchmarks/results/curriculum.json``
(test accuracy per round, per variant, setting and seed; the config; the command) and
``benchmarks/results/curriculum.png``.

Run from the repository root::

    .venv/bin/python benchmarks/curriculum.py            # about 3 minutes on 2 cores
    .venv/bin/python benchmarks/curriculum.py --seeds 1  # quicker
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from florist.server.runtime.localgrid import run_local
from florist.server.spec import ExperimentSpec

RESULTS = Path(__file__).resolve().parent / "results"

SETTINGS: dict[str, dict[str, Any]] = {
    "dirichlet-0.1": {"name": "dirichlet", "alpha": 0.1},
    "iid": {"name": "iid"},
}


def variants() -> dict[str, dict[str, Any]]:
    # pacing_rounds is left unset: the pacing spans the run's ``rounds``.
    paced = {"pacing": "linear", "a": 0.8, "b": 0.2, "scorer_epochs": 2}
    selected = {**paced, "ordering": "curriculum", "clients_per_round": 5, "warmup_rounds": 2}
    return {
        "fedavg": {"name": "fedavg", "config": {}},
        "curriculum": {"name": "curriculum", "config": {**paced, "ordering": "curriculum"}},
        "anti-curriculum": {"name": "curriculum", "config": {**paced, "ordering": "anti"}},
        "random-curriculum": {"name": "curriculum", "config": {**paced, "ordering": "random"}},
        "curriculum+easy-first": {
            "name": "curriculum",
            "config": {**selected, "client_selection": "easy_first"},
        },
        "curriculum+random-selection": {
            "name": "curriculum",
            "config": {**selected, "client_selection": "random"},
        },
    }


def spec_for(
    strategy: dict[str, Any], partitioner: dict[str, Any], args: argparse.Namespace, seed: int
) -> ExperimentSpec:
    return ExperimentSpec.model_validate(
        {
            "name": "curriculum-benchmark",
            "strategy": strategy,
            "dataset": {"name": "digits", "partitioner": partitioner},
            "model": {"name": "mlp", "hidden": [64]},
            "training": {"local_epochs": 2, "batch_size": 32, "lr": 0.05, "momentum": 0.9},
            "rounds": args.rounds,
            "clients": {"min": 2},
            "seed": seed,
        }
    )


def summarize(curves: list[list[float]]) -> dict[str, float]:
    acc = np.array(curves)
    final = acc[:, -3:].mean(axis=1)  # mean of the last three rounds, per seed
    return {
        "final-mean": float(final.mean()),
        "final-std": float(final.std(ddof=1)) if len(final) > 1 else 0.0,
        "auc-mean": float(acc.mean()),  # mean accuracy over all rounds: speed of learning
    }


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = results["settings"]
    fig, axes = plt.subplots(1, len(settings), figsize=(6 * len(settings), 4), squeeze=False)
    for ax, (setting, by_variant) in zip(axes[0], settings.items(), strict=True):
        for variant, runs in by_variant.items():
            acc = np.array(runs["accuracy"])
            rounds = np.arange(1, acc.shape[1] + 1)
            ax.plot(rounds, acc.mean(axis=0), label=variant)
            if len(acc) > 1:
                ax.fill_between(rounds, acc.min(axis=0), acc.max(axis=0), alpha=0.15)
        ax.set_title(f"digits, {setting}, {results['config']['nodes']} nodes")
        ax.set_xlabel("round")
        ax.set_ylabel("test accuracy (mean over seeds; band: min–max)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--nodes", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=2)
    args = parser.parse_args()
    logging.disable(logging.WARNING)  # Flower logs every round at INFO

    started = time.perf_counter()
    chosen = variants()
    results: dict[str, Any] = {
        "command": " ".join([".venv/bin/python", "benchmarks/curriculum.py", *sys.argv[1:]]),
        "config": {
            "dataset": "digits",
            "model": {"name": "mlp", "hidden": [64]},
            "training": {"local_epochs": 2, "batch_size": 32, "lr": 0.05, "momentum": 0.9},
            "rounds": args.rounds,
            "nodes": args.nodes,
            "seeds": list(range(args.seeds)),
            "partitioners": SETTINGS,
            "variants": chosen,
            "final": "mean test accuracy of the last 3 rounds",
        },
        "settings": {},
    }
    for setting, partitioner in SETTINGS.items():
        by_variant: dict[str, Any] = {}
        for variant, strategy in chosen.items():
            curves = []
            for seed in range(args.seeds):
                spec = spec_for(strategy, partitioner, args, seed)
                _, recorder = run_local(spec, args.nodes)
                curves.append([r.metrics["accuracy"] for r in recorder.rounds(1)])
            by_variant[variant] = {"accuracy": curves, **summarize(curves)}
            s = by_variant[variant]
            print(
                f"{setting:14s} {variant:22s} final {s['final-mean']:.4f} ± {s['final-std']:.4f}"
                f"  mean-over-rounds {s['auc-mean']:.4f}  ({time.perf_counter() - started:.0f} s)",
                flush=True,
            )
        results["settings"][setting] = by_variant
    results["final-minus-fedavg"] = {
        setting: {
            v: round(r["final-mean"] - by_variant["fedavg"]["final-mean"], 4)
            for v, r in by_variant.items()
            if v != "fedavg"
        }
        for setting, by_variant in results["settings"].items()
    }
    results["elapsed-s"] = round(time.perf_counter() - started, 1)

    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "curriculum.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, RESULTS / "curriculum.png")

    print("\nfinal accuracy minus FedAvg's (positive: the variant helps)")
    for setting, gaps in results["final-minus-fedavg"].items():
        print(f"  {setting}: " + ", ".join(f"{v} {gap:+.4f}" for v, gap in gaps.items()))
    print(f"wrote {RESULTS / 'curriculum.json'} and .png in {results['elapsed-s']} s")


if __name__ == "__main__":
    main()
