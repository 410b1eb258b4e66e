"""Byzantine-robust aggregation: pure rules on client updates, and the plugins that run them.

Every rule takes the updates Δ_i = x_i − x_sent(i) of one aggregation (n of them, of which at
most f are assumed Byzantine) and returns one robust update; the server applies
x ← x + η_g·rule(Δ). Updates count once each: a Byzantine node could claim any example count, so
example weights are ignored. The rules:

- **coordinate-wise median** (Yin et al., ICML 2018, https://arxiv.org/abs/1803.01498);
- **coordinate-wise trimmed mean** (same paper): per coordinate, drop the f largest and the f
  smallest values and average the n − 2f left (needs n > 2f);
- **Krum / Multi-Krum** (Blanchard et al., NeurIPS 2017, https://papers.nips.cc/paper/6617):
  score(i) = Σ of the squared distances from Δ_i to its n − f − 2 closest other updates; Krum
  returns the best-scored update, Multi-Krum the mean of the m best (needs n > 2f + 2);
- **centered clipping** (Karimireddy, He, Jaggi, ICML 2021, https://arxiv.org/abs/2012.10333):
  starting from the previous aggregate v (its history), L times
  v ← v + (1/n)·Σ (Δ_i − v)·min(1, τ/‖Δ_i − v‖);
- **nearest-neighbour average** (MoNNA's NNA, Farhadkhani et al., ICML 2023,
  https://arxiv.org/abs/2302.04444; the plugin is in strategies/monna.py): the mean of the n − f
  updates nearest to a robust pivot (see :func:`nearest_neighbour_average`).

The rules need only the set of updates, so each plugin runs under two schedulers: synchronous
rounds (strategies/rounds.py, with the experiment's dropout policy; a round's late updates enter
discounted as for every round-based plugin) or a FedBuff-style buffer of K asynchronous arrivals,
each Δ_i taken against the model node i was sent and scaled by 1/√(1 + staleness). Immediate
asynchronous schedulers (FedAsync, one arrival per aggregation) cannot host them: a robust rule
over one update is that update.

Flower's own ``FedMedian``, ``FedTrimmedAvg``, ``Krum`` and ``MultiKrum`` stay registered as
``fedmedian``, ``fedtrimmedavg``, ``krum`` and ``multikrum``; these are Florist's, on deltas,
with one ``num_byzantine`` f across the rules, and the buffered scheduler.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Literal, Self

import numpy as np
from pydantic import Field, model_validator

from .base import ServerSetup, StrategyPlugin
from .events import (
    Arrival,
    Decision,
    EventStrategy,
    NodeConfig,
    Retries,
    RetryingConfig,
    Weights,
    apply_delta,
)
from .rounds import RoundAggregator, SyncRounds


class TooFewUpdates(ValueError):
    """A robust rule was handed fewer updates than its f requires (e.g. Krum needs n > 2f + 2)."""


# --- pure maths on stacked updates: rows are clients, columns the flattened parameters --------


def flatten(update: Weights, keys: Sequence[str]) -> np.ndarray:
    """One update as a float64 vector, in ``keys`` order."""
    return np.concatenate([np.asarray(update[k], dtype=np.float64).ravel() for k in keys])


def unflatten(vector: np.ndarray, like: Weights) -> Weights:
    """A vector back into arrays shaped and typed like ``like``."""
    out: Weights = {}
    start = 0
    for key, value in like.items():
        size = int(np.asarray(value).size)
        out[key] = vector[start : start + size].reshape(np.shape(value)).astype(value.dtype)
        start += size
    return out


def coordinate_median(updates: np.ndarray) -> np.ndarray:
    """Per coordinate, the median of the n values (mean of the two middle ones for even n)."""
    return np.median(updates, axis=0)


def trimmed_mean(updates: np.ndarray, f: int) -> np.ndarray:
    """Per coordinate, the mean of the values left after dropping the f largest and f smallest."""
    n = len(updates)
    if n <= 2 * f:
        raise TooFewUpdates(f"trimmed mean with f={f} needs more than {2 * f} updates, got {n}")
    ordered = np.sort(updates, axis=0)
    return ordered[f : n - f].mean(axis=0)


def pairwise_sq_distances(updates: np.ndarray) -> np.ndarray:
    """‖Δ_i − Δ_j‖² for every pair (exact differences: the Gram trick loses small distances)."""
    diff = updates[:, None, :] - updates[None, :, :]
    return np.einsum("ijk,ijk->ij", diff, diff)


def krum_scores(updates: np.ndarray, f: int) -> np.ndarray:
    """Krum's score of each update: the sum of its squared distances to its n − f − 2 closest
    other updates."""
    n = len(updates)
    neighbours = n - f - 2
    if neighbours < 1:
        raise TooFewUpdates(f"Krum with f={f} needs more than {f + 2} updates, got {n}")
    dist = pairwise_sq_distances(updates)
    scores = np.empty(n)
    for i in range(n):
        others = np.delete(dist[i], i)
        scores[i] = np.sort(others)[:neighbours].sum()
    return scores


def multi_krum(updates: np.ndarray, f: int, m: int) -> tuple[np.ndarray, list[int]]:
    """The mean of the m best-scored updates (m = 1: Krum) and their indices, best first; ties
    go to the lower index, so the choice is repeatable."""
    if not 1 <= m <= len(updates):
        raise TooFewUpdates(f"Multi-Krum selects m={m} of {len(updates)} updates")
    scores = krum_scores(updates, f)
    chosen = [int(i) for i in np.argsort(scores, kind="stable")[:m]]
    return updates[chosen].mean(axis=0), chosen


def centered_clip(
    updates: np.ndarray, center: np.ndarray, radius: float | None, iterations: int
) -> tuple[np.ndarray, float]:
    """L iterations of v ← v + (1/n)·Σ (Δ_i − v)·min(1, τ/‖Δ_i − v‖) from ``center``.

    ``radius`` None takes τ = the median of the ‖Δ_i − v‖ at the start (Florist's choice, so that
    one setting fits any model's scale); returns v and the τ used.
    """
    v = center.astype(np.float64, copy=True)
    tau = radius
    if tau is None:
        tau = float(np.median(np.linalg.norm(updates - v, axis=1)))
    for _ in range(iterations):
        diff = updates - v
        norms = np.linalg.norm(diff, axis=1)
        # A zero distance needs no clipping (and must not divide by zero).
        scale = np.minimum(1.0, tau / np.where(norms > 0, norms, np.inf))
        v = v + (diff * scale[:, None]).mean(axis=0)
    return v, tau


def nearest_neighbour_average(
    updates: np.ndarray, f: int, pivot: np.ndarray
) -> tuple[np.ndarray, list[int]]:
    """The mean of the n − f updates nearest (L2) to ``pivot``, and their indices."""
    n = len(updates)
    if n <= f:
        raise TooFewUpdates(f"nearest-neighbour averaging with f={f} needs more than {f} updates")
    dist = np.linalg.norm(updates - pivot, axis=1)
    chosen = sorted(int(i) for i in np.argsort(dist, kind="stable")[: n - f])
    return updates[chosen].mean(axis=0), chosen


# --- rules with their state, as the schedulers use them ---------------------------------------


class RobustConfig(RetryingConfig):
    """What every robust plugin shares: f, the scheduler, and the server step."""

    num_byzantine: int = Field(
        default=1,
        ge=0,
        le=10_000,
        description="f: Byzantine updates tolerated per aggregation (each rule states what n it "
        "needs for this f).",
    )
    scheduler: Literal["rounds", "buffered"] = Field(
        default="rounds",
        description="rounds: synchronous rounds under the experiment's dropout policy; "
        "buffered: aggregate every buffer_size asynchronous arrivals (FedBuff's timing).",
    )
    buffer_size: int = Field(
        default=10, ge=1, le=100_000, description="K: arrivals per aggregation when buffered."
    )
    staleness_scaling: bool = Field(
        default=True,
        description="Buffered: scale each update by 1/√(1 + staleness) before the rule.",
    )
    server_lr: float = Field(
        default=1.0,
        gt=0,
        le=1000,
        allow_inf_nan=False,
        description="η_g: the server applies x ← x + η_g·rule(Δ).",
    )

    def min_updates(self) -> int:
        """The fewest updates the rule can aggregate with this f."""
        return self.num_byzantine + 1

    @model_validator(mode="after")
    def _buffer_fits(self) -> Self:
        if self.scheduler == "buffered" and self.buffer_size < self.min_updates():
            raise ValueError(
                f"buffer_size ({self.buffer_size}) must be at least {self.min_updates()} for "
                f"num_byzantine={self.num_byzantine} with this rule"
            )
        return self


class MedianConfig(RobustConfig):
    """Coordinate-wise median; f only sets the buffered scheduler's smallest buffer."""


class TrimmedMeanConfig(RobustConfig):
    """Coordinate-wise trimmed mean cutting f values at each end."""

    def min_updates(self) -> int:
        return 2 * self.num_byzantine + 1


class KrumConfig(RobustConfig):
    """Krum (select 1) or Multi-Krum (select m)."""

    # Krum needs n ≥ f + 3: with f = 0 by default (as Flower's Krum) a 3-node run works as is.
    num_byzantine: int = Field(
        default=0,
        ge=0,
        le=10_000,
        description="f: Byzantine updates tolerated per aggregation; Krum needs at least f + 3 "
        "updates. Set it to the number of attackers to expect.",
    )

    select: int | None = Field(
        default=1,
        ge=1,
        le=100_000,
        description="m: the best-scored updates averaged (1: Krum; None: n − f, Multi-Krum's "
        "usual choice).",
    )

    def min_updates(self) -> int:
        return self.num_byzantine + 3


class MultiKrumConfig(KrumConfig):
    select: int | None = Field(
        default=None,
        ge=1,
        le=100_000,
        description="m: the best-scored updates averaged (None: n − f).",
    )


class CenteredClippingConfig(RobustConfig):
    """Centered clipping around the previous aggregate."""

    radius: float | None = Field(
        default=None,
        gt=0,
        allow_inf_nan=False,
        description="τ, the clipping radius; None: the median distance of the updates from the "
        "centre in each aggregation.",
    )
    iterations: int = Field(default=1, ge=1, le=1000, description="L: clipping iterations.")


class RobustRule:
    """A robust rule on a list of updates, with any state it carries between aggregations."""

    def __init__(self, config: RobustConfig) -> None:
        self.config = config

    def combine(self, updates: np.ndarray) -> tuple[np.ndarray, dict[str, float]]:
        """The robust update of stacked updates, and metrics about the choice."""
        raise NotImplementedError

    def __call__(self, deltas: Sequence[Weights]) -> tuple[Weights, dict[str, float]]:
        if len(deltas) < self.config.min_updates():
            raise TooFewUpdates(
                f"{type(self).__name__} with num_byzantine={self.config.num_byzantine} needs "
                f"{self.config.min_updates()} updates, got {len(deltas)}"
            )
        keys = list(deltas[0])
        stacked = np.stack([flatten(d, keys) for d in deltas])
        vector, metrics = self.combine(stacked)
        return unflatten(vector, {k: deltas[0][k] for k in keys}), metrics


class MedianRule(RobustRule):
    def combine(self, updates: np.ndarray) -> tuple[np.ndarray, dict[str, float]]:
        return coordinate_median(updates), {}


class TrimmedMeanRule(RobustRule):
    def combine(self, updates: np.ndarray) -> tuple[np.ndarray, dict[str, float]]:
        return trimmed_mean(updates, self.config.num_byzantine), {}


class KrumRule(RobustRule):
    config: KrumConfig

    def combine(self, updates: np.ndarray) -> tuple[np.ndarray, dict[str, float]]:
        f = self.config.num_byzantine
        m = self.config.select if self.config.select is not None else len(updates) - f
        vector, chosen = multi_krum(updates, f, min(m, len(updates)))
        return vector, {"robust-selected": float(len(chosen))}


class CenteredClippingRule(RobustRule):
    """Keeps the last aggregate as the next centre: the history centered clipping learns from."""

    config: CenteredClippingConfig

    def __init__(self, config: RobustConfig) -> None:
        super().__init__(config)
        self.center: np.ndarray | None = None

    def combine(self, updates: np.ndarray) -> tuple[np.ndarray, dict[str, float]]:
        center = self.center
        if center is None or center.shape != updates.shape[1:]:
            center = np.zeros(updates.shape[1])
        vector, tau = centered_clip(updates, center, self.config.radius, self.config.iterations)
        self.center = vector
        return vector, {"robust-clip-radius": tau}


# --- the two schedulers ------------------------------------------------------------------------


class RobustRounds(RoundAggregator):
    """Synchronous rounds: Flower's sampling rule, then the robust rule on the round's deltas."""

    def __init__(self, rule: RobustRule, setup: ServerSetup) -> None:
        self.rule = rule
        self.setup = setup

    def select(
        self, server_round: int, weights: Weights, nodes: Sequence[int]
    ) -> dict[int, NodeConfig]:
        # Flower's sample_nodes: max(⌊fraction·N⌋, min), drawn from the loop-seeded ``random``.
        count = min(
            len(nodes), max(int(self.setup.fraction_train * len(nodes)), self.setup.min_clients)
        )
        chosen = list(nodes) if count >= len(nodes) else random.sample(list(nodes), count)
        return {node: {} for node in sorted(chosen)}

    def aggregate(
        self, server_round: int, weights: Weights, updates: Sequence[Arrival]
    ) -> tuple[Weights | None, dict[str, float]]:
        robust, metrics = self.rule([u.delta() for u in updates])
        return apply_delta(weights, robust, self.rule.config.server_lr), metrics


class RobustBuffer(EventStrategy):
    """FedBuff's timing: every K arrivals, x ← x + η_g·rule(s(τ_i)·Δ_i); each node gets new work
    as soon as it reports."""

    def __init__(self, rule: RobustRule) -> None:
        self.rule = rule
        self.buffer: list[Weights] = []
        self.retries = Retries(rule.config.max_failures)

    def on_arrival(self, arrival: Arrival, weights: Weights) -> Decision:
        self.retries.reported(arrival.node_id)
        config = self.rule.config
        scale = (1.0 + arrival.staleness) ** -0.5 if config.staleness_scaling else 1.0
        self.buffer.append({k: v * scale for k, v in arrival.delta().items()})
        if len(self.buffer) < config.buffer_size:
            return Decision(dispatch=(arrival.node_id,))
        buffered, self.buffer = self.buffer, []
        robust, metrics = self.rule(buffered)
        new = apply_delta(weights, robust, config.server_lr)
        return Decision(weights=new, dispatch=(arrival.node_id,), metrics=metrics)

    def on_failure(self, node_id: int, reason: str, weights: Weights) -> Decision:
        return self.retries.lost(node_id, reason)


def build(rule: RobustRule, setup: ServerSetup) -> EventStrategy:
    """The plugin's scheduler for its configured ``scheduler``."""
    if rule.config.scheduler == "buffered":
        return RobustBuffer(rule)
    return SyncRounds(RobustRounds(rule, setup))


def _plugin(
    name: str,
    summary: str,
    config_model: type[RobustConfig],
    rule: Callable[[RobustConfig], RobustRule],
    paper: str,
) -> StrategyPlugin:
    def build_server(config: RobustConfig, setup: ServerSetup) -> EventStrategy:
        return build(rule(config), setup)

    return StrategyPlugin(
        name=name,
        summary=summary,
        config_model=config_model,
        build_server=build_server,
        paper=paper,
        tags=("sync", "robust"),
    )


median = _plugin(
    "robust-median",
    "Coordinate-wise median of the updates (Byzantine-robust; rounds or buffered).",
    MedianConfig,
    MedianRule,
    "https://arxiv.org/abs/1803.01498",
)
trimmed_mean_plugin = _plugin(
    "robust-trimmed-mean",
    "Coordinate-wise trimmed mean, f cut at each end (Byzantine-robust; rounds or buffered).",
    TrimmedMeanConfig,
    TrimmedMeanRule,
    "https://arxiv.org/abs/1803.01498",
)
krum = _plugin(
    "robust-krum",
    "Krum: the update closest to its n − f − 2 neighbours (Byzantine-robust).",
    KrumConfig,
    KrumRule,
    "https://papers.nips.cc/paper/6617",
)
multi_krum_plugin = _plugin(
    "robust-multi-krum",
    "Multi-Krum: the mean of the m best Krum-scored updates (Byzantine-robust).",
    MultiKrumConfig,
    KrumRule,
    "https://papers.nips.cc/paper/6617",
)
centered_clipping = _plugin(
    "centered-clipping",
    "Centered clipping around the previous aggregate (Byzantine-robust; rounds or buffered).",
    CenteredClippingConfig,
    CenteredClippingRule,
    "https://arxiv.org/abs/2012.10333",
)
