"""Black-box workloads for zeroth-order strategies: a client can only query f_i(x) at a point x.

Each task is a workload like any other, so every strategy, checkpoint, download and reply check
works on it. Its "model" is a :class:`QueryPoint`: the point ``x`` being optimised (the one
trainable parameter) and a ``surrogate`` buffer, room for a strategy's surrogate weights that
travel and are averaged with ``x`` (FZooS's random-feature weights; zeros otherwise). A node's
data define its local objective: ``f_i(x) = loss(model(data.x), data.y)`` on its whole
partition. The server's *test* split is the union of every client's data, so the centralized
``objective`` metric of a round is the federated objective F(x) itself (example-weighted, i.e.
the mean over the clients when they hold equally much); the *validation* split, where there is
one, is data no client queries.

- ``quadratic``: f_i(x) = ½ (x − c_i)ᵀ A_i (x − c_i), A_i = Q diag(λ ∘ s_i) Qᵀ. λ spans
  [1/κ, 1] (κ = ``condition_number``); the clients' curvature weights s_i average to one, so
  the mean of the A_i has condition number exactly κ; ``heterogeneity`` h ∈ [0, 1] moves the
  curvature from shared (h = 0) to spread over the clients by a Dirichlet draw (h = 1) and
  spreads the minimisers c_i = h·z_i. Stored as least squares: rows M_i = √d·diag(√(λ∘s_i))·Qᵀ
  and targets M_i·c_i, so that f_i = ½·mean((M_i x − v_i)²).
- ``attack-digits``: a universal adversarial perturbation. A small MLP classifier is trained
  deterministically on half of scikit-learn's digits at first use (cached in the process); the
  clients hold different held-out images of one class, correctly classified; the perturbation
  is ε·tanh(x) (so it stays in the L∞ ball) and f_i is the mean margin
  z_y − max_{j≠y} z_j of the classifier on the perturbed images, clipped to [0, 1] (below zero:
  misclassified).
- ``metric-digits``: a thresholded linear classifier (w, b) for "digit == positive_class" on
  each client's partition of digits; f_i = 1 − F1 of [w·a + b > 0] (accuracy is reported too).
  Piecewise constant: its gradient is zero almost everywhere, and first-order strategies see
  exactly that.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Self

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import nn

from florist.datasets import XY, DigitsSpec, IidPartitioner, PartitionerSpec, load_partition
from florist.datasets import load_test as load_dataset_test

from . import ClientData, WorkloadConfig, WorkloadDataError, WorkloadPlugin

# The name of the buffer strategies keep their surrogate weights in (FZooS).
SURROGATE_BUFFER = "surrogate"
OBJECTIVE = "objective"


class BlackBoxConfig(WorkloadConfig):
    """What every black-box task shares: the federation's size and the surrogate's room."""

    num_clients: int = Field(
        default=5,
        ge=1,
        le=1000,
        description="Number of local objectives; each SuperNode must run with num-partitions "
        "equal to it (its partition-id picks its objective).",
    )
    seed: int = Field(default=0, ge=0, lt=2**32, description="Seeds the task's construction.")
    surrogate_features: int = Field(
        default=1000,
        ge=1,
        le=100_000,
        description="Size of the model's surrogate buffer: FZooS's number of random Fourier "
        "features (the paper uses 1,000-10,000). Other strategies leave it at zero.",
    )


class QueryPoint(nn.Module):
    """The point x of a black-box task (float64) and the surrogate buffer sent along with it."""

    def __init__(self, x: torch.Tensor, surrogate_features: int) -> None:
        super().__init__()
        self.x = nn.Parameter(x.to(torch.float64))
        self.register_buffer(SURROGATE_BUFFER, torch.zeros(surrogate_features, dtype=torch.float64))


def _check_partition(name: str, client: ClientData, config: BlackBoxConfig) -> int:
    pid, num = client.require_partition(name)
    if num != config.num_clients:
        raise WorkloadDataError(
            f"workload {name!r} has num_clients={config.num_clients} objectives, but this node "
            f"runs with num-partitions={num}: start the SuperNodes with num-partitions="
            f"{config.num_clients}, or set the workload's num_clients"
        )
    return pid


def _union(parts: list[XY]) -> XY:
    return XY(x=np.concatenate([p.x for p in parts]), y=np.concatenate([p.y for p in parts]))


# --- quadratic -----------------------------------------------------------------------------


class QuadraticConfig(BlackBoxConfig):
    """A heterogeneous quadratic; the defaults are the FZooS paper's d = 300 and 5 clients."""

    dimension: int = Field(default=300, ge=1, le=5000, description="d, the length of x.")
    condition_number: float = Field(
        default=10.0, ge=1, le=1e8, description="κ of the global objective's Hessian."
    )
    heterogeneity: float = Field(
        default=0.5,
        ge=0,
        le=1,
        description="0: every client holds the same quadratic; 1: curvature split across the "
        "clients by a Dirichlet draw, minimisers spread with unit variance per coordinate.",
    )
    init_scale: float = Field(
        default=1.0, ge=0, le=1e3, description="x starts at init_scale·N(0, I)."
    )


