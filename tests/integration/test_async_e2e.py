"""The event-driven runtime over gRPC: heterogeneous SuperNodes, FedAsync on the wall clock."""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from florist.server.runtime import NO_REPLY, NOT_AGGREGATED

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


def events_of(api: Api, experiment_id: int, kind: str) -> list[dict[str, Any]]:
    """The experiment's events of one kind, as the ServerApp wrote them, through the API's log."""
    response = api.client.get(f"/api/v1/experiments/{experiment_id}/log", params={"kind": kind})
    assert response.status_code == 200, response.text
    return [{"message": e["message"], **(e["data"] or {})} for e in response.json()["data"]]


def assert_no_update_lost(api: Api, experiment_id: int, updates: list[Any]) -> None:
    """Every task the loop dispatched is exactly one client-update row, node by node."""
    (tasks,) = events_of(api, experiment_id, "tasks")
    rows = Counter(u["node_id"] for u in updates)
    assert tasks["by_node"] == dict(rows), (tasks, rows)
    assert tasks["dispatched"] == len(updates)


def test_fedasync_fast_nodes_contribute_more(api: Api, database_url: str) -> None:
    exp = api.submit(fedasync("e2e-fedasync-wall", budget=50))
    done = api.wait_finished(exp["id"], timeout=240)
    assert done["status"] == "completed", f"{done}\n{api.stack.logs()}"
    updates = updates_of(api, exp["id"])
    rounds = api.client.get(f"/api/v1/experiments/{exp['id']}/rounds").json()["data"]

    # No update lost: every task dispatched is one row; FedAsync aggregates every arrival, so
    # each accepted update is one round.
    assert_no_update_lost(api, exp["id"], updates)
    accepted = [u for u in updates if u["status"] == "accepted"]
    assert len(accepted) == len(rounds) == sum(r["num_updates"] for r in rounds)
    # The tasks out when the budget ran out are rows of the round they would have joined.
    left = [u for u in updates if u["server_round"] > len(rounds)]
    assert {u["server_round"] for u in left} <= {len(rounds) + 1}
    assert {(u["status"], u["reason"]) for u in left} <= {
        ("failed", NO_REPLY),
        ("rejected", NOT_AGGREGATED),
    }
    # One task in flight per node: at most one row per node is left over. (Usually the node whose
    # update used up the budget gets no new task, but on the wall clock the budget may also run
    # out while a task is being pushed; that task is a "run ended before the reply" row too.)
    assert 1 <= len(left) <= len(SPEEDS)
    assert len({u["node_id"] for u in left}) == len(left), left
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


def test_fedcompass_gives_slower_nodes_fewer_steps_on_the_wall_clock(
    api: Api, database_url: str
) -> None:
    # FedCompass through REST on real SuperNodes of different speeds (0.2, 0.2, 0.6, 1.2 s per
    # step). After the first group (Q_max = 20 steps for all: no speed known yet), the 0.6 s node
    # joins the fast nodes' group with ⌊(20·0.2)/0.6⌋ = 6 steps; the 1.2 s node would get 3 < Q_min
    # and opens its own group of 20.
    body = fedasync("e2e-fedcompass-wall", budget=None) | {
        "strategy": {"name": "fedcompass", "config": {"q_min": 5, "q_max": 20}},
        "rounds": 3,
    }
    exp = api.submit(body)
    done = api.wait_finished(exp["id"], timeout=240)
    assert done["status"] == "completed", f"{done}\n{api.stack.logs()}"
    updates = updates_of(api, exp["id"])
    assert_no_update_lost(api, exp["id"], updates)
    assign_events = events_of(api, exp["id"], "fedcompass-assign")
    assigned = [a for e in assign_events for a in e["assignments"]]
    # The dashboard's arrival groups: the first group's times are unknown (no speed yet); a
    # later group is expected back before its latest time.
    groups = [g for e in assign_events for g in e["groups"]]
    assert groups[0] == {"group": 0, "expected_at": None, "latest_at": None}, groups
    timed = [g for g in groups if g["expected_at"] is not None]
    assert timed and all(g["expected_at"] < g["latest_at"] for g in timed), groups
    first = {a["node_id"]: a["local_steps"] for a in assigned[: len(SPEEDS)]}
    assert set(first.values()) == {20}, assigned
    later = [a for a in assigned[len(SPEEDS) :]]
    assert later and min(a["local_steps"] for a in later) < 20, assigned
    by_node = {u["node_id"]: u for u in updates if u["status"] == "accepted"}
    assert len(by_node) == len(SPEEDS)


def test_fedfix_aggregates_every_period_with_whoever_finished(api: Api, database_url: str) -> None:
    # FedFix through REST on the wall clock: 20 steps take 4 s on the fast nodes and 24 s on the
    # slowest. With Δt = 6 s the early ticks aggregate the fast nodes only; every task is a row.
    body = fedasync("e2e-fedfix-wall", budget=None) | {
        "strategy": {"name": "fedfix", "config": {"period_s": 6.0}},
        "rounds": 4,
    }
    exp = api.submit(body)
    done = api.wait_finished(exp["id"], timeout=240)
    assert done["status"] == "completed", f"{done}\n{api.stack.logs()}"
    updates = updates_of(api, exp["id"])
    assert_no_update_lost(api, exp["id"], updates)
    rounds = api.client.get(f"/api/v1/experiments/{exp['id']}/rounds").json()["data"]
    assert len(rounds) == 4
    first = [u for u in updates if u["server_round"] == 1 and u["status"] == "accepted"]
    assert 0 < len(first) < len(SPEEDS), first  # the slowest was still training at the tick


# Last in this module: it kills one of the module's SuperNodes.
def test_a_node_killed_mid_task_does_not_stop_the_run(api: Api, database_url: str) -> None:
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
    assert_no_update_lost(api, exp["id"], updates)
    # Lost on their own, not merely out when the run ended.
    lost = [u for u in updates if u["status"] == "failed" and u["reason"] != NO_REPLY]
    summary = [(u["node_id"][-4:], u["status"], u["reason"], u["arrived_at"]) for u in updates]
    assert lost, f"the killed node's task was never recorded as lost: {summary}, {done}\n" + (
        api.stack.logs(60)
    )
    assert all(u["reason"] for u in lost)
    # The lost tasks are the killed node's: the one node with no update after the kill.
    after_kill = {
        u["node_id"]
        for u in updates
        if u["status"] == "accepted" and _ts(u["arrived_at"]) > killed_at + 1
    }
    assert after_kill, "no update arrived after the kill: the run stalled"
    (killed,) = {u["node_id"] for u in lost}
    assert killed not in after_kill and len(after_kill) == len(SPEEDS) - 1, summary

    # The policy's outcome is in the database: one decision per lost task, naming the node.
    notes = [n for n in events_of(api, exp["id"], "policy") if n.get("node_id")]
    decisions = [n["action"] for n in notes if str(n["node_id"]) == killed]
    assert len(decisions) == len(lost), (notes, summary)
    assert set(decisions) <= {"re-sent", "given-up"}
    assert all(str(n["node_id"]) == killed for n in notes), notes
    if "given-up" in decisions:
        assert decisions[-1] == "given-up" and decisions.count("given-up") == 1


def _ts(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()
