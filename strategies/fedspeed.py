"""FedSpeed (Sun et al., ICLR 2023): prox-corrected local SAM steps with a per-client correction.

Paper: https://arxiv.org/abs/2302.10429 ("FedSpeed: Larger Local Interval, Less Communication
Round, and Higher Generalization Accuracy").

Client i, starting at x_0 = x^t (the round's global model), for k < K local steps:

- g1 = ∇f_i(x_k; ξ), x̆ = x_k + ρ·g1/‖g1‖ (or ρ·g1), g2 = ∇f_i(x̆; ξ) on the same minibatch ξ;
- g̃ = (1 − α)·g1 + α·g2;
- x_{k+1} = x_k − η·(g̃ − ĝ_i + (1/λ)·(x_k − x^t)).

Then ĝ_i ← ĝ_i − (1/λ)·(x_K − x^t), and the client sends x̂_i = x_K − λ·ĝ_i. The server is
FedAvg over the x̂_i.

Variant followed: the reference code (woodenchild95/FL-Simulator, ``client/fedspeed.py`` and
``optimizer/ESAM.py``, by the paper's first author), since it is what the paper's experiments
describe: the ascent step is SAM-normalised (``normalized_ascent=True``) and the gradient used is
the perturbed one alone (``alpha=1``). Both are configurable; ``normalized_ascent=False`` gives
the paper's Algorithm 1 literally (x̆ = x + ρ·g1).

Choices where paper and reference are silent or differ from this platform:

- The local step is torch SGD on the corrected direction with the experiment's ``lr`` and
  ``weight_decay`` (weight decay adds wd·x to the direction, as in the reference's base
  optimizer), and without momentum: the paper's update has none, nor does the reference, so by
  default FedSpeed takes the plain step whatever ``training.momentum`` says.
  ``use_training_momentum = true`` applies ``training.momentum`` instead; then ρ = 0, 1/λ = 0 is
  exactly FedAvg under any training config (with the default, when ``training.momentum = 0``).
- No gradient clipping (the reference clips at norm 10) and no per-round learning-rate decay:
  neither is part of the algorithm, and the platform's TrainingConfig has no such knobs.
- ĝ_i lives in the node's run state (Flower's Context.state) under ``fedspeed.g_hat``; it starts at
  zero and is reset for every new experiment. It only changes when 1/λ > 0.
- ‖g1‖ = 0 skips the ascent (x̆ = x_k) instead of dividing by zero.
- **Partial participation.** The server averages the sampled clients' x̂_i, as the paper's
  Algorithm 1 writes it. The reference code's server instead takes the mean of the sampled
  clients' x_K plus a correction from the mean of ĝ over *all* clients (sampled this round or
  not); with every client in every round the two coincide, with a sample they do not: here a
  client's ĝ_i is as old as its last selection, and benchmarks/README.md measured FedSpeed far
  behind FedAvg with 5 of 20 clients per round (Dirichlet 0.1 digits). Use it with full
  participation; the reference rule is not offered (the server would need each client's ĝ_i,
  which only the client holds).
- The server's mean is Flower's FedAvg, weighted by each client's example count. The paper writes
  the plain mean (1/|S|)·Σ x̂_i over clients that hold equally many examples in its experiments,
  where the two coincide; weighting by examples keeps ρ = 0, 1/λ = 0 exactly FedAvg on skewed
  shards too.
- Each update reports ``fedspeed-ghat-norm-start`` (‖ĝ_i‖ when the round's local steps begin: 0 on
  a node's first round of a run, and again in every new run) and ``fedspeed-ghat-norm`` (after the
  correction), so that the state's life across rounds is visible in the database.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from flwr.app import ArrayRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from pydantic import Field
from torch import nn

from florist.client.training import (
    RunningMetrics,
    TrainerHooks,
    TrainingConfig,
    TrainResult,
    TrainTask,
    train_local,
)

from .base import ServerSetup, StrategyConfig, StrategyPlugin
from .fedavg import sampling_kwargs

G_HAT_KEY = "fedspeed.g_hat"


class FedSpeedConfig(StrategyConfig):
    """FedSpeed's hyper-parameters; ρ = 0 and 1/λ = 0 give FedAvg exactly (with the same local
    momentum: ``use_training_momentum = true``, or ``training.momentum = 0``)."""

    rho: float = Field(
        default=0.1,
        ge=0,
        description="Ascent radius ρ of the gradient-perturbation step (paper and reference: 0.1).",
    )
    inv_lambda: float = Field(
        default=0.1,
        ge=0,
        description=(
            "1/λ: weight of the prox term (1/λ)(x − x^t) and step of the correction ĝ "
            "(paper and reference: 0.1). 0 disables the correction."
        ),
    )
    alpha: float = Field(
        default=1.0,
        ge=0,
        le=1,
        description=(
            "Mix g̃ = (1 − α)·g1 + α·g2 of the plain and perturbed gradients (reference code: 1, "
            "the perturbed gradient alone)."
        ),
    )
    normalized_ascent: bool = Field(
        default=True,
        description=(
            "Ascent step ρ·g1/‖g1‖ as in SAM and the reference code; false gives the paper's "
            "Algorithm 1, ρ·g1."
        ),
    )
    # A flag, not an optional number: the task's ConfigRecord drops None, so a null would arrive
    # at the client as the default.
    use_training_momentum: bool = Field(
        default=False,
        description=(
            "Default false: the local step has no momentum, the paper's (and the reference "
            "code's) plain step, whatever training.momentum says; true applies training.momentum."
        ),
    )


def build_server(config: FedSpeedConfig, setup: ServerSetup) -> FedAvg:
    """The server averages the clients' corrected models x̂_i: plain FedAvg."""
    return FedAvg(**sampling_kwargs(setup))  # type: ignore[arg-type]


