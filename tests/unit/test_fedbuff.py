"""FedBuff's server rule against hand-computed runs: Δ against the model sent, staleness, η_g."""

from __future__ import annotations

import numpy as np
import pytest

from florist.strategies.events import Arrival, Weights
from florist.strategies.fedbuff import FedBuff, FedBuffConfig
from tests.unit.updates import arrival, vec


def buffered(server: FedBuff, a: Arrival, current: Weights) -> None:
    decision = server.on_arrival(a, current)
    assert decision.weights is None, "aggregated before the buffer was full"
    assert decision.dispatch == (a.node_id,)


def aggregated(server: FedBuff, a: Arrival, current: Weights) -> Weights:
    decision = server.on_arrival(a, current)
    assert decision.weights is not None, "the buffer was full but nothing was aggregated"
    assert decision.dispatch == (a.node_id,)
    return decision.weights


def test_delta_is_taken_against_the_model_sent_not_the_current_one() -> None:
    # Prepare: K = 2, η_g = 1, no staleness scaling: x ← x + (Δ_1 + Δ_2)/2.
    server = FedBuff(FedBuffConfig(buffer_size=2, server_lr=1.0, staleness_scaling=False))
    x0 = vec(1.0, 1.0)  # version 0, sent to A = 1, B = 2 and C = 3

    # Execute / Assert: A and B fill the first buffer.
    # Δ_A = (3, 1) − (1, 1) = (2, 0); Δ_B = (1, 3) − (1, 1) = (0, 2); x1 = (1, 1) + (1, 1) = (2, 2).
    buffered(server, arrival(1, vec(3.0, 1.0), x0, 0, 0), x0)
    x1 = aggregated(server, arrival(2, vec(1.0, 3.0), x0, 0, 0), x0)
    np.testing.assert_allclose(x1["w"], [2.0, 2.0])

    # C trained from x0 arrives after the model moved to x1: Δ_C = (2, 0) − (1, 1) = (1, −1).
    # (Against the current model it would be (2, 0) − (2, 2) = (0, −2).)
    buffered(server, arrival(3, vec(2.0, 0.0), x0, 0, 1), x1)
    # A, sent x1: Δ_A = (4, 2) − (2, 2) = (2, 0).
    # x2 = (2, 2) + ((1, −1) + (2, 0))/2 = (2, 2) + (1.5, −0.5) = (3.5, 1.5).
    # (Δ_C against the current model: (2, 2) + ((0, −2) + (2, 0))/2 = (3, 1).)
    x2 = aggregated(server, arrival(1, vec(4.0, 2.0), x1, 1, 1), x1)
    np.testing.assert_allclose(x2["w"], [3.5, 1.5])


def test_stale_delta_with_staleness_scaling_and_server_lr_by_hand() -> None:
    # Prepare: K = 2, η_g = 0.5, each Δ scaled by 1/√(1 + τ).
    server = FedBuff(FedBuffConfig(buffer_size=2, server_lr=0.5, staleness_scaling=True))
    x0 = vec(0.0, 0.0)  # version 0, sent to A = 1, B = 2 and C = 3

    # Execute: A and B make three fresh aggregations while C is still training from x0.
    # 1: Δ_A = (4, 0), Δ_B = (0, 4); x1 = (0, 0) + 0.5·(2, 2) = (1, 1).
    buffered(server, arrival(1, vec(4.0, 0.0), x0, 0, 0), x0)
    x1 = aggregated(server, arrival(2, vec(0.0, 4.0), x0, 0, 0), x0)
    # 2: Δ_A = (3, 1) − (1, 1) = (2, 0), Δ_B = (1, 5) − (1, 1) = (0, 4);
    #    x2 = (1, 1) + 0.5·(1, 2) = (1.5, 2).
    buffered(server, arrival(1, vec(3.0, 1.0), x1, 1, 1), x1)
    x2 = aggregated(server, arrival(2, vec(1.0, 5.0), x1, 1, 1), x1)
    # 3: Δ_A = (1.5, 6) − (1.5, 2) = (0, 4), Δ_B = (5.5, 2) − (1.5, 2) = (4, 0);
    #    x3 = (1.5, 2) + 0.5·(2, 2) = (2.5, 3).
    buffered(server, arrival(1, vec(1.5, 6.0), x2, 2, 2), x2)
    x3 = aggregated(server, arrival(2, vec(5.5, 2.0), x2, 2, 2), x2)
    # 4: C, sent x0 at version 0, arrives at version 3: τ = 3, scale 1/√4 = 1/2;
    #    Δ_C = (8, −8) − (0, 0) = (8, −8), scaled (4, −4). A, sent x3: Δ_A = (4.5, 3) − (2.5, 3)
    #    = (2, 0). x4 = (2.5, 3) + 0.5·((4, −4) + (2, 0))/2 = (2.5, 3) + (1.5, −1) = (4, 2).
    #    (Δ_C against x3: (5.5, −11), scaled (2.75, −5.5): x4 = (3.6875, 1.625).
    #     Staleness ignored: x4 = (2.5, 3) + 0.5·(5, −4) = (5, 1).
    #     η_g ignored: x4 = (2.5, 3) + (3, −2) = (5.5, 1).)
    buffered(server, arrival(3, vec(8.0, -8.0), x0, 0, 3), x3)
    x4 = aggregated(server, arrival(1, vec(4.5, 3.0), x3, 3, 3), x3)

    # Assert
    np.testing.assert_allclose(x1["w"], [1.0, 1.0])
    np.testing.assert_allclose(x2["w"], [1.5, 2.0])
    np.testing.assert_allclose(x3["w"], [2.5, 3.0])
    np.testing.assert_allclose(x4["w"], [4.0, 2.0])


@pytest.mark.parametrize(
    ("weighting", "expected"),
    [
        # K = 3, η_g = 1, no staleness scaling, every model sent is (0, 0). A (node 1, 10
        # examples) sends Δ = (3, 0), then (0, 3); B (node 2, 30 examples) sends (4, 4).
        # none: w = 1, 1, 1: ((3, 3) + (4, 4))/3 = (7/3, 7/3).
        ("none", [7 / 3, 7 / 3]),
        # data, w = M·p_i: 1, 1 (A alone), then B: 2·30/40 = 1.5: ((3, 3) + (6, 6))/3 = (3, 3).
        ("data", [3.0, 3.0]),
        # frequency, w = p_i/q_i: 1, 1, then B: 0.75/(1/3) = 2.25: ((3, 3) + (9, 9))/3 = (4, 4).
        ("frequency", [4.0, 4.0]),
    ],
)
def test_client_weighting_by_hand(weighting: str, expected: list[float]) -> None:
    # Prepare
    config = FedBuffConfig(
        buffer_size=3,
        server_lr=1.0,
        staleness_scaling=False,
        client_weighting=weighting,  # type: ignore[arg-type]
    )
    server = FedBuff(config)
    x0 = vec(0.0, 0.0)
    # Execute
    buffered(server, arrival(1, vec(3.0, 0.0), x0, 0, 0, n=10), x0)
    buffered(server, arrival(1, vec(0.0, 3.0), x0, 0, 0, n=10), x0)
    new = aggregated(server, arrival(2, vec(4.0, 4.0), x0, 0, 0, n=30), x0)
    # Assert
    np.testing.assert_allclose(new["w"], expected)


def test_defaults_keep_the_papers_rule() -> None:
    config = FedBuffConfig()
    assert (config.staleness_scaling, config.client_weighting, config.server_lr) == (
        True,
        "none",
        1.0,
    )
