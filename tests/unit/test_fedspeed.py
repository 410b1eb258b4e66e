"""FedSpeed: FedAvg in its degenerate setting, one round checked by hand, config validation."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import RecordDict
from pydantic import ValidationError
from torch import nn

from florist.client.training import TrainingConfig, TrainTask
from florist.datasets import XY
from florist.server.runtime.localgrid import run_local
from florist.server.spec import ExperimentSpec
from florist.strategies.fedspeed import G_HAT_KEY, FedSpeedConfig, plugin


def make_spec(strategy: str, config: dict[str, Any], training: dict[str, Any]) -> ExperimentSpec:
    return ExperimentSpec.model_validate(
        {
            "name": "unit",
            "strategy": {"name": strategy, "config": config},
            "dataset": {"name": "digits", "partitioner": {"name": "dirichlet", "alpha": 0.5}},
            "model": {"name": "logreg"},
            "training": training,
            "rounds": 2,
            "clients": {"min": 3},
        }
    )


def final_weights(strategy: str, config: dict[str, Any], **training: Any) -> dict[str, np.ndarray]:
    recording, _ = run_local(make_spec(strategy, config, {"local_epochs": 1, **training}), 3)
    assert recording.final_arrays is not None
    return {k: v.numpy() for k, v in recording.final_arrays.items()}


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_rho_and_inv_lambda_zero_equal_fedavg(momentum: float) -> None:
    fedavg = final_weights("fedavg", {}, momentum=momentum)
    # The local step takes the experiment's momentum, as FedAvg's does.
    fedspeed = final_weights(
        "fedspeed",
        {"rho": 0, "inv_lambda": 0, "alpha": 0.3, "use_training_momentum": True},
        momentum=momentum,
    )
    assert fedavg.keys() == fedspeed.keys()
    for key, value in fedavg.items():
        np.testing.assert_array_equal(fedspeed[key], value)


def test_default_settings_change_the_weights() -> None:
    fedavg = final_weights("fedavg", {}, momentum=0)
    fedspeed = final_weights("fedspeed", {}, momentum=0)
    assert any(not np.allclose(v, fedspeed[k]) for k, v in fedavg.items())


def reference_round(
    w: torch.Tensor,
    b: torch.Tensor,
    g_hat: tuple[torch.Tensor, torch.Tensor],
    data: XY,
    steps: int,
    lr: float,
    cfg: FedSpeedConfig,
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """FedSpeed's round written out on a linear model with full-batch steps: (x̂, ĝ)."""
    x, y = torch.from_numpy(data.x), torch.from_numpy(data.y)

    def grad(w: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w, b = w.clone().requires_grad_(), b.clone().requires_grad_()
        loss = nn.functional.cross_entropy(x @ w.T + b, y)
        gw, gb = torch.autograd.grad(loss, (w, b))
        return gw, gb

    w0, b0 = w.clone(), b.clone()
    for _ in range(steps):
        g1w, g1b = grad(w, b)
        norm = torch.sqrt((g1w**2).sum() + (g1b**2).sum())
        scale = cfg.rho / norm if cfg.normalized_ascent else cfg.rho
        g2w, g2b = grad(w + scale * g1w, b + scale * g1b)
        gtw = (1 - cfg.alpha) * g1w + cfg.alpha * g2w
        gtb = (1 - cfg.alpha) * g1b + cfg.alpha * g2b
        w = w - lr * (gtw - g_hat[0] + cfg.inv_lambda * (w - w0))
        b = b - lr * (gtb - g_hat[1] + cfg.inv_lambda * (b - b0))
    g_hat = (g_hat[0] - cfg.inv_lambda * (w - w0), g_hat[1] - cfg.inv_lambda * (b - b0))
    lam = 1 / cfg.inv_lambda
    return (w - lam * g_hat[0], b - lam * g_hat[1]), g_hat


@pytest.mark.parametrize("normalized", [True, False])
def test_two_rounds_match_the_algorithm_by_hand(normalized: bool) -> None:
    # Prepare: a 2→2 linear model on 4 examples; full batch, so every step sees all of them.
    data = XY(
        x=np.array([[1.0, 2.0], [-1.0, 0.5], [0.3, -1.2], [2.0, 1.0]], dtype=np.float32),
        y=np.array([0, 1, 1, 0], dtype=np.int64),
    )
    cfg = FedSpeedConfig(rho=0.5, inv_lambda=0.2, alpha=0.7, normalized_ascent=normalized)
    model = nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.1, -0.2], [0.3, 0.4]]))
        model.bias.copy_(torch.tensor([0.05, -0.1]))
    state = RecordDict()
    w, b = model.weight.detach().clone(), model.bias.detach().clone()
    g_hat = (torch.zeros(2, 2), torch.zeros(2))

    for server_round, steps in ((1, 1), (2, 3)):
        start_norm = float(torch.sqrt((g_hat[0] ** 2).sum() + (g_hat[1] ** 2).sum()))
        training = TrainingConfig(local_steps=steps, batch_size=4, lr=0.1, momentum=0)
        task = TrainTask(model, data, training, cfg, server_round=server_round, seed=0, state=state)
        if server_round == 2:  # ĝ carried over from round 1
            stored = state.array_records[G_HAT_KEY].to_torch_state_dict()
            assert stored["weight"].abs().sum() > 0

        # Execute
        result = plugin.train(task)
        (w, b), g_hat = reference_round(w, b, g_hat, data, steps, lr=0.1, cfg=cfg)

        # Assert
        assert result.steps == steps and result.num_examples == 4
        np.testing.assert_allclose(model.weight.detach().numpy(), w.numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(model.bias.detach().numpy(), b.numpy(), rtol=1e-5, atol=1e-6)
        stored = state.array_records[G_HAT_KEY].to_torch_state_dict()
        np.testing.assert_allclose(stored["weight"].numpy(), g_hat[0].numpy(), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(stored["bias"].numpy(), g_hat[1].numpy(), rtol=1e-5, atol=1e-7)
        expected_norm = float(torch.sqrt((g_hat[0] ** 2).sum() + (g_hat[1] ** 2).sum()))
        assert result.metrics["fedspeed-ghat-norm"] == pytest.approx(expected_norm, rel=1e-5)
        assert result.metrics["fedspeed-ghat-norm-start"] == pytest.approx(start_norm, rel=1e-5)
        assert (start_norm > 0) == (server_round == 2)


def fedspeed_round(cfg: FedSpeedConfig, momentum: float) -> tuple[np.ndarray, np.ndarray]:
    """One FedSpeed round of 3 steps on a fixed 2→2 model: the weights and ĝ it ends with."""
    data = XY(
        x=np.array([[1.0, 2.0], [-1.0, 0.5], [0.3, -1.2], [2.0, 1.0]], dtype=np.float32),
        y=np.array([0, 1, 1, 0], dtype=np.int64),
    )
    model = nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.1, -0.2], [0.3, 0.4]]))
        model.bias.copy_(torch.tensor([0.05, -0.1]))
    state = RecordDict()
    training = TrainingConfig(local_steps=3, batch_size=4, lr=0.1, momentum=momentum)
    plugin.train(TrainTask(model, data, training, cfg, server_round=1, seed=0, state=state))
    g_hat = state.array_records[G_HAT_KEY].to_torch_state_dict()["weight"].numpy()
    return model.weight.detach().numpy(), g_hat


