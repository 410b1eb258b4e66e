"""Local training and evaluation loops shared by the strategies' client halves."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import numpy as np
import torch
from flwr.app import RecordDict
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.nn import functional as F

from florist.datasets.seeds import derive_seed

if TYPE_CHECKING:
    from florist.client.profiles import DeviceProfile
    from florist.datasets import XY

# A strategy's config model; bound to pydantic's BaseModel so that this module, below the
# strategies, never needs to know their base class.
C = TypeVar("C", bound=BaseModel)
Batch = tuple[torch.Tensor, torch.Tensor]
# A workload's loss: (model outputs, targets) -> scalar tensor (the batch mean).
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


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
class TrainTask(Generic[C]):
    """One training message, decoded: what a strategy's client half works on.

    Generic over the strategy's config model, so a trainer typed ``TrainTask[FedProxConfig]``
    reads ``task.config.proximal_mu`` without a cast.
    """

    model: nn.Module
    data: XY
    training: TrainingConfig
    config: C
    server_round: int
    seed: int
    # Survives between the messages of one run on the same node (Flower's Context.state), and
    # starts empty for every new run, i.e. every experiment: per-client algorithm state lives here.
    state: RecordDict = field(default_factory=RecordDict)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    # The workload's loss and optimiser (client/workloads): cross-entropy and SGD unless the
    # workload says otherwise; a strategy's hooks build on them, never around them.
    loss: LossFn = F.cross_entropy
    optimizer: Callable[[list[nn.Parameter], TrainingConfig], torch.optim.Optimizer] = field(
        default_factory=lambda: sgd_optimizer
    )
    # The node's device profile (its node-config): e.g. the local steps it is willing to run;
    # None: the neutral profile.
    profile: DeviceProfile | None = None


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
    # Every metric the workload computes (``accuracy`` among them for classifiers).
    metrics: dict[str, float] = field(default_factory=dict)


def pick_device() -> torch.device:
    """A GPU when there is one; the code never needs one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def batches(data: XY, batch_size: int, generator: torch.Generator) -> Iterator[Batch]:
    """One shuffled pass over ``data`` in minibatches."""
    x = torch.from_numpy(data.x)
    y = torch.from_numpy(data.y)
    order = torch.randperm(len(y), generator=generator)
    for start in range(0, len(y), batch_size):
        idx = order[start : start + batch_size]
        yield x[idx], y[idx]


def round_seed(task: TrainTask[Any]) -> int:
    """The seed of this node's local work in this round: a rerun reproduces the same batches."""
    return derive_seed(task.seed, "round", task.server_round)


def num_local_steps(training: TrainingConfig, num_examples: int) -> int:
    """K: ``local_steps`` if set, else ``local_epochs`` passes in minibatches."""
    return training.local_steps or training.local_epochs * math.ceil(
        num_examples / training.batch_size
    )


