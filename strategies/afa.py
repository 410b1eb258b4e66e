"""AFA-CD and AFA-CS (Yang et al., ICML 2022, "Anarchic Federated Learning"): both halves.

Workers take part when they choose (here: whenever their device profile has them online) and run
as many local steps K_i as they choose (here: drawn, seeded, from ``[min_local_steps,
max_local_steps]`` for every task, where a node's own device profile may set either bound:
``--node-config "min-local-steps=2 max-local-steps=8"``), from whatever model they last
received. A worker's update is normalised by its own steps: G_i = (x_start − x_end)/(η_L·K_i).
The server's step is x ← x − η·η_L·G, so with Δ_i = x_end − x_start the learning rate η_L
cancels and the server applies x ← x + η·Ḡ with Ḡ the mean of Δ_i/K_i — which is why it never
needs η_L.

- **AFA-CD** (cross-device) waits for m arrivals and averages their m normalised updates.
- **AFA-CS** (cross-silo) keeps each worker's latest normalised update; every m arrivals it
  averages over ALL M workers the server knows (a worker not heard from yet counts as zero),
  which removes AFA-CD's non-vanishing error term at the price of O(M·d) server memory.

Every worker gets new work as soon as it reports. Forgetting the 1/K_i normalisation lets the
workers that run more steps dominate; the tests check it with unequal K_i.
https://arxiv.org/abs/2108.09875
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Self

import numpy as np
from pydantic import Field, model_validator

from florist.client.profiles import DeviceProfile
from florist.client.training import TrainResult, TrainTask, round_seed, train_sgd
from florist.datasets.seeds import derive_seed

from .base import ServerSetup, StrategyPlugin
from .events import Arrival, Decision, EventStrategy, Note, Retries, RetryingConfig, Weights


class AfaConfig(RetryingConfig):
    """AFA's settings: the workers' step range and the server's two-sided step."""

    arrivals_per_update: int = Field(
        default=3, ge=1, le=100_000, description="m: arrivals per server update."
    )
    min_local_steps: int = Field(
        default=5, ge=1, le=100_000, description="Fewest K_i a worker runs."
    )
    max_local_steps: int = Field(
        default=20, ge=1, le=100_000, description="Most K_i a worker runs."
    )
    server_lr: float | None = Field(
        default=None,
        gt=0,
        le=10_000,
        allow_inf_nan=False,
        description="η, the server step on the mean normalised update; None: the theory's "
        "√(K·m) with K = max_local_steps.",
    )

    @model_validator(mode="after")
    def _range_in_order(self) -> Self:
        if self.min_local_steps > self.max_local_steps:
            raise ValueError(
                f"min_local_steps ({self.min_local_steps}) must not exceed max_local_steps "
                f"({self.max_local_steps})"
            )
        return self

    @property
    def step(self) -> float:
        """η as configured, or √(K·m)."""
        if self.server_lr is not None:
            return self.server_lr
        return math.sqrt(self.max_local_steps * self.arrivals_per_update)


def normalised(arrival: Arrival) -> Weights:
    """Δ_i/K_i = (x_end − x_start)/K_i: the update per local step (−η_L·G_i)."""
    steps = max(arrival.local_steps, 1)
    return {k: d / steps for k, d in arrival.delta().items()}


def afa_update(
    current: Weights, updates: Sequence[Weights], server_lr: float, count: int
) -> Weights:
    """x + η·(1/count)·Σ updates, accumulated in the given order; each array keeps its dtype.
    AFA-CD: ``count`` is m, the updates the m arrivals'; AFA-CS: ``count`` is M, one per worker."""
    out = {k: v.astype(np.float64, copy=True) for k, v in current.items()}
    for update in updates:
        for key, value in update.items():
            out[key] += (server_lr / count) * value
    return {k: v.astype(current[k].dtype) for k, v in out.items()}


