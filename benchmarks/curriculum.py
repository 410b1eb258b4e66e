"""Curriculum client selection (Vahidian et al., 2023): easy-first vs random selection vs FedAvg.

Each is tuned on the same grid, on non-IID digits.

Run from the repository root, either way:

    .venv/bin/python benchmarks/curriculum.py            # the committed figures
    .venv/bin/python -m benchmarks.curriculum --quick    # a smoke run, written to results/quick/

Variants, all on the same partitions (digits, Dirichlet α = 0.1 over 10 nodes), model (MLP[64]),
training (batch 32, 2 local epochs) and seeds:

- ``fedavg``: every node every round.
- ``easy-first``: the paper's ordered local training (easy→hard, linear pacing a = 0.8, b = 0.2,
  over the whole run); after a 2-round warm-up of all nodes, 5 of the 10 nodes per round from
  a paced pool of the nodes easiest under one common scorer (the global model after the
  warm-up).
- ``random-selection``: the same as ``easy-first`` but the pool is a random fixed order of the
  nodes: it trains as few nodes per round, so a gain of ``easy-first`` over it is one of the
  ranking, not of training fewer nodes.

Every variant runs the same grid of local learning rates × client momentum (benchmarks/tuning.py)
and is reported at its setting chosen on validation; 3 seeds and 20 rounds (the budget of 2
shared cores; the ordering alone, every node every round, is not re-run here). Writes
benchmarks/results/curriculum.json and curriculum.png.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from typing import Any

try:
    from benchmarks import tuning
except ModuleNotFoundError:  # run as a script: benchmarks/ itself is on sys.path
    import tuning  # type: ignore[no-redef]

from florist.server.spec import ExperimentSpec

NODES = 10
PER_ROUND = 5
TRAINING = {"batch_size": 32, "local_epochs": 2}
# pacing_rounds is left unset: the pacing spans the run's ``rounds``.
PACED = {"ordering": "curriculum", "pacing": "linear", "a": 0.8, "b": 0.2, "scorer_epochs": 2}
SELECTED = {**PACED, "clients_per_round": PER_ROUND, "warmup_rounds": 2}
VARIANTS: dict[str, dict[str, Any]] = {
    "fedavg": {"name": "fedavg", "config": {}},
    "easy-first": {"name": "curriculum", "config": {**SELECTED, "client_selection": "easy_first"}},
    "random-selection": {
        "name": "curriculum",
        "config": {**SELECTED, "client_selection": "random"},
    },
}
LRS = [0.01, 0.05, 0.2]
MOMENTA = [0.0, 0.9]


def factory(variant: str, rounds: int) -> tuning.SpecFactory:
    def make(setting: tuning.Setting, seed: int) -> ExperimentSpec:
        return ExperimentSpec.model_validate(
            {
                "name": f"bench-curriculum-{variant}-s{seed}",
                "strategy": VARIANTS[variant],
                "dataset": {
                    "name": "digits",
                    "partitioner": {"name": "dirichlet", "alpha": 0.1},
                    "seed": seed,
                },
                "model": {"name": "mlp", "hidden": [64]},
                "training": {**TRAINING, "lr": setting["lr"], "momentum": setting["momentum"]},
                "rounds": rounds,
                "clients": {"min": 2},
                "seed": seed,
            }
        )

    return make


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--tail", type=int, default=5, help="rounds averaged for val and test")
    parser.add_argument("--quick", action="store_true", help="1 seed, 5 rounds, 2 LRs")
    tuning.add_worker_args(parser)
    args = parser.parse_args(argv)
    lrs, seeds, rounds = LRS, args.seeds, args.rounds
    if args.quick:
        lrs, seeds, rounds = LRS[1:], seeds[:1], 5
    tail = min(args.tail, rounds)
    tuning.quiet()
    settings = tuning.grid(lrs, MOMENTA)

    started = time.perf_counter()
    runs = tuning.run_grid(
        {v: factory(v, rounds) for v in VARIANTS},
        settings,
        seeds,
        NODES,
        tail,
        cache=tuning.cache_dir("curriculum", args.quick),
        shard=args.shard,
    )
    if args.shard:
        return  # a worker: its runs are in the cache; the run without --shard writes results
    methods = {v: tuning.summarise(runs[v], settings, tail) for v in VARIANTS}
    result = {
        "benchmark": "curriculum",
        "command": shlex.join([".venv/bin/python", "benchmarks/curriculum.py", *sys.argv[1:]]),
        "config": {
            "dataset": {"name": "digits", "partitioner": {"name": "dirichlet", "alpha": 0.1}},
            "model": {"name": "mlp", "hidden": [64]},
            "nodes": NODES,
            "rounds": rounds,
            "training": TRAINING,
            "variants": VARIANTS,
        },
        "grid": {"lr": lrs, "momentum": MOMENTA},
        "seeds": seeds,
        "tail": tail,
        "selection": tuning.SELECTION.format(tail=tail),
        "scenarios": {
            f"Dirichlet 0.1, {NODES} nodes ({PER_ROUND} per round with selection)": {
                "methods": methods
            }
        },
        "runs": runs,
        "runs_seconds": round(tuning.runs_seconds(runs), 1),
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    path = tuning.write_results("curriculum", result, args.quick)
    tuning.plot(result, path.with_suffix(".png"), "Curriculum selection vs random vs FedAvg")
    for variant, s in methods.items():
        print(
            f"{variant:17s} chosen {tuning.label(s['chosen'])}: "
            f"test {s['test']['mean']:.3f} ± {s['test']['sd']:.3f}"
        )
    print(f"wrote {path} in {result['total_seconds']} s")


if __name__ == "__main__":
    main()
