"""The one local training loop and its hooks, checked against values computed by hand."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, RecordDict
from pydantic import BaseModel
from torch import nn

from florist.client.training import (
    Batch,
    RunningMetrics,
    TrainerHooks,
    TrainingConfig,
    TrainTask,
    train_local,
    train_sgd,
)
from florist.datasets import XY
from florist.datasets.seeds import derive_seed

W0 = 0.5
LR = 0.1


class NoConfig(BaseModel):
    """The loop never reads the strategy's config; hooks get theirs when built."""


def line_task(x: list[float], *, steps: int = 1, state: RecordDict | None = None) -> TrainTask[Any]:
    """A 1→1 model w·x without bias at w = 0.5, one full batch per step, plain SGD."""
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(W0)
    data = XY(x=np.array(x, dtype=np.float32).reshape(-1, 1), y=np.zeros(len(x), dtype=np.int64))
    training = TrainingConfig(local_steps=steps, batch_size=max(len(x), 1), lr=LR, momentum=0.0)
    return TrainTask(
        model,
        data,
        training,
        NoConfig(),
        server_round=1,
        seed=0,
        state=state if state is not None else RecordDict(),
    )


def weight(task: TrainTask[Any]) -> float:
    return float(task.model.weight.detach()[0, 0])


class LinearLoss(TrainerHooks):
    """L(w) = mean(w·x), so dL/dw = mean(x): every step is easy to follow by hand."""

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return logits.mean()


def test_default_hooks_are_sgd_with_momentum_and_weight_decay_by_hand() -> None:
    # Prepare: a 2→2 linear model on 3 examples, full batch, two steps of torch's SGD rule
    # buf ← m·buf + (g + wd·w), w ← w − lr·buf, with g the mean cross-entropy gradient.
    x = np.array([[1.0, 2.0], [-1.0, 0.5], [0.3, -1.2]])
    y = np.array([0, 1, 1])
    w = np.array([[0.1, -0.2], [0.3, 0.4]])
    b = np.array([0.05, -0.1])
    model = nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor(w))
        model.bias.copy_(torch.tensor(b))
    training = TrainingConfig(local_steps=2, batch_size=3, lr=0.2, momentum=0.9, weight_decay=0.1)
    task = TrainTask(
        model, XY(x.astype(np.float32), y), training, NoConfig(), server_round=1, seed=0
    )
    buf_w, buf_b = np.zeros_like(w), np.zeros_like(b)
    for _ in range(2):
        logits = x @ w.T + b
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        delta = (p - np.eye(2)[y]) / len(y)
        buf_w = 0.9 * buf_w + (delta.T @ x + 0.1 * w)
        buf_b = 0.9 * buf_b + (delta.sum(0) + 0.1 * b)
        w, b = w - 0.2 * buf_w, b - 0.2 * buf_b

    # Execute
    result = train_sgd(task)

    # Assert
    assert result.steps == 2 and result.num_examples == 3
    np.testing.assert_allclose(model.weight.detach().numpy(), w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.bias.detach().numpy(), b, rtol=1e-5, atol=1e-6)