def local_minibatches(task: TrainTask[Any]) -> Iterator[Batch]:
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
        self.steps, self.seen, self.loss_sum, self.correct, self.classified = 0, 0, 0.0, 0, 0

    def add(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        self.steps += 1
        self.seen += len(y)
        self.loss_sum += float(loss.detach()) * len(y)
        # Accuracy only for class scores: a black-box task's outputs may be residuals.
        if logits.ndim == 2:
            self.classified += len(y)
            self.correct += int((logits.argmax(1) == y).sum())

    def result(self, num_examples: int, **extra: float) -> TrainResult:
        if self.seen == 0:
            return TrainResult(num_examples=num_examples, steps=0, metrics={})
        metrics = {"train-loss": self.loss_sum / self.seen}
        if self.classified:
            metrics["train-accuracy"] = self.correct / self.classified
        return TrainResult(num_examples=num_examples, steps=self.steps, metrics=metrics | extra)


class TrainerHooks:
    """The places where an algorithm changes the one local training loop (:func:`train_local`).

    Every default is plain local SGD, so ``TrainerHooks()`` trains exactly like FedAvg's clients
    and a strategy overrides only what its paper changes. One instance serves one task (one
    round on one node), so a hook keeps what it needs between calls on ``self``. Per round::

        start(task, model)                           read state carried from earlier rounds
        optimizer(params, training)                  torch SGD with the experiment's settings
        for x, y in minibatches(task):               data ordering and pacing
            x, y = transform_batch(model, x, y)      e.g. adversarial inputs
            zero the gradients
            loss, logits = compute_gradient(model, x, y)
                                                     forward, loss(...) + extra_loss(model),
                                                     backward; or a zeroth-order estimate
            transform_gradient(model, params, x, y)  p.grad edited in place, before the step
            optimizer step; loss and accuracy accumulated on (loss, logits, y)
        finish(task, model, running)                 write state; extra metrics
    """

    # The workload's loss and optimiser; train_local sets them from the task before start().
    # Class attributes, so that a subclass needs no super().__init__().
    workload_loss: LossFn = staticmethod(F.cross_entropy)
    workload_optimizer: Callable[[list[nn.Parameter], TrainingConfig], torch.optim.Optimizer] = (
        staticmethod(lambda params, training: sgd_optimizer(params, training))
    )

    def start(self, task: TrainTask[Any], model: nn.Module) -> None:
        """Before the first step, with the round's global weights in ``model``."""

    def optimizer(
        self, params: list[nn.Parameter], training: TrainingConfig
    ) -> torch.optim.Optimizer:
        """The workload's optimiser (default: SGD with the experiment's settings)."""
        return self.workload_optimizer(params, training)

    def minibatches(self, task: TrainTask[Any]) -> Iterable[Batch]:
        """The round's batches; the default is FedAvg's K seeded shuffled minibatches."""
        return local_minibatches(task)

    def transform_batch(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Batch:
        """The batch the step trains on (the loop reports accuracy against the returned y)."""
        return x, y

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The data term of the local objective: the workload's loss (mean cross-entropy by
        default)."""
        return self.workload_loss(logits, y)

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        """A term added to the loss before backward (a regulariser), or None."""
        return None

    def compute_gradient(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Fill each trainable ``p.grad`` at the current weights; return (loss, logits).

        A zeroth-order trainer overrides this: it estimates the gradient from loss values under
        ``torch.no_grad()`` and writes it into ``p.grad``, with no backward pass.
        """
        logits = model(x)
        loss = self.loss(logits, y)
        extra = self.extra_loss(model)
        if extra is not None:
            loss = loss + extra
        loss.backward()
        return loss, logits

    def transform_gradient(
        self, model: nn.Module, params: list[nn.Parameter], x: torch.Tensor, y: torch.Tensor
    ) -> None:
        """Change ``p.grad`` of ``params`` in place between the gradient and the step."""

    def finish(
        self, task: TrainTask[Any], model: nn.Module, running: RunningMetrics
    ) -> dict[str, float]:
        """After the last step: write state into ``task.state``, adjust the weights to send,
        and return metrics merged over the loop's (a key of the loop's may be replaced)."""
        return {}


def train_local(task: TrainTask[Any], hooks: TrainerHooks | None = None) -> TrainResult:
    """The one local training loop: K optimizer steps on the task's data, shaped by ``hooks``.

    The trained weights are left in ``task.model``. An empty shard trains nothing and calls no
    hook, so no state is read or written.
    """
    hooks = hooks if hooks is not None else TrainerHooks()
    model = task.model.to(task.device)
    model.train()
    num_examples = len(task.data)
    if num_examples == 0:
        return TrainResult(num_examples=0, steps=0, metrics={})
    hooks.workload_loss = task.loss
    hooks.workload_optimizer = task.optimizer
    hooks.start(task, model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = hooks.optimizer(params, task.training)
    running = RunningMetrics()
    for xb, yb in hooks.minibatches(task):
        xb, yb = hooks.transform_batch(model, xb, yb)
        optimizer.zero_grad()
        loss, logits = hooks.compute_gradient(model, xb, yb)
        hooks.transform_gradient(model, params, xb, yb)
        optimizer.step()
        running.add(loss, logits, yb)
    return running.result(num_examples, **hooks.finish(task, model, running))


def train_sgd(task: TrainTask[Any]) -> TrainResult:
    """Plain local SGD: the client half of FedAvg and of every strategy that keeps it."""
    return train_local(task, TrainerHooks())


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    """Share of rows whose largest output is the label (0 for no rows)."""
    n = len(y)
    return int((logits.argmax(1) == y).sum()) / n if n else 0.0


def classification_metrics(logits: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """The default evaluation metrics: accuracy."""
    return {"accuracy": accuracy(logits, y)}


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: XY,
    batch_size: int = 512,
    *,
    loss: LossFn = F.cross_entropy,
    metrics: Callable[[torch.Tensor, torch.Tensor], dict[str, float]] = classification_metrics,
) -> EvalResult:
    """``model``'s mean loss on ``data`` and the workload's ``metrics`` over all of it.

    ``loss`` is a batch mean (as in training), so it is weighted by batch size here; ``metrics``
    sees every output and target at once (an F1 does not average over batches).
    """
    device = next(model.parameters()).device
    model.eval()
    x = torch.from_numpy(data.x)
    y = torch.from_numpy(data.y)
    loss_sum = 0.0
    outputs, targets = [], []
    for start in range(0, len(y), batch_size):
        xb, yb = x[start : start + batch_size].to(device), y[start : start + batch_size].to(device)
        out = model(xb)
        loss_sum += float(loss(out, yb)) * len(yb)
        outputs.append(out.cpu())
        targets.append(yb.cpu())
    n = len(y)
    if n == 0:
        return EvalResult(num_examples=0, loss=math.nan, accuracy=0.0, metrics={})
    found = metrics(torch.cat(outputs), torch.cat(targets))
    return EvalResult(
        num_examples=n,
        loss=loss_sum / n,
        accuracy=found.get("accuracy", math.nan),
        metrics=found,
    )


def get_weights(model: nn.Module) -> dict[str, np.ndarray]:
    """The model's state as numpy arrays, keyed like its state_dict."""
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def set_weights(model: nn.Module, weights: dict[str, np.ndarray]) -> None:
    """Load numpy arrays keyed like the model's state_dict (strict: a missing key is an error)."""
    model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in weights.items()})
