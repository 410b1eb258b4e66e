"""FAL: the PGD attack, one local adversarial step by hand, FedAvg at ε = 0, robust metrics."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch import nn

from florist.client.models import LogRegSpec, build_model
from florist.client.training import TrainingConfig, TrainTask
from florist.datasets import XY, DigitsSpec, dataset_info, load_test, load_train
from florist.server.localgrid import run_local
from florist.server.spec import ExperimentSpec
from florist.strategies.fal import FalConfig, pgd_attack, plugin, server_metrics, train


def make_spec(strategy: dict[str, Any], rounds: int = 2) -> ExperimentSpec:
    return ExperimentSpec.model_validate(
        {
            "name": "unit-fal",
            "strategy": strategy,
            "dataset": {"name": "digits", "partitioner": {"name": "dirichlet", "alpha": 0.5}},
            "model": {"name": "logreg"},
            "training": {"local_epochs": 1},
            "rounds": rounds,
            "clients": {"min": 3},
        }
    )


def final_weights(strategy: Any) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in strategy.final_arrays.items()}


@pytest.fixture(scope="module")
def trained_logreg() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A logistic regression fitted (full-batch SGD) on digits, and the test split."""
    spec = DigitsSpec()
    torch.manual_seed(0)
    model = build_model(LogRegSpec(), dataset_info(spec))
    data = load_train(spec)
    x, y = torch.from_numpy(data.x), torch.from_numpy(data.y)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(200):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    test = load_test(spec)
    return model, torch.from_numpy(test.x), torch.from_numpy(test.y)


def linear(weight: list[list[float]], bias: list[float]) -> nn.Linear:
    layer = nn.Linear(len(weight[0]), len(weight))
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weight))
        layer.bias.copy_(torch.tensor(bias))
    return layer


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def np_pgd(
    w: np.ndarray, b: np.ndarray, x: np.ndarray, y: np.ndarray, eps: float, steps: int, alpha: float
) -> np.ndarray:
    """PGD on the mean cross-entropy of a linear model, by hand: ∇x = (p − onehot)·W / N."""
    onehot = np.eye(w.shape[0])[y]
    x_adv = x.copy()
    for _ in range(steps):
        grad = (softmax(x_adv @ w.T + b) - onehot) @ w / len(y)
        x_adv = np.clip(np.clip(x_adv + alpha * np.sign(grad), x - eps, x + eps), 0.0, 1.0)
    return x_adv


# Two examples in [0,1]²; the second sits on the domain's edge so the clip bites.
W = [[1.0, -2.0], [-0.5, 1.5], [0.3, 0.2]]
B = [0.1, -0.2, 0.0]
X = [[0.5, 0.5], [0.98, 0.01]]
Y = [0, 1]


def test_config_defaults_and_validation() -> None:
    config = FalConfig()
    assert config.epsilon == 0.1 and config.pgd_steps == 10 and config.eval_pgd_steps == 10
    assert config.train_step_size == pytest.approx(0.025)
    assert config.robust_epsilon == 0.1
    assert FalConfig(epsilon=0.0, eval_epsilon=0.2).robust_epsilon == 0.2
    for bad in (
        {"epsilon": -0.1},
        {"pgd_steps": -1},
        {"step_size": 0.0},
        {"clip_min": 1.0, "clip_max": 1.0},
        {"eval_max_examples": 0},
        {"epsilom": 0.1},
    ):
        with pytest.raises(ValidationError):
            FalConfig.model_validate(bad)


def test_single_pgd_step_matches_hand_computation() -> None:
    model = linear(W, B)
    x, y = torch.tensor(X), torch.tensor(Y)
    # α > ε: the ε-ball projection bites as well as the domain clip.
    x_adv = pgd_attack(model, x, y, epsilon=0.05, steps=1, step_size=0.08)
    expected = np_pgd(np.array(W), np.array(B), np.array(X), np.array(Y), 0.05, 1, 0.08)
    np.testing.assert_allclose(x_adv.numpy(), expected, atol=1e-6)
    assert not np.allclose(expected, np.array(X))
    assert all(p.grad is None for p in model.parameters())


def test_pgd_is_identity_with_no_budget_or_no_steps() -> None:
    model = linear(W, B)
    x, y = torch.tensor(X), torch.tensor(Y)
    state = torch.get_rng_state()
    for eps, steps in [(0.0, 10), (0.1, 0)]:
        out = pgd_attack(model, x, y, epsilon=eps, steps=steps, step_size=0.1, random_start=True)
        assert torch.equal(out, x)
    assert torch.equal(torch.get_rng_state(), state)  # no random start was drawn


