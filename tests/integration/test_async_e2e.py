"""The event-driven runtime over gRPC: heterogeneous SuperNodes, FedAsync on the wall clock."""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from .conftest import Api, FlowerStack, start_stack

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slow,
    pytest.mark.parametrize("database_url", ["sqlite"], indirect=True),
]

# Seconds per local step: speeds 1×, 1×, 3×, 6× (the acceptance fleet).
SPEEDS = [0.2, 0.2, 0.6, 1.2]


@pytest.fixture(scope="module")
def flower_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FlowerStack]:
    configs: list[dict[str, int | float | str]] = [{"seconds-per-step": s} for s in SPEEDS]
    with start_stack(tmp_path_factory.mktemp("async"), configs) as stack:
        yield stack


def fedasync(name: str, budget: float | None, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "strategy": {"name": "fedasync", "config": {"alpha": 0.6, "staleness": "polynomial"}},
        "dataset": {"name": "digits", "partitioner": {"name": "iid"}, "seed": 0},
        "model": {"name": "logreg"},
        "training": {"local_steps": 20},
        "rounds": 500,
        "time_budget_s": budget,
        "clients": {"min": len(SPEEDS)},
        **extra,
    }


def updates_of(api: Api, experiment_id: int) -> list[dict[str, Any]]:
    return list(api.client.get(f"/api/v1/experiments/{experiment_id}/updates").json()["data"])


def test_fedasync_fast_nodes_contribute_more(api: Api) -> None:
    exp = api.submit(fedasync("e2e-fedasync-wall", budget=50))
    done = api.wait_finished(exp["id"], timeout=240)
    assert done["status"] == "completed", f"{done}\n{api.stack.logs()}"
    updates = updates_of(api, exp["id"])
    rounds = api.client.get(f"/api/v1/experiments/{exp['id']}/rounds").json()["data"]

    # No update lost: FedAsync aggregates every arrival, so each accepted update is one round.
    accepted = [u for u in updates if u["status"] == "accepted"]
    assert len(accepted) == len(rounds) == sum(r["num_updates"] for r in rounds)
    # ...and the experiment's progress counts them.
    assert done["asynchronous"] is True and done["accepted_updates"] == len(accepted)
    # Each node's updates, by its speed: the nodes are told apart by their task durations.
    per_node = Counter(u["node_id"] for u in accepted)
    by_duration = sorted(
        per_node, key=lambda n: min(u["wall_duration_s"] for u in accepted if u["node_id"] == n)
    )
    fastest, slowest = by_duration[0], by_duration[-1]
    assert per_node[fastest] > per_node[slowest], per_node
    assert len(per_node) == len(SPEEDS)
    # Staleness is recorded, and it is the version gap.
    assert any(u["staleness"] > 0 for u in accepted)
    assert all(u["staleness"] == u["arrival_version"] - u["model_version"] for u in accepted)
    assert all(u["dispatched_at"] and u["arrived_at"] for u in accepted)


def test_virtual_clock_runs_are_reproducible(api: Api) -> None:
    """Same seed: the same update order and the same model every round; another seed differs."""

    def run(seed: int) -> tuple[list[tuple[str, int]], list[float]]:
        body = fedasync(f"e2e-virtual-{seed}", budget=None, clock="virtual", rounds=12)
        body["dataset"]["seed"] = seed
        exp = api.submit(body | {"seed": seed})
        done = api.wait_finished(exp["id"], timeout=240)
        assert done["status"] == "completed", f"{done}\n{api.stack.logs()}"
        updates = updates_of(api, exp["id"])
        rounds = api.client.get(f"/api/v1/experiments/{exp['id']}/rounds").json()["data"]
        order = [(u["node_id"], u["model_version"]) for u in updates]
        assert [r["virtual_time_s"] for r in rounds] == sorted(r["virtual_time_s"] for r in rounds)
        return order, [r["metrics"]["loss"] for r in rounds]

    first, again, other = run(0), run(0), run(1)
    assert first == again
    assert first[1] != other[1]


# Last in this module: it kills one of the module's SuperNodes.
def test_a_node_killed_mid_task_does_not_stop_the_run(api: Api) -> None:
    # Short tasks (5 steps: 1 s to 6 s of profile time) and a deadline that a healthy task meets
    # on this 2-core machine, so the lost task is noticed well within the run.
    body = fedasync("e2e-fedasync-kill", budget=80, round_timeout_s=45)
    exp = api.submit(body | {"training": {"local_steps": 5}})
    api.wait(exp["id"], lambda e: e["current_round"] >= 2, timeout=120)
    victim = next(m for m in api.stack.supervisor.processes if m.name == "supernode-3")
    assert victim.proc is not None
    os.killpg(victim.proc.pid, signal.SIGKILL)  # the slowest node vanishes mid-task
    killed_at = time.time()
    done = api.wait_finished(exp["id"], timeout=240)
    assert done["status"] == "completed", f"{done}\n{api.stack.logs()}"

    updates = updates_of(api, exp["id"])
    failed = [u for u in updates if u["status"] == "failed"]
    summary = [(u["node_id"][-4:], u["status"], u["arrived_at"]) for u in updates]
    assert failed, f"the killed node's task was never recorded as lost: {summary}, {done}\n" + (
        api.stack.logs(60)
    )
    assert all(u["reason"] for u in failed)
    late = [
        u for u in updates if u["status"] == "accepted" and _ts(u["arrived_at"]) > killed_at + 1
    ]
    assert late, "no update arrived after the kill: the run stalled"


def _ts(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()