class QuadraticModel(QueryPoint):
    """Residuals M x − v of each row [M | v]: the loss ½·mean(r²) is the client's f_i."""

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        rows = rows.to(torch.float64)
        return rows[:, :-1] @ self.x - rows[:, -1]


@lru_cache(maxsize=8)
def quadratic_rows(config: QuadraticConfig) -> tuple[np.ndarray, ...]:
    """Each client's rows [M_i | M_i c_i] (d × (d + 1), float64), from the config's seed."""
    d, n = config.dimension, config.num_clients
    rng = np.random.default_rng([config.seed, 0x9AD])
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    q = q * np.sign(np.diag(r))  # a Haar-distributed rotation
    lam = config.condition_number ** (-np.arange(d) / max(d - 1, 1))
    h = config.heterogeneity
    # Each coordinate's curvature split over the clients: the shares sum to n, so the mean
    # Hessian keeps λ (and κ) exactly.
    shares = rng.dirichlet(np.full(n, 1.0 / n) if n > 1 else np.ones(1), size=d).T * n
    weights = (1.0 - h) + h * shares
    centres = h * rng.standard_normal((n, d))
    out = []
    for i in range(n):
        m = math.sqrt(d) * np.sqrt(lam * weights[i])[:, None] * q.T
        out.append(np.concatenate([m, (m @ centres[i])[:, None]], axis=1))
    return tuple(out)


def quadratic_optimum(config: QuadraticConfig) -> float:
    """min F, for plotting the optimality gap (F is the mean of the clients' f_i)."""
    rows = np.concatenate(quadratic_rows(config))
    m, v = rows[:, :-1], rows[:, -1]
    x, *_ = np.linalg.lstsq(m, v, rcond=None)
    return float(0.5 * np.mean((m @ x - v) ** 2))


def _quadratic_xy(rows: np.ndarray) -> XY:
    # The targets travel inside x (its last column): y holds no labels for a quadratic.
    return XY(x=rows.astype(np.float64), y=np.zeros(len(rows), dtype=np.int64))


def _quadratic_model(config: QuadraticConfig) -> nn.Module:
    x = torch.randn(config.dimension, dtype=torch.float64) * config.init_scale
    return QuadraticModel(x, config.surrogate_features)


def _quadratic_train(config: QuadraticConfig, client: ClientData) -> XY:
    return _quadratic_xy(quadratic_rows(config)[_check_partition("quadratic", client, config)])


def _quadratic_test(config: QuadraticConfig) -> XY:
    return _quadratic_xy(np.concatenate(quadratic_rows(config)))


