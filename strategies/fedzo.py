"""FedZO (Fang et al., 2022): local steps on forward-difference gradient estimates, then FedAvg.

Paper: https://arxiv.org/abs/2201.09452 ("Communication-Efficient Stochastic Zeroth-Order
Optimization for Federated Learning"); the variant here is the baseline of FZooS (Shu et al.,
ICML 2024, https://arxiv.org/abs/2401.14213), whose estimator orthogonalises its directions.

Client i, from θ_0 = x^t, for k < K local steps (K = ``training.local_steps``, or the usual
epochs × batches of its partition): draw q Gaussian directions, orthonormalise them
(u_1 … u_q, q ≤ d; for q > d independent orthonormal blocks), query f_i(θ_k) and
f_i(θ_k + μ·u_j), and step along

    ĝ = (d / q) · Σ_j (f_i(θ_k + μ·u_j) − f_i(θ_k)) / μ · u_j,

an unbiased estimate of the gradient of f_i smoothed over the sphere of radius μ (with q = d it
is the exact directional-derivative expansion in a full orthonormal basis, up to O(μ)). Each
step costs q + 1 queries. The server is FedAvg of the models (example-weighted).

Choices: f_i is the workload's loss on the node's whole partition (a deterministic black box,
as in the FZooS experiments; no minibatches); the local step is plain SGD θ − η·ĝ at
``training.lr`` (``local_optimizer = "adam"``: Adam, as the FZooS reference runs every method);
directions are drawn from a stream seeded per node, round and repeat (datasets/seeds.py).
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.serverapp.strategy import FedAvg
from pydantic import Field

from florist.client.training import TrainResult, TrainTask, round_seed, train_local

from .base import ServerSetup, StrategyConfig, StrategyPlugin
from .zeroth_order import LocalOptimizer, Oracle, ZerothOrderHooks, averaging_server


class FedZOConfig(StrategyConfig):
    """FedZO's estimator; defaults from the FZooS paper's experiments (μ = 0.01, q = 20)."""

    q: int = Field(default=20, ge=1, le=10_000, description="Directions per local step.")
    mu: float = Field(default=0.01, gt=0, le=10, description="Smoothing radius μ.")
    local_optimizer: LocalOptimizer = Field(
        default="sgd", description="sgd: θ − lr·ĝ (the paper's step); adam: Adam at lr."
    )


def orthogonal_directions(rng: np.random.Generator, d: int, q: int) -> np.ndarray:
    """q unit directions in R^d (rows), orthonormal within each block of at most d: Gaussian
    draws through a QR decomposition (sign-corrected, so the block is Haar-distributed)."""
    blocks = []
    left = q
    while left > 0:
        k = min(left, d)
        basis, r = np.linalg.qr(rng.standard_normal((d, k)))
        signs = np.sign(np.diag(r))
        signs[signs == 0] = 1.0
        blocks.append((basis * signs).T)
        left -= k
    return np.concatenate(blocks)


def forward_difference_gradient(
    values: np.ndarray, base: float, directions: np.ndarray, mu: float
) -> np.ndarray:
    """(d/q)·Σ_j (f(θ + μ·u_j) − f(θ)) / μ · u_j from the q values f(θ + μ·u_j)."""
    q, d = directions.shape
    slopes = (np.asarray(values, dtype=np.float64) - base) / mu
    return (d / q) * (slopes @ directions)


def estimate_gradient(
    f: Oracle, theta: np.ndarray, rng: np.random.Generator, q: int, mu: float
) -> tuple[np.ndarray, float, torch.Tensor]:
    """One FedZO estimate at θ: q + 1 queries of ``f``."""
    base, outputs = f.evaluate(theta)
    directions = orthogonal_directions(rng, len(theta), q)
    values = np.array([f(theta + mu * u) for u in directions])
    return forward_difference_gradient(values, base, directions, mu), base, outputs


class FedZOHooks(ZerothOrderHooks):
    """FedZO's client half on the one local loop."""

    def __init__(self, config: FedZOConfig, seed: int) -> None:
        super().__init__()
        self.config = config
        self.optimizer_kind = config.local_optimizer
        self.rng = np.random.default_rng([seed, 0xF20])

    def estimate(
        self, oracle: Oracle, theta: np.ndarray, step: int
    ) -> tuple[np.ndarray, float, torch.Tensor]:
        return estimate_gradient(oracle, theta, self.rng, self.config.q, self.config.mu)


def train(task: TrainTask[FedZOConfig]) -> TrainResult:
    """K FedZO steps from the global model on the node's black box."""
    return train_local(task, FedZOHooks(task.config, round_seed(task)))


def build_server(config: FedZOConfig, setup: ServerSetup) -> FedAvg:
    return averaging_server(setup)


plugin = StrategyPlugin(
    name="fedzo",
    summary="FedZO: local steps on forward-difference estimates along q orthonormal Gaussian "
    "directions (q + 1 queries per step), FedAvg of the models.",
    config_model=FedZOConfig,
    build_server=build_server,
    train=train,
    paper="https://arxiv.org/abs/2201.09452",
    tags=("sync", "zeroth-order"),
)
