"""Synchronous rounds on the one loop: sample, wait under the dropout policy, aggregate.

The timing lives here, once, for every round-based algorithm; what a round *computes* (which nodes
it picks, how it aggregates, what federated evaluation reports) is a :class:`RoundAggregator`.
Flower's own strategies are RoundAggregators through strategies/flower_adapter.py.
"""

from __future__ import annotations

import math
import random
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from .events import (
    Arrival,
    Decision,
    DropoutPolicy,
    DropoutPolicyError,
    Evaluation,
    EventStrategy,
    NodeConfig,
    Note,
    Weights,
    discount_stale,
)
from .streaming import RunningSum


class AggregationError(RuntimeError):
    """A round's aggregation cannot go on (e.g. the algorithm sampled no node at all)."""


class RoundAggregator(ABC):
    """What a synchronous algorithm computes each round; :class:`SyncRounds` does the timing."""

    @abstractmethod
    def select(
        self, server_round: int, weights: Weights, nodes: Sequence[int]
    ) -> dict[int, NodeConfig]:
        """The nodes that train in ``server_round`` (from ``nodes``), each with any extra task
        config. Randomness comes from the ``random`` module, which the loop seeds per run."""

    @abstractmethod
    def aggregate(
        self, server_round: int, weights: Weights, updates: Sequence[Arrival]
    ) -> tuple[Weights | None, dict[str, float]]:
        """The new global model from the round's sound updates (in node order; None: no model
        could be made), and the round's train metrics as the algorithm sees them (recorded over
        the loop's example-weighted means of the updates' metrics)."""

    @property
    def needs_all_updates(self) -> bool:
        """True: :meth:`aggregate` needs every update's arrays at once (a median, Krum…), so
        the round holds them all until it closes. False: the rule is an example-weighted mean,
        and :class:`SyncRounds` folds each update into a :class:`RunningSum` as it arrives, keeps
        only its metrics, and calls :meth:`finish` (one model's memory, not one per client)."""
        return True

    def finish(
        self, server_round: int, weights: Weights, total: RunningSum, updates: Sequence[Arrival]
    ) -> tuple[Weights | None, dict[str, float]]:
        """What :meth:`aggregate` returns, from the running sum of the round's updates
        (Σ n_i·x_i, Σ n_i) and the updates without their arrays (``weights`` is empty)."""
        raise NotImplementedError(f"{type(self).__name__} aggregates only all updates at once")

    def select_evaluate(
        self, server_round: int, weights: Weights, nodes: Sequence[int]
    ) -> dict[int, NodeConfig]:
        """Federated evaluation of the model aggregated in ``server_round``. Default: none."""
        return {}

    def aggregate_evaluate(
        self, server_round: int, results: Sequence[Evaluation]
    ) -> dict[str, float]:
        return {}


def _ceil(x: float) -> int:
    # 0.7 · 10 is 7.000000000000001 in floating point; a quorum of 0.7 of 10 nodes is 7.
    return math.ceil(round(x, 9))


