"""The scheduler interface of Florist's one server loop: react to each event, decide what to send.

Every plugin's server half is an :class:`EventStrategy` (a scheduler: whom to send work, when to
aggregate) driving pure aggregation maths on numpy weights; Florist's one loop
(server/runtime/loop.py) does the I/O. Synchronous rounds are the scheduler in strategies/rounds.py;
Flower's own strategies plug into it through strategies/flower_adapter.py.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from .base import StrategyConfig

Weights = dict[str, np.ndarray]
# What a task may carry besides the experiment's settings (e.g. FedProx's ``proximal-mu``):
# ConfigRecord scalars, kebab-case keys.
ConfigValue = int | float | str | bool
NodeConfig = Mapping[str, ConfigValue]


class DropoutPolicy(BaseModel):
    """What a synchronous round does about nodes that are slow or gone (ExperimentSpec.dropout).

    The defaults keep plain FedAvg: sample k nodes, wait for all of them (a lost task counts as
    reported; a silent one is given up after ``round_timeout_s``), aggregate what arrived.
    k is the round's target size (``clients.min`` / ``clients.fraction_train``, Flower's rule).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    deadline_s: float | None = Field(
        default=None,
        gt=0,
        allow_inf_nan=False,
        description="Seconds on the experiment's clock (wall, or virtual) after a round's "
        "dispatch at which it aggregates what arrived, if the quorum is met. None: wait for all.",
    )
    quorum: float = Field(
        default=1.0,
        gt=0,
        le=1,
        description="Share of the round's k nodes whose updates are needed to aggregate before "
        "all have reported (at the deadline).",
    )
    on_short: Literal["wait", "skip"] = Field(
        default="wait",
        description="Below quorum: wait (keep waiting until the quorum is met or nothing more can "
        "come, then aggregate what arrived) or skip (end the round without a new model and "
        "sample it again).",
    )
    max_skips: int = Field(
        default=10,
        ge=0,
        le=10_000,
        description="Consecutive skipped attempts of one round before the run fails.",
    )
    over_commit: float = Field(
        default=0.0,
        ge=0,
        le=10,
        allow_inf_nan=False,
        description="Dispatch to ⌈k·(1 + over_commit)⌉ nodes (at most all) and aggregate the "
        "first k updates.",
    )
    late_updates: Literal["drop", "stale"] = Field(
        default="drop",
        description="An update that arrives after its round closed: drop (recorded as rejected, "
        "reason 'late …') or stale (aggregated with the next round as its delta on the current "
        "model, weighted by examples·(1 + staleness)^-½).",
    )

    @property
    def is_default(self) -> bool:
        return self == DropoutPolicy()


class DropoutPolicyError(ValueError):
    """The experiment's dropout policy cannot be honoured by its strategy."""


@dataclass(frozen=True)
class Arrival:
    """One sound update, as the server sees it when it arrives."""

    node_id: int
    weights: Weights  # the client's model after local training
    sent_weights: Weights  # the global model it started from
    sent_version: int  # that model's version
    version: int  # the global version now; staleness = version - sent_version
    # Its weight in an example-weighted mean: the reply's example count (a late update kept for
    # a later round may enter discounted, see ``discount_stale``).
    num_examples: float
    local_steps: int
    metrics: Mapping[str, float]
    duration_s: float  # on the experiment's clock
    # When it arrived: seconds since the run began on the experiment's clock (virtual seconds,
    # or wall seconds); schedulers that plan in time (FedCompass) read it.
    arrived_at: float = 0.0

    @property
    def staleness(self) -> int:
        return self.version - self.sent_version

    def delta(self) -> Weights:
        """x_i − x_sent(i): the update against the model the client started from."""
        return {k: self.weights[k] - self.sent_weights[k] for k in self.weights}


@dataclass(frozen=True)
class Evaluation:
    """One node's federated-evaluation reply: its metrics on its own held-out shard."""

    node_id: int
    num_examples: float
    metrics: Mapping[str, float]


