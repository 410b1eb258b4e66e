"""FedZO's estimator, FZooS's surrogate and update, the black-box workloads and their counting."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from flwr.app import ArrayRecord, MetricRecord, RecordDict

from florist.client.training import TrainingConfig, TrainTask, train_local
from florist.client.workloads import ClientData, WorkloadDataError
from florist.client.workloads.blackbox import (
    SURROGATE_BUFFER,
    AttackConfig,
    MetricConfig,
    QuadraticConfig,
    QuadraticModel,
    attack_digits,
    attack_images,
    metric_digits,
    quadratic,
    quadratic_rows,
)
from florist.datasets import XY
from florist.strategies.fedzo import (
    FedZOConfig,
    FedZOHooks,
    forward_difference_gradient,
    orthogonal_directions,
)
from florist.strategies.fzoos import (
    HISTORY_KEY,
    OWN_KEY,
    FZooSConfig,
    FZooSHooks,
    feature_map,
    fit_surrogate,
    random_features,
    surrogate_gradient,
)
from florist.strategies.zeroth_order import OBJECTIVE, QUERIES, QUERIES_TOTAL, query_metrics

# --- FedZO's estimator ---------------------------------------------------------------------


def _quadratic(d: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((d, d))
    hessian = a @ a.T / d + np.eye(d)
    centre = rng.standard_normal(d)
    return hessian, centre, rng.standard_normal(d)


def _fedzo_estimate(h: np.ndarray, c: np.ndarray, x: np.ndarray, q: int, mu: float, rng: Any):
    f = lambda z: 0.5 * (z - c) @ h @ (z - c)  # noqa: E731
    u = orthogonal_directions(rng, len(x), q)
    return forward_difference_gradient(np.array([f(x + mu * v) for v in u]), f(x), u, mu)


def test_directions_are_orthonormal_unit_vectors_in_blocks_of_at_most_d() -> None:
    rng = np.random.default_rng(0)
    u = orthogonal_directions(rng, 6, 4)
    np.testing.assert_allclose(u @ u.T, np.eye(4), atol=1e-12)
    blocks = orthogonal_directions(rng, 3, 7)  # 3 + 3 + 1
    assert blocks.shape == (7, 3)
    np.testing.assert_allclose(blocks[:3] @ blocks[:3].T, np.eye(3), atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(blocks, axis=1), 1.0)


def test_fedzo_estimator_mean_matches_the_gradient_more_closely_as_q_grows() -> None:
    d, mu, draws = 30, 1e-4, 400
    h, c, x = _quadratic(d)
    true = h @ (x - c)
    rng = np.random.default_rng(1)
    errors = {}
    for q in (2, 8, 30):
        estimates = np.array([_fedzo_estimate(h, c, x, q, mu, rng) for _ in range(draws)])
        mean_error = np.linalg.norm(estimates.mean(0) - true) / np.linalg.norm(true)
        # Unbiased: the mean of `draws` estimates is off by about sqrt((d/q − 1)/draws).
        assert mean_error < 3 * math.sqrt((d / q - 1) / draws) + 1e-3, (q, mean_error)
        errors[q] = float(np.mean(np.linalg.norm(estimates - true, axis=1)))
    assert errors[2] > errors[8] > errors[30]
    # q = d: a full orthonormal basis, exact up to the O(μ) smoothing term.
    assert errors[30] / np.linalg.norm(true) < 1e-3


# --- FZooS's surrogate ---------------------------------------------------------------------


def _smooth(x: np.ndarray) -> float:
    return float(np.sum(np.sin(x)) + 0.5 * x @ x)


def _smooth_gradient(x: np.ndarray) -> np.ndarray:
    return np.cos(x) + x


def test_surrogate_gradient_is_the_derivative_of_the_surrogate() -> None:
    omega, offset = random_features(3, 5, 200, 0.7)
    w = np.random.default_rng(0).standard_normal(200)
    x = np.random.default_rng(1).standard_normal(5)

    def value(z: np.ndarray) -> float:
        return float(feature_map(z[None, :], omega, offset)[0] @ w)

    step = 1e-6
    numeric = np.array(
        [(value(x + step * e) - value(x - step * e)) / (2 * step) for e in np.eye(5)]
    )
    np.testing.assert_allclose(surrogate_gradient(x, w, omega, offset), numeric, rtol=1e-6)


def test_fitted_surrogate_interpolates_its_queries() -> None:
    omega, offset = random_features(0, 3, 500, 1.0)
    points = np.random.default_rng(0).uniform(-1, 1, (12, 3))
    values = np.array([_smooth(p) for p in points])
    w = fit_surrogate(points, values, omega, offset, 1e-9)
    predicted = feature_map(points, omega, offset) @ w
    # Up to the constant the surrogate leaves out (the values' mean).
    np.testing.assert_allclose(predicted - predicted.mean(), values - values.mean(), atol=1e-5)


def test_surrogate_gradient_approaches_the_true_gradient_as_queries_grow() -> None:
    d = 4
    x0 = np.array([0.3, -0.2, 0.5, 0.1])
    omega, offset = random_features(0, d, 4000, 1.0)
    true = _smooth_gradient(x0)
    errors = []
    for n in (2, 8, 64):
        per_seed = []
        for seed in range(5):
            around = x0 + np.random.default_rng(seed).uniform(-0.1, 0.1, (n, d))
            points = np.vstack([x0, around])
            values = np.array([_smooth(p) for p in points])
            w = fit_surrogate(points, values, omega, offset, 1e-8)
            estimate = surrogate_gradient(x0, w, omega, offset)
            per_seed.append(np.linalg.norm(estimate - true) / np.linalg.norm(true))
        errors.append(float(np.median(per_seed)))
    assert errors[0] > errors[1] > errors[2]
    assert errors[1] < 0.05 and errors[2] < 0.005, errors


# --- the client halves on the one loop --------------------------------------------------------


class CountingLoss:
    """The quadratic's loss, counting its calls: every query is one call."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, residuals: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return 0.5 * torch.mean(residuals**2)