class SyncRounds(EventStrategy):
    """Synchronous rounds under the experiment's :class:`DropoutPolicy`.

    Each round the aggregator picks its k nodes (Flower's FedAvg: its own sampling rule on the
    ``random`` module; over-committing adds ⌈k·(1 + over_commit)⌉ − k more, drawn from the
    rest). The round aggregates once k updates are in; when nothing more can come (every task
    reported or lost); or at the policy's deadline if the quorum is met. Below quorum
    ``on_short`` decides: wait on, or skip (no new model, sample the round again). An update
    from a closed round is late: dropped, or kept for the next aggregation (discounted by its
    staleness). A sampled node still busy with an earlier task gets its new task when it
    reports, as Flower would queue it.

    An aggregator that needs all updates (``needs_all_updates``) gets them in node order, so a
    seeded run is repeatable whatever order the replies came in. One whose rule is a weighted
    mean gets them folded into running sums as they arrive (one for the round's fresh updates,
    one for the late ones kept), each update's arrays let go at once: the round holds one
    model's worth of sums, whatever its number of clients (strategies/streaming.py says what
    that does to the last bits).
    """

    def __init__(self, aggregator: RoundAggregator, policy: DropoutPolicy | None = None) -> None:
        self.aggregator = aggregator
        self.policy = policy or DropoutPolicy()
        self.nodes: list[int] = []
        self.round = 1  # the round being collected: aggregations so far + 1
        self.target = 0  # k
        self.config: dict[int, NodeConfig] = {}  # this round's extra task config, by node
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
        # Streaming aggregators: Σ n_i·x_i of this attempt's fresh updates and of the late ones
        # kept; ``arrived`` and ``stale`` then hold the updates without their arrays.
        self.fresh_sum = RunningSum()
        self.stale_sum = RunningSum()

    def __setstate__(self, state: dict[str, Any]) -> None:
        # A resume point stored before the running sums existed: it was taken right after an
        # aggregation, when both are empty.
        state.setdefault("fresh_sum", RunningSum())
        state.setdefault("stale_sum", RunningSum())
        self.__dict__.update(state)

    @property
    def streaming(self) -> bool:
        return not self.aggregator.needs_all_updates

    @property
    def needs_all_updates(self) -> bool:
        return self.aggregator.needs_all_updates

    def _fold(self, arrival: Arrival, weights: Weights, *, late: bool) -> Arrival:
        """Fold the update into its running sum and keep it without its arrays. Raises before
        anything is folded when its arrays do not fit (the loop then rejects it)."""
        if late:
            # discount_stale's x + Δ_i weighted by n_i·(1 + τ_i)^-½, formed as it is folded in.
            factor = (1.0 + arrival.staleness) ** -0.5
            self.stale_sum.add(
                arrival.weights,
                arrival.num_examples * factor,
                minus=arrival.sent_weights,
                plus=weights,
            )
        else:
            self.fresh_sum.add(arrival.weights, arrival.num_examples)
        return replace(arrival, weights={}, sent_weights={})

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
        self.nodes = sorted(nodes)
        return self._next_round(weights)

    def on_nodes_joined(self, nodes: Sequence[int], weights: Weights) -> Decision:
        # A round under way keeps its sample; the next ones sample from the new nodes too. A node
        # that left stays in the pool: its task fails at once (Flower answers for it), and the
        # dropout policy decides what that means for the round.
        self.nodes = sorted(set(self.nodes) | set(nodes))
        return Decision()

    def _sample(self, weights: Weights) -> list[int]:
        self.config = self.aggregator.select(self.round, weights, self.nodes)
        chosen = sorted(self.config)
        if not chosen:
            raise AggregationError(f"round {self.round}: the strategy sampled no node to train")
        self.target = len(chosen)
        count = min(_ceil(self.target * (1 + self.policy.over_commit)), len(self.nodes))
        if count > self.target:
            rest = [n for n in self.nodes if n not in self.config]
            extra = random.sample(rest, count - self.target)
            # Over-committed nodes get the task the aggregator set for the others.
            template = self.config[chosen[0]]
            self.config.update(dict.fromkeys(extra, template))
            chosen = sorted(self.config)
        return chosen

    def _next_round(
        self,
        weights: Weights,
        new: bool = False,
        notes: tuple[Note, ...] = (),
        refused: dict[int, str] | None = None,
    ) -> Decision:
        sample = self._sample(weights)
        dispatch = tuple(node for node in sample if node not in self.busy)
        self.attempt += 1
        self.queued = set(sample) - set(dispatch)
        self.outstanding = set(dispatch)
        self.busy.update(dict.fromkeys(dispatch, (self.round, self.attempt)))
        self.arrived, self.lost, self.overdue = {}, set(), False
        self.fresh_sum = RunningSum()
        if len(sample) > self.target:
            notes += (
                Note(
                    f"over-committed: dispatched {len(sample)} for {self.target} "
                    f"in round {self.round}",
                    {"round": self.round, "dispatched": len(sample), "target": self.target},
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
            weights=weights if new else None,
            dispatch=dispatch,
            config={n: self.config[n] for n in dispatch},
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

    def _released(self, released: tuple[int, ...], **kwargs: Any) -> Decision:
        return Decision(dispatch=released, config={n: self.config[n] for n in released}, **kwargs)

    def on_arrival(self, arrival: Arrival, weights: Weights) -> Decision:
        node = arrival.node_id
        task = self.busy.get(node, (self.round, self.attempt))
        fresh = node in self.outstanding
        if self.streaming and (fresh or self.policy.late_updates == "stale"):
            arrival = self._fold(arrival, weights, late=not fresh)
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
            return self._released(released)
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
                weights, Note(f"round {self.round} skipped at the deadline with {shares}", counts)
            )
        return Decision(
            notes=(
                Note(
                    f"round {self.round} below quorum at the deadline with {shares}: waiting",
                    counts,
                ),
            )
        )

    def configure_evaluate(
        self, version: int, weights: Weights, idle: Sequence[int]
    ) -> Mapping[int, NodeConfig]:
        return self.aggregator.select_evaluate(version, weights, sorted(idle))

    def aggregate_evaluate(self, version: int, results: Sequence[Evaluation]) -> dict[str, float]:
        return self.aggregator.aggregate_evaluate(version, results)

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
            weights,
            Note(f"round {self.round} skipped with {shares}, {len(self.lost)} lost", counts),
        )

    def _aggregate(self, weights: Weights, note: Note | None) -> Decision:
        fresh = [self.arrived[n] for n in sorted(self.arrived)]
        stale, self.stale = self.stale, []
        stale_sum, self.stale_sum = self.stale_sum, RunningSum()
        if not fresh and not stale:
            # Nothing sound to average (every task lost or rejected): a skipped attempt, so a
            # round that can never succeed fails the run after max_skips instead of looping.
            empty = Note(f"round {self.round} had no sound update: sampled again", self._counts())
            return self._skip(weights, empty, note)
        notes = (note,) if note is not None else ()
        updates = [*fresh, *(discount_stale(weights, a) for a in stale)]
        try:
            if self.streaming:
                total, self.fresh_sum = self.fresh_sum, RunningSum()
                total.absorb(stale_sum)
                new, metrics = self.aggregator.finish(self.round, weights, total, updates)
            else:
                new, metrics = self.aggregator.aggregate(self.round, weights, updates)
        except AggregationError:
            raise
        except Exception as exc:
            # Which update the algorithm choked on cannot be told in general (its rule may
            # need them all): the attempt is skipped and sampled again, so one client's reply
            # never ends the run, while a strategy that always fails ends it after max_skips.
            return self._failed_aggregation(weights, updates, exc, note)
        if new is None:
            raise AggregationError(
                f"round {self.round}: the strategy returned no model from {len(updates)} updates"
            )
        self.skips = 0
        self.round += 1
        decision = self._next_round(new, new=True, notes=notes)
        return replace(decision, metrics=metrics)

    def _failed_aggregation(
        self, weights: Weights, updates: Sequence[Arrival], exc: Exception, why: Note | None
    ) -> Decision:
        error = f"{type(exc).__name__}: {exc}"
        data = self._counts() | {"error": error, "nodes": [u.node_id for u in updates]}
        note = Note(f"round {self.round}: the strategy's aggregation failed ({error})", data)
        reason = f"round {self.round} not aggregated: the strategy's aggregation failed ({error})"
        refused = dict.fromkeys((u.node_id for u in updates), reason)
        return self._skip(weights, note, why, refused)

    def _skip(
        self,
        weights: Weights,
        note: Note,
        why: Note | None = None,
        refused: Mapping[int, str] | None = None,
    ) -> Decision:
        self.skips += 1
        if self.skips > self.policy.max_skips:
            raise DropoutPolicyError(
                f"round {self.round} was skipped {self.skips} times in a row "
                f"(dropout.max_skips = {self.policy.max_skips}): {note.message}"
            )
        reason = f"round {self.round} skipped below quorum"
        self.skipped.add(self.attempt)
        notes = (note,) if why is None else (why, note)
        refuse = dict.fromkeys(self.arrived, reason) | dict(refused or {})
        return self._next_round(weights, notes=notes, refused=refuse)

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
            return self._released(released, notes=(Note(message, data),))
        return self._released(
            released,
            refused={node: f"late: round {task_round} {closed} before it arrived"},
            notes=(Note(f"late update from node {node} (round {task_round}) dropped", data),),
        )