@dataclass(frozen=True)
class Note:
    """A decision worth recording (an ``events`` row of this kind), e.g. a policy's choice."""

    message: str
    data: Mapping[str, Any] = field(default_factory=dict)
    kind: str = "policy"


@dataclass(frozen=True)
class Decision:
    """What the strategy wants after an event: a new global model (or None), and tasks to send.

    ``dispatch`` lists nodes to send the (new) global model to now; ``local_steps`` may set
    their local steps (None: the experiment's training settings); ``config`` adds entries to a
    node's task (e.g. a Flower strategy's ``proximal-mu``). ``refused`` names nodes whose
    latest update since the last aggregation stays out of the aggregate, with the reason it is
    recorded under (status rejected). ``wake_in`` asks for :meth:`EventStrategy.on_tick` that
    many seconds from now on the experiment's clock (it replaces any earlier request; None leaves
    it). ``notes`` are recorded as events; ``metrics`` are the aggregation's own train metrics,
    recorded with the new model's round.
    """

    weights: Weights | None = None
    dispatch: tuple[int, ...] = ()
    local_steps: Mapping[int, int] = field(default_factory=dict)
    config: Mapping[int, NodeConfig] = field(default_factory=dict)
    refused: Mapping[int, str] = field(default_factory=dict)
    wake_in: float | None = None
    notes: tuple[Note, ...] = ()
    metrics: Mapping[str, float] = field(default_factory=dict)


class EventStrategy(ABC):
    """Server half of an algorithm that acts on one update at a time.

    The runtime calls :meth:`begin` once with the nodes taking part, then :meth:`on_arrival` for
    each sound update and :meth:`on_failure` for each lost task, in arrival order on the
    experiment's clock (virtual arrival time on the virtual clock). Each node has at most one
    task in flight; the runtime drops dispatches to busy nodes. A decision's ``wake_in`` sets a
    timer: :meth:`on_tick` runs when it comes due, ordered with the arrivals on the clock.
    """

    @property
    def needs_all_updates(self) -> bool:
        """True when aggregating holds every update's arrays until the aggregation (a median,
        Krum, a buffer kept as a list); False when each update is folded into a running sum as
        it arrives (strategies/streaming.py), so the server holds one model's worth of sums
        whatever the number of clients. Default: True, the safe claim."""
        return True

    def use_dropout_policy(self, policy: DropoutPolicy) -> None:
        """Adopt the experiment's dropout policy. Default: only the default policy applies."""
        if not policy.is_default:
            raise DropoutPolicyError(
                f"{type(self).__name__} has no synchronous rounds: a dropout policy other than "
                "the default does not apply to it"
            )

    def begin(self, nodes: Sequence[int], weights: Weights) -> Decision:
        """Start: by default every node gets the initial model."""
        return Decision(dispatch=tuple(nodes))

    @abstractmethod
    def on_arrival(self, arrival: Arrival, weights: Weights) -> Decision:
        """React to a sound update; ``weights`` is the current global model."""

    def on_failure(self, node_id: int, reason: str, weights: Weights) -> Decision:
        """A task was lost (error reply, deadline, dropout) or its update refused as malformed.

        Default: send that node work again, and say so in a ``policy`` note.
        """
        return Decision(dispatch=(node_id,), notes=(_resent(node_id, reason, None),))

    def on_tick(self, now: float, weights: Weights) -> Decision:
        """The timer a decision asked for came due; ``now`` is on the experiment's clock."""
        return Decision()

    def on_nodes_joined(self, nodes: Sequence[int], weights: Weights) -> Decision:
        """SuperNodes connected after :meth:`begin`. Default: each gets work at once."""
        return Decision(dispatch=tuple(nodes))

    def configure_evaluate(
        self, version: int, weights: Weights, idle: Sequence[int]
    ) -> Mapping[int, NodeConfig]:
        """Federated evaluation of a new global model: which of the ``idle`` nodes evaluate it
        (with any extra task config). The loop asks after every aggregation. Default: none."""
        return {}

    def aggregate_evaluate(self, version: int, results: Sequence[Evaluation]) -> dict[str, float]:
        """The round's federated-evaluation metrics from the nodes' replies. Default: none."""
        return {}


