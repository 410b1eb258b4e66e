"""FAL: the PGD attack and its domain, one local adversarial step by hand, FedAvg at ε = 0,
robust metrics on a seeded subset under the training and the strong attack."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch import nn

from florist.client.models import LogRegSpec, build_model
from florist.client.training import TrainingConfig, TrainTask
from florist.datasets import (
    XY,
    DigitsSpec,
    SyntheticSpec,
    dataset_info,
    load_partition,
    load_test,
    load_train,
)
from florist.server.runtime.localgrid import run_local
from florist.server.spec import ExperimentSpec
from florist.strategies.fal import (
    AdversarialHooks,
    FalConfig,
    eval_subset,
    pgd_attack,
    plugin,
    server_metrics,
    train,
    worst_case,
)

UNIT_BOX = (0.0, 1.0)


DIGITS = {"name": "digits", "partitioner": {"name": "dirichlet", "alpha": 0.5}}


def make_spec(
    strategy: dict[str, Any], rounds: int = 2, dataset: dict[str, Any] = DIGITS
) -> ExperimentSpec:
    return ExperimentSpec.model_validate(
        {
            "name": "unit-fal",
            "strategy": strategy,
            "dataset": dataset,
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
    w: np.ndarray,
    b: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    eps: float,
    steps: int,
    alpha: float,
    domain: tuple[float, float] = UNIT_BOX,
) -> np.ndarray:
    """PGD on the mean cross-entropy of a linear model, by hand: ∇x = (p − onehot)·W / N."""
    onehot = np.eye(w.shape[0])[y]
    x_adv = x.copy()
    for _ in range(steps):
        grad = (softmax(x_adv @ w.T + b) - onehot) @ w / len(y)
        x_adv = np.clip(np.clip(x_adv + alpha * np.sign(grad), x - eps, x + eps), *domain)
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
    assert config.clip_min is None and config.clip_max is None  # the dataset's range
    assert config.eval_seed == 0 and config.strong_restarts == 5 and config.strong_pgd_steps == 50
    assert config.strong_step == pytest.approx(2.5 * 0.1 / 50)
    assert FalConfig(clip_max=0.5).clip_max == 0.5  # one explicit side is fine
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
    x_adv = pgd_attack(model, x, y, epsilon=0.05, steps=1, step_size=0.08, clip_min=0, clip_max=1)
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
    low, high = dataset_info(DigitsSpec()).input_range or (None, None)
    assert (low, high) == UNIT_BOX
    for random_start in (False, True):
        x_adv = pgd_attack(
            model,
            x,
            y,
            epsilon=eps,
            steps=10,
            step_size=eps / 4,
            random_start=random_start,
            clip_min=low,
            clip_max=high,
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
        # The data's range reaches the attack: x has 0s and 1s, so the domain clip bites.
        data=XY(x, y, input_range=UNIT_BOX),
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


def test_server_metrics_uses_eval_epsilon_and_a_strong_attack_no_weaker(
    trained_logreg: Any,
) -> None:
    model, x, y = trained_logreg
    test = XY(x.numpy(), y.numpy(), input_range=UNIT_BOX)
    clean = float((model(x).argmax(1) == y).float().mean())
    no_attack = server_metrics(model, test, FalConfig(eval_epsilon=0.0))
    assert (
        no_attack["robust-accuracy"] == no_attack["robust-accuracy-strong"] == pytest.approx(clean)
    )
    attacked = server_metrics(model, test, FalConfig(epsilon=0.0, eval_epsilon=0.1))
    assert attacked["robust-accuracy"] < no_attack["robust-accuracy"]
    assert attacked["robust-accuracy-strong"] <= attacked["robust-accuracy"]
    assert attacked["robust-loss-strong"] >= attacked["robust-loss"] - 1e-6
    assert plugin.server_metrics is server_metrics and "robust" in plugin.tags


# --- The attack's domain comes from the data: inputs outside [0, 1] are not pinned. ---


def test_datasets_declare_their_input_range() -> None:
    digits = load_partition(DigitsSpec(), 0, 2)
    assert dataset_info(DigitsSpec()).input_range == digits.input_range == UNIT_BOX
    assert load_test(DigitsSpec()).input_range == UNIT_BOX
    assert digits.x.min() >= 0.0 and digits.x.max() <= 1.0 and digits.x.max() == 1.0
    synthetic = load_partition(SyntheticSpec(), 0, 2)
    assert dataset_info(SyntheticSpec()).input_range is synthetic.input_range is None
    assert ((synthetic.x < 0) | (synthetic.x > 1)).mean() > 0.5


def attack_batch(
    data: XY, config: FalConfig, model: nn.Module
) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch the client half trains on for the whole of ``data``: (clean x, attacked x)."""
    training = TrainingConfig(local_steps=1, batch_size=len(data))
    hooks = AdversarialHooks(config)
    hooks.start(TrainTask(model, data, training, config, server_round=1, seed=0), model)
    x, y = torch.from_numpy(data.x), torch.from_numpy(data.y)
    return x, hooks.transform_batch(model, x, y)[0]