class AfaCd(EventStrategy):
    """AFA-CD: every m arrivals, x ← x + η·mean of their Δ_i/K_i."""

    def __init__(self, config: AfaConfig) -> None:
        self.config = config
        self.retries = Retries(config.max_failures)
        self.buffer: list[Weights] = []

    def on_arrival(self, arrival: Arrival, weights: Weights) -> Decision:
        self.retries.reported(arrival.node_id)
        self.buffer.append(normalised(arrival))
        if len(self.buffer) < self.config.arrivals_per_update:
            return Decision(dispatch=(arrival.node_id,))
        new = afa_update(weights, self.buffer, self.config.step, len(self.buffer))
        self.buffer = []
        return Decision(weights=new, dispatch=(arrival.node_id,))

    def on_failure(self, node_id: int, reason: str, weights: Weights) -> Decision:
        return self.retries.lost(node_id, reason)


class AfaCs(EventStrategy):
    """AFA-CS: keep each worker's latest Δ_i/K_i; every m arrivals, x ← x + η·(1/M)·Σ over all M."""

    def __init__(self, config: AfaConfig) -> None:
        self.config = config
        self.retries = Retries(config.max_failures)
        self.workers: set[int] = set()
        self.latest: dict[int, Weights] = {}
        self.arrivals = 0

    def begin(self, nodes: Sequence[int], weights: Weights) -> Decision:
        self.workers.update(nodes)
        return Decision(dispatch=tuple(nodes))

    def on_nodes_joined(self, nodes: Sequence[int], weights: Weights) -> Decision:
        self.workers.update(nodes)
        return Decision(dispatch=tuple(nodes))

    def on_arrival(self, arrival: Arrival, weights: Weights) -> Decision:
        self.retries.reported(arrival.node_id)
        self.workers.add(arrival.node_id)
        self.latest[arrival.node_id] = normalised(arrival)
        self.arrivals += 1
        if self.arrivals < self.config.arrivals_per_update:
            return Decision(dispatch=(arrival.node_id,))
        self.arrivals = 0
        stored = [self.latest[n] for n in sorted(self.latest)]
        new = afa_update(weights, stored, self.config.step, len(self.workers))
        note = Note(
            f"averaged the latest updates of {len(stored)} of {len(self.workers)} workers",
            {"reported": sorted(self.latest), "workers": len(self.workers)},
        )
        return Decision(weights=new, dispatch=(arrival.node_id,), notes=(note,))

    def on_failure(self, node_id: int, reason: str, weights: Weights) -> Decision:
        return self.retries.lost(node_id, reason)


def local_steps_drawn(task: TrainTask[AfaConfig]) -> int:
    """The worker's K_i for this task: uniform on the configured range, seeded per node and
    round (a repeat of the same round draws anew through the task's seed)."""
    rng = np.random.default_rng(derive_seed(round_seed(task), "afa-steps"))
    profile = task.profile or DeviceProfile()
    low, high = profile.step_range(task.config.min_local_steps, task.config.max_local_steps)
    return int(rng.integers(low, high + 1))


def train(task: TrainTask[AfaConfig]) -> TrainResult:
    """Plain local SGD for the K_i steps the worker chose; the steps are reported, and the
    server normalises by them."""
    steps = local_steps_drawn(task)
    return train_sgd(
        replace(task, training=task.training.model_copy(update={"local_steps": steps}))
    )


def build_cd(config: AfaConfig, setup: ServerSetup) -> AfaCd:
    return AfaCd(config)


def build_cs(config: AfaConfig, setup: ServerSetup) -> AfaCs:
    return AfaCs(config)


afa_cd = StrategyPlugin(
    name="afa-cd",
    summary="AFA-CD: workers choose when and how long to train; every m arrivals the server "
    "steps along the mean of their step-normalised updates.",
    config_model=AfaConfig,
    build_server=build_cd,
    train=train,
    paper="https://arxiv.org/abs/2108.09875",
    tags=("async",),
)

afa_cs = StrategyPlugin(
    name="afa-cs",
    summary="AFA-CS: as AFA-CD, averaging every worker's latest step-normalised update.",
    config_model=AfaConfig,
    build_server=build_cs,
    train=train,
    paper="https://arxiv.org/abs/2108.09875",
    tags=("async",),
)
