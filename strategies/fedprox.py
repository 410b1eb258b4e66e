"""FedProx (Li et al., MLSys 2020): FedAvg with a proximal term in the clients' local objective."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from flwr.serverapp.strategy import FedProx
from pydantic import Field

from .base import ServerSetup, StrategyConfig, StrategyPlugin
from .fedavg import sampling_kwargs

if TYPE_CHECKING:
    from florist.client.training import TrainResult, TrainTask


class FedProxConfig(StrategyConfig):
    proximal_mu: float = Field(
        default=0.01,
        ge=0,
        description="Weight μ of the proximal term μ/2·‖w − w_global‖²; 0 gives FedAvg.",
    )


def build_server(config: FedProxConfig, setup: ServerSetup) -> FedProx:
    return FedProx(proximal_mu=config.proximal_mu, **sampling_kwargs(setup))  # type: ignore[arg-type]


def train(task: TrainTask) -> TrainResult:
    """Local SGD on f_i(w) + μ/2·‖w − w_global‖², w_global being the round's start model."""
    from florist.client.training import train_sgd

    assert isinstance(task.config, FedProxConfig)
    mu = task.config.proximal_mu
    if mu == 0.0:
        return train_sgd(task)
    global_params = [p.detach().clone() for p in task.model.parameters()]

    def proximal(model: torch.nn.Module) -> torch.Tensor:
        sq = sum(
            ((p - g) ** 2).sum() for p, g in zip(model.parameters(), global_params, strict=True)
        )
        return 0.5 * mu * sq  # type: ignore[return-value]

    return train_sgd(task, extra_loss=proximal)


plugin = StrategyPlugin(
    name="fedprox",
    summary="FedProx: FedAvg whose clients add a proximal term μ/2·‖w − w_global‖².",
    config_model=FedProxConfig,
    build_server=build_server,
    train=train,
    paper="https://arxiv.org/abs/1812.06127",
    tags=("sync", "flower"),
)
