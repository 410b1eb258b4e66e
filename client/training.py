"""Local training and evaluation loops shared by the strategies' client halves."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from flwr.app import RecordDict
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

if TYPE_CHECKING:
    from florist.datasets import XY
    from florist.strategies.base import StrategyConfig


class TrainingConfig(BaseModel):
    """Local-training settings every client uses, whatever the strategy."""

    model_config = ConfigDict(extra="forbid")

    local_epochs: int = Field(default=2, ge=1, le=1000, description="Passes over the local data.")
    local_steps: int | None = Field(
        default=None, ge=1, description="If set, a fixed number of SGD steps instead of epochs."
    )
    batch_size: int = Field(default=32, ge=1, le=65536)
    lr: float = Field(default=0.05, gt=0, le=10, description="Local SGD learning rate.")
    momentum: float = Field(default=0.9, ge=0, lt=1)
    weight_decay: float = Field(default=0.0, ge=0)


@dataclass
class TrainTask:
    """One training message, decoded: what a strategy's client half works on."""

    model: nn.Module
    data: XY
    training: TrainingConfig
    config: StrategyConfig
    server_round: int
    seed: int
    # Survives between the messages of one run on the same node (Flower's Context.state), and
    # starts empty for every new run, i.e. every experiment: per-client algorithm state lives here.
    state: RecordDict = field(default_factory=RecordDict)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


@dataclass(frozen=True)
class TrainResult:
    """What a client half reports besides the trained weights (left in ``task.model``)."""

    num_examples: int
    steps: int
    metrics: dict[str, float]


@dataclass(frozen=True)
class EvalResult:
    num_examples: int
    loss: float
    accuracy: float


def pick_device() -> torch.device:
    """A GPU when there is one; the code never needs one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def batches(
    data: XY, batch_size: int, generator: torch.Generator
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One shuffled pass over ``data`` in minibatches."""
    x = torch.from_numpy(data.x)
    y = torch.from_numpy(data.y)
    order = torch.randperm(len(y), generator=generator)
    for start in range(0, len(y), batch_size):
        idx = order[start : start + batch_size]
        yield x[idx], y[idx]


def round_seed(task: TrainTask) -> int:
    """The seed of this node's local work in this round: a rerun reproduces the same batches."""
    return task.seed * 100_003 + task.server_round


def num_local_steps(training: TrainingConfig, num_examples: int) -> int:
    """K: ``local_steps`` if set, else ``local_epochs`` passes in minibatches."""
    return training.local_steps or training.local_epochs * math.ceil(
        num_examples / training.batch_size
    )


def local_minibatches(task: TrainTask) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The K minibatches of this round's local training, on the task's device.

    Every client half that trains on the usual batches draws them here, so its degenerate setting
    sees exactly FedAvg's data in FedAvg's order.
    """
    n = len(task.data)
    if n == 0:
        return
    total = num_local_steps(task.training, n)
    generator = torch.Generator().manual_seed(round_seed(task))
    steps = 0
    while True:
        for xb, yb in batches(task.data, task.training.batch_size, generator):
            yield xb.to(task.device), yb.to(task.device)
            steps += 1
            if steps >= total:
                return


def sgd_optimizer(
    params: Iterable[torch.nn.Parameter], training: TrainingConfig
) -> torch.optim.Optimizer:
    return torch.optim.SGD(
        params, lr=training.lr, momentum=training.momentum, weight_decay=training.weight_decay
    )


class RunningMetrics:
    """Example-weighted train loss and accuracy over a round's minibatches."""

    def __init__(self) -> None:
        self.steps, self.seen, self.loss_sum, self.correct = 0, 0, 0.0, 0

    def add(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        self.steps += 1
        self.seen += len(y)
        self.loss_sum += float(loss.detach()) * len(y)
        self.correct += int((logits.argmax(1) == y).sum())

    def result(self, num_examples: int, **extra: float) -> TrainResult:
        if self.seen == 0:
            return TrainResult(num_examples=num_examples, steps=0, metrics={})
        metrics = {
            "train-loss": self.loss_sum / self.seen,
            "train-accuracy": self.correct / self.seen,
        }
        return TrainResult(num_examples=num_examples, steps=self.steps, metrics=metrics | extra)


def train_sgd(
    task: TrainTask, extra_loss: Callable[[nn.Module], torch.Tensor] | None = None
) -> TrainResult:
    """Local SGD on the task's data; ``extra_loss`` adds a regulariser (FedProx's proximal term)."""
    model = task.model.to(task.device)
    model.train()
    optimizer = sgd_optimizer(model.parameters(), task.training)
    loss_fn = nn.CrossEntropyLoss()
    running = RunningMetrics()
    for xb, yb in local_minibatches(task):
        optimizer.zero_grad()
        logits = model(xb)
        loss = loss_fn(logits, yb)
        if extra_loss is not None:
            loss = loss + extra_loss(model)
        loss.backward()
        optimizer.step()
        running.add(loss, logits, yb)
    return running.result(len(task.data))


@torch.no_grad()
def evaluate(model: nn.Module, data: XY, batch_size: int = 512) -> EvalResult:
    """Loss and accuracy of ``model`` on ``data``."""
    device = next(model.parameters()).device
    model.eval()
    x = torch.from_numpy(data.x)
    y = torch.from_numpy(data.y)
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    loss_sum, correct = 0.0, 0
    for start in range(0, len(y), batch_size):
        xb, yb = x[start : start + batch_size].to(device), y[start : start + batch_size].to(device)
        logits = model(xb)
        loss_sum += float(loss_fn(logits, yb))
        correct += int((logits.argmax(1) == yb).sum())
    n = len(y)
    return EvalResult(
        num_examples=n, loss=loss_sum / n if n else math.nan, accuracy=correct / n if n else 0.0
    )


def get_weights(model: nn.Module) -> dict[str, np.ndarray]:
    """The model's state as numpy arrays, keyed like its state_dict."""
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def set_weights(model: nn.Module, weights: dict[str, np.ndarray]) -> None:
    """Load numpy arrays keyed like the model's state_dict (strict: a missing key is an error)."""
    model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in weights.items()})
