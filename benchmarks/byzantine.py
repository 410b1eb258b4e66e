"""Byzantine robustness: FedAvg vs Florist's robust plugins with 0, 1 and 3 of 13 nodes attacking.

Run from the repository root, either way:

    .venv/bin/python -m benchmarks.byzantine
    .venv/bin/python benchmarks/byzantine.py [--rounds 30] [--seeds 0 1 2]

Writes ``benchmarks/results/byzantine.json`` (final test accuracy per dataset, scenario,
strategy and seed, the chosen learning rates, the config and the command) and
``benchmarks/results/byzantine.png`` (mean final accuracy with 3 attackers per attack, clean
FedAvg as a line), and prints a Markdown table. In-process with ``run_local``.

Setup: 13 nodes (IID partitions), logistic regression on scikit-learn digits and on the
LEAF-style ``synthetic`` task, 1 local epoch of plain SGD (batch 32) per round. Nodes 0, 1, 2
attack in the 3-attacker scenarios, node 0 in the 1-attacker ones, each attack at its default
strength (client/attacks.py): sign flip (−Δ), ALIE (z = 1, μ and σ from 3 of the attacker's own
runs), IPM (ε = 0.1, μ from its own run), label flip (all labels y → 9 − y). Every robust plugin
assumes f = 3, whatever the scenario; MoNNA's clients use β = 0.9 (the paper's 0.99 needs far
more steps than 30 short rounds give). The norm bound on replies is off, so only the
aggregation rule stands between the attackers and the model.

``--strong`` reruns the clean and 3-attacker scenarios with stronger attacks (``STRONG``) into
``byzantine-strong.json``/``.png``; ``--lrs-from benchmarks/results/byzantine.json`` reuses the
learning rates chosen there instead of choosing again.

Tuning: each strategy's learning rate is chosen from the same grid on the validation split of a
clean run (seed 0, final round), then used in every scenario; the test split is only reported.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from florist.server.metrics import ACCURACY, VAL_ACCURACY
from florist.server.runtime.localgrid import run_local
from florist.server.spec import ExperimentSpec

RESULTS = Path(__file__).resolve().parent / "results"
NUM_NODES = 13
F = 3
LR_GRID = (0.03, 0.1, 0.3)
DATASETS = ("digits", "synthetic")
ATTACKS = ("sign-flip", "alie", "ipm", "label-flip")
STRATEGIES: dict[str, dict[str, Any]] = {
    "fedavg": {},
    "robust-median": {"num_byzantine": F},
    "robust-trimmed-mean": {"num_byzantine": F},
    "robust-krum": {"num_byzantine": F},
    "robust-multi-krum": {"num_byzantine": F},
    "centered-clipping": {"num_byzantine": F},
    "monna": {"num_byzantine": F, "beta": 0.9},
}


# ``--strong``: strengths past the point where FedAvg's mean turns against the honest one (with 3
# of 13 attackers, −s·Δ or −s·μ outweighs the 10 honest updates once s > 10/3); ALIE's z is large
# because an attacker's own σ estimate is small (client/attacks.py).
STRONG = {"sign-flip": 4.0, "alie": 10.0, "ipm": 4.0, "label-flip": 1.0}
COUNTS = [1, 3]
STRENGTHS: dict[str, float] = {}


def scenarios() -> list[tuple[str, int]]:
    return [("none", 0)] + [(a, k) for k in COUNTS for a in ATTACKS]


def scenario_name(attack: str, count: int) -> str:
    return "clean" if count == 0 else f"{attack}x{count}"


def spec(strategy: str, dataset: str, lr: float, rounds: int, seed: int) -> ExperimentSpec:
    return ExperimentSpec.model_validate(
        {
            "name": f"byz-{strategy}-{dataset}-s{seed}",
            "strategy": {"name": strategy, "config": STRATEGIES[strategy]},
            "dataset": {"name": dataset, "partitioner": {"name": "iid"}, "seed": seed},
            "model": {"name": "logreg"},
            "training": {"lr": lr, "batch_size": 32, "local_epochs": 1, "momentum": 0.0},
            "rounds": rounds,
            "clients": {"min": NUM_NODES},
            "seed": seed,
            "reply_checks": {"norm_bound": {"kind": "none"}},
        }
    )


def run_one(
    strategy: str, dataset: str, lr: float, rounds: int, seed: int, attack: str, count: int
) -> dict[str, float]:
    bad: dict[str, Any] = {"attack": attack}
    if attack in STRENGTHS:
        bad["attack-strength"] = STRENGTHS[attack]
    configs = [bad if i < count else {} for i in range(NUM_NODES)]
    _, recorder = run_local(
        spec(strategy, dataset, lr, rounds, seed), NUM_NODES, node_configs=configs
    )
    last = recorder.rounds(1)[-1].metrics
    return {"accuracy": float(last[ACCURACY]), "val_accuracy": float(last[VAL_ACCURACY])}


def choose_lrs(rounds: int) -> dict[str, dict[str, float]]:
    chosen: dict[str, dict[str, float]] = {}
    for dataset in DATASETS:
        chosen[dataset] = {}
        for strategy in STRATEGIES:
            vals = {
                lr: run_one(strategy, dataset, lr, rounds, 0, "none", 0)["val_accuracy"]
                for lr in LR_GRID
            }
            chosen[dataset][strategy] = max(LR_GRID, key=lambda lr: (vals[lr], -lr))
            print(f"lr {dataset} {strategy}: {vals} -> {chosen[dataset][strategy]}", flush=True)
    return chosen


def table(summary: dict[str, Any], dataset: str) -> str:
    names = [scenario_name(a, k) for a, k in scenarios()]
    head = "| strategy | " + " | ".join(names) + " |"
    rule = "|---|" + "---|" * len(names)
    lines = [head, rule]
    for strategy in STRATEGIES:
        cells = []
        for name in names:
            s = summary[dataset][name][strategy]
            cells.append(f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f}")
        lines.append(f"| {strategy} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(DATASETS), figsize=(12, 4.2), sharey=True)
    width = 0.8 / len(STRATEGIES)
    for ax, dataset in zip(axes, DATASETS, strict=True):
        x = np.arange(len(ATTACKS))
        for j, strategy in enumerate(STRATEGIES):
            means = [100 * summary[dataset][f"{a}x3"][strategy]["mean"] for a in ATTACKS]
            stds = [100 * summary[dataset][f"{a}x3"][strategy]["std"] for a in ATTACKS]
            ax.bar(
                x + (j - len(STRATEGIES) / 2 + 0.5) * width,
                means,
                width,
                yerr=stds,
                label=strategy,
                capsize=2,
            )
        clean = 100 * summary[dataset]["clean"]["fedavg"]["mean"]
        ax.axhline(clean, color="black", linestyle="--", linewidth=1, label="clean FedAvg")
        ax.axhline(clean - 5, color="grey", linestyle=":", linewidth=1, label="clean FedAvg − 5")
        ax.set_xticks(x, ATTACKS)
        ax.set_title(f"{dataset}: 3 of {NUM_NODES} nodes attack")
        ax.set_ylim(0, 100)
    axes[0].set_ylabel("final test accuracy (%)")
    axes[-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--strong",
        action="store_true",
        help="3 attackers only, at the STRONG strengths; writes byzantine-strong.json/png",
    )
    parser.add_argument(
        "--lrs-from", type=Path, help="reuse the learning rates chosen in an earlier run's JSON"
    )
    args = parser.parse_args(argv)
    output = "byzantine"
    if args.strong:
        STRENGTHS.update(STRONG)
        COUNTS[:] = [3]
        output = "byzantine-strong"
    logging.disable(logging.WARNING)
    started = time.perf_counter()
    if args.lrs_from is not None:
        lrs = json.loads(args.lrs_from.read_text())["chosen_lr"]
    else:
        lrs = choose_lrs(args.rounds)
    runs: dict[str, dict[str, dict[str, list[float]]]] = {}
    for dataset in DATASETS:
        runs[dataset] = {}
        for attack, count in scenarios():
            name = scenario_name(attack, count)
            runs[dataset][name] = {}
            for strategy in STRATEGIES:
                accs = [
                    run_one(
                        strategy, dataset, lrs[dataset][strategy], args.rounds, seed, attack, count
                    )["accuracy"]
                    for seed in args.seeds
                ]
                runs[dataset][name][strategy] = accs
            print(
                f"{dataset} {name}: "
                + ", ".join(f"{s} {100 * np.mean(a):.1f}" for s, a in runs[dataset][name].items()),
                flush=True,
            )
    summary = {
        d: {
            n: {s: {"mean": float(np.mean(a)), "std": float(np.std(a))} for s, a in by.items()}
            for n, by in sc.items()
        }
        for d, sc in runs.items()
    }
    RESULTS.mkdir(exist_ok=True)
    out = {
        "command": shlex.join(
            [
                sys.executable.rsplit("/", 1)[-1],
                "-m",
                "benchmarks.byzantine",
                *(argv if argv is not None else sys.argv[1:]),
            ]
        ),
        "config": {
            "nodes": NUM_NODES,
            "num_byzantine_assumed": F,
            "rounds": args.rounds,
            "seeds": args.seeds,
            "lr_grid": LR_GRID,
            "strategies": STRATEGIES,
            "attacks": ATTACKS,
            "attacker_counts": COUNTS,
            "strengths": STRENGTHS or "defaults (client/attacks.py)",
            "partitioner": "iid",
            "model": "logreg",
        },
        "chosen_lr": lrs,
        "final_test_accuracy": runs,
        "summary": summary,
        "wall_seconds": time.perf_counter() - started,
    }
    (RESULTS / f"{output}.json").write_text(json.dumps(out, indent=1))
    plot(summary, RESULTS / f"{output}.png")
    for dataset in DATASETS:
        print(f"\n### {dataset}\n\n{table(summary, dataset)}")
    print(f"\nwall time {out['wall_seconds']:.0f} s")


if __name__ == "__main__":
    main()
