"""FedAsync (Xie, Koyejo, Gupta, 2019): the server mixes in every update as it arrives,
weighted down by its staleness. Client half: plain local SGD.

Server update on each arrival from client i, trained from version τ while the server is at t:
x ← (1 − α_t)·x + α_t·x_i with α_t = α·s(t − τ). Staleness functions (the paper's):
constant s = 1; polynomial s(τ) = (τ + 1)^(−a); hinge s(τ) = 1 if τ ≤ b else 1 / (a·(τ − b) + 1).
https://arxiv.org/abs/1903.03934
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import Field

from .base import ServerSetup, StrategyConfig, StrategyPlugin
from .events import Arrival, Decision, EventStrategy, Retries, Weights, mix


class FedAsyncConfig(StrategyConfig):
    alpha: float = Field(default=0.6, gt=0, le=1, description="Mixing weight α (paper: 0.6).")
    staleness: Literal["constant", "polynomial", "hinge"] = Field(
        default="polynomial", description="How α decays with staleness."
    )
    a: float = Field(default=0.5, ge=0, description="Exponent (polynomial) or slope (hinge).")
    b: int = Field(default=4, ge=0, description="Hinge: staleness tolerated at full weight.")
    max_failures: int = Field(
        default=5,
        ge=0,
        le=10_000,
        description="Lost tasks in a row after which a node gets no more work (0: never).",
    )


def staleness_factor(config: FedAsyncConfig, staleness: int) -> float:
    """s(τ) of the configured family; s(0) = 1 for all of them."""
    if config.staleness == "constant":
        return 1.0
    if config.staleness == "polynomial":
        return float((staleness + 1) ** (-config.a))
    if staleness <= config.b:
        return 1.0
    return 1.0 / (config.a * (staleness - config.b) + 1.0)


class FedAsync(EventStrategy):
    def __init__(self, config: FedAsyncConfig) -> None:
        self.config = config
        self.retries = Retries(config.max_failures)

    def begin(self, nodes: Sequence[int], weights: Weights) -> Decision:
        return Decision(dispatch=tuple(nodes))

    def on_arrival(self, arrival: Arrival, weights: Weights) -> Decision:
        self.retries.reported(arrival.node_id)
        alpha = self.config.alpha * staleness_factor(self.config, arrival.staleness)
        # The arriving node gets the new model at once: no one waits for anyone.
        return Decision(weights=mix(weights, arrival.weights, alpha), dispatch=(arrival.node_id,))

    def on_failure(self, node_id: int, reason: str, weights: Weights) -> Decision:
        return self.retries.lost(node_id, reason)


def build_server(config: FedAsyncConfig, setup: ServerSetup) -> FedAsync:
    return FedAsync(config)


plugin = StrategyPlugin(
    name="fedasync",
    summary="FedAsync: mix each update into the global model as it arrives, by staleness.",
    config_model=FedAsyncConfig,
    build_server=build_server,
    paper="https://arxiv.org/abs/1903.03934",
    tags=("async",),
)
