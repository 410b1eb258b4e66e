"""FAL vs FedAvg on digits: clean and PGD-robust test accuracy per round, under two attacks.

Run from the repository root (about 2.5 minutes on 2 CPU cores)::

    .venv/bin/python benchmarks/fal.py [--rounds 50] [--nodes 10] [--pgd-steps 10]

Both runs use ``run_local`` with the same data (digits, Dirichlet α = 0.5), model, seed and
training settings. FedAvg runs as the ``fal`` plugin with training ε = 0, which gives exactly
FedAvg's weights (tests/unit/test_fal.py checks it; this script checks that its clean accuracy
equals the ``fedavg`` plugin's every round), so its global models get the same server-side PGD
evaluation as FAL's: the training attack's kind (eval ε, eval steps) and the strong attack (per
example the worst of it, a longer run and random restarts; ``FalConfig`` has the defaults).
Writes benchmarks/results/fal.json and fal.png.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from florist.server.runtime.localgrid import run_local
from florist.server.spec import ExperimentSpec

TAIL = 5
RESULTS = Path(__file__).resolve().parent / "results"


def make_spec(strategy: str, config: dict[str, Any], args: argparse.Namespace) -> ExperimentSpec:
    return ExperimentSpec.model_validate(
        {
            "name": f"bench-fal-{strategy}",
            "strategy": {"name": strategy, "config": config},
            "dataset": {"name": "digits", "partitioner": {"name": "dirichlet", "alpha": 0.5}},
            "model": {"name": "mlp", "hidden": [64]},
            "training": {"local_epochs": args.local_epochs, "lr": 0.05, "momentum": 0.9},
            "rounds": args.rounds,
            "clients": {"min": args.nodes},
            "seed": args.seed,
        }
    )


def run(spec: ExperimentSpec, nodes: int) -> tuple[list[dict[str, float]], float]:
    started = time.perf_counter()
    _, recorder = run_local(spec, nodes)
    elapsed = time.perf_counter() - started
    return [dict(r.metrics) for r in recorder.rounds(1)], elapsed


KEYS = ("accuracy", "robust-accuracy", "robust-accuracy-strong")


def summarize(rounds: list[dict[str, float]]) -> tuple[float, ...]:
    """Clean, robust and strong-robust accuracy averaged over the last rounds (single rounds are
    noisy)."""
    tail = rounds[-TAIL:]
    return tuple(sum(m[key] for m in tail) / len(tail) for key in KEYS)


def plot(curves: dict[str, list[dict[str, float]]], eval_desc: str, path: Path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(15, 4), sharex=True)
    panels = [
        ("accuracy", "clean test accuracy"),
        ("robust-accuracy", f"robust accuracy ({eval_desc})"),
        ("robust-accuracy-strong", "robust accuracy (strong: restarts, more steps)"),
    ]
    for ax, (key, title) in zip(axes, panels, strict=True):
        for name, rounds in curves.items():
            ax.plot(range(1, len(rounds) + 1), [m[key] for m in rounds], marker=".", label=name)
        ax.set_title(title)
        ax.set_xlabel("round")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy")
    axes[0].legend()
    fig.suptitle("FAL vs FedAvg: digits, Dirichlet α=0.5, MLP[64]")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--nodes", type=int, default=10)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--epsilon", type=float, default=0.1, help="training and eval ε")
    parser.add_argument("--pgd-steps", type=int, default=10, help="training PGD steps")
    parser.add_argument("--eval-pgd-steps", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.getLogger("flwr").setLevel(logging.WARNING)  # Flower logs every round's metrics

    eval_config = {"eval_epsilon": args.epsilon, "eval_pgd_steps": args.eval_pgd_steps}
    fal_config = {"epsilon": args.epsilon, "pgd_steps": args.pgd_steps, **eval_config}
    fedavg_config = {"epsilon": 0.0, **eval_config}

    fedavg, fedavg_s = run(make_spec("fal", fedavg_config, args), args.nodes)
    plain, _ = run(make_spec("fedavg", {}, args), args.nodes)
    if [m["accuracy"] for m in plain] != [m["accuracy"] for m in fedavg]:
        sys.exit("fal with ε=0 did not reproduce FedAvg's clean accuracy: the comparison is void")
    fal, fal_s = run(make_spec("fal", fal_config, args), args.nodes)

    curves = {"FedAvg": fedavg, "FAL": fal}
    eval_desc = f"PGD ε={args.epsilon}, {args.eval_pgd_steps} steps"
    final = {name: summarize(rounds) for name, rounds in curves.items()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {
        "command": " ".join([".venv/bin/python", "benchmarks/fal.py", *sys.argv[1:]]),
        "config": {
            "dataset": "digits, dirichlet alpha=0.5, test split 20% (robust metrics: a seeded "
            "random subset of at most 500, here the whole split)",
            "model": "mlp hidden=[64]",
            "training": {"local_epochs": args.local_epochs, "lr": 0.05, "momentum": 0.9},
            "rounds": args.rounds,
            "nodes": args.nodes,
            "seed": args.seed,
            "fal": fal_config,
            "fedavg": {"plugin": "fal", **fedavg_config},
            "eval": eval_desc,
            "eval-strong": "worst per example of the eval attack, a 50-step run from x and 5 "
            "random restarts (step 2.5·ε/50)",
        },
        f"mean-last-{TAIL}-rounds": {
            name: dict(zip(KEYS, values, strict=True)) for name, values in final.items()
        },
        "wall-seconds (shared machine, indicative only)": {
            "FedAvg": round(fedavg_s, 1),
            "FAL": round(fal_s, 1),
        },
        "rounds": {
            name: [
                {
                    "round": i,
                    "accuracy": m["accuracy"],
                    "robust-accuracy": m["robust-accuracy"],
                    "robust-accuracy-strong": m["robust-accuracy-strong"],
                    "loss": m["loss"],
                    "robust-loss": m["robust-loss"],
                    "robust-loss-strong": m["robust-loss-strong"],
                }
                for i, m in enumerate(rounds, start=1)
            ]
            for name, rounds in curves.items()
        },
    }
    (RESULTS / "fal.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(curves, eval_desc, RESULTS / "fal.png")

    print(
        f"{'':8} {'clean':>7} {'robust':>7} {'strong':>7}"
        f"   (mean of the last {TAIL} rounds; {eval_desc})"
    )
    for name, (clean, robust, strong) in final.items():
        print(f"{name:8} {clean:7.3f} {robust:7.3f} {strong:7.3f}")
    d_clean = final["FAL"][0] - final["FedAvg"][0]
    d_robust = final["FAL"][1] - final["FedAvg"][1]
    d_strong = final["FAL"][2] - final["FedAvg"][2]
    trade = d_clean <= 0 < d_robust
    print(
        f"FAL - FedAvg: clean {d_clean:+.3f}, robust {d_robust:+.3f}, strong {d_strong:+.3f} -> "
        + (
            "FAL trades clean for robust accuracy, as the paper says."
            if trade
            else "no clean-for-robust trade-off in this run."
        )
    )
    print(f"time: FedAvg {fedavg_s:.0f}s, FAL {fal_s:.0f}s; wrote {RESULTS}/fal.json, fal.png")


if __name__ == "__main__":
    main()
