"""Flower's other built-in message-API strategies as plugins (server-side change, local SGD)."""

from __future__ import annotations

from flwr.serverapp.strategy import (
    FedAdagrad,
    FedAdam,
    FedAvgM,
    FedMedian,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
)
from pydantic import Field

from .base import EmptyConfig, ServerSetup, StrategyConfig, StrategyPlugin
from .fedavg import sampling_kwargs


class FedAvgMConfig(StrategyConfig):
    server_learning_rate: float = Field(default=1.0, gt=0, description="Server-side step size.")
    server_momentum: float = Field(default=0.0, ge=0, lt=1, description="Server momentum β.")


class FedAdagradConfig(StrategyConfig):
    eta: float = Field(default=0.1, gt=0, description="Server learning rate.")
    tau: float = Field(default=1e-3, gt=0, description="Adaptivity (numerical stability) term.")


class FedAdamConfig(StrategyConfig):
    eta: float = Field(default=0.1, gt=0, description="Server learning rate.")
    beta_1: float = Field(default=0.9, ge=0, lt=1)
    beta_2: float = Field(default=0.99, ge=0, lt=1)
    tau: float = Field(default=1e-3, gt=0, description="Adaptivity (numerical stability) term.")


class FedYogiConfig(FedAdamConfig):
    eta: float = Field(default=1e-2, gt=0, description="Server learning rate.")


class FedTrimmedAvgConfig(StrategyConfig):
    beta: float = Field(default=0.2, ge=0, lt=0.5, description="Fraction cut at each end.")


class KrumConfig(StrategyConfig):
    num_malicious_nodes: int = Field(default=0, ge=0, description="Byzantine nodes tolerated, f.")


class MultiKrumConfig(KrumConfig):
    num_nodes_to_select: int = Field(default=1, ge=1, description="Updates averaged, m.")


def _plugin(
    name: str, summary: str, config_model: type[StrategyConfig], cls: type, paper: str
) -> StrategyPlugin:
    # Local training is plain SGD for all of these, so the client half is the default trainer;
    # FedOpt's eta_l is not exposed because the clients' rate is the experiment's training.lr.
    def build_server(config: StrategyConfig, setup: ServerSetup) -> object:
        return cls(**config.model_dump(), **sampling_kwargs(setup))

    return StrategyPlugin(
        name=name,
        summary=summary,
        config_model=config_model,
        build_server=build_server,  # type: ignore[arg-type]
        paper=paper,
        tags=("sync", "flower"),
    )


fedavgm = _plugin(
    "fedavgm",
    "FedAvg with server momentum.",
    FedAvgMConfig,
    FedAvgM,
    "https://arxiv.org/abs/1909.06335",
)
fedadagrad = _plugin(
    "fedadagrad",
    "Adaptive server optimiser: Adagrad on the averaged update.",
    FedAdagradConfig,
    FedAdagrad,
    "https://arxiv.org/abs/2003.00295",
)
fedadam = _plugin(
    "fedadam",
    "Adaptive server optimiser: Adam on the averaged update.",
    FedAdamConfig,
    FedAdam,
    "https://arxiv.org/abs/2003.00295",
)
fedyogi = _plugin(
    "fedyogi",
    "Adaptive server optimiser: Yogi on the averaged update.",
    FedYogiConfig,
    FedYogi,
    "https://arxiv.org/abs/2003.00295",
)
fedmedian = _plugin(
    "fedmedian",
    "Coordinate-wise median of the clients' models (robust).",
    EmptyConfig,
    FedMedian,
    "https://arxiv.org/abs/1803.01498",
)
fedtrimmedavg = _plugin(
    "fedtrimmedavg",
    "Coordinate-wise trimmed mean (robust).",
    FedTrimmedAvgConfig,
    FedTrimmedAvg,
    "https://arxiv.org/abs/1803.01498",
)
krum = _plugin(
    "krum",
    "Krum: the update closest to its neighbours (Byzantine-robust).",
    KrumConfig,
    Krum,
    "https://papers.nips.cc/paper/6617",
)
multikrum = _plugin(
    "multikrum",
    "Multi-Krum: mean of the m updates Krum scores best.",
    MultiKrumConfig,
    MultiKrum,
    "https://papers.nips.cc/paper/6617",
)