def half_squared(residuals: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
    """½·mean(r²): f_i for the rows given."""
    return 0.5 * torch.mean(residuals**2)


def _quadratic_metrics(residuals: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    return {OBJECTIVE: float(half_squared(residuals, y))}


# --- attack-digits ---------------------------------------------------------------------------


class AttackConfig(BlackBoxConfig):
    """A federated universal black-box attack on a digits classifier."""

    target_class: int = Field(
        default=3,
        ge=0,
        le=9,
        description="The class whose images "
        "every client holds and the perturbation should misclassify.",
    )
    images_per_client: int = Field(default=8, ge=1, le=200)
    epsilon: float = Field(
        default=0.3, gt=0, le=1, description="L∞ budget of the perturbation ε·tanh(x)."
    )
    num_clients: int = Field(default=5, ge=1, le=20)

    @model_validator(mode="after")
    def _enough_images(self) -> Self:
        usable = len(_usable_images(self.target_class, self.seed))
        if self.images_per_client * self.num_clients >= usable:
            raise ValueError(
                f"class {self.target_class} has {usable} usable images: {self.num_clients} "
                f"clients × {self.images_per_client} images leave none held out; lower "
                "images_per_client or num_clients"
            )
        return self


@lru_cache(maxsize=1)
def digits_classifier() -> tuple[tuple[np.ndarray, ...], np.ndarray, np.ndarray]:
    """The victim: an MLP trained on half of digits (stratified, fixed seeds), and the other
    half's images and labels. Deterministic, trained once per process (about a second)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.neural_network import MLPClassifier

    bunch = load_digits()
    x = np.asarray(bunch.data, dtype=np.float64) / 16.0
    y = np.asarray(bunch.target, dtype=np.int64)
    x_fit, x_rest, y_fit, y_rest = train_test_split(x, y, test_size=0.5, random_state=0, stratify=y)
    mlp = MLPClassifier(
        hidden_layer_sizes=(32,), solver="lbfgs", alpha=1e-3, max_iter=400, random_state=0
    )
    mlp.fit(x_fit, y_fit)
    weights = (mlp.coefs_[0], mlp.intercepts_[0], mlp.coefs_[1], mlp.intercepts_[1])
    return tuple(np.asarray(w, dtype=np.float64) for w in weights), x_rest, y_rest


def _logits(images: torch.Tensor) -> torch.Tensor:
    (w1, b1, w2, b2), _, _ = digits_classifier()
    flat = images.reshape(len(images), -1).to(torch.float64)
    device = flat.device
    hidden = torch.relu(flat @ torch.from_numpy(w1).to(device) + torch.from_numpy(b1).to(device))
    return hidden @ torch.from_numpy(w2).to(device) + torch.from_numpy(b2).to(device)


@lru_cache(maxsize=16)
def _usable_images(target_class: int, seed: int) -> np.ndarray:
    """Held-out digits of the class that the victim classifies correctly, shuffled by seed."""
    _, x_rest, y_rest = digits_classifier()
    pool = x_rest[y_rest == target_class]
    with torch.device("cpu"):  # also when the API builds models on the meta device
        correct = _logits(torch.from_numpy(pool)).argmax(1).numpy() == target_class
    pool = pool[correct]
    return pool[np.random.default_rng([seed, 0xA77]).permutation(len(pool))]


def attack_images(config: AttackConfig) -> tuple[tuple[np.ndarray, ...], np.ndarray]:
    """Each client's images, then the held-out ones (no client queries them)."""
    pool = _usable_images(config.target_class, config.seed)
    k, n = config.images_per_client, config.num_clients
    parts = tuple(pool[i * k : (i + 1) * k] for i in range(n))
    return parts, pool[k * n :]


class AttackModel(QueryPoint):
    """Logits of the victim on each image + ε·tanh(x), clipped to the pixel range [0, 1]."""

    def __init__(self, config: AttackConfig) -> None:
        super().__init__(torch.zeros(64, dtype=torch.float64), config.surrogate_features)
        self.epsilon = config.epsilon

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        perturbed = images.reshape(len(images), -1).to(torch.float64) + self.epsilon * torch.tanh(
            self.x
        )
        return _logits(torch.clamp(perturbed, 0.0, 1.0))


def _attack_xy(images: np.ndarray, config: AttackConfig) -> XY:
    return XY(
        x=images.reshape(-1, 1, 8, 8).astype(np.float32),
        y=np.full(len(images), config.target_class, dtype=np.int64),
        input_range=(0.0, 1.0),
    )


def _attack_train(config: AttackConfig, client: ClientData) -> XY:
    pid = _check_partition("attack-digits", client, config)
    return _attack_xy(attack_images(config)[0][pid], config)


def _attack_test(config: AttackConfig) -> XY:
    return _attack_xy(np.concatenate(attack_images(config)[0]), config)


def _attack_validation(config: AttackConfig) -> XY:
    return _attack_xy(attack_images(config)[1], config)


def _attack_model(config: AttackConfig) -> nn.Module:
    return AttackModel(config)


def _margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    true = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.scatter(1, y[:, None], -math.inf).amax(1)
    return true - others


def attack_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """f_i: the mean margin z_y − max_{j≠y} z_j (below 0: misclassified)."""
    return _margin(logits, y).mean()


def _attack_metrics(logits: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    return {
        OBJECTIVE: float(attack_loss(logits, y)),
        "attack-success": float((logits.argmax(1) != y).double().mean()),
    }


# --- metric-digits ---------------------------------------------------------------------------


class MetricConfig(BlackBoxConfig):
    """A thresholded linear classifier optimised for a non-differentiable metric."""

    positive_class: int = Field(default=9, ge=0, le=9, description="The class called positive.")
    partitioner: PartitionerSpec = Field(default=IidPartitioner())
    init_scale: float = Field(default=0.1, ge=0, le=100, description="w, b start at N(0, s²).")

    def dataset(self) -> DigitsSpec:
        return DigitsSpec(partitioner=self.partitioner, seed=self.seed, validation_fraction=0.0)


class LinearThreshold(QueryPoint):
    """Scores (0, w·a + b) per image: argmax is the thresholded prediction [w·a + b > 0]."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        flat = images.reshape(len(images), -1).to(torch.float64)
        score = flat @ self.x[:-1] + self.x[-1]
        return torch.stack([torch.zeros_like(score), score], dim=1)


def binary_scores(predicted: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """F1 and accuracy of 0/1 predictions (F1 is 0 when nothing is predicted positive)."""
    tp = float(((predicted == 1) & (y == 1)).sum())
    fp = float(((predicted == 1) & (y == 0)).sum())
    fn = float(((predicted == 0) & (y == 1)).sum())
    f1 = 2 * tp / (2 * tp + fp + fn) if tp > 0 else 0.0
    accuracy = float((predicted == y).double().mean()) if len(y) else 0.0
    return {"f1": f1, "accuracy": accuracy}


def one_minus_f1(scores: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """f_i = 1 − F1 of the thresholded predictions."""
    value = 1.0 - binary_scores(scores.argmax(1), y)["f1"]
    # The value exactly, with the true (zero almost everywhere) gradient attached, so that a
    # first-order strategy runs and sees what the metric offers it: nothing.
    return scores.sum() * 0.0 + value


def _metric_metrics(scores: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    found = binary_scores(scores.argmax(1), y)
    return {OBJECTIVE: 1.0 - found["f1"], **found}


def _metric_xy(data: XY, config: MetricConfig) -> XY:
    return XY(x=data.x, y=(data.y == config.positive_class).astype(np.int64), input_range=None)


def _metric_model(config: MetricConfig) -> nn.Module:
    return LinearThreshold(
        torch.randn(65, dtype=torch.float64) * config.init_scale, config.surrogate_features
    )


def _metric_train(config: MetricConfig, client: ClientData) -> XY:
    pid = _check_partition("metric-digits", client, config)
    return _metric_xy(load_partition(config.dataset(), pid, config.num_clients), config)


def _metric_test(config: MetricConfig) -> XY:
    spec = config.dataset()
    parts = [load_partition(spec, i, config.num_clients) for i in range(config.num_clients)]
    return _metric_xy(_union(parts), config)


def _metric_validation(config: MetricConfig) -> XY:
    return _metric_xy(load_dataset_test(config.dataset()), config)


# --- the plugins ---------------------------------------------------------------------------

quadratic = WorkloadPlugin(
    name="quadratic",
    summary="A heterogeneous quadratic f_i(x) = ½(x − c_i)ᵀA_i(x − c_i) per client (black box; "
    "d = 300, 5 clients by default).",
    config_model=QuadraticConfig,
    build_model=_quadratic_model,
    load_train=_quadratic_train,
    load_test=_quadratic_test,
    loss=half_squared,
    metrics=_quadratic_metrics,
    tags=("black-box",),
)
attack_digits = WorkloadPlugin(
    name="attack-digits",
    summary="A federated universal black-box attack: clients hold images of one digit and "
    "query a classifier's margin under the shared perturbation.",
    config_model=AttackConfig,
    build_model=_attack_model,
    load_train=_attack_train,
    load_test=_attack_test,
    load_validation=_attack_validation,
    loss=attack_loss,
    metrics=_attack_metrics,
    input_range=lambda config: (0.0, 1.0),
    tags=("black-box",),
)
metric_digits = WorkloadPlugin(
    name="metric-digits",
    summary="A thresholded linear classifier (digit == k) whose 1 − F1 on each client's "
    "partition is the (non-differentiable) objective.",
    config_model=MetricConfig,
    build_model=_metric_model,
    load_train=_metric_train,
    load_test=_metric_test,
    load_validation=_metric_validation,
    loss=one_minus_f1,
    metrics=_metric_metrics,
    tags=("black-box",),
)
