"""FedProx (Li et al., MLSys 2020): FedAvg with a proximal term in the clients' local objective."""

from __future__ import annotations

from typing import Any

import torch
from flwr.serverapp.strategy import FedProx
from pydantic import Field
from torch import nn

from florist.client.training import TrainerHooks, TrainResult, TrainTask, train_local, train_sgd

from .base import ServerSetup, StrategyConfig, StrategyPlugin
from .fedavg import sampling_kwargs


class FedProxConfig(StrategyConfig):
    proximal_mu: float = Field(
        default=0.01,
        ge=0,
        description="Weight μ of the proximal term μ/2·‖w − w_global‖²; 0 gives FedAvg.",
    )


def build_server(config: FedProxConfig, setup: ServerSetup) -> FedProx:
    return FedProx(proximal_mu=config.proximal_mu, **sampling_kwargs(setup))  # type: ignore[arg-type]


class ProximalTerm(TrainerHooks):
    """Adds μ/2·‖w − w_global‖² to the local loss, w_global being the round's start model."""

    def __init__(self, mu: float) -> None:
        self.mu = mu
        self.global_params: list[torch.Tensor] = []

    def start(self, task: TrainTask[Any], model: nn.Module) -> None:
        self.global_params = [p.detach().clone() for p in model.parameters()]

    def extra_loss(self, model: nn.Module) -> torch.Tensor:
        sq = sum(
            ((p - g) ** 2).sum()
            for p, g in zip(model.parameters(), self.global_params, strict=True)
        )
        return 0.5 * self.mu * sq  # type: ignore[return-value]


def train(task: TrainTask[FedProxConfig]) -> TrainResult:
    """Local SGD on f_i(w) + μ/2·‖w − w_global‖²; μ = 0 is plain local SGD."""
    mu = task.config.proximal_mu
    if mu == 0.0:
        return train_sgd(task)
    return train_local(task, ProximalTerm(mu))


plugin = StrategyPlugin(
    name="fedprox",
    summary="FedProx: FedAvg whose clients add a proximal term μ/2·‖w − w_global‖².",
    config_model=FedProxConfig,
    build_server=build_server,
    train=train,
    paper="https://arxiv.org/abs/1812.06127",
    tags=("sync", "flower"),
)