def test_batches_are_the_seeded_shuffles_of_fedavg() -> None:
    # Prepare: 5 examples in batches of 2 for 4 steps, i.e. one epoch and one batch more.
    seen: list[list[float]] = []

    class Record(TrainerHooks):
        def transform_batch(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Batch:
            seen.append(x[:, 0].tolist())
            return x, y

    data = XY(x=np.arange(5, dtype=np.float32).reshape(5, 1), y=np.zeros(5, dtype=np.int64))
    training = TrainingConfig(local_steps=4, batch_size=2)
    task = TrainTask(nn.Linear(1, 2), data, training, NoConfig(), server_round=3, seed=7)
    # The seed of node/round, one permutation per pass over the data.
    generator = torch.Generator().manual_seed(derive_seed(7, "round", 3))
    first, second = torch.randperm(5, generator=generator), torch.randperm(5, generator=generator)
    expected = [first[0:2], first[2:4], first[4:5], second[0:2]]

    # Execute
    result = train_local(task, Record())

    # Assert
    assert result.steps == 4
    assert seen == [t.float().tolist() for t in expected]


def test_gradient_transform_runs_after_backward_and_before_the_step() -> None:
    # Prepare: the hook sees g = mean(x) = 2 and adds 1; stepping first would give 0.5 − 0.1·2.
    seen: list[float] = []

    class AddOne(LinearLoss):
        def transform_gradient(
            self, model: nn.Module, params: list[nn.Parameter], x: torch.Tensor, y: torch.Tensor
        ) -> None:
            (p,) = params
            assert p.grad is not None
            seen.append(float(p.grad[0, 0]))
            p.grad.add_(1.0)

    task = line_task([1.0, 3.0])

    # Execute
    train_local(task, AddOne())

    # Assert: w1 = 0.5 − 0.1·(2 + 1)
    assert seen == [2.0]
    assert weight(task) == pytest.approx(W0 - LR * 3.0)


def test_extra_loss_is_in_the_gradient_and_the_reported_loss() -> None:
    # Prepare: 0.5·k·w² with k = 4 adds k·w0 = 2 to the gradient and 0.5 to the loss.
    class Quadratic(LinearLoss):
        def extra_loss(self, model: nn.Module) -> torch.Tensor:
            return 0.5 * 4.0 * (model.weight**2).sum()  # type: ignore[operator]

    task = line_task([1.0, 3.0])

    # Execute
    result = train_local(task, Quadratic())

    # Assert: w1 = 0.5 − 0.1·(2 + 2); loss at w0 = 0.5·2 + 0.5
    assert weight(task) == pytest.approx(W0 - LR * 4.0)
    assert result.metrics["train-loss"] == pytest.approx(1.5)


def test_batch_transform_feeds_the_gradient_and_the_metrics() -> None:
    # Prepare: inputs doubled (g = mean(2x) = 4); labels moved to 1, which the model never
    # predicts (one output, argmax 0), so accuracy is against the transformed labels.
    class Double(LinearLoss):
        def transform_batch(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Batch:
            return 2 * x, torch.ones_like(y)

    task = line_task([1.0, 3.0])

    # Execute
    result = train_local(task, Double())

    # Assert
    assert weight(task) == pytest.approx(W0 - LR * 4.0)
    assert result.metrics["train-accuracy"] == 0.0


def test_minibatch_hook_sets_the_data_order_and_the_step_count() -> None:
    # Prepare: two single-example batches, x = 1 then x = 3, whatever local_steps says.
    class Ordered(LinearLoss):
        def minibatches(self, task: TrainTask[Any]) -> Iterable[Batch]:
            for value in (1.0, 3.0):
                yield torch.tensor([[value]]), torch.zeros(1, dtype=torch.int64)

    task = line_task([1.0, 3.0], steps=10)

    # Execute
    result = train_local(task, Ordered())

    # Assert: w1 = 0.5 − 0.1·1 = 0.4, w2 = 0.4 − 0.1·3 = 0.1
    assert result.steps == 2
    assert weight(task) == pytest.approx(0.1)


def test_a_zeroth_order_gradient_replaces_backward() -> None:
    # Prepare: a central difference of L(w) = w·mean(x), with no autograd graph at all.
    class CentralDifference(LinearLoss):
        def compute_gradient(
            self, model: nn.Module, x: torch.Tensor, y: torch.Tensor
        ) -> tuple[torch.Tensor, torch.Tensor]:
            (p,) = list(model.parameters())
            h = 0.125  # a power of two: w ± h and the quotient are exact in float32
            with torch.no_grad():
                p.add_(h)
                up = self.loss(model(x), y)
                p.sub_(2 * h)
                down = self.loss(model(x), y)
                p.add_(h)
                p.grad = ((up - down) / (2 * h)).reshape(1, 1)
                logits = model(x)
                return self.loss(logits, y), logits

    task = line_task([1.0, 3.0])

    # Execute
    result = train_local(task, CentralDifference())

    # Assert: the estimate is exactly mean(x) = 2, so the step is plain SGD's.
    assert weight(task) == pytest.approx(W0 - LR * 2.0)
    assert result.metrics["train-loss"] == pytest.approx(1.0)


class CountRounds(LinearLoss):
    """Reads a counter from the run state at the start and writes it back at the end."""

    def start(self, task: TrainTask[Any], model: nn.Module) -> None:
        record = task.state.config_records.get("count")
        self.before = int(record["rounds"]) if record is not None else 0

    def finish(
        self, task: TrainTask[Any], model: nn.Module, running: RunningMetrics
    ) -> dict[str, float]:
        task.state["count"] = ConfigRecord({"rounds": self.before + 1})
        return {"rounds-before": float(self.before), "train-accuracy": -1.0}


def test_state_is_carried_across_rounds_and_finish_metrics_are_merged() -> None:
    # Prepare
    state = RecordDict()

    # Execute: two rounds on the same node's state
    first = train_local(line_task([1.0, 3.0], state=state), CountRounds())
    second = train_local(line_task([1.0, 3.0], state=state), CountRounds())

    # Assert: the second round read what the first wrote; finish may replace a loop metric.
    assert first.metrics["rounds-before"] == 0.0
    assert second.metrics["rounds-before"] == 1.0
    assert second.metrics["train-accuracy"] == -1.0
    assert second.metrics["train-loss"] == pytest.approx(1.0)
    assert state.config_records["count"]["rounds"] == 2


def test_an_empty_shard_trains_nothing_and_calls_no_hook() -> None:
    # Prepare
    state = RecordDict()
    task = line_task([], state=state)

    # Execute
    result = train_local(task, CountRounds())

    # Assert
    assert (result.num_examples, result.steps, result.metrics) == (0, 0, {})
    assert weight(task) == W0
    assert "count" not in state.config_records