class RetryingConfig(StrategyConfig):
    """The config field of a strategy that re-sends lost tasks (:class:`Retries`)."""

    max_failures: int = Field(
        default=5,
        ge=0,
        le=10_000,
        description="Lost tasks in a row after which a node gets no more work (0: never).",
    )


class Retries:
    """What an asynchronous strategy does about a node's lost task: send it work again, and give
    the node up after ``limit`` losses in a row (0: never), since a node that is gone fails each
    new task at once. Every decision comes with a ``policy`` note naming the node.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_a_row: Counter[int] = Counter()
        self.given_up: set[int] = set()

    def reported(self, node_id: int) -> None:
        """A sound update from the node: its losses are no longer in a row."""
        self.in_a_row.pop(node_id, None)

    def lost(self, node_id: int, reason: str) -> Decision:
        self.in_a_row[node_id] += 1
        count = self.in_a_row[node_id]
        if self.limit and count >= self.limit:
            self.given_up.add(node_id)
            data = _failure_data(node_id, reason, count) | {"action": "given-up"}
            message = (
                f"node {node_id} given up after {count} lost tasks in a row ({reason}): "
                "it gets no more work"
            )
            return Decision(notes=(Note(message, data),))
        return Decision(dispatch=(node_id,), notes=(_resent(node_id, reason, count),))


def _failure_data(node_id: int, reason: str, in_a_row: int | None) -> dict[str, Any]:
    data: dict[str, Any] = {"node_id": node_id, "reason": reason}
    if in_a_row is not None:
        data["failures_in_a_row"] = in_a_row
    return data


def _resent(node_id: int, reason: str, in_a_row: int | None) -> Note:
    data = _failure_data(node_id, reason, in_a_row) | {"action": "re-sent"}
    return Note(f"node {node_id} lost its task ({reason}): work sent again", data)


def weighted_mean(models: Sequence[Weights], weights: Sequence[float]) -> Weights:
    """Σ w_i·x_i / Σ w_i, accumulated in the given order (so callers fix the order)."""
    total = float(sum(weights))
    out: Weights = {}
    for model, w in zip(models, weights, strict=True):
        factor = w / total
        for key, value in model.items():
            if key in out:
                out[key] += value * factor
            else:
                out[key] = value * factor
    return out


def mix(current: Weights, incoming: Weights, alpha: float) -> Weights:
    """(1 − α)·x + α·x_i, FedAsync's server update."""
    return {k: (1.0 - alpha) * current[k] + alpha * incoming[k] for k in current}


def apply_delta(current: Weights, delta: Weights, scale: float) -> Weights:
    """x + η·Δ, keeping each array's dtype."""
    return {k: (current[k] + scale * delta[k]).astype(current[k].dtype) for k in current}


def discount_stale(current: Weights, late: Arrival) -> Arrival:
    """A late update as a fresh one for the current round: x + Δ_i (its delta applied to the
    current model) weighted by n_i·(1 + τ_i)^-½, FedAsync's polynomial staleness with a = ½."""
    moved = {k: (current[k] + d).astype(current[k].dtype) for k, d in late.delta().items()}
    return replace(
        late,
        weights=moved,
        sent_weights=current,
        num_examples=late.num_examples * (1.0 + late.staleness) ** -0.5,
    )


def average_with_stale(
    current: Weights, fresh: Sequence[Arrival], stale: Sequence[Arrival] = ()
) -> Weights:
    """Example-weighted mean of a round's fresh models in the given order, plus late ones
    (:func:`discount_stale`). Without late updates this is ``weighted_mean`` of the fresh models.
    """
    updates = [*fresh, *(discount_stale(current, a) for a in stale)]
    return weighted_mean([a.weights for a in updates], [a.num_examples for a in updates])
