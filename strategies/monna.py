"""MoNNA (Farhadkhani et al., ICML 2023): client-side Polyak momentum, nearest-neighbour averaging.

https://arxiv.org/abs/2302.04444 ("Robust Collaborative Learning with Linear Gradient Overhead").

- **Client half**: each local step uses the node's Polyak momentum m_i ← β·m_i + (1 − β)·g_i and
  steps x ← x − η·m_i (plain SGD on m_i, without torch's own momentum). m_i persists across
  rounds in the node's run state (``monna.momentum``), starting at zero, as in the paper, where
  momentum is what shrinks the honest nodes' variance so that the Byzantine ones stand out.
  β = 0.99 is the paper's.
- **Server half**: MoNNA is decentralised: each honest node averages the n − f models nearest to
  its own. A server has no model of its own that it trusts, so Florist's analogue takes as pivot
  the coordinate-wise median of the updates (robust while f < n/2) and averages the n − f updates
  nearest to it (:func:`~florist.strategies.robust.nearest_neighbour_average`). Like the other
  robust rules it runs under synchronous rounds or a FedBuff-style buffer.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord
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

from .base import ServerSetup, StrategyPlugin
from .events import EventStrategy
from .robust import (
    RobustConfig,
    RobustRule,
    build,
    coordinate_median,
    nearest_neighbour_average,
)

MOMENTUM_KEY = "monna.momentum"


class MonnaConfig(RobustConfig):
    """MoNNA's settings: the clients' momentum β and the server's f."""

    beta: float = Field(
        default=0.99,
        ge=0,
        lt=1,
        description="β of the clients' Polyak momentum m ← β·m + (1 − β)·g (0: plain SGD).",
    )


class PolyakMomentum(TrainerHooks):
    """Replaces each gradient by the node's running momentum, carried across rounds."""

    def __init__(self, beta: float) -> None:
        self.beta = beta
        self.named: list[tuple[str, nn.Parameter]] = []
        self.momentum: list[torch.Tensor] = []

    def start(self, task: TrainTask[Any], model: nn.Module) -> None:
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        record = task.state.array_records.get(MOMENTUM_KEY)
        if record is None:
            self.momentum = [torch.zeros_like(p) for _, p in self.named]
        else:
            stored = record.to_torch_state_dict()
            self.momentum = [stored[n].to(device=p.device, dtype=p.dtype) for n, p in self.named]

    def optimizer(
        self, params: list[nn.Parameter], training: TrainingConfig
    ) -> torch.optim.Optimizer:
        # The momentum is MoNNA's own: torch's would apply a second one on top of it.
        return torch.optim.SGD(params, lr=training.lr, weight_decay=training.weight_decay)

    def transform_gradient(
        self, model: nn.Module, params: list[nn.Parameter], x: torch.Tensor, y: torch.Tensor
    ) -> None:
        with torch.no_grad():
            for (_, p), m in zip(self.named, self.momentum, strict=True):
                if p.grad is None:
                    continue
                m.mul_(self.beta).add_(p.grad, alpha=1.0 - self.beta)
                p.grad.copy_(m)

    def finish(
        self, task: TrainTask[Any], model: nn.Module, running: RunningMetrics
    ) -> dict[str, float]:
        task.state[MOMENTUM_KEY] = ArrayRecord(
            {n: m.detach().cpu() for (n, _), m in zip(self.named, self.momentum, strict=True)}
        )
        norm = float(np.sqrt(sum(float((m.double() ** 2).sum()) for m in self.momentum)))
        return {"monna-momentum-norm": norm}


def train(task: TrainTask[MonnaConfig]) -> TrainResult:
    """Local SGD on the node's Polyak momentum."""
    return train_local(task, PolyakMomentum(task.config.beta))


class NearestNeighbourRule(RobustRule):
    """The mean of the n − f updates nearest to their coordinate-wise median."""

    def combine(self, updates: np.ndarray) -> tuple[np.ndarray, dict[str, float]]:
        pivot = coordinate_median(updates)
        vector, chosen = nearest_neighbour_average(updates, self.config.num_byzantine, pivot)
        return vector, {"robust-selected": float(len(chosen))}


def build_server(config: MonnaConfig, setup: ServerSetup) -> EventStrategy:
    return build(NearestNeighbourRule(config), setup)


plugin = StrategyPlugin(
    name="monna",
    summary="MoNNA: clients' Polyak momentum, mean of the n − f updates nearest the median.",
    config_model=MonnaConfig,
    build_server=build_server,
    train=train,
    paper="https://arxiv.org/abs/2302.04444",
    tags=("sync", "robust"),
)
