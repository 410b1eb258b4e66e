"""FedCompass (Li, Kumar, Lee, Yang, Kotamarthi, Foster, Bhatt, ICLR 2024): both halves.

A semi-asynchronous, computing-power-aware scheduler. The server keeps an estimate s_i of each
client's seconds per local step (an exponential moving average of what it measured) and gathers
clients in **arrival groups**: a group has an expected arrival time T_a and a latest time
T_max = t_created + λ·Q·s (λ, the latest-time factor). When a client is sent work it gets the
number of local steps Q_i = ⌊(T_a − now)/s_i⌋ that brings it back with an open group (the group
allowing the most steps, within [Q_min, Q_max]); with no such group it opens a new one with
Q_max steps. A group aggregates when all its members are back, or at T_max with those who are;
a member back after that is late: its update waits in a general buffer for the next
aggregation, and it is sent work at once. After a group aggregates its members are sent work
again, fastest first, so the fast ones found the groups the slow ones then join.

The scheduler (:class:`CompassScheduler`: timing only) and the aggregation
(:func:`compass_update`: maths only) are separate and pure. The update is
x ← x + Σ_i α·S(τ_i)·(1/N)·(x_i − x_sent(i)), with S(τ) = (τ + 1)^(−a), N the number of clients
(not the group's size) and τ_i the versions since client i's model. (An early standalone release
of the authors' code raised (τ + 1) to +a, rewarding staleness; the paper's factor decays.)
Before any speed is known every client gets Q_max steps in one group, which then waits for all:
with equal speeds the scheme stays one group of Q_max steps, i.e. FedAvg with server step α.
The client half is plain local SGD, for the number of steps the server assigns.
https://arxiv.org/abs/2309.14675
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Self

from pydantic import Field, model_validator

from .base import ServerSetup, StrategyPlugin
from .events import Arrival, Decision, EventStrategy, Note, Retries, RetryingConfig, Weights


class FedCompassConfig(RetryingConfig):
    """FedCompass's settings, with the paper's defaults."""

    q_min: int = Field(default=20, ge=1, le=100_000, description="Fewest local steps assigned.")
    q_max: int = Field(default=100, ge=1, le=100_000, description="Most local steps assigned.")
    latest_time_factor: float = Field(
        default=1.5,
        ge=1,
        le=100,
        allow_inf_nan=False,
        description="λ: a group's latest time is λ·Q·s after it opens (its founder's Q and s).",
    )
    speed_momentum: float = Field(
        default=0.9,
        gt=0,
        le=1,
        description="m in s ← (1 − m)·s + m·(measured seconds per step).",
    )
    staleness_exponent: float = Field(
        default=0.5, ge=0, le=10, description="a in S(τ) = (τ + 1)^(−a)."
    )
    server_lr: float = Field(default=0.9, gt=0, le=10, description="α, the server step size.")

    @model_validator(mode="after")
    def _steps_in_order(self) -> Self:
        if self.q_min > self.q_max:
            raise ValueError(f"q_min ({self.q_min}) must not exceed q_max ({self.q_max})")
        return self


def staleness_factor(staleness: int, exponent: float) -> float:
    """S(τ) = (τ + 1)^(−a): 1 for a fresh update, decaying with its staleness."""
    return float((staleness + 1) ** -exponent)


def compass_update(
    current: Weights,
    deltas: Sequence[Weights],
    staleness: Sequence[int],
    *,
    num_clients: int,
    server_lr: float,
    exponent: float,
) -> Weights:
    """x + Σ_i α·S(τ_i)·(1/N)·Δ_i, each Δ_i = x_i − x_sent(i), accumulated in the given order;
    each array keeps its dtype."""
    out = {k: v.astype(v.dtype, copy=True) for k, v in current.items()}
    for delta, tau in zip(deltas, staleness, strict=True):
        scale = server_lr * staleness_factor(tau, exponent) / num_clients
        for key, d in delta.items():
            out[key] = (out[key] + scale * d).astype(current[key].dtype)
    return out


@dataclass
class Group:
    """An arrival group: who is expected back by when, and who is back."""

    gid: int
    expected_at: float  # T_a; infinite until speeds are known (the first group)
    latest_at: float  # T_max: the group aggregates then with whoever is back
    pending: set[int] = field(default_factory=set)  # assigned, not back yet
    back: list[int] = field(default_factory=list)  # back in time, in arrival order

    @property
    def complete(self) -> bool:
        return not self.pending and bool(self.back)


@dataclass(frozen=True)
class Assignment:
    node_id: int
    gid: int
    steps: int


class CompassScheduler:
    """FedCompass's timing: speeds, arrival groups and local-step assignments; no weights."""

    def __init__(self, q_min: int, q_max: int, latest_time_factor: float, momentum: float) -> None:
        self.q_min, self.q_max = q_min, q_max
        self.latest_time_factor = latest_time_factor
        self.momentum = momentum
        self.speed: dict[int, float] = {}  # s_i: seconds per local step
        self.groups: dict[int, Group] = {}  # open groups
        self.group_of: dict[int, int] = {}  # node -> group of its task in flight
        self._next_gid = 0

    def measured(self, node_id: int, seconds: float, steps: int) -> None:
        """A task of ``steps`` local steps took ``seconds``: update s_i (the first sets it)."""
        if steps <= 0 or not math.isfinite(seconds) or seconds < 0:
            return
        sample = seconds / steps
        old = self.speed.get(node_id)
        self.speed[node_id] = (
            sample if old is None else (1 - self.momentum) * old + self.momentum * sample
        )

    def _open(self, now: float, steps: int, speed: float | None) -> Group:
        if speed is None:
            expected = latest = math.inf
        else:
            expected = now + steps * speed
            latest = now + self.latest_time_factor * steps * speed
        group = Group(self._next_gid, expected, latest)
        self._next_gid += 1
        self.groups[group.gid] = group
        return group

    def assign(self, node_id: int, now: float) -> Assignment:
        """Send the node work: join the open group allowing it the most steps within
        [Q_min, Q_max], or open a new group with Q_max steps."""
        speed = self.speed.get(node_id)
        best: tuple[int, Group] | None = None
        if speed is not None and speed > 0:
            for group in self.groups.values():
                if not math.isfinite(group.expected_at) or group.expected_at <= now:
                    continue
                steps = math.floor(round((group.expected_at - now) / speed, 9))
                if self.q_min <= steps <= self.q_max and (best is None or steps > best[0]):
                    best = (steps, group)
        elif speed is None:
            # No speed yet: the group of other unmeasured nodes, if one is open, else a new one.
            for group in self.groups.values():
                if not math.isfinite(group.expected_at):
                    best = (self.q_max, group)
                    break
        if best is None:
            best = (self.q_max, self._open(now, self.q_max, speed))
        steps, group = best
        group.pending.add(node_id)
        self.group_of[node_id] = group.gid
        return Assignment(node_id, group.gid, steps)

    def assign_all(self, nodes: Sequence[int], now: float) -> list[Assignment]:
        """Send several nodes work, fastest first (unknown speeds last, by node id)."""
        order = sorted(nodes, key=lambda n: (n not in self.speed, self.speed.get(n, 0.0), n))
        return [self.assign(n, now) for n in order]

    def back(self, node_id: int) -> Group | None:
        """The node is back: its group if that is still open (it waits for the group), None if
        it is late (its group aggregated without it)."""
        gid = self.group_of.pop(node_id, None)
        group = self.groups.get(gid) if gid is not None else None
        if group is None:
            return None
        group.pending.discard(node_id)
        group.back.append(node_id)
        return group

    def lost(self, node_id: int) -> Group | None:
        """The node's task is lost: its group stops waiting for it (returned, if open)."""
        gid = self.group_of.pop(node_id, None)
        group = self.groups.get(gid) if gid is not None else None
        if group is not None:
            group.pending.discard(node_id)
        return group

    def due(self, now: float) -> list[Group]:
        """Open groups that aggregate now: all back, or past their latest time."""
        return [
            g
            for g in sorted(self.groups.values(), key=lambda g: g.gid)
            if g.complete or g.latest_at <= now + 1e-9
        ]

    def close(self, group: Group) -> list[int]:
        """The group aggregated: it is gone; members still out are late. Returns who was back."""
        del self.groups[group.gid]
        return list(group.back)

    def next_deadline(self) -> float | None:
        finite = [g.latest_at for g in self.groups.values() if math.isfinite(g.latest_at)]
        return min(finite) if finite else None


