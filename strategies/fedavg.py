"""FedAvg (McMahan et al., AISTATS 2017) as a plugin: Flower's own server half, plain local SGD.

Written once: Flower's ``FedAvg`` picks each round's nodes and averages their models, driven by
Florist's synchronous rounds (strategies/rounds.py through strategies/flower_adapter.py), which
add the experiment's dropout policy, clocks and time budget.
"""

from __future__ import annotations

from flwr.serverapp.strategy import FedAvg

from .base import EmptyConfig, ServerSetup, StrategyPlugin


def sampling_kwargs(setup: ServerSetup) -> dict[str, float | int]:
    """Flower's sampling arguments from the experiment's ``clients`` section."""
    return {
        "fraction_train": setup.fraction_train,
        "fraction_evaluate": setup.fraction_evaluate,
        "min_train_nodes": setup.min_clients,
        "min_evaluate_nodes": setup.min_clients if setup.fraction_evaluate > 0 else 0,
        "min_available_nodes": setup.min_clients,
    }


def build_server(config: EmptyConfig, setup: ServerSetup) -> FedAvg:
    return FedAvg(**sampling_kwargs(setup))  # type: ignore[arg-type]


plugin = StrategyPlugin(
    name="fedavg",
    summary="Federated Averaging: weighted mean of the clients' models after local SGD.",
    config_model=EmptyConfig,
    build_server=build_server,
    paper="https://arxiv.org/abs/1602.05629",
    tags=("sync", "flower"),
)
