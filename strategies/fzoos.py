"""FZooS (Shu et al., ICML 2024): local steps on a trajectory-informed GP surrogate's gradient
with an adaptive correction towards the global surrogate.

Paper: https://arxiv.org/abs/2401.14213 ("Federated Zeroth-Order Optimization using
Trajectory-Informed Surrogate Gradients"); reference code shuyao95/FZooS (``optimizers.py``).

Every client uses the same m random Fourier features φ(θ) = √(2/m)·cos(Ωθ + b) of an RBF kernel
with lengthscale ℓ (Ω ~ N(0, ℓ⁻²), b ~ U[0, 2π), drawn from ``feature_seed``, d and m alone),
so a surrogate is a weight vector w and f̂(θ) = φ(θ)ᵀw (+ a constant), ∇f̂(θ) =
−√(2/m)·Ωᵀ(sin(Ωθ + b) ∘ w). Fitting is the GP posterior mean in weight space: on the n queries
nearest θ (values centred and scaled by their range), w = Φᵀ(ΦΦᵀ + σ²I)⁻¹y, back in the
objective's units.

Client i, from θ_0 = x^t, with its query history H_i (kept across rounds in the node's run
state), its own surrogate w_i sent last round and the global surrogate w̄ that arrived with the
model, for k < K:
- query f_i(θ_k) (k ≥ 1: and ``explore`` points uniform in the box θ_k ± r; round one, k = 0:
  ``init_queries`` such points instead), all added to H_i;
- fit w on the ``fit_queries`` points of H_i nearest θ_k; g = ∇f̂(θ_k);
- g += γ_k·(∇F̂(θ_k) − ∇f̂_i(θ_k)) = γ_k·∇φ(θ_k)ᵀ(w̄ − w_i), γ_k = γ/(k + 1) (the reference
  decays over the local steps);
- the local optimiser steps along g (Adam at ``training.lr`` by default, as in the paper).
Then it queries f_i(θ_K), fits its surrogate w_i at θ_K and sends it in the model's
``surrogate`` buffer beside x; the server's FedAvg averages both (example-weighted), so the next
round's w̄ is the mean of the clients' surrogates.

Departures from the reference code, on purpose:
- **No oracle on the true global objective.** The reference server rejects an aggregate when
  the true F (over every client's data) rose; a federated server cannot evaluate F, so this
  server always accepts the average.
- The local gradient comes from the same random-feature GP (refit each step) as the surrogate
  that is shared; the reference uses an exact Matérn GP with fitted hyper-parameters locally.
- The surrogate is fit at the end of local training on the points already queried, not at the
  next global model with 51 extra queries per client and round, which would need a second
  message per round; w̄ and w_i are thus one round old, and consistent with each other.
- Exploration points are uniform in the box, not chosen by the GP's gradient variance.
With one client, w̄ = w_i after the first round, so the correction vanishes for every γ.
A node that restarts (or joins late) starts with an empty history and no correction.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord
from flwr.serverapp.strategy import FedAvg
from pydantic import Field
from torch import nn

from florist.client.training import (
    RunningMetrics,
    TrainResult,
    TrainTask,
    round_seed,
    train_local,
)
from florist.client.workloads.blackbox import SURROGATE_BUFFER

from .base import ServerSetup, StrategyConfig, StrategyPlugin
from .zeroth_order import (
    LocalOptimizer,
    Oracle,
    ZerothOrderHooks,
    averaging_server,
    flat_parameters,
)

HISTORY_KEY = "fzoos.history"
OWN_KEY = "fzoos.surrogate"


class FZooSConfig(StrategyConfig):
    """FZooS's surrogate and correction; defaults from the paper and its reference code. The
    number of random features m is the size of the workload model's ``surrogate`` buffer (the
    black-box workloads' ``surrogate_features``, 1,000 by default)."""

    gamma: float = Field(
        default=1.0,
        ge=0,
        le=1e3,
        description="γ: the correction's weight at local step k is γ/(k + 1); 0 turns it off.",
    )
    lengthscale: float = Field(default=1.0, gt=0, le=1e6, description="RBF kernel lengthscale ℓ.")
    noise: float = Field(
        default=1e-6,
        gt=0,
        le=1e3,
        description="σ²: observation noise of the GP on values scaled to [0, 1].",
    )
    fit_queries: int = Field(
        default=150, ge=2, le=5000, description="Queries nearest θ the surrogate is fit on."
    )
    explore: int = Field(
        default=5, ge=0, le=1000, description="Extra queries around each new local iterate."
    )
    explore_radius: float = Field(
        default=0.01, gt=0, le=100, description="Half-width r of the box."
    )
    init_queries: int = Field(
        default=10, ge=0, le=1000, description="Queries around x^1 before the first step."
    )
    history: int = Field(
        default=1000, ge=2, le=100_000, description="Queries a node keeps (the most recent)."
    )
    feature_seed: int = Field(
        default=0, ge=0, lt=2**32, description="Seeds Ω and b, which every client shares."
    )
    local_optimizer: LocalOptimizer = Field(default="adam", description="adam (paper) or sgd.")