def _finite(value: float) -> float | None:
    """JSON has no infinity: an unknown time is null."""
    return value if math.isfinite(value) else None


class FedCompass(EventStrategy):
    """FedCompass's server half: :class:`CompassScheduler` timing, :func:`compass_update` maths."""

    def __init__(self, config: FedCompassConfig) -> None:
        self.config = config
        self.scheduler = CompassScheduler(
            config.q_min, config.q_max, config.latest_time_factor, config.speed_momentum
        )
        self.retries = Retries(config.max_failures)
        self.nodes: set[int] = set()
        self.version = 0  # aggregations so far: the strategy makes every new model
        self.now = 0.0  # the latest time seen on the experiment's clock
        self.updates: dict[int, Arrival] = {}  # back in time, waiting for their group
        self.buffer: list[Arrival] = []  # late: merged into the next aggregation

    def _dispatch(self, nodes: Sequence[int], weights: Weights | None = None) -> Decision:
        assignments = self.scheduler.assign_all(nodes, self.now)
        # The groups' times as they stand after these assignments, for the dashboard's view
        # of the arrival groups (null: not known until the group's first speed is measured).
        groups = sorted({a.gid for a in assignments})
        note = Note(
            f"{len(assignments)} nodes sent work",
            {
                "time_s": self.now,
                "assignments": [
                    {"node_id": a.node_id, "group": a.gid, "local_steps": a.steps}
                    for a in assignments
                ],
                "groups": [
                    {
                        "group": gid,
                        "expected_at": _finite(self.scheduler.groups[gid].expected_at),
                        "latest_at": _finite(self.scheduler.groups[gid].latest_at),
                    }
                    for gid in groups
                ],
            },
            kind="fedcompass-assign",
        )
        return Decision(
            weights=weights,
            dispatch=tuple(a.node_id for a in assignments),
            local_steps={a.node_id: a.steps for a in assignments},
            wake_in=self._wake_in(),
            notes=(note,),
        )

    def _wake_in(self) -> float | None:
        deadline = self.scheduler.next_deadline()
        return None if deadline is None else max(0.0, deadline - self.now)

    def begin(self, nodes: Sequence[int], weights: Weights) -> Decision:
        self.nodes.update(nodes)
        return self._dispatch(list(nodes))

    def on_nodes_joined(self, nodes: Sequence[int], weights: Weights) -> Decision:
        self.nodes.update(nodes)
        return self._dispatch(list(nodes))

    def _aggregate(self, groups: Sequence[Group], weights: Weights) -> Decision:
        """Aggregate ``groups`` (and the late buffer) into one new model; their members who
        were back get work again, fastest first."""
        back = [n for g in groups for n in self.scheduler.close(g)]
        fresh = [self.updates.pop(n) for n in back]
        updates = [*fresh, *self.buffer]
        self.buffer = []
        if not updates:
            return Decision(wake_in=self._wake_in())
        staleness = [self.version - a.sent_version for a in updates]
        new = compass_update(
            weights,
            [a.delta() for a in updates],
            staleness,
            num_clients=max(len(self.nodes), 1),
            server_lr=self.config.server_lr,
            exponent=self.config.staleness_exponent,
        )
        self.version += 1
        decision = self._dispatch(back, new)
        note = Note(
            f"groups {[g.gid for g in groups]} aggregated {len(updates)} updates",
            {
                "time_s": self.now,
                "groups": [g.gid for g in groups],
                "nodes": [a.node_id for a in updates],
                "staleness": staleness,
                "late": [a.node_id for a in updates[len(fresh) :]],
            },
            kind="fedcompass-aggregate",
        )
        return replace(decision, notes=(note, *decision.notes))

    def on_arrival(self, arrival: Arrival, weights: Weights) -> Decision:
        self.now = max(self.now, arrival.arrived_at)
        self.retries.reported(arrival.node_id)
        self.scheduler.measured(arrival.node_id, arrival.duration_s, arrival.local_steps)
        group = self.scheduler.back(arrival.node_id)
        if group is None:
            # Late: its group aggregated without it. The update waits for the next
            # aggregation; the node gets work now.
            self.buffer.append(arrival)
            return self._dispatch([arrival.node_id])
        self.updates[arrival.node_id] = arrival
        if group.complete:
            return self._aggregate([group], weights)
        return Decision(wake_in=self._wake_in())  # it waits for its group

    def on_failure(self, node_id: int, reason: str, weights: Weights) -> Decision:
        group = self.scheduler.lost(node_id)
        retry = self.retries.lost(node_id, reason)
        if group is not None and group.complete:
            decision = self._aggregate([group], weights)
        else:
            decision = Decision(wake_in=self._wake_in())
        if not retry.dispatch:  # given up
            self.nodes.discard(node_id)
            return replace(decision, notes=(*decision.notes, *retry.notes))
        again = self._dispatch([node_id])
        return replace(
            decision,
            dispatch=(*decision.dispatch, *again.dispatch),
            local_steps={**decision.local_steps, **again.local_steps},
            wake_in=again.wake_in,
            notes=(*decision.notes, *retry.notes, *again.notes),
        )

    def on_tick(self, now: float, weights: Weights) -> Decision:
        self.now = max(self.now, now)
        due = self.scheduler.due(self.now)
        if not due:
            return Decision(wake_in=self._wake_in())
        return self._aggregate(due, weights)


def build_fedcompass(config: FedCompassConfig, setup: ServerSetup) -> FedCompass:
    return FedCompass(config)


plugin = StrategyPlugin(
    name="fedcompass",
    summary="FedCompass: arrival groups and per-client local steps from measured speeds, "
    "staleness-weighted aggregation.",
    config_model=FedCompassConfig,
    build_server=build_fedcompass,
    paper="https://arxiv.org/abs/2309.14675",
    tags=("semi-async",),
)
