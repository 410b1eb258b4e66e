"""Workload plugins: what is trained (model, each client's data, loss, optimiser, metrics)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn
from torch.nn import functional as F

from florist.client.plugins import PluginRegistry, UnknownPluginError
from florist.client.training import TrainingConfig, classification_metrics, sgd_optimizer
from florist.datasets import XY, InputRange

ENTRY_POINT_GROUP = "florist.workloads"
# The SuperNode node-config keys a workload's data comes from.
DATA_PATH_KEY = "data-path"
PARTITION_ID_KEY = "partition-id"
NUM_PARTITIONS_KEY = "num-partitions"

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
OptimizerFactory = Callable[[list[nn.Parameter], TrainingConfig], torch.optim.Optimizer]
Metrics = Callable[[torch.Tensor, torch.Tensor], dict[str, float]]


class WorkloadConfig(BaseModel):
    """Base of every workload's config: unknown fields are refused, never ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class WorkloadDataError(ValueError):
    """A node's data is missing or malformed; the node reports it to the run instead of crashing.

    The message is what the run records for the node's failed update, so say what is wrong and
    how to fix it (the path, the file, the expected format).
    """


@dataclass(frozen=True)
class ClientData:
    """Where one node's data is: its own folder (``data-path`` in its node-config), or its slice
    of a simulated federation (``partition-id`` of ``num-partitions``).

    A workload's loader reads what it supports and raises :class:`WorkloadDataError` otherwise
    (:meth:`require_path`, :meth:`require_partition` say so in the usual words).
    """

    data_path: Path | None = None
    partition_id: int | None = None
    num_partitions: int | None = None
    seed: int = 0

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any], seed: int = 0) -> ClientData:
        """Read the node-config keys (raises WorkloadDataError on a malformed partition)."""
        raw_path = node_config.get(DATA_PATH_KEY)
        path = Path(str(raw_path)).expanduser() if raw_path not in (None, "") else None
        pid, num = node_config.get(PARTITION_ID_KEY), node_config.get(NUM_PARTITIONS_KEY)
        if pid is None and num is None:
            return cls(data_path=path, seed=seed)
        try:
            pid_i, num_i = int(pid), int(num)  # type: ignore[arg-type]
        except (TypeError, ValueError) as exc:
            raise WorkloadDataError(
                f"node-config needs both {PARTITION_ID_KEY} and {NUM_PARTITIONS_KEY} as integers"
                f" (got {PARTITION_ID_KEY}={pid!r}, {NUM_PARTITIONS_KEY}={num!r})"
            ) from exc
        if not 0 <= pid_i < num_i:
            raise WorkloadDataError(f"{PARTITION_ID_KEY} {pid_i} is not in [0, {num_i})")
        return cls(data_path=path, partition_id=pid_i, num_partitions=num_i, seed=seed)

    def require_path(self, workload: str) -> Path:
        """The node's own data folder; it must exist."""
        if self.data_path is None:
            raise WorkloadDataError(
                f"workload {workload!r} reads each node's own data: start the SuperNode with "
                f"--node-config '{DATA_PATH_KEY}=/path/to/data' (florist client --data-path)"
            )
        if not self.data_path.exists():
            raise WorkloadDataError(f"{DATA_PATH_KEY} {self.data_path} does not exist on this node")
        return self.data_path

    def require_partition(self, workload: str) -> tuple[int, int]:
        """This node's slice of a simulated federation."""
        if self.partition_id is None or self.num_partitions is None:
            raise WorkloadDataError(
                f"workload {workload!r} gives each node a slice of one dataset: start the "
                f"SuperNode with --node-config '{PARTITION_ID_KEY}=N {NUM_PARTITIONS_KEY}=M'"
            )
        return self.partition_id, self.num_partitions


@dataclass(frozen=True)
class WorkloadPlugin:
    """One registered workload: what every strategy trains when an experiment names it.

    Parameters
    ----------
    name, summary : str
        Registry name and a one-line description (the API and dashboard list it).
    config_model : type[WorkloadConfig]
        The workload's settings, validated once at the API's edge (a bad value is a 422).
    build_model : (config) -> nn.Module
        A fresh module; initialisation uses torch's global generator, which the caller seeds.
        Every node and the server build the same architecture from the same config.
    load_train : (config, ClientData) -> XY
        This node's training data, read on the node (its own ``data-path``, or its partition of
        a simulated federation). Raise :class:`WorkloadDataError` for missing or malformed data.
    load_test, load_validation : (config) -> XY, optional
        Held-out data the *server* evaluates each global model on: the test split is reported,
        the validation split chooses the best round. None: no centralized evaluation.
    load_local_test : (config, ClientData) -> XY, optional
        The node's own evaluation data, for federated evaluation.
    loss : (outputs, targets) -> scalar tensor, default cross-entropy
    optimizer : (params, TrainingConfig) -> torch optimiser, default SGD with the experiment's
        learning rate, momentum and weight decay. A strategy that prescribes its own local step
        (FedSpeed) builds on it.
    metrics : (outputs, targets) -> dict, default ``{"accuracy": …}``
        Evaluation metrics over a whole split; ``loss`` is always reported beside them.
    input_range : (config) -> (low, high) or None
        The valid input range (for attacks that must stay inside it: FAL); None is unbounded.
    data_extent : (config) -> (low, high), optional
        The smallest and largest input value over all of the workload's data, where the server
        can know it (generated data); otherwise checks fall back to the server's held-out data.
    """

    name: str
    summary: str
    config_model: type[WorkloadConfig]
    build_model: Callable[[Any], nn.Module]
    load_train: Callable[[Any, ClientData], XY]
    load_test: Callable[[Any], XY] | None = None
    load_validation: Callable[[Any], XY] | None = None
    load_local_test: Callable[[Any, ClientData], XY] | None = None
    loss: Loss = F.cross_entropy
    optimizer: OptimizerFactory = sgd_optimizer
    metrics: Metrics = classification_metrics
    input_range: Callable[[Any], InputRange] = field(default=lambda config: None)
    data_extent: Callable[[Any], tuple[float, float]] | None = None
    tags: tuple[str, ...] = ()

    def parse_config(self, raw: Mapping[str, Any] | None) -> WorkloadConfig:
        """Validate a raw config dict (raises pydantic.ValidationError naming the field)."""
        return self.config_model.model_validate(dict(raw or {}))

    def config_schema(self) -> dict[str, Any]:
        """The config's JSON schema, as the API serves it."""
        return self.config_model.model_json_schema()


class UnknownWorkloadError(UnknownPluginError):
    """No workload of that name; the message lists the known ones."""


class WorkloadRegistry(PluginRegistry[WorkloadPlugin]):
    """Workload plugins by name (see :class:`~florist.client.plugins.PluginRegistry`)."""

    kind = "workload"
    unknown_error = UnknownWorkloadError

    def __init__(self, group: str = ENTRY_POINT_GROUP) -> None:
        super().__init__(group, WorkloadPlugin)


@lru_cache(maxsize=1)
def default_workloads() -> WorkloadRegistry:
    """The process-wide workload registry over the installed entry points."""
    return WorkloadRegistry()


__all__ = [
    "DATA_PATH_KEY",
    "ENTRY_POINT_GROUP",
    "ClientData",
    "UnknownWorkloadError",
    "WorkloadConfig",
    "WorkloadDataError",
    "WorkloadPlugin",
    "WorkloadRegistry",
    "default_workloads",
]
