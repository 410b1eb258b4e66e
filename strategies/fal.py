"""Federated adversarial learning, FAL (Li, Song, Yang, ICML 2023): PGD training on the clients.

Paper: https://arxiv.org/abs/2208.03635 ("Federated Adversarial Learning: A Framework with
Convergence Analysis").

Client i runs the K local SGD steps of plain FedAvg (same batches, optimizer and learning rate),
each taken on the loss at x̃ = PGD(x) instead of x: an inner loop of ``pgd_steps`` sign-gradient
ascent steps of size α (default ε/4), each projected onto the L∞ ball B(x, ε) intersected with
the input domain [clip_min, clip_max]. The server is FedAvg of the returned models, and evaluates
the global model every round on clean and on PGD-perturbed held-out data.

Variant followed: the paper's framework (its analysis is of a two-layer network; we apply the
same loop to every model). Where it is silent: the attack runs with the model in eval mode and
no gradient reaches the parameters; the random start is off by default (Madry's PGD has it, the
paper's algorithm starts at x); the server's robust evaluation uses its own deterministic attack
(no random start) on the first ``eval_max_examples`` test examples to stay cheap each round.
Clients report ``train-accuracy`` (clean) and ``train-robust-accuracy`` (on their attacked
batches). ε = 0 or ``pgd_steps`` = 0 is FedAvg exactly.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Self

import torch
from flwr.serverapp.strategy import FedAvg
from pydantic import Field, model_validator
from torch import nn
from torch.nn import functional as F

from florist.client.training import (
    Batch,
    RunningMetrics,
    TrainerHooks,
    TrainResult,
    TrainTask,
    round_seed,
    train_local,
)

from .base import ServerSetup, StrategyConfig, StrategyPlugin
from .fedavg import sampling_kwargs

if TYPE_CHECKING:
    from florist.datasets import XY

# Keeps the server's per-round PGD evaluation cheap on large test splits.
DEFAULT_EVAL_MAX_EXAMPLES = 500
# Random-start noise has its own stream, so turning it on never changes the batches.
_NOISE_STREAM = 0x5EED_0000_0000


class FalConfig(StrategyConfig):
    """FAL's settings: the clients' PGD attack and the server's robust evaluation.

    Parameters
    ----------
    epsilon : float, default 0.1
        L∞ radius ε of the clients' training attack; 0 gives plain local SGD, i.e. FedAvg.
    pgd_steps : int, default 10
        Sign-gradient ascent steps of the training attack; 0 trains on clean inputs.
    step_size : float | None, default None
        Step α of the training attack; None means ε/4.
    random_start : bool, default False
        Start the training attack from a uniform point in the ε-ball instead of x.
    clip_min, clip_max : float, default 0.0, 1.0
        Input domain every adversarial example is clipped to.
    eval_epsilon : float | None, default None
        ε of the server's robust evaluation; None means ``epsilon``.
    eval_pgd_steps : int, default 10
        Steps of the server's attack (step eval_ε/4, no random start, so it is deterministic).
    eval_max_examples : int, default 500
        Robust metrics use only the first this-many test examples.
    """

    epsilon: float = Field(
        default=0.1, ge=0, description="L∞ radius ε of the training attack (default 0.1)."
    )
    pgd_steps: int = Field(
        default=10, ge=0, le=1000, description="PGD steps per local SGD step (default 10)."
    )
    step_size: float | None = Field(
        default=None, gt=0, description="PGD step α (default None: ε/4)."
    )
    random_start: bool = Field(
        default=False, description="Start PGD at a uniform point of the ε-ball (default false)."
    )
    clip_min: float = Field(default=0.0, description="Lower bound of the input domain (0.0).")
    clip_max: float = Field(default=1.0, description="Upper bound of the input domain (1.0).")
    eval_epsilon: float | None = Field(
        default=None, ge=0, description="ε of the server's robust evaluation (None: epsilon)."
    )
    eval_pgd_steps: int = Field(
        default=10, ge=0, le=1000, description="PGD steps of the server's robust evaluation (10)."
    )
    eval_max_examples: int = Field(
        default=DEFAULT_EVAL_MAX_EXAMPLES,
        ge=1,
        description="Robust metrics on the first this-many test examples (default 500).",
    )

    @model_validator(mode="after")
    def _domain_not_empty(self) -> Self:
        if not self.clip_min < self.clip_max:
            raise ValueError(f"clip_min ({self.clip_min}) must be below clip_max ({self.clip_max})")
        return self

    @property
    def train_step_size(self) -> float:
        return self.step_size if self.step_size is not None else self.epsilon / 4

    @property
    def robust_epsilon(self) -> float:
        return self.eval_epsilon if self.eval_epsilon is not None else self.epsilon


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode (no dropout, frozen batch-norm statistics); its mode restored."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def pgd_attack(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epsilon: float,
    steps: int,
    step_size: float,
    random_start: bool = False,
    clip_min: float = 0.0,
    clip_max: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """L∞ PGD (Madry et al.): ``steps`` sign-gradient ascent steps on the mean cross-entropy, each
    projected onto the ε-ball around ``x`` intersected with [clip_min, clip_max].

    Returns ``x`` itself when ε = 0 or steps = 0, without drawing any random numbers. The model runs
    in eval mode during the attack (its mode is restored) and no gradient reaches its parameters.
    ``generator`` draws the random start (a CPU generator; torch's global one if None).
    """
    if epsilon == 0 or steps == 0:
        return x
    x = x.detach()
    lower = torch.clamp(x - epsilon, min=clip_min)
    upper = torch.clamp(x + epsilon, max=clip_max)
    x_adv = x.clone()
    if random_start:
        noise = torch.rand(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        x_adv = torch.minimum(torch.maximum(x + (2 * noise - 1) * epsilon, lower), upper)
    with eval_mode(model), torch.enable_grad():
        for _ in range(steps):
            x_adv.requires_grad_(True)
            loss = F.cross_entropy(model(x_adv), y)
            # autograd.grad with respect to the input only: nothing accumulates in param.grad.
            (grad,) = torch.autograd.grad(loss, x_adv)
            x_adv = x_adv.detach() + step_size * grad.sign()
            x_adv = torch.minimum(torch.maximum(x_adv, lower), upper)
    return x_adv.detach()


def build_server(config: FalConfig, setup: ServerSetup) -> FedAvg:
    return FedAvg(**sampling_kwargs(setup))  # type: ignore[arg-type]


class AdversarialHooks(TrainerHooks):
    """Each local step on x̃ = PGD(x) instead of x; the clean accuracy is counted on the side."""

    def __init__(self, config: FalConfig) -> None:
        self.config = config
        self.noise = torch.Generator()
        self.clean_correct = 0

    def start(self, task: TrainTask[Any], model: nn.Module) -> None:
        # Its own stream: random starts never shift the batches, so ε = 0 is FedAvg exactly.
        self.noise = torch.Generator().manual_seed(round_seed(task) + _NOISE_STREAM)
        self.clean_correct = 0

    def transform_batch(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Batch:
        config = self.config
        x_adv = pgd_attack(
            model,
            x,
            y,
            epsilon=config.epsilon,
            steps=config.pgd_steps,
            step_size=config.train_step_size,
            random_start=config.random_start,
            clip_min=config.clip_min,
            clip_max=config.clip_max,
            generator=self.noise,
        )
        with torch.no_grad(), eval_mode(model):
            self.clean_correct += int((model(x).argmax(1) == y).sum())
        return x_adv, y

    def finish(
        self, task: TrainTask[Any], model: nn.Module, running: RunningMetrics
    ) -> dict[str, float]:
        """The loop's accuracy is on the attacked batches: report it as robust, and the clean
        one as ``train-accuracy``."""
        if running.seen == 0:
            return {}
        return {
            "train-accuracy": self.clean_correct / running.seen,
            "train-robust-accuracy": running.correct / running.seen,
        }


def train(task: TrainTask[FalConfig]) -> TrainResult:
    """Local adversarial training: every SGD step of ``train_sgd`` (same K, batches, optimizer),
    taken on the loss at x̃ = PGD(x) instead of x."""
    return train_local(task, AdversarialHooks(task.config))


def server_metrics(model: nn.Module, test: XY, config: FalConfig) -> dict[str, float]:
    """PGD-robust accuracy and loss of the global model on the first ``eval_max_examples`` test
    examples (ε = ``eval_epsilon``, ``eval_pgd_steps`` steps of ε/4, no random start)."""
    device = next(model.parameters()).device
    x = torch.from_numpy(test.x[: config.eval_max_examples]).to(device)
    y = torch.from_numpy(test.y[: config.eval_max_examples]).to(device)
    if len(y) == 0:
        return {}
    epsilon = config.robust_epsilon
    x_adv = pgd_attack(
        model,
        x,
        y,
        epsilon=epsilon,
        steps=config.eval_pgd_steps,
        step_size=epsilon / 4,
        clip_min=config.clip_min,
        clip_max=config.clip_max,
    )
    with torch.no_grad(), eval_mode(model):
        logits = model(x_adv)
        loss = float(F.cross_entropy(logits, y))
        accuracy = float((logits.argmax(1) == y).float().mean())
    return {"robust-accuracy": accuracy, "robust-loss": loss}


plugin = StrategyPlugin(
    name="fal",
    summary="FAL: clients train on L∞ PGD adversarial examples, the server averages (FedAvg) "
    "and reports PGD-robust accuracy.",
    config_model=FalConfig,
    build_server=build_server,
    train=train,
    server_metrics=server_metrics,
    paper="https://arxiv.org/abs/2208.03635",
    tags=("sync", "robust"),
)