def test_attack_on_unbounded_data_moves_an_input_at_3_by_at_most_epsilon() -> None:
    # Prepare: inputs around 3, as synthetic has them, with no declared range.
    x = np.array([[3.0, 3.0], [2.5, 3.2]], dtype=np.float32)
    data = XY(x, np.array(Y), input_range=None)
    # Execute
    clean, attacked = attack_batch(data, FalConfig(epsilon=0.1), linear(W, B))
    # Assert: moved (the attack ran) but never outside the ε-ball; a [0, 1] clip gave 1.
    shift = (attacked - clean).abs()
    assert float(shift.max()) <= 0.1 + 1e-6 and float(shift.max()) > 0.05
    np.testing.assert_allclose(
        attacked.numpy(),
        np_pgd(np.array(W), np.array(B), x, np.array(Y), 0.1, 10, 0.025, (-np.inf, np.inf)),
        atol=1e-5,
    )


def test_attack_on_synthetic_stays_in_the_epsilon_ball() -> None:
    data = load_partition(SyntheticSpec(), 0, 3)
    torch.manual_seed(0)
    model = build_model(LogRegSpec(), dataset_info(SyntheticSpec()))
    clean, attacked = attack_batch(data, FalConfig(epsilon=0.1, random_start=True), model)
    assert float((attacked - clean).abs().max()) <= 0.1 + 1e-6
    assert float((attacked - clean).abs().mean()) > 0.05  # the attack did move the inputs


def test_explicit_clip_range_overrides_the_datasets_and_must_contain_the_inputs() -> None:
    x = np.array([[0.2, 0.9], [0.5, 0.5]], dtype=np.float32)
    model = linear(W, B)
    # A wider explicit range than the data's own: allowed, and used instead of [0, 1].
    wide = FalConfig(clip_min=-1.0, clip_max=2.0)
    _, attacked = attack_batch(XY(x, np.array(Y), input_range=UNIT_BOX), wide, model)
    expected = np_pgd(np.array(W), np.array(B), x, np.array(Y), 0.1, 10, 0.025, (-1.0, 2.0))
    np.testing.assert_allclose(attacked.numpy(), expected, atol=1e-5)
    # One that cuts the inputs off would pin them: refused.
    with pytest.raises(ValueError, match="outside the attack's domain"):
        attack_batch(XY(x, np.array(Y)), FalConfig(clip_max=0.8), model)


def test_fal_runs_on_synthetic_and_records_both_robust_accuracies() -> None:
    synthetic = {"name": "synthetic", "num_devices": 6}
    spec = make_spec({"name": "fal", "config": {"pgd_steps": 2}}, rounds=1, dataset=synthetic)
    _, recorder = run_local(spec, num_nodes=3)
    (record,) = recorder.rounds(1)
    metrics = record.metrics
    assert 0.0 <= metrics["robust-accuracy-strong"] <= metrics["robust-accuracy"]
    assert metrics["robust-accuracy"] <= metrics["accuracy"]


# --- The server's evaluation: a seeded random subset, and a strong attack. ---