def _task(
    config: Any,
    *,
    d: int = 3,
    steps: int = 2,
    lr: float = 0.1,
    m: int = 50,
    seed: int = 7,
    state: RecordDict | None = None,
    loss: Any = None,
    start: np.ndarray | None = None,
    global_w: np.ndarray | None = None,
) -> TrainTask[Any]:
    rows = np.random.default_rng(0).standard_normal((d + 2, d))
    targets = rows @ np.linspace(-1, 1, d)
    data = XY(x=np.concatenate([rows, targets[:, None]], 1), y=np.zeros(d + 2, dtype=np.int64))
    x0 = torch.from_numpy(start if start is not None else np.full(d, 0.5))
    model = QuadraticModel(x0, m)
    if global_w is not None:
        model.get_buffer(SURROGATE_BUFFER).copy_(torch.from_numpy(global_w))
    return TrainTask(
        model=model,
        data=data,
        training=TrainingConfig(local_steps=steps, lr=lr),
        config=config,
        server_round=1,
        seed=seed,
        state=state if state is not None else RecordDict(),
        loss=loss or CountingLoss(),
    )


def test_fedzo_counts_every_query_and_reports_the_start_objective() -> None:
    loss = CountingLoss()
    task = _task(FedZOConfig(q=4), steps=3, loss=loss)
    with torch.no_grad():
        start = float(loss(task.model(torch.from_numpy(task.data.x)), None))
    loss.calls = 0
    result = train_local(task, FedZOHooks(task.config, seed=1))
    assert result.metrics[QUERIES] == 3 * (4 + 1) == loss.calls
    assert result.metrics[QUERIES_TOTAL] == 15
    assert result.metrics[OBJECTIVE] == pytest.approx(start)
    again = train_local(
        _task(FedZOConfig(q=4), steps=3, state=task.state), FedZOHooks(task.config, 2)
    )
    assert again.metrics[QUERIES_TOTAL] == 30  # the node's running total for the run


def test_fedzo_steps_along_its_estimate() -> None:
    # SGD: x_1 = x_0 − lr·ĝ, ĝ from the same directions the hooks draw.
    config = FedZOConfig(q=2, mu=1e-3)
    task = _task(config, steps=1, lr=0.2)
    x0 = task.model.x.detach().numpy().copy()
    rows = torch.from_numpy(task.data.x)

    def f(z: np.ndarray) -> float:
        with torch.no_grad():
            task.model.x.copy_(torch.from_numpy(z))
            value = float(0.5 * torch.mean(task.model(rows) ** 2))
        task.model.x.data = torch.from_numpy(x0.copy())
        return value

    u = orthogonal_directions(np.random.default_rng([5, 0xF20]), 3, 2)
    expected = x0 - 0.2 * forward_difference_gradient(
        np.array([f(x0 + 1e-3 * v) for v in u]), f(x0), u, 1e-3
    )
    train_local(task, FedZOHooks(config, seed=5))
    np.testing.assert_allclose(task.model.x.detach().numpy(), expected, rtol=1e-12)


