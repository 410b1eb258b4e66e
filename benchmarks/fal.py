"""FAL vs tuned FedAvg on digits: clean, PGD-robust and strong-PGD-robust test accuracy, 3 seeds.

Run from the repository root, either way:

    .venv/bin/python benchmarks/fal.py             # the committed figures
    .venv/bin/python -m benchmarks.fal --quick     # a smoke run, written to results/quick/

Both methods run the same grid of local learning rates × client momentum (benchmarks/tuning.py)
with the same seeds, data (digits, Dirichlet α = 0.5 over 10 nodes, all nodes every round),
model (MLP[64]) and training (batch 32, 1 local epoch). FedAvg runs as the ``fal`` plugin with
training ε = 0, which gives exactly FedAvg's weights (tests/unit/test_fal.py checks it; this script
checks it against the ``fedavg`` plugin once per seed), so its global models get the same
server-side evaluation as FAL's: the training attack's kind (PGD ε = 0.1, 10 steps) and the
strong attack (per example the worst of it, a 50-step run from x and 5 random restarts), both on a
seeded random subset of the test split.

Selection is on clean validation accuracy for both methods (the validation split has no robust
metric), the same rule for both; the robust figures are reported for the chosen setting, never
used to choose it. Grid: lr 0.05, 0.2 × client momentum 0, 0.9; 30 rounds; the last 5 averaged.
Writes benchmarks/results/fal.json and fal.png. On a loaded machine, run workers that share the
per-run cache, then the assembling run::

    for i in 0 1; do .venv/bin/python benchmarks/fal.py --shard $i/2 & done; wait
    .venv/bin/python benchmarks/fal.py
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
EPSILON = 0.1
EVAL = {"eval_epsilon": EPSILON, "eval_pgd_steps": 10}
CONFIGS = {
    "fal": {"epsilon": EPSILON, "pgd_steps": 10, **EVAL},
    "fedavg": {"epsilon": 0.0, **EVAL},  # the fal plugin with ε = 0: FedAvg's weights
}
TRAINING = {"batch_size": 32, "local_epochs": 1}
ROBUST_KEYS = ("robust-accuracy", "robust-accuracy-strong")
LRS = [0.05, 0.2]
# Two learning rates × momentum on/off. The lr range was cut to two when a FAL run (~4 FedAvg
# runs: PGD in training, the strong attack every round) was slow on the loaded shared cores.
MOMENTA = [0.0, 0.9]


def make_spec(
    strategy: dict[str, Any], rounds: int, setting: tuning.Setting, seed: int
) -> ExperimentSpec:
    return ExperimentSpec.model_validate(
        {
            "name": f"bench-fal-{strategy['name']}-s{seed}",
            "strategy": strategy,
            "dataset": {
                "name": "digits",
                "partitioner": {"name": "dirichlet", "alpha": 0.5},
                "seed": seed,
            },
            "model": {"name": "mlp", "hidden": [64]},
            "training": {**TRAINING, "lr": setting["lr"], "momentum": setting["momentum"]},
            "rounds": rounds,
            "clients": {"min": NODES},
            "seed": seed,
        }
    )


def factory(method: str, rounds: int) -> tuning.SpecFactory:
    def make(setting: tuning.Setting, seed: int) -> ExperimentSpec:
        return make_spec({"name": "fal", "config": CONFIGS[method]}, rounds, setting, seed)

    return make


def check_fedavg_equivalence(rounds: int, seeds: list[int]) -> None:
    """The ε = 0 run must be FedAvg, or the comparison is void."""
    setting = {"lr": LRS[1], "momentum": MOMENTA[-1]}
    for seed in seeds:
        plain = tuning.run_once(
            make_spec({"name": "fedavg", "config": {}}, rounds, setting, seed), NODES
        )
        as_fal = tuning.run_once(factory("fedavg", rounds)(setting, seed), NODES)
        if plain["accuracy"] != as_fal["accuracy"]:
            sys.exit(f"fal with ε=0 did not reproduce FedAvg (seed {seed}): comparison void")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--tail", type=int, default=5, help="rounds averaged for val and test")
    parser.add_argument("--quick", action="store_true", help="1 seed, 4 rounds, 2 LRs")
    tuning.add_worker_args(parser)
    args = parser.parse_args(argv)
    lrs, seeds, rounds = LRS, args.seeds, args.rounds
    if args.quick:
        lrs, seeds, rounds = LRS[1:], seeds[:1], 4
    tail = min(args.tail, rounds)
    tuning.quiet()
    settings = tuning.grid(lrs, MOMENTA)

    started = time.perf_counter()
    if not args.shard:
        check_fedavg_equivalence(min(rounds, 3), seeds)
    runs = tuning.run_grid(
        {m: factory(m, rounds) for m in CONFIGS},
        settings,
        seeds,
        NODES,
        tail,
        ROBUST_KEYS,
        cache=tuning.cache_dir("fal", args.quick),
        shard=args.shard,
    )
    if args.shard:
        return  # a worker: its runs are in the cache; the run without --shard writes results
    methods = {m: tuning.summarise(runs[m], settings, tail, ROBUST_KEYS) for m in CONFIGS}
    result = {
        "benchmark": "fal",
        "command": shlex.join([".venv/bin/python", "benchmarks/fal.py", *sys.argv[1:]]),
        "config": {
            "dataset": {"name": "digits", "partitioner": {"name": "dirichlet", "alpha": 0.5}},
            "model": {"name": "mlp", "hidden": [64]},
            "nodes": NODES,
            "rounds": rounds,
            "training": TRAINING,
            "strategies": {"fal": CONFIGS["fal"], "fedavg": {"plugin": "fal", **CONFIGS["fedavg"]}},
            "eval": f"PGD ε={EPSILON}, {EVAL['eval_pgd_steps']} steps, on a seeded random "
            "subset of the test split (at most 500: here all of it)",
            "eval-strong": "per example the worst of the eval attack, a 50-step run from x and "
            "5 random restarts (step 2.5·ε/50)",
        },
        "grid": {"lr": lrs, "momentum": MOMENTA},
        "seeds": seeds,
        "tail": tail,
        "selection": tuning.SELECTION.format(tail=tail)
        + " Robust accuracies are reported for the chosen setting, not used to choose it.",
        "scenarios": {f"all {NODES} nodes per round": {"methods": methods}},
        "runs": runs,
        "runs_seconds": round(tuning.runs_seconds(runs), 1),
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    path = tuning.write_results("fal", result, args.quick)
    tuning.plot(result, path.with_suffix(".png"), "FAL vs FedAvg, digits Dir(0.5), MLP[64]")
    for method, s in methods.items():
        robust, strong = (s["metrics"][k] for k in ROBUST_KEYS)
        print(
            f"{method:7s} chosen {tuning.label(s['chosen'])}: clean {s['test']['mean']:.3f} ± "
            f"{s['test']['sd']:.3f}, robust {robust['mean']:.3f} ± {robust['sd']:.3f}, "
            f"strong {strong['mean']:.3f} ± {strong['sd']:.3f}"
        )
    print(f"wrote {path} in {result['total_seconds']} s")


if __name__ == "__main__":
    main()
