"""The strategy plugin contract: a typed config, a server half and a client half."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict

from florist.client.training import TrainResult, TrainTask, train_sgd

if TYPE_CHECKING:
    from flwr.serverapp.strategy import Strategy
    from torch import nn

    from florist.datasets import XY

    from .events import EventStrategy


class StrategyConfig(BaseModel):
    """Base of every plugin's config: unknown fields are refused, never ignored."""

    model_config = ConfigDict(extra="forbid")


class EmptyConfig(StrategyConfig):
    """A strategy with nothing to configure."""


@dataclass(frozen=True)
class ServerSetup:
    """What the server half gets besides its own config: the experiment's sampling settings."""

    num_rounds: int
    min_clients: int
    fraction_train: float = 1.0
    fraction_evaluate: float = 0.0


def default_trainer(task: TrainTask[Any]) -> TrainResult:
    """Plain local SGD: the client half of every strategy that does not change local training."""
    return train_sgd(task)


@dataclass(frozen=True)
class StrategyPlugin:
    """One registered algorithm.

    The server half is ``build_server``: an :class:`~florist.strategies.events.EventStrategy`
    (a Florist scheduler, e.g. FedAsync's), or a Flower ``Strategy``, which runs as synchronous
    rounds of its own ``configure_*``/``aggregate_*`` hooks (strategies/flower_adapter.py). Both
    run on Florist's one loop (server/runtime/loop.py). ``train`` is the client half, run by the
    ClientApp on each training message.
    """

    name: str
    summary: str
    config_model: type[StrategyConfig]
    build_server: Callable[[Any, ServerSetup], EventStrategy | Strategy]
    train: Callable[[TrainTask[Any]], TrainResult] = default_trainer
    # Extra centralized metrics per round (e.g. FAL's robust accuracy): (global model, held-out
    # test data, config) -> metrics recorded with the round beside accuracy and loss.
    server_metrics: Callable[[nn.Module, XY, Any], dict[str, float]] | None = None
    # Why the plugin cannot train a workload's model (e.g. FZooS needs a surrogate buffer), or
    # None; the API checks it on the model built on the meta device and refuses with a 422.
    model_check: Callable[[nn.Module], str | None] | None = None
    paper: str = ""
    tags: tuple[str, ...] = field(default_factory=tuple)

    def parse_config(self, raw: dict[str, Any] | None) -> StrategyConfig:
        """Validate a raw config dict (raises pydantic.ValidationError naming the field)."""
        return self.config_model.model_validate(raw or {})

    def config_schema(self) -> dict[str, Any]:
        """The config's JSON schema, as the API serves it."""
        return self.config_model.model_json_schema()
