"""FedFix and asynchronous FedAvg (Fraboni, Vidal, Kameni, Lorenzi, JMLR 2023): both halves.

Client i trains from the model it was sent, x_sent(i), for τ_i seconds (on the experiment's clock).
Both schemes apply x ← x + η_g·Σ_{i∈S} d_i·(x_i − x_sent(i)), the difference against the model the
client started from, and differ in when they aggregate and how they weigh:

- **FedFix-Δt** aggregates every Δt with whoever finished since the last tick, d_i = ⌈τ_i/Δt⌉·p_i;
  a client that finished waits for the tick and then gets the new model. With Δt ≥ the slowest
  τ_i every client finishes within the first period and the update is FedAvg's.
- **asynchronous FedAvg** aggregates every single arrival and sends that client the new model at
  once, with d_i = 1 (``weighting = "none"``) or d_i = (Σ_j 1/τ_j)·τ_i·p_i (``"time"``), which
  undoes the pull toward fast clients.

p_i = n_i / Σ_j n_j is client i's share of the examples, over the clients that have reported so far
(every client reports in FedFix's first period when Δt ≥ max τ). The client half is plain local SGD.
https://arxiv.org/abs/2206.10189
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

from pydantic import Field

from .base import ServerSetup, StrategyPlugin
from .client_weights import data_shares
from .events import Arrival, Decision, EventStrategy, Note, Retries, RetryingConfig, Weights


class FedFixConfig(RetryingConfig):
    period_s: float = Field(
        default=10.0,
        gt=0,
        le=604_800,  # a week: past that no aggregation would ever come on the wall clock
        allow_inf_nan=False,
        description="Δt: seconds on the experiment's clock between aggregations (the paper's grid "
        "is 0.2 to 0.8 of the slowest client's time).",
    )
    server_lr: float = Field(default=1.0, gt=0, le=10, description="η_g, the server step size.")


class AsyncFedAvgConfig(RetryingConfig):
    weighting: Literal["none", "time"] = Field(
        default="time",
        description="d_i = 1 (none), or (Σ_j 1/τ_j)·τ_i·p_i (time: corrects the bias toward fast "
        "clients, the paper's proposal).",
    )
    server_lr: float = Field(default=1.0, gt=0, le=10, description="η_g, the server step size.")


def apply_differences(
    current: Weights, updates: Sequence[Arrival], weights: Sequence[float], server_lr: float
) -> Weights:
    """x + η_g·Σ d_i·(x_i − x_sent(i)), each array keeping its dtype."""
    out = {k: v.astype(v.dtype, copy=True) for k, v in current.items()}
    for update, d in zip(updates, weights, strict=True):
        for key, delta in update.delta().items():
            out[key] = (out[key] + server_lr * d * delta).astype(current[key].dtype)
    return out


def periods(duration_s: float, period_s: float) -> int:
    """⌈τ/Δt⌉, at least 1; a client of exactly Δt seconds (to rounding) is one period, not two."""
    return max(1, math.ceil(round(duration_s / period_s, 9)))


class FedFix(EventStrategy):
    """Aggregate every Δt with whoever finished; weights ⌈τ_i/Δt⌉·p_i."""

    def __init__(self, config: FedFixConfig) -> None:
        self.config = config
        self.finished: list[Arrival] = []  # since the last tick, in arrival order
        self.examples: dict[int, float] = {}
        self.retries = Retries(config.max_failures)
        self.idle: list[int] = []  # lost a task, waiting for the tick to be sent work again

    def begin(self, nodes: Sequence[int], weights: Weights) -> Decision:
        return Decision(dispatch=tuple(nodes), wake_in=self.config.period_s)

    def on_arrival(self, arrival: Arrival, weights: Weights) -> Decision:
        self.retries.reported(arrival.node_id)
        self.examples[arrival.node_id] = arrival.num_examples
        self.finished.append(arrival)
        return Decision()  # the client waits for the tick

    def on_failure(self, node_id: int, reason: str, weights: Weights) -> Decision:
        decision = self.retries.lost(node_id, reason)
        # Work is handed out at the ticks only: a node that lost its task gets the next model.
        self.idle.extend(decision.dispatch)
        return Decision(notes=decision.notes)

    def on_tick(self, now: float, weights: Weights) -> Decision:
        waiting = tuple(sorted({*self.idle, *(a.node_id for a in self.finished)}))
        self.idle = []
        if not self.finished:
            return Decision(dispatch=waiting, wake_in=self.config.period_s)
        updates = sorted(self.finished, key=lambda a: a.node_id)
        self.finished = []
        shares = data_shares(self.examples)
        period = self.config.period_s
        factors = [periods(a.duration_s, period) * shares[a.node_id] for a in updates]
        new = apply_differences(weights, updates, factors, self.config.server_lr)
        note = Note(
            f"tick at {now:g} s: aggregated {len(updates)} updates",
            {"time_s": now, "nodes": [a.node_id for a in updates], "weights": factors},
        )
        return Decision(weights=new, dispatch=waiting, wake_in=period, notes=(note,))


class AsyncFedAvg(EventStrategy):
    """Aggregate every arrival; d_i = 1 or (Σ_j 1/τ_j)·τ_i·p_i."""

    def __init__(self, config: AsyncFedAvgConfig) -> None:
        self.config = config
        self.examples: dict[int, float] = {}
        self.durations: dict[int, float] = {}  # τ_j, each client's latest
        self.retries = Retries(config.max_failures)

    def weight(self, arrival: Arrival) -> float:
        if self.config.weighting == "none":
            return 1.0
        tau = max(arrival.duration_s, 1e-9)
        inverse = sum(1.0 / max(t, 1e-9) for t in self.durations.values())
        return inverse * tau * data_shares(self.examples)[arrival.node_id]

    def on_arrival(self, arrival: Arrival, weights: Weights) -> Decision:
        self.retries.reported(arrival.node_id)
        self.examples[arrival.node_id] = arrival.num_examples
        self.durations[arrival.node_id] = arrival.duration_s
        d = self.weight(arrival)
        new = apply_differences(weights, [arrival], [d], self.config.server_lr)
        return Decision(weights=new, dispatch=(arrival.node_id,))

    def on_failure(self, node_id: int, reason: str, weights: Weights) -> Decision:
        return self.retries.lost(node_id, reason)


def build_fedfix(config: FedFixConfig, setup: ServerSetup) -> FedFix:
    return FedFix(config)


def build_async_fedavg(config: AsyncFedAvgConfig, setup: ServerSetup) -> AsyncFedAvg:
    return AsyncFedAvg(config)


fedfix = StrategyPlugin(
    name="fedfix",
    summary="FedFix: aggregate every Δt with whoever finished, weighted ⌈τ_i/Δt⌉·p_i.",
    config_model=FedFixConfig,
    build_server=build_fedfix,
    paper="https://arxiv.org/abs/2206.10189",
    tags=("semi-async",),
)

async_fedavg = StrategyPlugin(
    name="async-fedavg",
    summary="Asynchronous FedAvg: every arrival applied, optionally weighted by its time.",
    config_model=AsyncFedAvgConfig,
    build_server=build_async_fedavg,
    paper="https://arxiv.org/abs/2206.10189",
    tags=("async",),
)
