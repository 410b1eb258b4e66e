"""What FedZO and FZooS share: a counted black-box oracle on the one local loop, and query metrics.

A zeroth-order client half sees its local objective only through :class:`Oracle`: f_i(θ) is the
workload's loss on the node's whole partition with the model's trainable parameters set to the
flat vector θ, and every call is counted. The local loop (client/training.py) runs K steps; at
each, :meth:`ZerothOrderHooks.compute_gradient` asks the algorithm for a gradient estimate built
from oracle values only and writes it into ``p.grad``; the configured optimiser then steps.
Each update reports ``zoo-queries`` (this task's queries), ``zoo-queries-total`` (the node's
queries in this run so far) and ``zoo-objective`` (f_i at the global model it was sent); the
server half sums ``zoo-queries`` over a round (:func:`query_metrics`), so the round's train
metrics hold the federation's queries and the dashboard can plot the objective against them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal

import numpy as np
import torch
from flwr.app import ConfigRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords
from torch import nn

from florist.client.training import (
    Batch,
    LossFn,
    RunningMetrics,
    TrainerHooks,
    TrainingConfig,
    TrainTask,
    num_local_steps,
)

from .base import ServerSetup
from .fedavg import sampling_kwargs

QUERIES = "zoo-queries"
QUERIES_TOTAL = "zoo-queries-total"
OBJECTIVE = "zoo-objective"
_COUNTER_KEY = "zoo.queries"

LocalOptimizer = Literal["sgd", "adam"]


def flat_parameters(params: list[nn.Parameter]) -> np.ndarray:
    """The trainable parameters as one float64 vector θ."""
    return np.concatenate([p.detach().cpu().double().reshape(-1).numpy() for p in params])


def assign(params: list[nn.Parameter], theta: np.ndarray) -> None:
    """Set the parameters from the flat vector θ (in place, keeping dtype and device)."""
    offset = 0
    with torch.no_grad():
        for p in params:
            n = p.numel()
            chunk = torch.from_numpy(np.ascontiguousarray(theta[offset : offset + n]))
            p.copy_(chunk.reshape(p.shape).to(dtype=p.dtype, device=p.device))
            offset += n


def write_gradient(params: list[nn.Parameter], gradient: np.ndarray) -> None:
    """``p.grad`` of each parameter from one flat gradient vector."""
    offset = 0
    for p in params:
        n = p.numel()
        chunk = torch.from_numpy(np.ascontiguousarray(gradient[offset : offset + n]))
        p.grad = chunk.reshape(p.shape).to(dtype=p.dtype, device=p.device).clone()
        offset += n


class Oracle:
    """f_i as a black box: the loss of ``model`` on (x, y) at a flat parameter vector, counted.

    A query leaves the parameters where they were (the loop's optimiser steps from there)."""

    def __init__(
        self,
        model: nn.Module,
        params: list[nn.Parameter],
        x: torch.Tensor,
        y: torch.Tensor,
        loss: LossFn,
    ) -> None:
        self.model, self.params, self.x, self.y, self.loss = model, params, x, y, loss
        self.count = 0

    def evaluate(self, theta: np.ndarray) -> tuple[float, torch.Tensor]:
        """f_i(θ) and the model's outputs there (one query)."""
        saved = flat_parameters(self.params)
        assign(self.params, theta)
        try:
            with torch.no_grad():
                outputs = self.model(self.x)
                value = float(self.loss(outputs, self.y))
        finally:
            assign(self.params, saved)
        self.count += 1
        return value, outputs

    def __call__(self, theta: np.ndarray) -> float:
        return self.evaluate(theta)[0]


def local_optimizer(
    kind: LocalOptimizer, params: list[nn.Parameter], training: TrainingConfig
) -> torch.optim.Optimizer:
    """The local step along the estimate: plain SGD (θ − η·g) or Adam, both at ``training.lr``
    (a fresh optimiser each round, as in the FZooS reference code)."""
    if kind == "adam":
        return torch.optim.Adam(params, lr=training.lr)
    return torch.optim.SGD(params, lr=training.lr)


class ZerothOrderHooks(TrainerHooks):
    """The loop's hooks for a zeroth-order client half: each of the K steps sees the node's
    whole partition (f_i is a deterministic black box), its gradient comes from
    :meth:`estimate`, and every query is counted into the update's metrics."""

    optimizer_kind: LocalOptimizer = "sgd"

    def __init__(self) -> None:
        self.oracle: Oracle | None = None
        self.params: list[nn.Parameter] = []
        self.step = 0
        self.start_value = float("nan")
        self.task: TrainTask[Any] | None = None

    def start(self, task: TrainTask[Any], model: nn.Module) -> None:
        self.task = task
        self.params = [p for p in model.parameters() if p.requires_grad]

    def optimizer(
        self, params: list[nn.Parameter], training: TrainingConfig
    ) -> torch.optim.Optimizer:
        return local_optimizer(self.optimizer_kind, params, training)

    def minibatches(self, task: TrainTask[Any]) -> Iterator[Batch]:
        x = torch.from_numpy(task.data.x).to(task.device)
        y = torch.from_numpy(task.data.y).to(task.device)
        for _ in range(num_local_steps(task.training, len(task.data))):
            yield x, y

    def estimate(
        self, oracle: Oracle, theta: np.ndarray, step: int
    ) -> tuple[np.ndarray, float, torch.Tensor]:
        """The gradient estimate at θ (the step's k-th), f_i(θ) and the outputs there."""
        raise NotImplementedError

    def compute_gradient(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.oracle is None:
            self.oracle = Oracle(model, self.params, x, y, self.loss)
        theta = flat_parameters(self.params)
        gradient, value, outputs = self.estimate(self.oracle, theta, self.step)
        if self.step == 0:
            self.start_value = value
        write_gradient(self.params, gradient)
        self.step += 1
        return torch.tensor(value, dtype=torch.float64), outputs

    def finish(
        self, task: TrainTask[Any], model: nn.Module, running: RunningMetrics
    ) -> dict[str, float]:
        used = self.oracle.count if self.oracle is not None else 0
        total = count_queries(task.state, used)
        return {QUERIES: float(used), QUERIES_TOTAL: float(total), OBJECTIVE: self.start_value}


def count_queries(state: RecordDict, used: int) -> int:
    """Add this task's queries to the node's running total for the run; return the total."""
    record = state.config_records.get(_COUNTER_KEY)
    total = int(record["total"]) if record is not None else 0  # type: ignore[arg-type]
    total += used
    state[_COUNTER_KEY] = ConfigRecord({"total": total})
    return total


def query_metrics(records: list[RecordDict], weighting_key: str) -> MetricRecord:
    """A round's train metrics: example-weighted means, except ``zoo-queries``, which is the
    sum over the round's updates (the queries the federation spent on it)."""
    out = aggregate_metricrecords(records, weighting_key)
    total = 0.0
    for record in records:
        metrics = next(iter(record.metric_records.values()))
        total += float(metrics.get(QUERIES, 0.0))  # type: ignore[arg-type]
    out[QUERIES] = total
    return out


def averaging_server(setup: ServerSetup) -> FedAvg:
    """FedAvg of every array of the model (x, and FZooS's surrogate weights) that sums the
    round's queries into its metrics."""
    return FedAvg(**sampling_kwargs(setup), train_metrics_aggr_fn=query_metrics)  # type: ignore[arg-type]