def test_eval_subset_is_seeded_random_not_the_first_rows() -> None:
    a, b, again = (
        eval_subset(1000, 50, seed=0),
        eval_subset(1000, 50, seed=1),
        eval_subset(1000, 50, seed=0),
    )
    np.testing.assert_array_equal(a, again)
    assert not np.array_equal(a, b)
    assert not np.array_equal(a, np.arange(50)) and a.max() >= 50
    assert len(np.unique(a)) == 50 and np.all(np.diff(a) > 0) and a.min() >= 0 and a.max() < 1000
    np.testing.assert_array_equal(eval_subset(40, 50, seed=0), np.arange(40))


def test_server_metrics_score_the_seeded_subset() -> None:
    # Prepare: the model gets the first 50 rows right and every later row wrong.
    n, cap = 400, 50
    x = np.zeros((n, 2), dtype=np.float32)
    x[:cap, 0] = 1.0
    y = np.zeros(n, dtype=np.int64)
    # Logits (x0, 0.5): class 0 only where x0 = 1.
    model = linear([[1.0, 0.0], [0.0, 0.0]], [0.0, 0.5])
    test = XY(x, y)
    config = FalConfig(eval_epsilon=0.0, eval_max_examples=cap, eval_seed=7)
    # Execute
    metrics = server_metrics(model, test, config)
    # Assert: accuracy on exactly the seeded rows (the first 50 would score 1.0).
    idx = eval_subset(n, cap, seed=7)
    assert metrics["robust-accuracy"] == pytest.approx(float(np.mean(idx < cap)))
    assert metrics["robust-accuracy"] < 0.5


class Bowl(nn.Module):
    """Class 0 wins near the origin (logit 1 − k·‖x‖²), class 1 elsewhere (logit 0). At x = 0
    the input gradient is zero, so PGD started at x never moves; a random start escapes."""

    def __init__(self, k: float) -> None:
        super().__init__()
        self.k = nn.Parameter(torch.tensor(k))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inside = 1 - self.k * x.pow(2).sum(1)
        return torch.stack([inside, torch.zeros_like(inside)], dim=1)


def test_strong_attack_breaks_what_the_training_attack_cannot() -> None:
    # Prepare: ε = 0.1 reaches ‖x‖² = 0.02, where class 0's logit is 1 − 200·0.02 < 0.
    test = XY(np.zeros((8, 2), dtype=np.float32), np.zeros(8, dtype=np.int64))
    config = FalConfig(epsilon=0.1, pgd_steps=10, eval_pgd_steps=10)
    # Execute
    metrics = server_metrics(Bowl(200.0), test, config)
    no_restarts = server_metrics(
        Bowl(200.0), test, config.model_copy(update={"strong_restarts": 0})
    )
    # Assert: the training-style attack is stuck at the stationary point; restarts break it.
    assert metrics["robust-accuracy"] == 1.0
    assert metrics["robust-accuracy-strong"] == 0.0
    assert metrics["robust-loss-strong"] > metrics["robust-loss"]
    assert no_restarts["robust-accuracy-strong"] == 1.0
    assert server_metrics(Bowl(200.0), test, config) == metrics  # seeded: reruns agree


def test_worst_case_prefers_a_misclassified_candidate_over_a_higher_loss() -> None:
    # Class 0's logit is x0, class 1's x1, class 2's x2; true class 0.
    model = nn.Linear(3, 3, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(3))
    y = torch.tensor([0])
    right_high_loss = torch.tensor([[0.0, -0.1, -0.1]])  # still class 0, p0 ≈ 0.36
    wrong_low_loss = torch.tensor([[1.0, 1.01, -10.0]])  # class 1 wins narrowly, p0 ≈ 0.50
    with torch.no_grad():
        losses = [
            float(nn.functional.cross_entropy(model(c), y))
            for c in (right_high_loss, wrong_low_loss)
        ]
    assert losses[0] > losses[1]
    best = worst_case(model, y, [right_high_loss, wrong_low_loss])
    torch.testing.assert_close(best, wrong_low_loss)
    assert torch.equal(worst_case(model, y, [wrong_low_loss, right_high_loss]), wrong_low_loss)
