"""FedAvg (McMahan et al., AISTATS 2017) as a plugin: Flower's own server half, plain local SGD."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

from flwr.serverapp.strategy import FedAvg

from .base import EmptyConfig, ServerSetup, StrategyPlugin
from .events import (
    Arrival,
    Decision,
    DropoutPolicy,
    DropoutPolicyError,
    EventStrategy,
    Note,
    Weights,
    average_with_stale,
)


def sampling_kwargs(setup: ServerSetup) -> dict[str, float | int]:
    """Flower's sampling arguments from the experiment's ``clients`` section."""
    return {
        "fraction_train": setup.fraction_train,
        "fraction_evaluate": setup.fraction_evaluate,
        "min_train_nodes": setup.min_clients,
        "min_evaluate_nodes": setup.min_clients if setup.fraction_evaluate > 0 else 0,
        "min_available_nodes": setup.min_clients,
    }


def build_server(config: EmptyConfig, setup: ServerSetup) -> FedAvg:
    return FedAvg(**sampling_kwargs(setup))  # type: ignore[arg-type]


def _ceil(x: float) -> int:
    # 0.7 · 10 is 7.000000000000001 in floating point; a quorum of 0.7 of 10 nodes is 7.
    return math.ceil(round(x, 9))


class SyncFedAvg(EventStrategy):
    """FedAvg on the event-driven loop, under the experiment's :class:`DropoutPolicy`.

    Each round samples k nodes with Flower's rule and RNG (⌈k·(1 + over_commit)⌉ when
    over-committing) and averages the updates weighted by examples, summed in node order as
    Florist's Flower path does, so a seeded run with the default policy gives Flower's FedAvg
    weights. The round aggregates once k updates are in; when nothing more can come (every task
    reported or lost); or at the policy's deadline if the quorum is met. Below quorum
    ``on_short`` decides: wait on, or skip (no new model, sample the round again). An update
    from a closed round is late: dropped, or kept for the next aggregation. A sampled node still
    busy with an earlier task gets its new task when it reports, as Flower would queue it.
    """

    def __init__(self, setup: ServerSetup, policy: DropoutPolicy | None = None) -> None:
        self.setup = setup
        self.policy = policy or DropoutPolicy()
        self.nodes: list[int] = []
        self.round = 1  # the round being collected: aggregations so far + 1
        self.target = 0  # k
        self.outstanding: set[int] = set()  # dispatched this round, not reported yet
        self.queued: set[int] = set()  # sampled this round, busy with an earlier task
        self.arrived: dict[int, Arrival] = {}
        self.lost: set[int] = set()
        self.overdue = False  # the deadline passed below quorum and the round waits on
        self.attempt = 0  # rounds sampled so far, skipped ones included
        self.busy: dict[int, tuple[int, int]] = {}  # node -> (round, attempt) of its task
        self.skipped: set[int] = set()  # attempts that ended without a new model
        self.stale: list[Arrival] = []  # late updates kept for the next aggregation
        self.skips = 0

    def use_dropout_policy(self, policy: DropoutPolicy) -> None:
        self.policy = policy

    @property
    def quorum_size(self) -> int:
        return max(1, _ceil(self.policy.quorum * self.target))

    def _counts(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "arrived": len(self.arrived),
            "target": self.target,
            "quorum": self.policy.quorum,
            "needed": self.quorum_size,
            "lost": sorted(self.lost),
            "waiting_for": sorted(self.outstanding | self.queued),
        }

    def begin(self, nodes: Sequence[int], weights: Weights) -> Decision:
        self.nodes = list(nodes)
        return self._next_round()

    def _next_round(
        self,
        weights: Weights | None = None,
        notes: tuple[Note, ...] = (),
        refused: dict[int, str] | None = None,
    ) -> Decision:
        # Flower's sampling rule and RNG (the runtime seeds `random`), so both paths pick alike.
        n = len(self.nodes)
        self.target = min(max(int(n * self.setup.fraction_train), self.setup.min_clients), n)
        count = min(_ceil(self.target * (1 + self.policy.over_commit)), n)
        sample = random.sample(self.nodes, count)
        dispatch = tuple(node for node in sample if node not in self.busy)
        self.attempt += 1
        self.queued = set(sample) - set(dispatch)
        self.outstanding = set(dispatch)
        self.busy.update(dict.fromkeys(dispatch, (self.round, self.attempt)))
        self.arrived, self.lost, self.overdue = {}, set(), False
        if count > self.target:
            notes += (
                Note(
                    f"over-committed: dispatched {count} for {self.target} in round {self.round}",
                    {"round": self.round, "dispatched": count, "target": self.target},
                ),
            )
        if self.queued:
            notes += (
                Note(
                    f"round {self.round}: node(s) {sorted(self.queued)} still busy with an "
                    "earlier task; each gets its task when it reports",
                    {"round": self.round, "queued": sorted(self.queued)},
                ),
            )
        return Decision(
            weights=weights,
            dispatch=dispatch,
            refused=refused or {},
            wake_in=self.policy.deadline_s,
            notes=notes,
        )

    def _reported(self, node_id: int) -> tuple[int, ...]:
        """The node is free again: if this round sampled it while busy, it gets its task now."""
        self.busy.pop(node_id, None)
        if node_id not in self.queued:
            return ()
        self.queued.discard(node_id)
        self.outstanding.add(node_id)
        self.busy[node_id] = (self.round, self.attempt)
        return (node_id,)

    def on_arrival(self, arrival: Arrival, weights: Weights) -> Decision:
        node = arrival.node_id
        task = self.busy.get(node, (self.round, self.attempt))
        fresh = node in self.outstanding
        released = self._reported(node)
        if not fresh:
            return self._late(arrival, task, released)
        self.outstanding.discard(node)
        self.arrived[node] = arrival
        return self._progress(weights)

    def on_failure(self, node_id: int, reason: str, weights: Weights) -> Decision:
        fresh = node_id in self.outstanding
        released = self._reported(node_id)
        if not fresh:
            return Decision(dispatch=released)
        # A lost task counts as reported: the round goes on without it.
        self.outstanding.discard(node_id)
        self.lost.add(node_id)
        return self._progress(weights)

    def on_tick(self, now: float, weights: Weights) -> Decision:
        if self.overdue or not (self.outstanding or self.queued):
            return Decision()  # the round closed already
        self.overdue = True
        counts = self._counts() | {"deadline_s": self.policy.deadline_s, "time_s": now}
        shares = f"{len(self.arrived)}/{self.target} (quorum {self.policy.quorum:g})"
        if len(self.arrived) >= self.quorum_size:
            return self._aggregate(
                weights,
                Note(f"round {self.round} aggregated at the deadline with {shares}", counts),
            )
        if self.policy.on_short == "skip":
            return self._skip(
                Note(f"round {self.round} skipped at the deadline with {shares}", counts)
            )
        return Decision(
            notes=(
                Note(
                    f"round {self.round} below quorum at the deadline with {shares}: waiting",
                    counts,
                ),
            )
        )

    def _progress(self, weights: Weights) -> Decision:
        got, counts = len(self.arrived), self._counts()
        shares = f"{got}/{self.target} (quorum {self.policy.quorum:g})"
        if got >= self.target:
            note = None
            if self.outstanding or self.queued:
                note = Note(f"round {self.round} aggregated the first {got} updates", counts)
            return self._aggregate(weights, note)
        if self.outstanding or self.queued:
            if self.overdue and got >= self.quorum_size:
                return self._aggregate(
                    weights,
                    Note(f"round {self.round} reached quorum after the deadline: {shares}", counts),
                )
            return Decision()
        # Every task reported or was lost: nothing more can come.
        if got >= self.quorum_size or self.policy.on_short == "wait":
            return self._aggregate(
                weights,
                Note(f"round {self.round} aggregated with {shares}, {len(self.lost)} lost", counts),
            )
        return self._skip(
            Note(f"round {self.round} skipped with {shares}, {len(self.lost)} lost", counts)
        )

    def _aggregate(self, weights: Weights, note: Note | None) -> Decision:
        fresh = [self.arrived[n] for n in sorted(self.arrived)]
        stale, self.stale = self.stale, []
        notes = (note,) if note is not None else ()
        self.skips = 0
        if not fresh and not stale:
            return self._next_round(notes=notes)  # nothing to average: sample the round again
        new = average_with_stale(weights, fresh, stale)
        self.round += 1
        return self._next_round(new, notes)

    def _skip(self, note: Note) -> Decision:
        self.skips += 1
        if self.skips > self.policy.max_skips:
            raise DropoutPolicyError(
                f"round {self.round} was skipped {self.skips} times in a row "
                f"(dropout.max_skips = {self.policy.max_skips}): {note.message}"
            )
        reason = f"round {self.round} skipped below quorum"
        self.skipped.add(self.attempt)
        return self._next_round(notes=(note,), refused=dict.fromkeys(self.arrived, reason))

    def _late(self, arrival: Arrival, task: tuple[int, int], released: tuple[int, ...]) -> Decision:
        node, (task_round, attempt) = arrival.node_id, task
        closed = "was skipped" if attempt in self.skipped else "was aggregated"
        data = {
            "node_id": node,
            "task_round": task_round,
            "round": self.round,
            "staleness": arrival.staleness,
            "late_updates": self.policy.late_updates,
        }
        if self.policy.late_updates == "stale":
            self.stale.append(arrival)
            message = (
                f"late update from node {node} (round {task_round}) kept for round "
                f"{self.round} with staleness {arrival.staleness}"
            )
            return Decision(dispatch=released, notes=(Note(message, data),))
        return Decision(
            dispatch=released,
            refused={node: f"late: round {task_round} {closed} before it arrived"},
            notes=(Note(f"late update from node {node} (round {task_round}) dropped", data),),
        )


def build_event_server(config: EmptyConfig, setup: ServerSetup) -> SyncFedAvg:
    return SyncFedAvg(setup)


plugin = StrategyPlugin(
    name="fedavg",
    summary="Federated Averaging: weighted mean of the clients' models after local SGD.",
    config_model=EmptyConfig,
    build_server=build_server,
    build_event_server=build_event_server,
    paper="https://arxiv.org/abs/1602.05629",
    tags=("sync", "flower"),
)
