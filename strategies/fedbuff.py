"""FedBuff (Nguyen et al., AISTATS 2022): buffered asynchronous aggregation. Client half: local SGD.

Each arriving update Δ_i = x_i − x_sent(i) goes into a buffer; when K updates are in, the server
applies x ← x + η_g·(1/K)·Σ Δ_i (optionally each Δ_i scaled by 1/√(1 + staleness), as the paper's
experiments do) and empties the buffer. Every node gets new work as soon as it reports.
https://arxiv.org/abs/2106.06639

Δ_i is always taken against the model client i was sent, never the current global model: the
server may have moved since, and x_i − x would pull it back toward x_sent(i).

Option beyond the paper: ``client_weighting`` scales each Δ_i by a per-client weight w_i that
undoes the bias toward fast clients (Fraboni et al., JMLR 2023, FedBuff-c with d_i = p_i / arrival
frequency; see ``client_weights.py``). The sum is still divided by K, not by Σ w_i: the weights are
right on average over arrivals, as in Fraboni et al., and renormalising each buffer would undo
them. Its default, ``none``, is the paper's 1/K.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import Field

from .base import ServerSetup, StrategyPlugin
from .client_weights import CLIENT_WEIGHTING_DOC, ArrivalWeights, ClientWeighting
from .events import (
    Arrival,
    Decision,
    EventStrategy,
    Retries,
    RetryingConfig,
    Weights,
    apply_delta,
)
from .streaming import RunningSum


class FedBuffConfig(RetryingConfig):
    """FedBuff's server settings; the defaults are the paper's rule with a small buffer."""

    buffer_size: int = Field(default=3, ge=1, description="K: updates per aggregation.")
    server_lr: float = Field(default=1.0, gt=0, description="η_g, the server learning rate.")
    staleness_scaling: bool = Field(
        default=True, description="Scale each update by 1/√(1 + staleness) (the paper's runs)."
    )
    client_weighting: ClientWeighting = Field(
        default="none",
        description=CLIENT_WEIGHTING_DOC
        + " FedBuff applies x ← x + η_g·(1/K)·Σ w_i·s(τ_i)·Δ_i over the buffer.",
    )


class FedBuff(EventStrategy):
    """Server half: sum w_i·s(τ_i)·Δ_i as they arrive; every K arrivals x ← x + η_g·(1/K)·Σ.

    The buffer is a running sum (strategies/streaming.py), not a list of K deltas: one model's
    memory whatever K, and part of the state a resume point saves.
    """

    def __init__(self, config: FedBuffConfig) -> None:
        self.config = config
        self.buffer = RunningSum()
        self.retries = Retries(config.max_failures)
        self.client_weights = ArrivalWeights(config.client_weighting)

    @property
    def needs_all_updates(self) -> bool:
        return False

    def begin(self, nodes: Sequence[int], weights: Weights) -> Decision:
        return Decision(dispatch=tuple(nodes))

    def on_arrival(self, arrival: Arrival, weights: Weights) -> Decision:
        self.retries.reported(arrival.node_id)
        scale = (1.0 + arrival.staleness) ** -0.5 if self.config.staleness_scaling else 1.0
        scale *= self.client_weights.weigh(arrival.node_id, arrival.num_examples)
        # Σ scale_i·Δ_i, divided by K (the count, not Σ scale_i: see the module docstring).
        self.buffer.add(arrival.weights, scale, minus=arrival.sent_weights)
        if self.buffer.count < self.config.buffer_size:
            return Decision(dispatch=(arrival.node_id,))
        mean_delta = self.buffer.mean(divide_by=self.buffer.count)
        new = apply_delta(weights, mean_delta, self.config.server_lr)
        return Decision(weights=new, dispatch=(arrival.node_id,))

    def on_failure(self, node_id: int, reason: str, weights: Weights) -> Decision:
        return self.retries.lost(node_id, reason)


def build_server(config: FedBuffConfig, setup: ServerSetup) -> FedBuff:
    return FedBuff(config)


plugin = StrategyPlugin(
    name="fedbuff",
    summary="FedBuff: aggregate every K asynchronous updates from a buffer.",
    config_model=FedBuffConfig,
    build_server=build_server,
    paper="https://arxiv.org/abs/2106.06639",
    tags=("async",),
)
