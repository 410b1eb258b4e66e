"""Fleet files: the device profiles of N SuperNodes, drawn from a distribution or listed.

A fleet file (TOML, kebab-case keys like the node-config it produces; see examples/fleet.toml)
either draws N speeds, as the FedCompass paper does (normal(mean, sd) truncated to positive
values, or exponential(mean)), or lists each node's profile under ``[[node]]``. Draws are
deterministic by the file's ``seed``. :func:`load_fleet` returns each node's node-config entries;
the caller adds ``partition-id`` and ``num-partitions``.
"""

from __future__ import annotations

import random
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from florist.client.profiles import PROFILE_KEYS, ProfileError, profile_from_node_config

NodeConfig = dict[str, int | float | str]


def _kebab(name: str) -> str:
    return name.replace("_", "-")


class _Kebab(BaseModel):
    model_config = ConfigDict(extra="forbid", alias_generator=_kebab, populate_by_name=True)


class SpeedDistribution(_Kebab):
    """Seconds per local step, drawn per node."""

    distribution: Literal["normal", "exponential"]
    mean: float = Field(gt=0, allow_inf_nan=False, description="Mean seconds per step.")
    sd: float | None = Field(
        default=None, ge=0, allow_inf_nan=False, description="normal only: standard deviation."
    )

    @model_validator(mode="after")
    def _sd_matches(self) -> SpeedDistribution:
        if self.distribution == "normal" and self.sd is None:
            raise ValueError("a normal distribution needs sd")
        if self.distribution == "exponential" and self.sd is not None:
            raise ValueError("an exponential distribution has no sd (its sd is its mean)")
        return self

    def draw(self, rng: random.Random) -> float:
        if self.distribution == "exponential":
            return rng.expovariate(1.0 / self.mean)
        assert self.sd is not None
        if self.sd == 0:
            return self.mean
        # Truncated to positive values by rejection; fine unless sd ≫ mean.
        for _ in range(10_000):
            value = rng.gauss(self.mean, self.sd)
            if value > 0:
                return value
        raise ValueError(f"normal({self.mean}, {self.sd}) hardly ever draws a positive speed")


class FleetSpec(_Kebab):
    """A fleet: ``nodes`` + ``speed`` (drawn), or an explicit ``[[node]]`` list."""

    seed: int = 0
    nodes: int | None = Field(default=None, ge=1, le=1000)
    speed: SpeedDistribution | None = None
    # Applied to every drawn node; an explicit [[node]] entry sets its own.
    availability: float | None = None
    period_s: float | None = None
    dropout: float | None = None
    bandwidth_mbps: float | None = None
    node: list[NodeConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _drawn_or_listed(self) -> FleetSpec:
        if self.node and (self.nodes is not None or self.speed is not None):
            raise ValueError("give either nodes and speed (drawn) or [[node]] entries, not both")
        if not self.node and (self.nodes is None or self.speed is None):
            raise ValueError("give nodes and speed (drawn) or a list of [[node]] entries")
        return self

    def node_configs(self) -> list[NodeConfig]:
        if self.node:
            return [dict(entry) for entry in self.node]
        assert self.nodes is not None and self.speed is not None
        rng = random.Random(self.seed)
        shared: NodeConfig = {
            _kebab(k): v
            for k, v in self.model_dump(
                include={"availability", "period_s", "dropout", "bandwidth_mbps"}
            ).items()
            if v is not None
        }
        # Six significant digits: readable on the command line, and plenty for a speed.
        return [
            {"seconds-per-step": float(f"{self.speed.draw(rng):.6g}"), **shared}
            for _ in range(self.nodes)
        ]


class FleetError(ValueError):
    """A fleet file that cannot be used."""


def load_fleet(path: Path | str) -> list[NodeConfig]:
    """Each node's profile node-config entries (``profile``, ``seconds-per-step``, …)."""
    path = Path(path)
    try:
        spec = FleetSpec.model_validate(tomllib.loads(path.read_text()))
    except (tomllib.TOMLDecodeError, OSError) as exc:
        raise FleetError(f"{path}: {exc}") from exc
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        raise FleetError(f"{path}: {loc}: {err['msg']}") from None
    configs = spec.node_configs()
    allowed = {"profile", *PROFILE_KEYS}
    for i, config in enumerate(configs):
        unknown = sorted(set(config) - allowed)
        if unknown:
            raise FleetError(f"{path}: node {i}: unknown key {unknown[0]!r}; known: {allowed}")
        try:
            profile_from_node_config(config)
        except ProfileError as exc:
            raise FleetError(f"{path}: node {i}: {exc}") from None
    return configs
