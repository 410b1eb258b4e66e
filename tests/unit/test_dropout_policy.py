"""The dropout policy of synchronous rounds on the event loop: deadline, quorum, over-commit."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import pytest
from flwr.app import Message
from flwr.supercore.task_identity import TaskIdentity
from pydantic import ValidationError

from florist.server.recording import InMemoryRunRecorder, RoundRecord, UpdateRecord
from florist.server.runtime.localgrid import LocalGrid
from florist.server.serverapp import RunResult, run_experiment
from florist.server.spec import ExperimentSpec
from florist.strategies.events import (
    Arrival,
    DropoutPolicyError,
    average_with_stale,
    weighted_mean,
)
from tests.unit.test_runtime import assert_every_task_recorded_once

FAST, SLOW = 1000, 1004


@pytest.fixture(autouse=True)
def task_identity() -> None:
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0


def spec(dropout: dict[str, Any], **overrides: Any) -> ExperimentSpec:
    body: dict[str, Any] = {
        "name": "dropout",
        "strategy": {"name": "fedavg", "config": {}},
        "dataset": {"name": "digits", "partitioner": {"name": "iid"}},
        "model": {"name": "logreg"},
        "training": {"local_steps": 10},
        "clock": "virtual",
        "rounds": 4,
        "clients": {"min": 5},
        "dropout": dropout,
    }
    return ExperimentSpec.model_validate(body | overrides)


def durations(seconds: Callable[[int, int], float]) -> Callable[[int, Message, Message], Message]:
    """A tamper hook: the n-th task (from 0) of a node takes ``seconds(node, n)`` virtual s."""
    tasks: Counter[int] = Counter()

    def tamper(node: int, request: Message, reply: Message) -> Message:
        reply.content.metric_records["metrics"]["virtual-duration"] = seconds(node, tasks[node])
        tasks[node] += 1
        return reply

    return tamper


def run(
    s: ExperimentSpec, nodes: int, tamper: Any, grid: LocalGrid | None = None
) -> tuple[RunResult, InMemoryRunRecorder]:
    recorder = InMemoryRunRecorder()
    result = run_experiment(
        grid or LocalGrid(nodes, tamper),
        s,
        recorder,
        experiment_id=1,
        flwr_run_id=1,
        poll_interval=0.005,
    )
    return result, recorder


def policy_events(recorder: InMemoryRunRecorder) -> list[str]:
    return [e.message for e in recorder.events if e.kind == "policy"]


def of(r: RoundRecord, node: int) -> list[UpdateRecord]:
    return [u for u in r.updates if u.node_id == node]


# --- deadline and quorum ---------------------------------------------------------------------


@pytest.mark.parametrize("late", ["drop", "stale"])
def test_deadline_aggregates_the_quorum_and_the_straggler_is_late(late: str) -> None:
    # Four nodes take 10 s, one 100 s; the deadline (90 s) lies between.
    s = spec({"deadline_s": 90, "quorum": 0.8, "late_updates": late})
    tamper = durations(lambda node, n: 100.0 if node == SLOW else 10.0)

    _, recorder = run(s, 5, tamper)

    rounds = recorder.rounds(1)
    assert [r.virtual_time_s for r in rounds] == [90, 180, 270, 360]
    for r in rounds:
        fresh = [u for u in r.updates if u.node_id != SLOW]
        assert sorted(u.node_id for u in fresh) == [1000, 1001, 1002, 1003]
        assert all(u.status == "accepted" and u.staleness == 0 for u in fresh)
    assert of(rounds[0], SLOW) == []
    # From round 2 on, each round receives the straggler's update from the round before.
    for r in rounds[1:]:
        (update,) = of(r, SLOW)
        assert update.staleness == 1 and update.model_version == r.server_round - 2
        if late == "drop":
            assert update.status == "rejected"
            assert (
                update.reason
                == f"late: round {r.server_round - 1} was aggregated before it arrived"
            )
            assert r.num_updates == 4
        else:
            assert update.status == "accepted" and r.num_updates == 5
    messages = policy_events(recorder)
    for k in range(1, 5):
        assert f"round {k} aggregated at the deadline with 4/5 (quorum 0.8)" in messages
    if late == "drop":
        assert "late update from node 1004 (round 1) dropped" in messages
    else:
        assert "late update from node 1004 (round 1) kept for round 2 with staleness 1" in messages


def test_stale_updates_change_the_model_and_drop_keeps_only_fresh_ones() -> None:
    tamper = lambda: durations(lambda node, n: 100.0 if node == SLOW else 10.0)  # noqa: E731
    policy = {"deadline_s": 90, "quorum": 0.8}
    drop, _ = run(spec(policy | {"late_updates": "drop"}, rounds=2), 5, tamper())
    stale, _ = run(spec(policy | {"late_updates": "stale"}, rounds=2), 5, tamper())
    assert drop.final_arrays is not None and stale.final_arrays is not None
    assert any(
        not np.array_equal(v.numpy(), stale.final_arrays[k].numpy())
        for k, v in drop.final_arrays.items()
    )


def test_below_quorum_wait_aggregates_once_the_quorum_is_met() -> None:
    # Two nodes are slow on their first task only (70 s, 200 s); the deadline is at 50 s.
    first = {1003: 70.0, 1004: 200.0}
    s = spec({"deadline_s": 50, "quorum": 0.8, "on_short": "wait"}, rounds=1)

    _, recorder = run(s, 5, durations(lambda node, n: first.get(node, 10.0) if n == 0 else 10.0))

    (r,) = recorder.rounds(1)
    assert r.virtual_time_s == 70
    assert sorted(u.node_id for u in r.updates if u.status == "accepted") == [
        1000,
        1001,
        1002,
        1003,
    ]
    assert policy_events(recorder) == [
        "round 1 below quorum at the deadline with 3/5 (quorum 0.8): waiting",
        "round 1 reached quorum after the deadline: 4/5 (quorum 0.8)",
        # Sampled for round 2 while its round-1 task runs on.
        "round 2: node(s) [1004] still busy with an earlier task; each gets its task when it "
        "reports",
    ]


def test_below_quorum_skip_samples_the_round_again_without_a_new_model() -> None:
    first = {1003: 70.0, 1004: 200.0}
    s = spec({"deadline_s": 50, "quorum": 0.8, "on_short": "skip"}, rounds=1)

    _, recorder = run(s, 5, durations(lambda node, n: first.get(node, 10.0) if n == 0 else 10.0))

    (r,) = recorder.rounds(1)
    # Skipped at 50 s; sampled again (1003, 1004 still busy: each gets its task when it
    # reports); 1003 reports late at 70 s, trains again by 80 s; the deadline at 100 s has 4/5.
    assert r.virtual_time_s == 100
    assert all(u.model_version == 0 for u in r.updates)
    accepted = [u.node_id for u in r.updates if u.status == "accepted"]
    rejected = {(u.node_id, u.reason) for u in r.updates if u.status == "rejected"}
    assert sorted(accepted) == [1000, 1001, 1002, 1003]
    assert rejected == {
        (1000, "round 1 skipped below quorum"),
        (1001, "round 1 skipped below quorum"),
        (1002, "round 1 skipped below quorum"),
        (1003, "late: round 1 was skipped before it arrived"),
    }
    messages = policy_events(recorder)
    assert messages[0] == "round 1 skipped at the deadline with 3/5 (quorum 0.8)"
    assert "late update from node 1003 (round 1) dropped" in messages
    assert "round 1 aggregated at the deadline with 4/5 (quorum 0.8)" in messages


def test_a_round_skipped_more_than_max_skips_times_fails_the_run() -> None:
    s = spec({"deadline_s": 50, "quorum": 0.8, "on_short": "skip", "max_skips": 2}, rounds=1)
    tamper = durations(lambda node, n: 200.0 if node in (1003, 1004) else 10.0)

    recorder = InMemoryRunRecorder()
    grid = LocalGrid(5, tamper)
    with pytest.raises(DropoutPolicyError, match="skipped 3 times in a row"):
        run_experiment(grid, s, recorder, experiment_id=1, flwr_run_id=1)

    assert recorder.runs[1].status == "failed"
    assert recorder.rounds(1) == []
    # Every attempt's updates are kept all the same: the first two refused by their skip, the
    # third's when the run failed over it; the two slow tasks were still out.
    updates = [u for _, u in recorder.updates(1)]
    assert [u.reason for u in updates if u.status == "rejected"] == [
        "round 1 skipped below quorum"
    ] * 6 + ["run ended before it was aggregated"] * 3
    assert {u.node_id for u in updates if u.status == "failed"} == {1003, 1004}
    assert_every_task_recorded_once(recorder, grid)


# --- over-commitment ---------------------------------------------------------------------------


@pytest.mark.parametrize("late", ["drop", "stale"])
def test_over_commit_dispatches_more_and_aggregates_the_first_k(late: str) -> None:
    # k = max(int(6 · 0.5), 4) = 4; over-commit 0.5 dispatches 6. Node 1000 + i takes 10·(i + 1) s.
    s = spec(
        {"over_commit": 0.5, "late_updates": late},
        rounds=2,
        clients={"min": 4, "fraction_train": 0.5},
    )

    grid = LocalGrid(6, durations(lambda node, n: 10.0 * (node - 999)))
    _, recorder = run(s, 6, None, grid)

    first, second = recorder.rounds(1)
    assert first.virtual_time_s == 40 and second.virtual_time_s == 80
    assert sorted(u.node_id for u in first.updates) == [1000, 1001, 1002, 1003]
    assert first.num_updates == 4
    # The other two dispatched in round 1 arrive during round 2.
    extras = [u for u in second.updates if u.model_version == 0]
    assert sorted(u.node_id for u in extras) == [1004, 1005]
    assert all(u.staleness == 1 for u in extras)
    if late == "drop":
        assert all(u.status == "rejected" and u.reason.startswith("late") for u in extras)  # type: ignore[union-attr]
        assert second.num_updates == 4
    else:
        assert all(u.status == "accepted" for u in extras)
        assert second.num_updates == 6
    messages = policy_events(recorder)
    assert messages[0] == "over-committed: dispatched 6 for 4 in round 1"
    assert "round 1 aggregated the first 4 updates" in messages
    # Round 2's two extra tasks were still out when the run ended; round 3 was never sent.
    out = [u for r, u in recorder.updates(1) if r == 3]
    assert all(u.status == "failed" and u.reason == "run ended before the reply" for u in out)
    assert sorted((u.model_version, u.node_id) for u in out) == [(1, 1004), (1, 1005)]
    assert_every_task_recorded_once(recorder, grid)


# --- the wall clock ----------------------------------------------------------------------------


class DelayedGrid(LocalGrid):
    """A LocalGrid whose replies become available only ``delay(node)`` wall seconds after a push."""

    def __init__(self, num_nodes: int, delay: Callable[[int], float]) -> None:
        super().__init__(num_nodes)
        self.delay = delay
        self.ready: dict[str, float] = {}

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            (msg_id,) = super().push_messages([msg])
            self.ready[msg_id] = time.monotonic() + self.delay(msg.metadata.dst_node_id)
            ids.append(msg_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        now = time.monotonic()
        return super().pull_messages(i for i in message_ids if self.ready.get(i, 0) <= now)


def test_deadline_on_the_wall_clock() -> None:
    s = spec({"deadline_s": 0.4, "quorum": 0.8}, rounds=2, clock="wall")
    grid = DelayedGrid(5, lambda node: 30.0 if node == SLOW else 0.0)

    _, recorder = run(s, 5, None, grid)

    rounds = recorder.rounds(1)
    assert [r.num_updates for r in rounds] == [4, 4]
    assert all(SLOW not in r.seen_node_ids for r in rounds)
    assert all((r.finished_at - r.started_at).total_seconds() >= 0.4 for r in rounds)
    messages = policy_events(recorder)
    assert "round 1 aggregated at the deadline with 4/5 (quorum 0.8)" in messages
    assert "round 2 aggregated at the deadline with 4/5 (quorum 0.8)" in messages
    # The straggler's task was still out when the run ended: one row says so.
    (slow,) = [u for _, u in recorder.updates(1) if u.node_id == SLOW]
    assert (slow.status, slow.reason, slow.model_version) == (
        "failed",
        "run ended before the reply",
        0,
    )
    assert slow.wall_duration_s is not None and slow.wall_duration_s >= 0.8
    assert_every_task_recorded_once(recorder, grid)


# --- config and the pure maths -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dropout", "loc"),
    [
        ({"quorum": 0}, ("dropout", "quorum")),
        ({"quorum": 1.5}, ("dropout", "quorum")),
        ({"deadline_s": 0}, ("dropout", "deadline_s")),
        ({"deadline_s": float("inf")}, ("dropout", "deadline_s")),
        ({"over_commit": -0.5}, ("dropout", "over_commit")),
        ({"late_updates": "keep"}, ("dropout", "late_updates")),
        ({"on_short": "retry"}, ("dropout", "on_short")),
        ({"max_skips": -1}, ("dropout", "max_skips")),
        ({"deadline": 5}, ("dropout", "deadline")),
    ],
)
def test_config_errors_name_the_field(dropout: dict[str, Any], loc: tuple[str, ...]) -> None:
    with pytest.raises(ValidationError) as info:
        spec(dropout)
    assert [e["loc"] for e in info.value.errors()] == [loc]


def test_the_runtime_field_is_ignored_and_loads() -> None:
    # Kept so that experiments stored before the one loop still load; it changes nothing.
    assert spec({"quorum": 0.5}, runtime="flower").dropout.quorum == 0.5
    with pytest.raises(ValidationError):
        spec({}, runtime="elsewhere")


@pytest.mark.parametrize(
    "strategy",
    [{"name": "fedprox", "config": {"proximal_mu": 0.25}}, {"name": "fedadam", "config": {}}],
)
def test_flowers_strategies_follow_the_policy_deterministically_on_the_virtual_clock(
    strategy: dict[str, Any],
) -> None:
    # Prepare: SLOW takes 100 virtual seconds, the others 10; the deadline is 30 s.
    s = spec({"deadline_s": 30, "quorum": 0.8}, strategy=strategy, rounds=3)
    sent: list[dict[str, Any]] = []

    def tamper(node: int, request: Message, reply: Message) -> Message:
        sent.append(dict(request.content.config_records["config"]))
        return durations(lambda n, _: 100.0 if n == SLOW else 10.0)(node, request, reply)

    # Execute: twice, and FedAvg under the same policy for comparison.
    a, first = run(s, 5, tamper)
    b, second = run(s, 5, durations(lambda n, _: 100.0 if n == SLOW else 10.0))
    avg, _ = run(spec({"deadline_s": 30, "quorum": 0.8}, rounds=3), 5, None)

    # Assert: every round closes at its deadline with the quorum, SLOW's update stays out.
    rounds = first.rounds(1)
    assert [r.virtual_time_s for r in rounds] == [30, 60, 90]
    assert [r.num_updates for r in rounds] == [4, 4, 4]
    assert all(SLOW not in r.seen_node_ids for r in rounds)
    assert "round 1 aggregated at the deadline with 4/5 (quorum 0.8)" in policy_events(first)
    # Deterministic: the same updates in the same order, the same final model.
    order = [(r, u.node_id, u.status, u.model_version) for r, u in first.updates(1)]
    assert order == [(r, u.node_id, u.status, u.model_version) for r, u in second.updates(1)]
    assert a.final_arrays is not None and b.final_arrays is not None
    final = {k: v.numpy() for k, v in a.final_arrays.items()}
    for key, value in b.final_arrays.items():
        np.testing.assert_array_equal(value.numpy(), final[key])
    # The strategy's own hooks ran: FedProx's μ reached the clients, and neither is FedAvg.
    if strategy["name"] == "fedprox":
        assert {c["proximal-mu"] for c in sent} == {0.25}
    assert avg.final_arrays is not None
    assert any(not np.allclose(v.numpy(), final[k]) for k, v in avg.final_arrays.items())


def test_an_async_strategy_refuses_a_policy() -> None:
    s = spec({"deadline_s": 10}, strategy={"name": "fedasync", "config": {}})
    with pytest.raises(DropoutPolicyError, match="FedAsync has no synchronous rounds"):
        run(s, 5, None)


def test_average_with_stale_by_hand() -> None:
    current = {"w": np.array([1.0, 1.0], np.float32)}
    zero = {"w": np.array([0.0, 0.0], np.float32)}

    def arrival(x: list[float], sent: dict[str, np.ndarray], n: int, staleness: int) -> Arrival:
        return Arrival(0, {"w": np.array(x, np.float32)}, sent, 0, staleness, n, 1, {}, 0.0)

    fresh = arrival([3.0, 1.0], current, 2, 0)
    # Δ = (0, 2) applied to the current model: (1, 3); weight 4·(1 + 3)^-½ = 2.
    stale = arrival([0.0, 2.0], zero, 4, 3)
    new = average_with_stale(current, [fresh], [stale])
    np.testing.assert_allclose(new["w"], [2.0, 2.0])
    assert new["w"].dtype == np.float32
    alone = average_with_stale(current, [fresh, arrival([1.0, 5.0], current, 6, 0)])
    expected = weighted_mean([fresh.weights, {"w": np.array([1.0, 5.0], np.float32)}], [2, 6])
    np.testing.assert_array_equal(alone["w"], expected["w"])
