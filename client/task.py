"""What every Florist message carries: the experiment's task spec, flattened into a ConfigRecord."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from florist.client.models import ModelSpec
from florist.client.training import TrainingConfig
from florist.datasets import DatasetSpec

PREFIX = "florist"
# The SuperNode's --node-config, echoed in each training reply: the SuperLink does not keep it,
# and the server records it with the node (device profile, partition) for the dashboard.
NODE_CONFIG_KEY = "node-config"

Scalar = int | float | str | bool | bytes


class StrategyRef(BaseModel):
    """A strategy by registry name, with its (not yet validated) config."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=100, examples=["fedavg"])
    config: dict[str, Any] = Field(default_factory=dict)


class WorkloadRef(BaseModel):
    """A workload by registry name (client/workloads), with its (not yet validated) config."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=100, examples=["digits"])
    config: dict[str, Any] = Field(default_factory=dict)


class TaskSpec(BaseModel):
    """The part of an experiment a client needs to train: identical on every node and round."""

    model_config = ConfigDict(extra="forbid")

    strategy: StrategyRef
    workload: WorkloadRef | None = Field(
        default=None,
        description="What is trained: a workload plugin and its config, e.g. "
        '{"name": "digits", "config": {"partitioner": {"name": "iid"}, "model": {"name": "cnn"}}}.',
    )
    dataset: DatasetSpec | None = Field(
        default=None,
        description="The older spelling of a built-in workload (digits, synthetic): kept "
        "working, stored as `workload` (the dataset's settings and `model` become its config).",
    )
    model: ModelSpec | None = Field(
        default=None, description="With `dataset`: the model (logreg, mlp, cnn)."
    )
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    seed: int = Field(
        default=0,
        ge=0,
        lt=2**63,
        description="Seeds model initialisation, local shuffling and every other draw.",
    )
    clock: Literal["wall", "virtual"] = Field(
        default="wall",
        description="wall: clients really take their device profile's time; virtual: they report "
        "the simulated duration and the event-driven server orders updates by it.",
    )

    @model_validator(mode="after")
    def _one_workload(self) -> Self:
        # Bodies written before workloads existed name a dataset and a model: they are the
        # built-in workload of that name, so every later reader sees only `workload`.
        if self.dataset is None and self.model is None:
            if self.workload is None:
                raise ValueError(
                    "give a `workload` ({'name': ..., 'config': {...}}; GET /api/v1/workloads "
                    "lists them), or the older `dataset` (and `model`)"
                )
            return self
        if self.workload is not None:
            raise ValueError(
                "give either `workload` or the older `dataset` and `model`, not both: "
                "put the dataset's settings and the model in `workload.config`"
            )
        if self.dataset is None:
            raise ValueError("`model` needs a `dataset` (or use `workload`)")
        config = self.dataset.model_dump(mode="json", exclude={"name"})
        if self.model is not None:
            config["model"] = self.model.model_dump(mode="json")
        self.workload = WorkloadRef(name=self.dataset.name, config=config)
        self.dataset = None
        self.model = None
        return self

    @property
    def workload_ref(self) -> WorkloadRef:
        """The workload (always set once validated)."""
        assert self.workload is not None
        return self.workload


def flatten(value: Mapping[str, Any], prefix: str = PREFIX) -> dict[str, Any]:
    """Nested dicts → dotted kebab-case keys holding scalars or lists of scalars.

    ConfigRecord holds only scalars and lists of them, so nested specs travel as
    ``florist.dataset.partitioner.min-partition-size = 10``. ``None`` is dropped (the model's
    default applies again on the other side).
    """
    out: dict[str, Any] = {}
    for key, item in value.items():
        path = f"{prefix}.{key.replace('_', '-')}"
        if isinstance(item, Mapping):
            out.update(flatten(item, path))
        elif item is None:
            continue
        elif isinstance(item, list | tuple):
            if any(isinstance(v, Mapping | list | tuple) or v is None for v in item):
                raise TypeError(f"{path}: only lists of scalars can travel in a ConfigRecord")
            out[path] = list(item)
        else:
            out[path] = item
    return out


def unflatten(config: Mapping[str, Any], prefix: str = PREFIX) -> dict[str, Any]:
    """The inverse of :func:`flatten`; keys outside ``prefix`` are ignored."""
    out: dict[str, Any] = {}
    head = prefix + "."
    for key, item in config.items():
        if not key.startswith(head):
            continue
        parts = [p.replace("-", "_") for p in key[len(head) :].split(".")]
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = item
    return out


def task_to_config(task: TaskSpec) -> dict[str, Any]:
    return flatten(task.model_dump(mode="json"))


def task_from_config(config: Mapping[str, Any]) -> TaskSpec:
    """Decode and validate the task a message carries (raises pydantic.ValidationError)."""
    return TaskSpec.model_validate(unflatten(config))