def _history(task: TrainTask[Any]) -> tuple[np.ndarray, np.ndarray]:
    points, values = task.state.array_records[HISTORY_KEY].to_numpy_ndarrays()
    return points, values


def _expected_descent(
    task: TrainTask[Any],
    config: FZooSConfig,
    x0: np.ndarray,
    lr: float,
    m: int,
    correction: np.ndarray | None = None,
) -> np.ndarray:
    """Local surrogate descent by hand, on the queries the node recorded, in their order."""
    points, values = _history(task)
    omega, offset = random_features(config.feature_seed, len(x0), m, config.lengthscale)
    x, known = x0.copy(), 1 + config.init_queries
    for k in range(task.training.local_steps or 0):
        if k > 0:
            known += 1 + config.explore
        g = surrogate_gradient(
            x,
            fit_surrogate(points[:known], values[:known], omega, offset, config.noise),
            omega,
            offset,
        )
        if correction is not None:
            g = g + config.gamma / (k + 1) * surrogate_gradient(x, correction, omega, offset)
        x = x - lr * g
    return x


def test_fzoos_with_gamma_zero_is_local_surrogate_descent() -> None:
    config = FZooSConfig(gamma=0.0, init_queries=4, explore=2, local_optimizer="sgd")
    loss = CountingLoss()
    task = _task(config, steps=3, lr=0.05, loss=loss, global_w=np.full(50, 3.0))
    x0 = task.model.x.detach().numpy().copy()
    result = train_local(task, FZooSHooks(config, seed=3))
    expected = _expected_descent(task, config, x0, 0.05, 50)
    np.testing.assert_allclose(task.model.x.detach().numpy(), expected, rtol=1e-10)
    # Queries: x_0 and 4 around it, then x_k and 2 around it for k = 1, 2, then x_3.
    assert result.metrics[QUERIES] == 1 + 4 + 2 * (1 + 2) + 1 == loss.calls
    points, _ = _history(task)
    np.testing.assert_allclose(points[-1], task.model.x.detach().numpy())
    # The surrogate sent with the model is the one fit at x_3, and the node keeps it.
    sent = task.model.get_buffer(SURROGATE_BUFFER).numpy()
    np.testing.assert_allclose(task.state.array_records[OWN_KEY].to_numpy_ndarrays()[0], sent)
    assert not np.allclose(sent, 3.0)


def test_fzoos_corrects_by_the_global_minus_its_own_surrogate_with_decaying_gamma() -> None:
    config = FZooSConfig(gamma=2.0, init_queries=4, explore=2, local_optimizer="sgd")
    rng = np.random.default_rng(4)
    own, global_w = rng.standard_normal(50), rng.standard_normal(50)
    state = RecordDict({OWN_KEY: ArrayRecord([own])})
    task = _task(config, steps=3, lr=0.05, state=state, global_w=global_w)
    x0 = task.model.x.detach().numpy().copy()
    train_local(task, FZooSHooks(config, seed=3))
    expected = _expected_descent(task, config, x0, 0.05, 50, correction=global_w - own)
    np.testing.assert_allclose(task.model.x.detach().numpy(), expected, rtol=1e-10)
    plain = _expected_descent(task, config, x0, 0.05, 50)
    assert np.linalg.norm(expected - plain) > 1e-3  # the correction moved the iterate