@lru_cache(maxsize=4)
def random_features(seed: int, d: int, m: int, lengthscale: float) -> tuple[np.ndarray, ...]:
    """(Ω, b) of m random Fourier features of the RBF kernel exp(−‖θ − θ'‖²/(2ℓ²)) on R^d."""
    rng = np.random.default_rng([seed, d, m, 0xF2005])
    omega = rng.standard_normal((m, d)) / lengthscale
    offset = rng.uniform(0.0, 2.0 * math.pi, size=m)
    omega.setflags(write=False)
    offset.setflags(write=False)
    return omega, offset


def feature_map(points: np.ndarray, omega: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """φ(θ) = √(2/m)·cos(Ωθ + b) for each row θ of ``points``."""
    return math.sqrt(2.0 / len(offset)) * np.cos(points @ omega.T + offset)


def fit_surrogate(
    points: np.ndarray, values: np.ndarray, omega: np.ndarray, offset: np.ndarray, noise: float
) -> np.ndarray:
    """The GP posterior mean's weights w on these queries (in the values' units)."""
    values = np.asarray(values, dtype=np.float64)
    scale = float(values.max() - values.min()) if len(values) else 0.0
    scale = scale if scale > 0 else 1.0
    centred = (values - values.mean()) / scale
    phi = feature_map(points, omega, offset)
    alpha = np.linalg.solve(phi @ phi.T + noise * np.eye(len(values)), centred)
    return (phi.T @ alpha) * scale


def surrogate_gradient(
    theta: np.ndarray, weights: np.ndarray, omega: np.ndarray, offset: np.ndarray
) -> np.ndarray:
    """∇(φ(θ)ᵀw) = −√(2/m)·Ωᵀ(sin(Ωθ + b) ∘ w)."""
    return -math.sqrt(2.0 / len(offset)) * (omega.T @ (np.sin(omega @ theta + offset) * weights))


def nearest(
    points: np.ndarray, values: np.ndarray, theta: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The k queries closest to θ (all of them if there are fewer)."""
    if len(points) <= k:
        return points, values
    order = np.argsort(np.linalg.norm(points - theta, axis=1), kind="stable")[:k]
    return points[order], values[order]


class FZooSHooks(ZerothOrderHooks):
    """FZooS's client half on the one local loop."""

    def __init__(self, config: FZooSConfig, seed: int) -> None:
        super().__init__()
        self.config = config
        self.optimizer_kind = config.local_optimizer
        self.rng = np.random.default_rng([seed, 0xF2005])
        self.points: list[np.ndarray] = []
        self.values: list[float] = []
        self.global_w = np.zeros(0)
        self.own_w: np.ndarray | None = None
        self.features: tuple[np.ndarray, ...] = ()
        self.correction_norm = 0.0

    def start(self, task: TrainTask[Any], model: nn.Module) -> None:
        super().start(task, model)
        buffers = dict(model.named_buffers())
        if SURROGATE_BUFFER not in buffers:
            raise ValueError(
                f"fzoos needs a model with a {SURROGATE_BUFFER!r} buffer (a black-box workload)"
            )
        self.global_w = buffers[SURROGATE_BUFFER].detach().cpu().double().numpy().copy()
        d = sum(p.numel() for p in self.params)
        self.features = random_features(
            self.config.feature_seed, d, len(self.global_w), self.config.lengthscale
        )
        history = task.state.array_records.get(HISTORY_KEY)
        if history is not None:
            stored = history.to_numpy_ndarrays()
            self.points, self.values = list(stored[0]), [float(v) for v in stored[1]]
        own = task.state.array_records.get(OWN_KEY)
        self.own_w = own.to_numpy_ndarrays()[0] if own is not None else None

    def _query(self, oracle: Oracle, theta: np.ndarray) -> tuple[float, torch.Tensor]:
        value, outputs = oracle.evaluate(theta)
        self.points.append(theta.copy())
        self.values.append(value)
        return value, outputs

    def _explore(self, oracle: Oracle, theta: np.ndarray, count: int) -> None:
        r = self.config.explore_radius
        for _ in range(count):
            self._query(oracle, theta + self.rng.uniform(-r, r, size=len(theta)))

    def fit(self, theta: np.ndarray) -> np.ndarray:
        """The surrogate's weights fit on the queries nearest θ."""
        points, values = nearest(
            np.asarray(self.points), np.asarray(self.values), theta, self.config.fit_queries
        )
        omega, offset = self.features
        return fit_surrogate(points, values, omega, offset, self.config.noise)

    def estimate(
        self, oracle: Oracle, theta: np.ndarray, step: int
    ) -> tuple[np.ndarray, float, torch.Tensor]:
        value, outputs = self._query(oracle, theta)
        if step == 0 and len(self.points) == 1:
            self._explore(oracle, theta, self.config.init_queries)
        elif step > 0:
            self._explore(oracle, theta, self.config.explore)
        omega, offset = self.features
        gradient = surrogate_gradient(theta, self.fit(theta), omega, offset)
        if self.own_w is not None and self.config.gamma > 0:
            gamma = self.config.gamma / (step + 1)
            correction = surrogate_gradient(theta, self.global_w - self.own_w, omega, offset)
            self.correction_norm = max(self.correction_norm, float(np.linalg.norm(correction)))
            gradient = gradient + gamma * correction
        return gradient, value, outputs

    def finish(
        self, task: TrainTask[Any], model: nn.Module, running: RunningMetrics
    ) -> dict[str, float]:
        if self.oracle is not None:
            theta = flat_parameters(self.params)
            self._query(self.oracle, theta)
            own = self.fit(theta)
            with torch.no_grad():
                model.get_buffer(SURROGATE_BUFFER).copy_(torch.from_numpy(own))
            keep = self.config.history
            task.state[HISTORY_KEY] = ArrayRecord(
                [np.asarray(self.points[-keep:]), np.asarray(self.values[-keep:])]
            )
            task.state[OWN_KEY] = ArrayRecord([own])
        return super().finish(task, model, running) | {
            "fzoos-history": float(min(len(self.points), self.config.history)),
            "fzoos-correction-norm": self.correction_norm,
        }


def train(task: TrainTask[FZooSConfig]) -> TrainResult:
    """K FZooS steps from the global model; the model goes back with this node's surrogate."""
    return train_local(task, FZooSHooks(task.config, round_seed(task)))


def build_server(config: FZooSConfig, setup: ServerSetup) -> FedAvg:
    return averaging_server(setup)


def check_model(model: nn.Module) -> str | None:
    """Why FZooS cannot run on this workload's model, or None."""
    if SURROGATE_BUFFER not in dict(model.named_buffers()):
        return (
            f"fzoos sends its surrogate in the model's {SURROGATE_BUFFER!r} buffer: choose a "
            "black-box workload (quadratic, attack-digits, metric-digits)"
        )
    return None


plugin = StrategyPlugin(
    name="fzoos",
    summary="FZooS: local steps on a random-feature GP surrogate of the query history plus a "
    "correction towards the averaged global surrogate; FedAvg of models and surrogates.",
    config_model=FZooSConfig,
    build_server=build_server,
    train=train,
    model_check=check_model,
    paper="https://arxiv.org/abs/2401.14213",
    tags=("sync", "zeroth-order"),
)
