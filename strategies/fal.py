"""Federated adversarial learning, FAL (Li, Song, Yang, ICML 2023): PGD training on the clients.

Paper: https://arxiv.org/abs/2208.03635 ("Federated Adversarial Learning: A Framework with
Convergence Analysis").

Client i runs the K local SGD steps of plain FedAvg (same batches, optimizer and learning rate),
each taken on the loss at x̃ = PGD(x) instead of x: an inner loop of ``pgd_steps`` sign-gradient
ascent steps of size α (default ε/4), each projected onto the L∞ ball B(x, ε) intersected with
the input domain. The domain is the dataset's valid input range (digits: [0, 1]; ``synthetic``:
none, so only the ε-ball), or an explicit ``clip_min``/``clip_max`` that must contain every
input, so the projection never moves a clean input. The server is FedAvg of the returned models,
and evaluates the global model every round on clean and on PGD-perturbed held-out data.

Variant followed: the paper's framework (its analysis is of a two-layer network; we apply the
same loop to every model). Where it is silent: the attack runs with the model in eval mode and
no gradient reaches the parameters; the random start is off by default (Madry's PGD has it, the
paper's algorithm starts at x). The server reports two attacks on the same seeded random subset
of ``eval_max_examples`` test examples: ``robust-*``, the training attack's kind (ε_eval,
``eval_pgd_steps`` steps of ε_eval/4 from x, deterministic), and ``robust-*-strong``, per example
the worst of that attack, a longer PGD run from x and ``strong_restarts`` runs from random points
of the ball (so it is never weaker). Clients report ``train-accuracy`` (clean) and
``train-robust-accuracy`` (on their attacked batches). ε = 0 or ``pgd_steps`` = 0 is FedAvg
exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from typing import TYPE_CHECKING, Any, Self

import numpy as np
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
    from florist.datasets import XY, InputRange

# Keeps the server's per-round PGD evaluation cheap on large test splits.
DEFAULT_EVAL_MAX_EXAMPLES = 500
# Random-start noise has its own stream, so turning it on never changes the batches.
_NOISE_STREAM = 0x5EED_0000_0000
# Madry et al.'s rule for a step size: the steps together can cross the ball 2.5 times.
_STRONG_STEP_SPAN = 2.5


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
    clip_min, clip_max : float | None, default None
        Input domain adversarial examples are clipped to; None takes the dataset's bound on that
        side (digits: 0 and 1; ``synthetic`` has none). An explicit bound must hold for all the
        dataset's inputs: the API refuses one that does not (422), and the attack raises.
    eval_epsilon : float | None, default None
        ε of the server's robust evaluation; None means ``epsilon``.
    eval_pgd_steps : int, default 10
        Steps of the server's attack (step eval_ε/4, no random start, so it is deterministic).
    eval_max_examples : int, default 500
        Robust metrics use a random subset of this many test examples (all if fewer).
    eval_seed : int, default 0
        Seeds that subset (the same every round) and the strong attack's random starts.
    strong_pgd_steps : int, default 50
        Steps of each run of the strong evaluation attack.
    strong_restarts : int, default 5
        Runs of the strong attack from uniform random points of the ball, besides one from x.
    strong_step_size : float | None, default None
        Step of the strong attack; None means 2.5·eval_ε / ``strong_pgd_steps``.
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
    clip_min: float | None = Field(
        default=None,
        description="Lower bound of the input domain (default None: the dataset's, if any); "
        "must not exceed any input.",
    )
    clip_max: float | None = Field(
        default=None,
        description="Upper bound of the input domain (default None: the dataset's, if any); "
        "must not be below any input.",
    )
    eval_epsilon: float | None = Field(
        default=None, ge=0, description="ε of the server's robust evaluation (None: epsilon)."
    )
    eval_pgd_steps: int = Field(
        default=10, ge=0, le=1000, description="PGD steps of the server's robust evaluation (10)."
    )
    eval_max_examples: int = Field(
        default=DEFAULT_EVAL_MAX_EXAMPLES,
        ge=1,
        description="Robust metrics on a seeded random subset of this many test examples (500).",
    )
    eval_seed: int = Field(
        default=0, ge=0, description="Seed of that subset and of the strong attack's starts (0)."
    )
    strong_pgd_steps: int = Field(
        default=50, ge=0, le=1000, description="PGD steps per run of the strong attack (50)."
    )
    strong_restarts: int = Field(
        default=5, ge=0, le=100, description="Random-start runs of the strong attack (5)."
    )
    strong_step_size: float | None = Field(
        default=None, gt=0, description="Step of the strong attack (None: 2.5·eval ε / steps)."
    )

    @model_validator(mode="after")
    def _domain_not_empty(self) -> Self:
        low, high = self.clip_min, self.clip_max
        if low is not None and high is not None and not low < high:
            raise ValueError(f"clip_min ({low}) must be below clip_max ({high})")
        return self

    @property
    def train_step_size(self) -> float:
        return self.step_size if self.step_size is not None else self.epsilon / 4

    @property
    def robust_epsilon(self) -> float:
        return self.eval_epsilon if self.eval_epsilon is not None else self.epsilon

    @property
    def strong_step(self) -> float:
        if self.strong_step_size is not None:
            return self.strong_step_size
        return _STRONG_STEP_SPAN * self.robust_epsilon / max(self.strong_pgd_steps, 1)


def input_bounds(config: FalConfig, input_range: InputRange) -> tuple[float, float]:
    """The attack's domain: an explicit ``clip_min``/``clip_max``, else the data's range on that
    side, else unbounded (±inf)."""
    low, high = input_range if input_range is not None else (-math.inf, math.inf)
    return (
        config.clip_min if config.clip_min is not None else low,
        config.clip_max if config.clip_max is not None else high,
    )


def clip_range_errors(
    config: FalConfig, workload: str, extent: Callable[[], tuple[float, float] | None]
) -> list[dict[str, Any]]:
    """Pydantic-style errors (``loc`` under the experiment spec) for an explicit clip bound that
    some input of ``workload`` violates: the ε-ball around such an input misses the domain.
    ``extent`` gives the smallest and largest input value known (None: nothing known)."""
    if config.clip_min is None and config.clip_max is None:
        return []  # the dataset's own range: nothing to load
    known = extent()
    if known is None:
        return []
    low, high = known
    errors = []
    if config.clip_min is not None and config.clip_min > low:
        errors.append((("clip_min", config.clip_min), f"the data go down to {low:g}"))
    if config.clip_max is not None and config.clip_max < high:
        errors.append((("clip_max", config.clip_max), f"the data go up to {high:g}"))
    return [
        {
            "loc": ("strategy", "config", field),
            "msg": f"{field} = {value:g} cuts off {workload} inputs ({why}); leave it unset "
            "to use the dataset's own range",
            "type": "clip_range_excludes_data",
            "input": value,
        }
        for (field, value), why in errors
    ]


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
    clip_min: float = -math.inf,
    clip_max: float = math.inf,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """L∞ PGD (Madry et al.): ``steps`` sign-gradient ascent steps on the mean cross-entropy, each
    projected onto the ε-ball around ``x`` intersected with [clip_min, clip_max] (unbounded by
    default).

    Returns ``x`` itself when ε = 0 or steps = 0, without drawing any random numbers. The model runs
    in eval mode during the attack (its mode is restored) and no gradient reaches its parameters.
    ``generator`` draws the random start (a CPU generator; torch's global one if None). Raises
    ValueError if ``x`` lies outside [clip_min, clip_max]: the projection would move it further
    than ε (x = 3 clipped to [0, 1] becomes 1).
    """
    if epsilon == 0 or steps == 0:
        return x
    x = x.detach()
    if x.numel() and (float(x.min()) < clip_min or float(x.max()) > clip_max):
        raise ValueError(
            f"inputs in [{float(x.min()):g}, {float(x.max()):g}] lie outside the attack's domain "
            f"[{clip_min:g}, {clip_max:g}]"
        )
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


def worst_case(
    model: nn.Module, y: torch.Tensor, candidates: Sequence[torch.Tensor]
) -> torch.Tensor:
    """Per example, the candidate input the model gets wrong, or failing that the one with the
    highest loss (misclassification first: a higher loss need not flip the label)."""
    best = candidates[0].clone()
    with torch.no_grad(), eval_mode(model):
        logits = model(best)
        best_wrong = logits.argmax(1) != y
        best_loss = F.cross_entropy(logits, y, reduction="none")
        for x_adv in candidates[1:]:
            logits = model(x_adv)
            wrong = logits.argmax(1) != y
            loss = F.cross_entropy(logits, y, reduction="none")
            better = (wrong & ~best_wrong) | ((wrong == best_wrong) & (loss > best_loss))
            best[better] = x_adv[better]
            best_wrong = torch.where(better, wrong, best_wrong)
            best_loss = torch.where(better, loss, best_loss)
    return best


def eval_subset(num_examples: int, max_examples: int, seed: int) -> np.ndarray:
    """Sorted indices of a seeded uniform random subset of ``max_examples`` rows (all rows if
    there are no more): the first rows of a split can be unrepresentative (``synthetic`` stores
    its test split device by device)."""
    if num_examples <= max_examples:
        return np.arange(num_examples)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(num_examples, size=max_examples, replace=False))


def build_server(config: FalConfig, setup: ServerSetup) -> FedAvg:
    return FedAvg(**sampling_kwargs(setup))  # type: ignore[arg-type]


class AdversarialHooks(TrainerHooks):
    """Each local step on x̃ = PGD(x) instead of x; the clean accuracy is counted on the side."""

    def __init__(self, config: FalConfig) -> None:
        self.config = config
        self.noise = torch.Generator()
        self.clean_correct = 0
        self.bounds = input_bounds(config, None)

    def start(self, task: TrainTask[Any], model: nn.Module) -> None:
        # Its own stream: random starts never shift the batches, so ε = 0 is FedAvg exactly.
        self.noise = torch.Generator().manual_seed(round_seed(task) + _NOISE_STREAM)
        self.clean_correct = 0
        self.bounds = input_bounds(self.config, task.data.input_range)

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
            clip_min=self.bounds[0],
            clip_max=self.bounds[1],
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
    """PGD-robust accuracy and loss of the global model on a seeded random subset of
    ``eval_max_examples`` test examples, under two attacks at ε = ``eval_epsilon``:

    - ``robust-accuracy``, ``robust-loss``: ``eval_pgd_steps`` steps of ε/4 from x, the training
      attack's kind;
    - ``robust-accuracy-strong``, ``robust-loss-strong``: per example the worst of that attack, a
      ``strong_pgd_steps`` run from x and ``strong_restarts`` runs from random starts.
    """
    device = next(model.parameters()).device
    idx = eval_subset(len(test), config.eval_max_examples, config.eval_seed)
    x = torch.from_numpy(test.x[idx]).to(device)
    y = torch.from_numpy(test.y[idx]).to(device)
    if len(y) == 0:
        return {}
    epsilon = config.robust_epsilon
    clip_min, clip_max = input_bounds(config, test.input_range)
    attack = partial(pgd_attack, model, x, y, epsilon=epsilon, clip_min=clip_min, clip_max=clip_max)
    x_adv = attack(steps=config.eval_pgd_steps, step_size=epsilon / 4)
    strong = partial(attack, steps=config.strong_pgd_steps, step_size=config.strong_step)
    # Seeded per call: every round's strong attack draws the same starts, as reruns must.
    noise = torch.Generator().manual_seed(config.eval_seed + _NOISE_STREAM)
    candidates = [
        x_adv,
        strong(),
        *(strong(random_start=True, generator=noise) for _ in range(config.strong_restarts)),
    ]
    x_strong = worst_case(model, y, candidates)
    metrics: dict[str, float] = {}
    with torch.no_grad(), eval_mode(model):
        for suffix, inputs in (("", x_adv), ("-strong", x_strong)):
            logits = model(inputs)
            # A count over n, as evaluate() computes clean accuracy: a float32 mean can round
            # above it (0.4000000059604645 > 0.4) when every attack fails.
            correct = int((logits.argmax(1) == y).sum())
            metrics[f"robust-accuracy{suffix}"] = correct / len(y) if len(y) else 0.0
            metrics[f"robust-loss{suffix}"] = float(F.cross_entropy(logits, y))
    return metrics


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