def test_fzoos_keeps_its_history_across_rounds_and_explores_only_once_at_the_start() -> None:
    config = FZooSConfig(init_queries=4, explore=2, history=20)
    first = _task(config, steps=2)
    train_local(first, FZooSHooks(config, seed=1))
    assert len(_history(first)[0]) == 1 + 4 + 1 + 2 + 1
    second = _task(config, steps=2, state=first.state)
    result = train_local(second, FZooSHooks(config, seed=2))
    assert result.metrics[QUERIES] == 1 + (1 + 2) + 1
    assert len(_history(second)[0]) == 9 + 5
    third = _task(config, steps=2, state=second.state)
    train_local(third, FZooSHooks(config, seed=3))
    assert len(_history(third)[0]) == 19 and len(_history(third)[1]) == 19
    fourth = _task(config, steps=2, state=third.state)
    train_local(fourth, FZooSHooks(config, seed=4))
    assert len(_history(fourth)[0]) == 20  # only the most recent `history` are kept


def test_a_round_sums_the_queries_and_averages_the_rest() -> None:
    records = [
        RecordDict({"m": MetricRecord({QUERIES: 10.0, OBJECTIVE: 1.0, "num-examples": 1})}),
        RecordDict({"m": MetricRecord({QUERIES: 30.0, OBJECTIVE: 4.0, "num-examples": 3})}),
    ]
    out = query_metrics(records, "num-examples")
    assert out[QUERIES] == 40.0
    assert out[OBJECTIVE] == pytest.approx((1.0 + 12.0) / 4)


# --- the workloads ---------------------------------------------------------------------------


def test_quadratic_global_hessian_has_the_condition_number_and_clients_differ() -> None:
    config = QuadraticConfig(dimension=20, num_clients=4, condition_number=50, heterogeneity=0.7)
    rows = quadratic_rows(config)
    hessians = [r[:, :-1].T @ r[:, :-1] / 20 for r in rows]
    eig = np.linalg.eigvalsh(np.mean(hessians, axis=0))
    assert eig.max() / eig.min() == pytest.approx(50, rel=1e-8)
    assert not np.allclose(hessians[0], hessians[1])
    same = quadratic_rows(QuadraticConfig(dimension=20, num_clients=4, heterogeneity=0.0))
    np.testing.assert_allclose(same[0], same[3])
    # The server's objective is the clients' mean.
    model = quadratic.build_model(config)
    with torch.no_grad():
        per_client = [
            float(quadratic.loss(model(torch.from_numpy(r)), torch.zeros(1))) for r in rows
        ]
        server = quadratic.metrics(model(torch.from_numpy(quadratic.load_test(config).x)), None)
    assert server["objective"] == pytest.approx(np.mean(per_client))


def test_black_box_nodes_need_num_partitions_equal_to_num_clients() -> None:
    with pytest.raises(WorkloadDataError, match="num_clients=5"):
        quadratic.load_train(QuadraticConfig(), ClientData(partition_id=0, num_partitions=3))


def test_attack_clients_hold_distinct_images_of_one_class_and_validation_is_unseen() -> None:
    config = AttackConfig(num_clients=3, images_per_client=5)
    parts, held_out = attack_images(config)
    seen = np.concatenate(parts)
    assert len({row.tobytes() for row in seen}) == 15
    assert not {row.tobytes() for row in held_out} & {row.tobytes() for row in seen}
    data = attack_digits.load_train(config, ClientData(partition_id=1, num_partitions=3))
    assert set(data.y.tolist()) == {config.target_class}
    model = attack_digits.build_model(config)
    with torch.no_grad():
        clean = attack_digits.metrics(model(torch.from_numpy(data.x)), torch.from_numpy(data.y))
        model.x.fill_(10.0)  # ε·tanh(10) ≈ ε on every pixel
        moved = attack_digits.metrics(model(torch.from_numpy(data.x)), torch.from_numpy(data.y))
    assert clean["attack-success"] == 0.0 and clean["objective"] > 0
    assert moved["objective"] != clean["objective"]


def test_attack_config_refuses_more_images_than_the_class_has() -> None:
    with pytest.raises(ValueError, match="usable images"):
        AttackConfig(num_clients=20, images_per_client=200)


def test_metric_objective_is_one_minus_f1_with_no_gradient() -> None:
    config = MetricConfig(num_clients=2)
    data = metric_digits.load_train(config, ClientData(partition_id=0, num_partitions=2))
    assert set(data.y.tolist()) == {0, 1}
    model = metric_digits.build_model(config)
    scores = model(torch.from_numpy(data.x))
    y = torch.from_numpy(data.y)
    predicted = (scores[:, 1] > 0).numpy()
    tp = int((predicted & (data.y == 1)).sum())
    f1 = (
        2
        * tp
        / (
            2 * tp
            + int((predicted & (data.y == 0)).sum())
            + int((~predicted & (data.y == 1)).sum())
        )
    )
    loss = metric_digits.loss(scores, y)
    assert float(loss.detach()) == pytest.approx(1 - f1)
    loss.backward()
    assert model.x.grad is not None and float(model.x.grad.abs().sum()) == 0.0


