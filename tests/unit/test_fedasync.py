"""FedAsync's server rule against hand-computed runs: staleness, the α mix, client weights."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from florist.strategies.events import Arrival, Weights
from florist.strategies.fedasync import FedAsync, FedAsyncConfig, staleness_factor
from tests.unit.updates import arrival, vec


def step(server: FedAsync, a: Arrival, current: Weights) -> Weights:
    decision = server.on_arrival(a, current)
    assert decision.weights is not None  # FedAsync moves the model on every arrival
    assert decision.dispatch == (a.node_id,)
    return decision.weights


def test_stale_arrival_after_the_model_moved_by_hand() -> None:
    # Prepare: α = 0.6 (≠ 1 − α, so a swapped mix shows), polynomial s(τ) = 1/(τ + 1) (a = 1).
    server = FedAsync(FedAsyncConfig(alpha=0.6, staleness="polynomial", a=1.0))
    x0 = vec(1.0, 2.0)  # version 0, sent to nodes A = 1 and B = 2

    # Execute / Assert 1: B trained from x0 and arrives first, fresh (τ = 0 → α_t = 0.6).
    # x1 = 0.4·(1, 2) + 0.6·(3, 0) = (0.4 + 1.8, 0.8 + 0) = (2.2, 0.8).
    # (Swapped α: 0.6·(1, 2) + 0.4·(3, 0) = (1.8, 1.2).)
    x1 = step(server, arrival(2, vec(3.0, 0.0), x0, sent_version=0, version=0), x0)
    np.testing.assert_allclose(x1["w"], [2.2, 0.8])

    # 2: A trained from x0 (version 0) arrives at version 1: τ = 1, s = 1/2, α_t = 0.3.
    # x2 = 0.7·(2.2, 0.8) + 0.3·(−1, 4) = (1.54 − 0.3, 0.56 + 1.2) = (1.24, 1.76).
    # (Staleness ignored, α_t = 0.6: 0.4·(2.2, 0.8) + 0.6·(−1, 4) = (0.28, 2.72).)
    x2 = step(server, arrival(1, vec(-1.0, 4.0), x0, sent_version=0, version=1), x1)
    np.testing.assert_allclose(x2["w"], [1.24, 1.76])

    # 3: B, sent x1 (version 1), arrives at version 2: τ = 1 again, α_t = 0.3.
    # x3 = 0.7·(1.24, 1.76) + 0.3·(2, 2) = (0.868 + 0.6, 1.232 + 0.6) = (1.468, 1.832).
    x3 = step(server, arrival(2, vec(2.0, 2.0), x1, sent_version=1, version=2), x2)
    np.testing.assert_allclose(x3["w"], [1.468, 1.832])


def test_hinge_defaults_are_the_papers() -> None:
    # Xie et al. 2019 (as ../shared/papers/ALGORITHMS.md records it): hinge a = 10, b = 4,
    # polynomial a = 0.5, α = 0.6.
    hinge = FedAsyncConfig(staleness="hinge")
    poly = FedAsyncConfig()
    assert (hinge.alpha, hinge.staleness_a, hinge.b) == (0.6, 10.0, 4)
    assert (poly.staleness, poly.staleness_a) == ("polynomial", 0.5)
    # Hinge: 1 up to b = 4; then 1/(10·(τ − 4) + 1): τ = 5 → 1/11, τ = 6 → 1/21.
    assert staleness_factor(hinge, 4) == 1.0
    assert staleness_factor(hinge, 5) == pytest.approx(1 / 11)
    assert staleness_factor(hinge, 6) == pytest.approx(1 / 21)
    # Polynomial (τ + 1)^(−1/2): τ = 3 → 1/2, τ = 8 → 1/3.
    assert staleness_factor(poly, 3) == pytest.approx(0.5)
    assert staleness_factor(poly, 8) == pytest.approx(1 / 3)
    # An explicit a still wins over the family's default.
    assert staleness_factor(FedAsyncConfig(staleness="hinge", a=0.5, b=2), 4) == pytest.approx(0.5)


def test_hinge_run_with_default_settings_by_hand() -> None:
    # Prepare: the paper's hinge, α = 0.6, a = 10, b = 4.
    server = FedAsync(FedAsyncConfig(staleness="hinge"))
    x = vec(0.0)
    # Execute: an update 5 versions stale: α_t = 0.6/(10·1 + 1) = 0.6/11.
    # x' = (1 − 0.6/11)·0 + (0.6/11)·11 = 0.6.
    new = step(server, arrival(1, vec(11.0), vec(0.0), sent_version=3, version=8), x)
    # Assert
    np.testing.assert_allclose(new["w"], [0.6])


def test_unknown_weighting_is_refused() -> None:
    with pytest.raises(ValidationError, match="client_weighting"):
        FedAsyncConfig(client_weighting="speed")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("weighting", "expected"),
    [
        # α = 0.4, constant s. A (node 1, 10 examples) arrives twice, then B (node 2, 30
        # examples), then A. Every model sent is 0 and every client returns 1, so each step is
        # x ← x + α_t·(1 − x): the α_t sequence below is all that differs.
        # none: α_t = 0.4 each time.
        #   x: 0 → 0.4 → 0.64 → 0.784 → 0.8704
        ("none", [0.4, 0.64, 0.784, 0.8704]),
        # data, w = M·p_i: A alone (M = 1, p = 1) → 1, 1; B: M = 2, p = 30/40 → 1.5; A: 2·10/40
        # → 0.5. α_t = 0.4, 0.4, 0.6, 0.2.
        #   x: 0 → 0.4 → 0.64 → 0.64 + 0.6·0.36 = 0.856 → 0.856 + 0.2·0.144 = 0.8848
        ("data", [0.4, 0.64, 0.856, 0.8848]),
        # frequency, w = p_i/q_i: A: p = 1, q = 1/1 → 1; A: p = 1, q = 2/2 → 1; B: p = 0.75,
        # q = 1/3 → 2.25; A: p = 0.25, q = 3/4 → 1/3. α_t = 0.4, 0.4, 0.9, 0.4/3.
        #   x: 0 → 0.4 → 0.64 → 0.64 + 0.9·0.36 = 0.964 → 0.964 + (0.4/3)·0.036 = 0.9688
        ("frequency", [0.4, 0.64, 0.964, 0.9688]),
    ],
)
def test_client_weighting_by_hand(weighting: str, expected: list[float]) -> None:
    # Prepare
    server = FedAsync(
        FedAsyncConfig(alpha=0.4, staleness="constant", client_weighting=weighting)  # type: ignore[arg-type]
    )
    x = vec(0.0)
    got = []
    # Execute
    for node, n in [(1, 10), (1, 10), (2, 30), (1, 10)]:
        x = step(server, arrival(node, vec(1.0), vec(0.0), 0, 0, n=n), x)
        got.append(float(x["w"][0]))
    # Assert
    np.testing.assert_allclose(got, expected)


def test_weighted_alpha_is_capped_at_one() -> None:
    # α = 0.6 and the frequency weight 2.25 of the previous test's third arrival: 1.35 → 1, so
    # the global model becomes B's model instead of stepping past it.
    server = FedAsync(FedAsyncConfig(alpha=0.6, staleness="constant", client_weighting="frequency"))
    x = vec(0.0)
    for node, n in [(1, 10), (1, 10)]:
        x = step(server, arrival(node, vec(1.0), vec(0.0), 0, 0, n=n), x)
    new = step(server, arrival(2, vec(5.0), vec(0.0), 0, 0, n=30), x)
    np.testing.assert_allclose(new["w"], [5.0])


def _client_round(rho: float, via: str = "fedasync") -> tuple[np.ndarray, np.ndarray]:
    """One round of a client half from one start model: (start, end) weights of the layer."""
    import torch
    from torch import nn

    from florist.client.training import TrainingConfig, TrainTask
    from florist.datasets import XY
    from florist.strategies import fedasync, fedprox

    rng = np.random.default_rng(0)
    data = XY(x=rng.normal(size=(64, 4)).astype(np.float32), y=rng.integers(0, 3, 64))
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    start = model.weight.detach().clone().numpy()
    training = TrainingConfig(local_steps=20, batch_size=16, lr=0.5, momentum=0.0)
    if via == "fedasync":
        task = TrainTask(model, data, training, FedAsyncConfig(rho=rho), server_round=2, seed=3)
        fedasync.plugin.train(task)
    else:
        config = fedprox.FedProxConfig(proximal_mu=rho)
        fedprox.plugin.train(TrainTask(model, data, training, config, server_round=2, seed=3))
    return start, model.weight.detach().numpy()


def test_the_workers_proximal_term_is_fedprox_s_and_pulls_toward_the_model_sent() -> None:
    # ρ = 0 is plain local SGD; ρ > 0 is exactly FedProx's term μ/2·‖x − x_τ‖² with μ = ρ.
    start, plain = _client_round(0.0)
    _, prox = _client_round(0.5)
    _, fedprox_end = _client_round(0.5, via="fedprox")
    _, sgd_end = _client_round(0.0, via="fedprox")
    np.testing.assert_array_equal(plain, sgd_end)
    np.testing.assert_array_equal(prox, fedprox_end)
    # The term pulls toward x_τ: a stronger ρ ends nearer the model sent (a sign error would not).
    _, strong = _client_round(1.5)
    distances = [np.linalg.norm(w - start) for w in (plain, prox, strong)]
    assert distances[0] > distances[1] > distances[2]