def test_pgd_stays_in_ball_and_domain_and_raises_the_loss(trained_logreg: Any) -> None:
    model, x, y = trained_logreg
    eps = 0.1
    for random_start in (False, True):
        x_adv = pgd_attack(
            model,
            x,
            y,
            epsilon=eps,
            steps=10,
            step_size=eps / 4,
            random_start=random_start,
            generator=torch.Generator().manual_seed(0),
        )
        assert float((x_adv - x).abs().max()) <= eps + 1e-6
        assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
        with torch.no_grad():
            clean = nn.functional.cross_entropy(model(x), y)
            adv = nn.functional.cross_entropy(model(x_adv), y)
            assert float(adv) > float(clean) + 0.1
            assert (model(x_adv).argmax(1) == y).float().mean() < (
                model(x).argmax(1) == y
            ).float().mean()
    assert all(p.grad is None for p in model.parameters())


def test_pgd_restores_the_training_mode() -> None:
    model = nn.Sequential(nn.Linear(2, 4), nn.Dropout(0.5), nn.Linear(4, 3)).train()
    pgd_attack(model, torch.tensor(X), torch.tensor(Y), epsilon=0.1, steps=2, step_size=0.05)
    assert model.training and all(m.training for m in model.modules())


def test_one_local_step_is_sgd_at_the_hand_computed_pgd_example() -> None:
    # Prepare: one full batch, two PGD steps, then one SGD step (weight decay on, momentum's first
    # step being a plain step).
    x = np.array([[0.2, 0.7], [0.9, 0.4], [0.0, 1.0], [0.6, 0.3]], dtype=np.float32)
    y = np.array([0, 1, 2, 1])
    lr, wd, eps, alpha = 0.3, 0.01, 0.1, 0.06
    task = TrainTask(
        model=linear(W, B),
        data=XY(x, y),
        training=TrainingConfig(local_steps=1, batch_size=4, lr=lr, momentum=0.9, weight_decay=wd),
        config=FalConfig(epsilon=eps, pgd_steps=2, step_size=alpha),
        server_round=1,
        seed=3,
    )
    # Execute
    result = train(task)
    # Assert
    w, b = np.array(W), np.array(B)
    x_adv = np_pgd(w, b, x.astype(np.float64), y, eps, 2, alpha)
    residual = softmax(x_adv @ w.T + b) - np.eye(3)[y]
    w_new = w - lr * (residual.T @ x_adv / 4 + wd * w)
    b_new = b - lr * (residual.mean(axis=0) + wd * b)
    np.testing.assert_allclose(task.model.weight.detach().numpy(), w_new, atol=1e-5)
    np.testing.assert_allclose(task.model.bias.detach().numpy(), b_new, atol=1e-5)
    assert result.steps == 1 and result.num_examples == 4
    adv_loss = -np.log(softmax(x_adv @ w.T + b)[np.arange(4), y]).mean()
    np.testing.assert_allclose(result.metrics["train-loss"], adv_loss, rtol=1e-5)
    clean_acc = (np.argmax(x @ w.T + b, axis=1) == y).mean()
    assert result.metrics["train-accuracy"] == pytest.approx(clean_acc)
    robust_acc = (np.argmax(x_adv @ w.T + b, axis=1) == y).mean()
    assert result.metrics["train-robust-accuracy"] == pytest.approx(robust_acc)


def test_fal_with_epsilon_zero_equals_fedavg() -> None:
    avg, _ = run_local(make_spec({"name": "fedavg", "config": {}}), num_nodes=3)
    fal0, _ = run_local(
        make_spec({"name": "fal", "config": {"epsilon": 0.0, "random_start": True}}), num_nodes=3
    )
    fal, _ = run_local(
        make_spec({"name": "fal", "config": {"epsilon": 0.1, "pgd_steps": 2}}), num_nodes=3
    )
    for key, value in final_weights(avg).items():
        np.testing.assert_array_equal(value, final_weights(fal0)[key])
    assert any(not np.allclose(v, final_weights(fal)[k]) for k, v in final_weights(avg).items())


def test_rounds_record_robust_accuracy_below_clean() -> None:
    spec = make_spec({"name": "fal", "config": {"pgd_steps": 3, "eval_pgd_steps": 5}}, rounds=1)
    _, recorder = run_local(spec, num_nodes=3)
    (record,) = recorder.rounds(1)
    metrics = record.metrics
    assert {"robust-accuracy", "robust-loss", "accuracy"} <= metrics.keys()
    assert 0.0 <= metrics["robust-accuracy"] <= metrics["accuracy"]
    assert metrics["robust-loss"] >= metrics["loss"]
    assert all("train-robust-accuracy" in u.metrics for u in record.updates)


def test_server_metrics_caps_examples_and_uses_eval_epsilon(trained_logreg: Any) -> None:
    model, x, y = trained_logreg
    test = XY(x.numpy(), y.numpy())
    clean = (model(x[:50]).argmax(1) == y[:50]).float().mean()
    no_attack = server_metrics(model, test, FalConfig(eval_epsilon=0.0, eval_max_examples=50))
    assert no_attack["robust-accuracy"] == pytest.approx(float(clean))
    attacked = server_metrics(model, test, FalConfig(epsilon=0.0, eval_epsilon=0.1))
    assert attacked["robust-accuracy"] < no_attack["robust-accuracy"]
    assert plugin.server_metrics is server_metrics and "robust" in plugin.tags