def _load_g_hat(state: RecordDict, params: list[tuple[str, nn.Parameter]]) -> list[torch.Tensor]:
    """ĝ_i from the node's run state, zeros on the node's first round of the run."""
    record = state.array_records.get(G_HAT_KEY)
    if record is None:
        return [torch.zeros_like(p, memory_format=torch.contiguous_format) for _, p in params]
    stored = record.to_torch_state_dict()
    return [stored[name].to(device=p.device, dtype=p.dtype) for name, p in params]


def _norm(tensors: list[torch.Tensor]) -> float:
    """The L2 norm of a list of tensors taken as one vector."""
    return float(torch.linalg.vector_norm(torch.stack([t.norm() for t in tensors])))


def _mixed_gradient(
    model: nn.Module,
    params: list[nn.Parameter],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    xb: torch.Tensor,
    yb: torch.Tensor,
    config: FedSpeedConfig,
) -> None:
    """Replace each ``p.grad`` (= g1) by g̃ = (1 − α)·g1 + α·∇f(x̆) on the same minibatch."""
    g1 = [p.grad.detach().clone() for p in params]  # type: ignore[union-attr]
    if config.normalized_ascent:
        norm = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in g1])))
        if norm == 0.0 or not math.isfinite(norm):
            return  # x̆ = x_k, so g2 = g1 and g̃ = g1
        scale = config.rho / norm
    else:
        scale = config.rho
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, g in zip(params, g1, strict=True):
            p.add_(g, alpha=scale)
    model.zero_grad()
    loss_fn(model(xb), yb).backward()
    alpha = config.alpha
    with torch.no_grad():
        # Back to x_k exactly (x̆ − ρ·g1/‖g1‖ may differ from x_k in the last bit).
        for p, x, g in zip(params, saved, g1, strict=True):
            p.copy_(x)
            if alpha != 1.0:
                p.grad.mul_(alpha).add_(g, alpha=1.0 - alpha)  # type: ignore[union-attr]


class FedSpeedHooks(TrainerHooks):
    """FedSpeed's client half on the one local loop: the mixed and corrected gradient at each
    step, then the correction ĝ_i (kept in the node's run state) and the model x̂_i sent back."""

    def __init__(self, config: FedSpeedConfig) -> None:
        self.config = config
        self.named: list[tuple[str, nn.Parameter]] = []
        self.start_weights: list[torch.Tensor] = []
        self.g_hat: list[torch.Tensor] = []
        self.g_hat_start = 0.0

    def start(self, task: TrainTask[Any], model: nn.Module) -> None:
        self.named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        self.start_weights = [p.detach().clone() for _, p in self.named]
        self.g_hat = _load_g_hat(task.state, self.named)
        self.g_hat_start = _norm(self.g_hat)

    def optimizer(
        self, params: list[nn.Parameter], training: TrainingConfig
    ) -> torch.optim.Optimizer:
        if not self.config.use_training_momentum:
            training = training.model_copy(update={"momentum": 0.0})
        return super().optimizer(params, training)

    def transform_gradient(
        self, model: nn.Module, params: list[nn.Parameter], x: torch.Tensor, y: torch.Tensor
    ) -> None:
        """g1 → g̃ − ĝ_i + (1/λ)(x_k − x^t), the direction torch's SGD then steps along."""
        config = self.config
        for p in params:
            if p.grad is None:  # a parameter the forward pass did not use
                p.grad = torch.zeros_like(p)
        if config.rho > 0 and config.alpha > 0:
            _mixed_gradient(model, params, self.loss, x, y, config)
        with torch.no_grad():
            for p, g, x0 in zip(params, self.g_hat, self.start_weights, strict=True):
                p.grad.sub_(g)  # type: ignore[union-attr]
                if config.inv_lambda > 0:
                    p.grad.add_(p - x0, alpha=config.inv_lambda)  # type: ignore[union-attr]

    def finish(
        self, task: TrainTask[Any], model: nn.Module, running: RunningMetrics
    ) -> dict[str, float]:
        inv_lambda = self.config.inv_lambda
        if inv_lambda > 0:
            with torch.no_grad():
                for (_, p), g, x0 in zip(self.named, self.g_hat, self.start_weights, strict=True):
                    g.sub_(p - x0, alpha=inv_lambda)  # ĝ_i ← ĝ_i − (1/λ)(x_K − x^t)
                    p.sub_(g / inv_lambda)  # x̂_i = x_K − λ·ĝ_i
            task.state[G_HAT_KEY] = ArrayRecord(
                {
                    name: g.detach().cpu()
                    for (name, _), g in zip(self.named, self.g_hat, strict=True)
                }
            )
        return {
            "fedspeed-ghat-norm-start": self.g_hat_start,
            "fedspeed-ghat-norm": _norm(self.g_hat),
        }


def train(task: TrainTask[FedSpeedConfig]) -> TrainResult:
    """K local FedSpeed steps from x^t on FedAvg's batches (the degenerate case is FedAvg), then
    the correction ĝ_i and the model x̂_i sent back."""
    return train_local(task, FedSpeedHooks(task.config))


plugin = StrategyPlugin(
    name="fedspeed",
    summary=(
        "FedSpeed: local steps on a SAM-perturbed gradient with a prox term and a per-client "
        "correction ĝ; the server averages the corrected models (FedAvg)."
    ),
    config_model=FedSpeedConfig,
    build_server=build_server,
    train=train,
    paper="https://arxiv.org/abs/2302.10429",
    tags=("sync",),
)