def test_default_local_step_has_no_momentum_whatever_training_says() -> None:
    # Prepare / Execute: the default config under the experiment's momentum 0.9 and under 0.
    default = FedSpeedConfig()
    with_training_momentum = fedspeed_round(default, momentum=0.9)
    plain = fedspeed_round(default, momentum=0.0)
    following = fedspeed_round(FedSpeedConfig(use_training_momentum=True), momentum=0.9)

    # Assert: the paper's plain step either way; the flag follows the experiment's momentum.
    assert not default.use_training_momentum
    np.testing.assert_array_equal(with_training_momentum[0], plain[0])
    np.testing.assert_array_equal(with_training_momentum[1], plain[1])
    assert not np.allclose(following[0], plain[0])


def test_inv_lambda_zero_keeps_no_correction() -> None:
    data = XY(x=np.ones((3, 2), dtype=np.float32), y=np.array([0, 1, 0], dtype=np.int64))
    state = RecordDict()
    task = TrainTask(
        nn.Linear(2, 2),
        data,
        TrainingConfig(local_steps=2, batch_size=3, momentum=0),
        FedSpeedConfig(inv_lambda=0),
        server_round=1,
        seed=0,
        state=state,
    )
    result = plugin.train(task)
    assert G_HAT_KEY not in state.array_records
    assert result.metrics["fedspeed-ghat-norm"] == 0.0


@pytest.mark.parametrize(
    ("raw", "field"),
    [({"rho": -1}, "rho"), ({"inv_lambda": -0.1}, "inv_lambda"), ({"alpha": 1.5}, "alpha")],
)
def test_bad_config_is_refused_naming_the_field(raw: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as info:
        plugin.parse_config(raw)
    assert [e["loc"] for e in info.value.errors()] == [(field,)]


def test_unknown_field_is_refused() -> None:
    with pytest.raises(ValidationError, match="rhoo"):
        plugin.parse_config({"rhoo": 0.1})
