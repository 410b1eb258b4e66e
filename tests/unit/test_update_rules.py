"""Client-side update rules against hand computations: curriculum pacing, FedSpeed's local step."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from florist.client.training import TrainingConfig, TrainTask
from florist.datasets import XY
from florist.strategies import fedspeed
from florist.strategies.curriculum import pacing_fraction
from florist.strategies.fedspeed import FedSpeedConfig

# --- curriculum pacing ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        # a = 0.5, T = 20, t = 5: s = t/(a·T) = 5/10 = 0.5; b = 0.2.
        # linear: 0.2 + 0.8·0.5 = 0.6.
        ("linear", 0.6),
        # exp: (e^{10s} − 1)/(e^{10} − 1) = (e^5 − 1)/((e^5 − 1)(e^5 + 1)) = 1/(e^5 + 1)
        #      = 1/149.4131591 = 0.0066928509; 0.2 + 0.8·0.0066928509 = 0.2053542807.
        ("exp", 0.2053542807),
        # log: 1 + 0.1·ln(s + e^{−10}); ln(0.5 + e^{−10}) = ln 0.5 + ln(1 + 2e^{−10})
        #      = −0.6931471806 + 0.0000907958 = −0.6930563848, so 1 − 0.0693056385 = 0.9306943615;
        #      0.2 + 0.8·0.9306943615 = 0.9445554892.
        ("log", 0.9445554892),
    ],
)
def test_pacing_midway_by_hand(kind: str, expected: float) -> None:
    assert pacing_fraction(kind, t=5, T=20, a=0.5, b=0.2) == pytest.approx(expected, abs=1e-9)  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["linear", "exp", "log"])
def test_pacing_ends(kind: str) -> None:
    # t = 0: s = 0, every family starts at b (exp: e^0 − 1 = 0; log: 1 + 0.1·ln(e^{−10}) = 0).
    assert pacing_fraction(kind, t=0, T=20, a=0.5, b=0.2) == pytest.approx(0.2)  # type: ignore[arg-type]
    # t ≥ a·T = 10: all the data.
    assert pacing_fraction(kind, t=10, T=20, a=0.5, b=0.2) == 1.0  # type: ignore[arg-type]
    assert pacing_fraction(kind, t=17, T=20, a=0.5, b=0.2) == 1.0  # type: ignore[arg-type]


# --- FedSpeed's local step --------------------------------------------------------------------

X = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 2.0]])
Y = np.array([0, 1, 1, 0])
W0 = np.array([[0.1, -0.2], [0.3, 0.0]])
B0 = np.array([0.0, 0.1])
LR, RHO, INV_LAMBDA, ALPHA = 0.5, 0.5, 0.1, 0.7


def ce_gradient(w: np.ndarray, b: np.ndarray, idx: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """∇ of the mean cross-entropy of the linear model z = W·x + b on the examples ``idx``."""
    x, y = X[idx], Y[idx]
    z = x @ w.T + b
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    # ∂/∂z of −log softmax(z)_y is p − onehot(y); the batch mean divides by its size.
    dz = (p - np.eye(2)[y]) / len(idx)
    return dz.T @ x, dz.sum(axis=0)


def fedspeed_reference(batches: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """One FedSpeed round from (W0, B0), written out from the paper's update, ĝ_i = 0 at start.

    Per step on minibatch ξ: g1 = ∇f(x; ξ); x̆ = x + ρ·g1/‖g1‖; g2 = ∇f(x̆; ξ) on the same ξ;
    g̃ = (1 − α)·g1 + α·g2; x ← x − η·(g̃ − ĝ + (1/λ)·(x − x^t)). After K steps
    ĝ = −(1/λ)·(x_K − x^t) and the client sends x̂ = x_K − λ·ĝ = 2·x_K − x^t.
    """
    w, b = W0.copy(), B0.copy()
    for idx in batches:
        g1w, g1b = ce_gradient(w, b, idx)
        norm = np.sqrt((g1w**2).sum() + (g1b**2).sum())
        g2w, g2b = ce_gradient(w + RHO * g1w / norm, b + RHO * g1b / norm, idx)
        dw = (1 - ALPHA) * g1w + ALPHA * g2w + INV_LAMBDA * (w - W0)
        db = (1 - ALPHA) * g1b + ALPHA * g2b + INV_LAMBDA * (b - B0)
        w, b = w - LR * dw, b - LR * db
    return 2 * w - W0, 2 * b - B0


def test_fedspeed_g2_on_the_same_minibatch_as_g1() -> None:
    # Prepare: 4 examples, batches of 2 (two minibatches per epoch), one epoch: K = 2 steps.
    model = nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor(W0, dtype=torch.float32))
        model.bias.copy_(torch.tensor(B0, dtype=torch.float32))
    task = TrainTask(
        model=model,
        data=XY(x=X.astype(np.float32), y=Y.astype(np.int64)),
        # Plain SGD, the paper's local step; set here so a change of defaults cannot move it.
        training=TrainingConfig(local_epochs=1, batch_size=2, lr=LR, momentum=0.0),
        config=FedSpeedConfig(rho=RHO, inv_lambda=INV_LAMBDA, alpha=ALPHA, normalized_ascent=True),
        server_round=1,
        seed=0,
    )

    # Execute
    fedspeed.plugin.train(task)
    w = model.weight.detach().numpy().astype(np.float64)
    b = model.bias.detach().numpy().astype(np.float64)

    # Assert: the shuffle is the runtime's business, so try every split into two batches of two;
    # exactly one order must match the reference (drawing g2 from the other batch matches none).
    matches = []
    for first in itertools.combinations(range(4), 2):
        second = [i for i in range(4) if i not in first]
        ref_w, ref_b = fedspeed_reference([list(first), second])
        if np.allclose(w, ref_w, atol=1e-5) and np.allclose(b, ref_b, atol=1e-5):
            matches.append((first, tuple(second)))
    assert len(matches) == 1, f"orders matching the reference: {matches}"
