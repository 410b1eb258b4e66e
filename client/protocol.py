"""The message protocol of a task: what the server's loop sends and what a reply carries, typed.

Each side encodes and decodes here, and nowhere else reads these keys off a raw record. A train
or evaluate task's ConfigRecord (``config``) holds three things side by side: the experiment's
:class:`~florist.client.task.TaskSpec` flattened under ``florist.*`` (client/task.py), a
:class:`TrainInstruction` / :class:`EvaluateInstruction` under kebab-case keys, and any entries
a strategy adds (e.g. Flower's FedProx: ``proximal-mu``). A training reply holds the arrays, a
MetricRecord ``metrics`` (a :class:`TrainReport` plus the algorithm's own numeric metrics) and
the node's ``node-config``. A node that drops out answers with an error reply that
:class:`Dropout` encodes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, ClassVar, Literal, Self

from flwr.app import Error, MetricRecord
from pydantic import BaseModel, ConfigDict, Field

from florist.client.task import PREFIX, unflatten

ConfigScalar = int | float | str | bool


class _Keyed(BaseModel):
    """A model whose fields travel as kebab-case keys of a Flower record."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @classmethod
    def key(cls, field: str) -> str:
        return field.replace("_", "-")

    def to_record_dict(self) -> dict[str, ConfigScalar]:
        """The fields as record entries; a None is left out (the default holds again)."""
        return {
            self.key(name): value for name, value in self.model_dump().items() if value is not None
        }

    @classmethod
    def from_record_dict(cls, record: Mapping[str, Any]) -> Self:
        """Decode from a record that may hold other entries too (raises ValidationError naming
        the missing or malformed key's field)."""
        return cls.model_validate(
            {name: record[cls.key(name)] for name in cls.model_fields if cls.key(name) in record}
        )


class TrainInstruction(_Keyed):
    """What the loop sends with a training task, besides the task spec and the model."""

    server_round: int = Field(ge=1, description="The round this update is for: version + 1.")
    model_version: int = Field(ge=0, description="The global model's version sent.")
    task_repeat: int = Field(
        default=0,
        ge=0,
        description="How often this node was sent this version before: a repeat trains on "
        "other batches.",
    )
    virtual_time: float | None = Field(
        default=None,
        ge=0,
        allow_inf_nan=False,
        description="Virtual clock: the server's time at dispatch (the node's availability is "
        "read at it). None on the wall clock.",
    )


class EvaluateInstruction(_Keyed):
    """What the loop sends with a federated-evaluation task."""

    server_round: int = Field(ge=1, description="The round whose model is evaluated.")


class _Report(_Keyed):
    """What a reply's MetricRecord ``metrics`` reports besides metrics of its own."""

    @classmethod
    def from_metrics(cls, record: MetricRecord | Mapping[str, Any]) -> Self:
        return cls.from_record_dict(record)

    def to_metrics(self, extra: Mapping[str, float] | None = None) -> MetricRecord:
        """A MetricRecord: the ``extra`` metrics, then the report's keys."""
        return MetricRecord({**(extra or {}), **self.to_record_dict()})  # type: ignore[dict-item]


class EvaluateReport(_Report):
    """What every federated-evaluation reply reports beside its metrics (``eval-loss``, …)."""

    num_examples: int = Field(ge=0, description="Examples evaluated on: the result's weight.")


class TrainReport(_Report):
    """What every training reply reports in its ``metrics`` beside the algorithm's own."""

    num_examples: int = Field(ge=0, description="Examples trained on: the update's weight.")
    local_steps: int | None = Field(default=None, ge=0, description="Optimiser steps taken.")
    train_time: float | None = Field(
        default=None, ge=0, allow_inf_nan=False, description="Seconds the trainer took."
    )
    virtual_duration: float | None = Field(
        default=None,
        ge=0,
        allow_inf_nan=False,
        description="Simulated seconds from dispatch to reply (device profile; virtual clock).",
    )


class TaskClock(BaseModel):
    """The two task-spec fields a ClientApp mod needs before the whole task is decoded."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    seed: int = Field(default=0, ge=0)
    clock: Literal["wall", "virtual"] = "wall"

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> TaskClock:
        return cls.model_validate(unflatten(config, PREFIX))


class Dropout(BaseModel):
    """A node vanishing part-way through its task, as its error reply says."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    CODE: ClassVar[int] = 100  # Flower's own error codes are below 100
    _PATTERN: ClassVar[re.Pattern[str]] = re.compile(
        r"^dropped out \(profile (?P<profile>.*)\) after (?P<after>[0-9.eE+-]+) s$"
    )

    profile: str = Field(description="The node's device profile, described.")
    after_s: float = Field(ge=0, allow_inf_nan=False, description="Seconds of work before.")

    def to_error(self) -> Error:
        return Error(
            code=self.CODE,
            reason=f"dropped out (profile {self.profile}) after {self.after_s:.6f} s",
        )

    @classmethod
    def from_error(cls, error: Error) -> Dropout | None:
        """The dropout an error reply reports, or None for any other error."""
        if error.code != cls.CODE or error.reason is None:
            return None
        match = cls._PATTERN.match(error.reason)
        if match is None:
            return None
        return cls(profile=match["profile"], after_s=float(match["after"]))
