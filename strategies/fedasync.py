"""FedAsync (Xie, Koyejo, Gupta, 2019): the server mixes in every update as it arrives,
weighted down by its staleness.

Server update on each arrival from client i, trained from version τ while the server is at t:
x ← (1 − α_t)·x + α_t·x_i with α_t = α·s(t − τ). Staleness functions (the paper's):
constant s = 1; polynomial s(τ) = (τ + 1)^(−a); hinge s(τ) = 1 if τ ≤ b else 1 / (a·(τ − b) + 1).
https://arxiv.org/abs/1903.03934

Defaults follow the paper's experiments as ../shared/papers/ALGORITHMS.md records them: α = 0.6
(of α ∈ {0.6, 0.8, 0.9}), polynomial a = 0.5, hinge a = 10 and b = 4. ``a`` left unset takes the
value of the chosen family, so switching to the hinge gives the paper's hinge, not a = 0.5.

Option beyond the paper: ``client_weighting`` multiplies α_t by a per-client weight w_i that undoes
the bias toward fast clients (Fraboni et al., JMLR 2023; see ``client_weights.py``), with α_t
capped at 1 so that the update stays a mix of the two models. Its default, ``none``, is the paper.

Client half: local SGD; with ``rho`` > 0 the worker minimises f_i(x) + (ρ/2)·‖x − x_τ‖², the
paper's proximal term toward the model it was sent (FedProx's hook on the one local loop). Its
default, 0, is plain local SGD, as before the option existed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import Field

from florist.client.training import TrainResult, TrainTask, train_local, train_sgd

from .base import ServerSetup, StrategyPlugin
from .client_weights import CLIENT_WEIGHTING_DOC, ArrivalWeights, ClientWeighting
from .events import Arrival, Decision, EventStrategy, Retries, RetryingConfig, Weights, mix
from .fedprox import ProximalTerm

Staleness = Literal["constant", "polynomial", "hinge"]

# The paper's a for each family with a parameter (Xie et al. 2019, experiments section, as
# ALGORITHMS.md records them): one shared default would give one family the other's value.
PAPER_A: dict[Staleness, float] = {"constant": 0.0, "polynomial": 0.5, "hinge": 10.0}


class FedAsyncConfig(RetryingConfig):
    """FedAsync's server settings; the defaults are the paper's (see the module docstring)."""

    alpha: float = Field(default=0.6, gt=0, le=1, description="Mixing weight α (paper: 0.6).")
    staleness: Staleness = Field(default="polynomial", description="How α decays with staleness.")
    a: float | None = Field(
        default=None,
        ge=0,
        description="Exponent a of the polynomial s(τ) = (τ+1)^(−a), or slope a of the hinge "
        "s(τ) = 1/(a·(τ−b)+1). Unset: the paper's value for the family, 0.5 (polynomial) or 10 "
        "(hinge).",
    )
    b: int = Field(
        default=4, ge=0, description="Hinge: staleness tolerated at full weight (paper: 4)."
    )
    client_weighting: ClientWeighting = Field(
        default="none",
        description=CLIENT_WEIGHTING_DOC + " FedAsync uses α_t = min(1, α·s(τ)·w_i).",
    )
    rho: float = Field(
        default=0.0,
        ge=0,
        le=100,
        allow_inf_nan=False,
        description="The worker's proximal term ρ/2·‖x − x_τ‖² toward the model it was sent "
        "(Xie et al.; their experiments use about 0.005 to 0.01). 0: plain local SGD.",
    )

    @property
    def staleness_a(self) -> float:
        """a as used: the configured value, else the paper's for the chosen family."""
        return PAPER_A[self.staleness] if self.a is None else self.a


def staleness_factor(config: FedAsyncConfig, staleness: int) -> float:
    """s(τ) of the configured family; s(0) = 1 for all of them."""
    if config.staleness == "constant":
        return 1.0
    a = config.staleness_a
    if config.staleness == "polynomial":
        return float((staleness + 1) ** (-a))
    if staleness <= config.b:
        return 1.0
    return 1.0 / (a * (staleness - config.b) + 1.0)


class FedAsync(EventStrategy):
    """Server half: x ← (1 − α_t)·x + α_t·x_i on every arrival, α_t = min(1, α·s(τ)·w_i)."""

    def __init__(self, config: FedAsyncConfig) -> None:
        self.config = config
        self.retries = Retries(config.max_failures)
        self.client_weights = ArrivalWeights(config.client_weighting)

    @property
    def needs_all_updates(self) -> bool:
        return False  # each update is mixed in as it arrives; none is kept

    def begin(self, nodes: Sequence[int], weights: Weights) -> Decision:
        return Decision(dispatch=tuple(nodes))

    def mixing_weight(self, arrival: Arrival) -> float:
        """α_t for this arrival; records the arrival for the client weights."""
        w = self.client_weights.weigh(arrival.node_id, arrival.num_examples)
        # Capped at 1: beyond it the server would step past the client's model, away from x.
        return min(1.0, self.config.alpha * staleness_factor(self.config, arrival.staleness) * w)

    def on_arrival(self, arrival: Arrival, weights: Weights) -> Decision:
        self.retries.reported(arrival.node_id)
        alpha = self.mixing_weight(arrival)
        # The arriving node gets the new model at once: no one waits for anyone.
        return Decision(weights=mix(weights, arrival.weights, alpha), dispatch=(arrival.node_id,))

    def on_failure(self, node_id: int, reason: str, weights: Weights) -> Decision:
        return self.retries.lost(node_id, reason)


def build_server(config: FedAsyncConfig, setup: ServerSetup) -> FedAsync:
    return FedAsync(config)


def train(task: TrainTask[FedAsyncConfig]) -> TrainResult:
    """Local SGD, with the proximal term toward the model sent when ``rho`` > 0."""
    rho = task.config.rho
    return train_local(task, ProximalTerm(rho)) if rho > 0 else train_sgd(task)


plugin = StrategyPlugin(
    name="fedasync",
    summary="FedAsync: mix each update into the global model as it arrives, by staleness.",
    config_model=FedAsyncConfig,
    build_server=build_server,
    train=train,
    paper="https://arxiv.org/abs/1903.03934",
    tags=("async",),
)