# --- through the API -------------------------------------------------------------------------


@pytest.fixture
def client(database_url: str, tmp_path: Path):  # type: ignore[no-untyped-def]
    from florist.server.api.app import create_app
    from florist.server.settings import Settings

    with TestClient(
        create_app(Settings(home=tmp_path, database_url=database_url), follow_runs=False)
    ) as c:
        yield c


BODY: dict[str, Any] = {
    "name": "zoo",
    "strategy": {"name": "fzoos", "config": {}},
    "workload": {"name": "quadratic", "config": {}},
    "training": {"local_steps": 5, "lr": 0.01},
    "rounds": 3,
    "clients": {"min": 5},
}


def test_zeroth_order_experiments_are_accepted_with_every_default_spelled_out(
    client: TestClient,
) -> None:
    created = client.post("/api/v1/experiments", json=BODY)
    assert created.status_code == 201, created.text
    workload = created.json()["workload"]
    assert workload["config"]["dimension"] == 300
    assert workload["config"]["num_clients"] == 5


@pytest.mark.parametrize(
    ("change", "loc"),
    [
        ({"workload": {"name": "digits", "config": {}}}, ["body", "workload", "name"]),
        (
            {"workload": {"name": "quadratic", "config": {"condition_number": 0.5}}},
            ["body", "workload", "config", "condition_number"],
        ),
        (
            {"workload": {"name": "attack-digits", "config": {"images_per_client": 200}}},
            ["body", "workload", "config"],
        ),
        ({"strategy": {"name": "fedzo", "config": {"q": 0}}}, ["body", "strategy", "config", "q"]),
        (
            {"strategy": {"name": "fzoos", "config": {"gamma": -1}}},
            ["body", "strategy", "config", "gamma"],
        ),
    ],
)
def test_bad_zeroth_order_configs_are_422_naming_the_field(
    client: TestClient, change: dict[str, Any], loc: list[str]
) -> None:
    response = client.post("/api/v1/experiments", json=BODY | change)
    assert response.status_code == 422, response.text
    locs = [err["loc"] for err in response.json()["detail"]]
    assert any(got[: len(loc)] == loc for got in locs), locs
    assert client.get("/api/v1/experiments").json()["count"] == 0


def test_fzoos_on_one_client_is_the_same_for_every_gamma() -> None:
    # With one client the averaged surrogate is its own: the correction vanishes, so FZooS with
    # γ = 1 runs exactly as with γ = 0 (local surrogate descent), round after round.
    from florist.server.runtime.localgrid import run_local
    from florist.server.spec import ExperimentSpec

    def final(gamma: float) -> tuple[np.ndarray, list[float]]:
        spec = ExperimentSpec.model_validate(
            {
                "name": "one",
                "strategy": {"name": "fzoos", "config": {"gamma": gamma, "init_queries": 3}},
                "workload": {
                    "name": "quadratic",
                    "config": {"dimension": 6, "num_clients": 1, "surrogate_features": 40},
                },
                "training": {"local_steps": 3, "lr": 0.05},
                "rounds": 3,
                "clients": {"min": 1},
            }
        )
        result, _ = run_local(spec, 1, node_configs=[{"partition-id": 0, "num-partitions": 1}])
        assert result.final_arrays is not None
        norms = [r.updates[0].metrics["fzoos-correction-norm"] for r in result.history]
        return result.final_arrays["x"].numpy(), norms

    with_gamma, norms = final(1.0)
    without, _ = final(0.0)
    # Up to rounding: the correction is the difference of two equal sums computed apart, which
    # leaves ~1e-12 where thread counts differ; a correction that did not vanish moves x far more.
    np.testing.assert_allclose(with_gamma, without, rtol=1e-9, atol=0)
    assert norms[1] == pytest.approx(0.0, abs=1e-9) and norms[2] == pytest.approx(0.0, abs=1e-9)
